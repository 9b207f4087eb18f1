"""What a loaded version must stop answering after later commits (index_version.withdrawn_since):
the shortcut for commits that only append runs and tombstones and the full comparison both give
the rule's answer, and the shortcut reads no feature file."""
from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from cart_core.identifiers import IdentifierTable
from cart_core.index_version import IndexVersion, withdrawn_since
from cart_core.store import Manifest, Store


class History:
    """Manifests of a store built one commit at a time, the way imports, reindexes and deletes
    write them: feature runs and tombstone runs only ever appended."""

    def __init__(self, store: Store):
        self.store, self.runs, self.tombs, self.versions = store, [], [], []

    def _commit(self) -> IndexVersion:
        version = IndexVersion(self.store, Manifest(version=len(self.versions) + 1, features=list(self.runs),
                                                    extra={"tombstones": list(self.tombs)}))
        self.versions.append(version)
        return version

    def add(self, items: list[str]) -> IndexVersion:
        """A feature run holding `items` (new ones, or new content of items already there)."""
        run = f"features/run-{len(self.runs)}"
        self.store.write_table(pa.table({"item_id": items, "content_hash": [f"{i}@{run}" for i in items]}),
                               f"{run}/part-0.parquet")
        self.runs.append(run)
        return self._commit()

    def retire(self, version: IndexVersion, items: list[str]) -> IndexVersion:
        """A tombstone run retiring the live rows `items` have in `version` (a delete; with an add
        of the same items after it, an update)."""
        owners = dict(zip(*(version.live_rows().column(c).to_pylist() for c in ("item_id", "run"))))
        run = f"tombstones/t-{len(self.tombs)}"
        pairs = [(i, owners[i]) for i in items if i in owners]
        self.store.write_table(pa.table({"item_id": [i for i, _ in pairs], "feature_run": [r for _, r in pairs]}),
                               f"{run}/tombstones.parquet")
        self.tombs.append(run)
        return self._commit()


def reference_withdrawn(table: IdentifierTable, held: IndexVersion, current: IndexVersion) -> set[str]:
    """The rule, read plainly: a live item of `table` with no live row in `current`, or whose live row
    in `held` a tombstone `current` names and `held` does not retires."""
    ids = set(table.item_ids[table.live].tolist())
    alive = set(current.live_rows().column("item_id").to_pylist())
    newer = [r for r in current.manifest.extra["tombstones"] if r not in held.manifest.extra["tombstones"]]
    retired = set()
    for run in newer:
        t = held.store.read_table(run)
        retired |= set(zip(t.column("item_id").to_pylist(), t.column("feature_run").to_pylist()))
    rows = held.live_rows()
    held_rows = set(zip(rows.column("item_id").to_pylist(), rows.column("run").to_pylist()))
    return {i for i in ids if i not in alive} | {i for i, r in held_rows & retired if i in ids}


def table_of(version: IndexVersion) -> IdentifierTable:
    """An identifier table over `version`'s live items (what a replica loaded from it)."""
    ids = np.array(version.live_rows().column("item_id").to_pylist(), dtype=object)
    return IdentifierTable(ids, np.zeros((len(ids), 2), np.int64), [1, len(ids) + 1], np.ones(len(ids), bool))


def random_history(store: Store, seed: int, steps: int = 14) -> History:
    rng = np.random.default_rng(seed)
    history, made = History(store), 0
    history.add([f"i{k}" for k in range(12)])
    made = 12
    for _ in range(steps):
        current = history.versions[-1]
        live = current.live_rows().column("item_id").to_pylist()
        some = sorted(rng.choice(live, size=min(len(live), int(rng.integers(1, 4))), replace=False).tolist())
        op = rng.choice(["add", "delete", "update", "import_again", "readd"])
        if op == "add":
            history.add([f"i{made + k}" for k in range(3)])
            made += 3
        elif op == "delete":
            history.retire(current, some)
        elif op == "update":  # reindex --update: the old row retired, the new content appended
            history.retire(current, some)
            history.add(some)
        elif op == "import_again":  # new content with no delete: the later run's row wins
            history.add(some)
        else:  # deleted, then added again by a later import
            history.retire(current, some)
            history.add(some)
    return history


@pytest.mark.parametrize("seed", range(6))
def test_an_appending_commit_withdraws_what_the_full_comparison_withdraws(tmp_path, seed):
    history = random_history(Store(tmp_path / f"s{seed}"), seed)
    compared = withdrew = 0
    for i, held in enumerate(history.versions):
        table = table_of(held)
        for current in history.versions[i + 1:]:
            expected = reference_withdrawn(table, held, current)
            assert withdrawn_since(table, held, current) == expected, (held.version, current.version)
            if (held.version + current.version) % 6 == 0:  # and the full comparison a rollback takes
                rolled = IndexVersion(current.store, replace(current.manifest,
                                                             features=current.manifest.features[::-1]))
                assert withdrawn_since(table, held, rolled) == reference_withdrawn(table, held, rolled)
            compared, withdrew = compared + 1, withdrew + bool(expected)
    assert compared > 50 and withdrew > 10  # the histories exercise the cases, not only empty answers


def test_a_delete_an_update_and_an_import_again_each_count_as_they_should(tmp_path):
    history = History(Store(tmp_path / "s"))
    held = history.add(["a", "b", "c", "d"])
    table = table_of(held)
    history.retire(held, ["a"])                              # deleted
    later = history.retire(history.versions[-1], ["b"])
    later = history.add(["b", "c"])                          # b: updated (retired, new content); c: imported again
    assert withdrawn_since(table, held, later) == {"a", "b"}
    # an item added after the loaded version, then deleted, was never answered by it
    history.add(["e"])
    gone = history.retire(history.versions[-1], ["e"])
    assert withdrawn_since(table, held, gone) == {"a", "b"}
    # an item the replica already withdrew is not live in its table: not named again
    masked = IdentifierTable(table.item_ids, table.codes, table.vocab_sizes, table.item_ids != "a")
    assert withdrawn_since(masked, held, gone) == {"b"}


def test_an_appending_commit_is_answered_from_its_new_tombstones_alone(tmp_path):
    """A replica keeps its version's live rows (IndexVersion.pinned); a takedown then reads the
    delete's tombstones and no feature file, whatever the catalog size."""
    store = Store(tmp_path / "s")
    history = History(store)
    held = history.add([f"i{k}" for k in range(50)]).pinned()
    history.add(["n0", "n1"])
    current = history.retire(history.versions[-1], ["i3", "n1"])
    for run in history.runs:
        shutil.rmtree(tmp_path / "s" / run)
    assert withdrawn_since(table_of(held), held, current) == {"i3"}
