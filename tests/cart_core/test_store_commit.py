"""The commit protocol of cart_core/store.py: guarded, rebased or refused, never lost.

Real files, real threads and processes racing on one store (the S3 variant is in
tests/pipelines/test_store_integrity.py, beside the local S3 server).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import threading
from dataclasses import replace

import pytest

from cart_core.store import CommitConflict, Manifest, Store, StoreError


def test_commit_replays_a_non_conflicting_change_on_the_newer_version(tmp_path):
    store = Store(tmp_path)
    base = store.commit(Manifest(features=["features/a"], dim=4), "import a")
    other = store.commit(replace(base, features=base.features + ["features/b"]), "import b", base=base)
    mine = store.commit(replace(base, ids="ids/q", codebooks="codebooks/q"), "quantize", base=base)
    assert mine.version == 3 and mine.features == ["features/a", "features/b"] and mine.ids == "ids/q"
    assert other.version == 2 and store.manifest() == mine


def test_both_appending_to_a_list_merges_and_a_read_key_conflicts(tmp_path):
    store = Store(tmp_path)
    base = store.commit(Manifest(features=["features/a"]), "a")
    store.commit(replace(base, features=base.features + ["features/b"]), "b", base=base)
    merged = store.commit(replace(base, features=base.features + ["features/c"]), "c", base=base)
    assert merged.features == ["features/a", "features/b", "features/c"]
    with pytest.raises(CommitConflict, match=r"version 3 \('c'\).*features \(read by this job\)"):
        store.commit(replace(base, features=base.features + ["features/d"]), "d", base=base, reads={"features"})
    assert store.manifest().version == 3  # nothing was committed


def test_changing_the_same_key_is_refused_with_the_key_named(tmp_path):
    store = Store(tmp_path)
    base = store.commit(Manifest(ids="ids/1", extra={"tombstones": []}), "base")
    store.commit(replace(base, ids="ids/reindex", extra={"tombstones": ["tombstones/r"]}), "reindex", base=base)
    with pytest.raises(CommitConflict, match=r"ids \(changed by both\)"):
        store.commit(replace(base, ids="ids/quantize"), "quantize", base=base)
    with pytest.raises(CommitConflict, match=r"extra.tombstones \(read by this job\)"):
        store.commit(replace(base, generator="generator/t"), "train", base=base, reads={"extra.tombstones"})
    assert store.manifest().ids == "ids/reindex"


def _commit_many(url: str, tag: str, n: int) -> None:
    store = Store(url)
    for i in range(n):
        base = store.manifest()
        store.commit(replace(base, features=base.features + [f"features/{tag}-{i}"]), f"{tag} {i}", base=base)


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_racing_committers_lose_nothing_locally(tmp_path, workers):
    url, n = str(tmp_path / "store"), 15
    if workers == "threads":
        jobs = [threading.Thread(target=_commit_many, args=(url, t, n)) for t in "abcd"]
    else:
        jobs = [multiprocessing.get_context("spawn").Process(target=_commit_many, args=(url, t, n)) for t in "abcd"]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    store = Store(url)
    final = store.manifest()
    assert final.version == 4 * n
    assert sorted(final.features) == sorted(f"features/{t}-{i}" for t in "abcd" for i in range(n))
    assert [m.version for m in store.versions()] == list(range(1, 4 * n + 1))


def test_a_committer_killed_before_its_pointer_write_has_still_committed(tmp_path):
    store = Store(tmp_path)
    first = store.commit(Manifest(features=["features/a"]), "a")
    # the history file is the commit point; manifest.json is a pointer readers follow forward
    late = replace(first, version=2, features=["features/a", "features/b"], message="b")
    (tmp_path / "manifests" / "v000002.json").write_text(late.to_json())
    assert store.manifest().version == 2 and store.manifest().features == late.features
    assert store.commit(replace(store.manifest(), ids="ids/x"), "c").version == 3
    assert json.loads((tmp_path / "manifest.json").read_text())["version"] == 3


def test_a_corrupted_pointer_names_the_file_and_the_repair(tmp_path):
    store = Store(tmp_path)
    store.commit(Manifest(features=["features/a"]), "a")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"manifest.json: not valid JSON.*cart check --store .* --repair"):
        store.manifest()

def test_a_relative_local_store_is_named_by_its_absolute_path(tmp_path, monkeypatch):
    """Ray workers run in other folders: the URL they are handed must name the same store."""
    monkeypatch.chdir(tmp_path)
    store = Store("idx/")
    assert store.url == str(tmp_path / "idx") and Store(store.url).root == store.root
    assert Store("s3://bucket/prefix/").url == "s3://bucket/prefix"


def test_a_committer_that_keeps_losing_backs_off_longer_then_gives_up(tmp_path, monkeypatch):
    """Each lost race waits a random time under a bound that doubles (so racing committers spread out
    instead of retrying in lock-step); after COMMIT_ATTEMPTS losses nothing is committed."""
    import cart_core.store as store_module

    store = Store(tmp_path)
    base = store.commit(Manifest(features=["features/a"]), "a")
    waits = []
    monkeypatch.setattr(store_module.time, "sleep", waits.append)
    monkeypatch.setattr(Store, "_create_exclusive", lambda self, path, data: False)  # every race is lost
    with pytest.raises(CommitConflict, match=f"after {store_module.COMMIT_ATTEMPTS} attempts"):
        store.commit(replace(base, ids="ids/x"), "x", base=base)
    bounds = [store_module.backoff_bound(a) for a in range(1, store_module.COMMIT_ATTEMPTS)]
    assert len(waits) == store_module.COMMIT_ATTEMPTS - 1  # none before the first attempt
    assert all(0 <= w <= b for w, b in zip(waits, bounds))
    assert bounds[0] == 0.005 and bounds[1] == 0.01 and bounds[-1] == 1.0
    assert sum(waits[len(waits) // 2:]) > sum(waits[:8])  # later retries wait longer
    assert Store(tmp_path).manifest().version == 1


def test_put_file_is_whole_or_absent_to_a_reader_meanwhile(tmp_path):
    """A reader (a resumed training looking for a checkpoint's `state.json`) never sees a short
    copy: on a local store the file is copied beside its place and renamed into it."""
    import threading

    store = Store(tmp_path / "store")
    sizes = {8 << 20, 12 << 20}
    sources = [tmp_path / f"src{i}" for i in range(2)]
    for path, size in zip(sources, sorted(sizes)):
        path.write_bytes(os.urandom(size))
    done, seen = threading.Event(), set()

    def read() -> None:
        dest = store.path("model/weights.bin")
        while not done.is_set():
            if os.path.exists(dest):
                seen.add(os.path.getsize(dest))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(12):
            store.put_file(sources[i % 2], "model/weights.bin")
    finally:
        done.set()
        reader.join()
    assert seen and seen <= sizes, f"a reader saw sizes {sorted(seen - sizes)[:5]} that are no whole copy"
    assert not [p for p in os.listdir(store.path("model")) if ".tmp-" in p]
