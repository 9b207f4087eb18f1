"""The query rules serve, retrieve and evaluate share (pipelines/queries.py), and the retrieve
output's temporary file: removed when the job fails, and when a killed run left it behind."""
from __future__ import annotations

import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cart_core.config import QueryConfig
from cart_core.errors import BadInput
from pipelines.queries import QueryRefused, check_k, normalize_query, read_query_table
from pipelines.retrieve import RESULT_SCHEMA, write_tables

RULES = QueryConfig()


@pytest.mark.parametrize("text, expected", [
    ("a dog", "a dog"),
    ("  a\tdog\n\non the\u2028beach  ", "a dog on the beach"),
    ("cafe\u0301", "caf\u00e9"),                     # NFC
    ("a\x00dog\x07", "a dog"),                      # control characters become spaces
    ("zero\u200bwidth", "zero width"),              # format characters too
    ("x" * 1000, "x" * 1000),
])
def test_normalize_query(text, expected):
    assert normalize_query(text, RULES) == expected


@pytest.mark.parametrize("text, reason", [
    (None, "query is null"),
    (7, "query must be text, got int"),
    ("", "query is empty"),
    (" \t\x00 ", "query is empty"),
    ("a \ud800 b", "query is not valid Unicode (lone surrogate at character 2)"),
    ("x" * 1001, "query is 1001 characters; at most 1000"),
    ("x" * 60_000_000, "query is 60000000 characters; at most 1000"),
])
def test_refused_queries_say_why(text, reason):
    with pytest.raises(QueryRefused) as exc:
        normalize_query(text, RULES)
    assert exc.value.reason == reason and len(str(exc.value)) < 200


@pytest.mark.parametrize("k", [0, -3, 101, 10**9, 2.5, "3", True, None])
def test_k_outside_the_rules_is_refused(k):
    with pytest.raises(QueryRefused, match=r"k must be an integer in \[1, 100\]"):
        check_k(k, RULES)


def test_query_table_skips_and_counts_by_reason(tmp_path):
    path = tmp_path / "q.parquet"
    pq.write_table(pa.table({"query_id": [1, 2, 3, 4, 5],
                             "text": ["a dog", None, "  ", "a\u00a0cat", "y" * 2000]}), path)
    checked = read_query_table(str(path), RULES)
    assert checked.table.to_pydict() == {"query_id": ["1", "4"], "text": ["a dog", "a cat"]}
    assert checked.source_rows == [0, 3]
    assert checked.report() == {"queries_read": 5, "queries_skipped": 3, "skipped_by_reason": {
        "query is null": {"count": 1, "first_row": 1}, "query is empty": {"count": 1, "first_row": 2},
        "query is 2000 characters; at most 1000": {"count": 1, "first_row": 4}}}


def test_query_table_refuses_a_folder_and_float_ids(tmp_path):
    with pytest.raises(BadInput, match="is a folder"):
        read_query_table(str(tmp_path), RULES)
    pq.write_table(pa.table({"query_id": [1.5], "text": ["a"]}), tmp_path / "q.parquet")
    with pytest.raises(BadInput, match="column query_id must hold strings or integers, got double"):
        read_query_table(str(tmp_path / "q.parquet"), RULES)


def failing_results():
    """A result stream that breaks after its first batch, as a dying actor pool does."""
    yield pa.table({"query_id": ["q"], "rank": pa.array([1], pa.int32()), "item_id": ["i"],
                    "score": pa.array([1.0], pa.float32())})
    raise RuntimeError("actor died")


def test_failed_retrieve_leaves_no_temporary_output(tmp_path):
    out = tmp_path / "results.parquet"
    with pytest.raises(RuntimeError, match="actor died"):
        write_tables(failing_results(), str(out))
    assert list(tmp_path.iterdir()) == []


def test_a_killed_runs_temporary_output_is_removed_by_the_next(tmp_path):
    out = tmp_path / "results.parquet"
    proc = subprocess.Popen(["true"])  # a pid that has exited
    proc.wait()
    stale = tmp_path / f"results.parquet.tmp-{proc.pid}-abcd1234"
    stale.write_bytes(b"half a file")
    live = tmp_path / f"results.parquet.tmp-{os.getpid()}-abcd1234"  # a running writer's: kept
    live.write_bytes(b"in progress")

    done = [pa.table({n: pa.array([], t) for n, t in zip(RESULT_SCHEMA.names, RESULT_SCHEMA.types)})]
    assert write_tables(done, str(out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["results.parquet", live.name])
    assert pq.read_table(out).num_rows == 0
