"""How a job places the item vectors it loads (pipelines/verify.py): by each item's live row, with
Arrow columns read without a numpy object per row, whatever the rows' order."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cart_core.identifiers import IdentifierTable, live_row_index, live_rows
from pipelines.stages import column_rows, stack_column
from pipelines.verify import _scatter


def table_of(ids: list[str], live: list[bool]) -> IdentifierTable:
    n = len(ids)
    return IdentifierTable(np.array(ids, dtype=object), np.zeros((n, 2), np.int64), [1, n], np.array(live))


def naive_scatter(out: np.ndarray, table: IdentifierTable, ids: list[str], vectors: np.ndarray) -> None:
    """The reference: one item at a time, by its live row."""
    row_of = {str(i): r for r, i in enumerate(table.item_ids) if table.live[r]}
    for j, item in enumerate(ids):
        if item in row_of:
            out[row_of[item]] = vectors[j]


@pytest.mark.parametrize("deletes", [False, True])
@pytest.mark.parametrize("order", ["table", "runs", "shuffled"])
def test_vectors_land_on_each_items_live_row_whatever_the_order(order, deletes):
    """In table order or in long runs (block copies), shuffled (one fancy-indexed copy)."""
    rng = np.random.default_rng(0)
    ids = [f"i{j}" for j in range(3000)]
    live = rng.random(3000) > (0.1 if deletes else 0.0)  # some rows deleted
    table = table_of(ids + ["i7"], list(live) + [True])  # i7 updated: its live row is the last one
    table.live[7] = False
    given = ids + ["unknown-1", "unknown-2"]
    if order == "runs":                                # files in another order than the table's rows
        given = given[2000:] + given[:2000]
    elif order == "shuffled":
        given = [given[j] for j in rng.permutation(len(given))]
    vectors = rng.normal(size=(len(given), 8)).astype(np.float32)
    want, got = np.zeros((len(table.item_ids), 8), np.float32), np.zeros((len(table.item_ids), 8), np.float32)
    naive_scatter(want, table, given, vectors)
    _scatter(got, table, pa.array(given), vectors)
    np.testing.assert_array_equal(got, want)
    got[:] = 0
    _scatter(got, table, given, vectors)              # a list works the same
    np.testing.assert_array_equal(got, want)
    assert got[-1].any() and not got[7].any()
    assert dict(zip(given, live_row_index(table, given).tolist())) == {
        **{i: -1 for i in given}, **live_rows(table, given)}


def test_nothing_known_changes_nothing():
    every_row_dead = table_of(["a", "b"], [False, False])  # every item deleted: no live row to find
    assert live_row_index(every_row_dead, ["a", "b", "c"]).tolist() == [-1, -1, -1]
    assert live_rows(every_row_dead, ["a"]) == {}
    table = table_of(["a", "b"], [True, False])
    out = np.zeros((2, 3), np.float32)
    _scatter(out, table, ["b", "c"], np.ones((2, 3), np.float32))
    _scatter(out, table, [], np.zeros((0, 3), np.float32))
    assert not out.any()


def test_list_columns_read_as_rows_like_a_stack_of_them():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 6)
    chunked = pa.chunked_array([fixed.slice(0, 20), fixed.slice(20)])
    kept = pa.table({"v": chunked}).filter(pa.array(np.arange(50) % 3 != 0)).column("v")
    np.testing.assert_array_equal(column_rows(chunked), x)
    np.testing.assert_array_equal(column_rows(kept), x[np.arange(50) % 3 != 0])
    np.testing.assert_array_equal(column_rows(fixed.slice(5, 10)), x[5:15])
    variable = pa.array([list(map(float, r)) for r in x[:4]], pa.list_(pa.float64()))
    np.testing.assert_array_equal(column_rows(variable), stack_column(variable.to_numpy(zero_copy_only=False)))
    empty = column_rows(pa.chunked_array([], pa.list_(pa.float32(), 6)), width=6)
    assert empty.shape == (0, 6) and empty.dtype == np.float32
