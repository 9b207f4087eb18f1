"""`cart compact`, `cart rollback` and `cart check` against what runs beside them: a rollback a
compact overtakes, a job writing for more than a day, a damaged history file, an older version
still serving, content deleted and imported again. Stores are written by hand (no Ray), the way
the jobs lay them out."""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cart_core.errors import BadInput
from cart_core.identifiers import IdentifierTable
from cart_core.index_version import IndexVersion, save_ids
from cart_core.store import Manifest, Store, StoreError, features_table

DAY = 86400


def run_id(kind: str, age_s: float = 0) -> str:
    return f"{kind}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(time.time() - age_s))}-{uuid.uuid4().hex[:8]}"


def put_features(store: Store, items: list[str], seed: int = 0, age_s: float = 0, kind: str = "import") -> str:
    run = f"features/{run_id(kind, age_s)}"
    emb = np.random.default_rng(seed).normal(size=(len(items), 4)).astype(np.float32)
    store.write_table(features_table(items, emb, "image", content_hashes=[f"h{seed}-{i}" for i in items]),
                      f"{run}/part-00000.parquet")
    return run


def put_tombstones(store: Store, pairs: list[tuple[str, str]], age_s: float = 0) -> str:
    run = f"tombstones/{run_id('reindex', age_s)}"
    store.write_table(pa.table({"item_id": [i for i, _ in pairs], "feature_run": [r for _, r in pairs]}),
                      f"{run}/tombstones.parquet")
    return run


def put_ids(store: Store, items: list[str], live: list[bool] | None = None) -> str:
    run = f"ids/{run_id('quantize')}"
    n = len(items)
    codes = np.stack([np.arange(n) % 3, np.arange(n) % 5, np.arange(n)], 1).astype(np.int64)
    save_ids(store, IdentifierTable(np.array(items, dtype=object), codes, [3, 5, n],
                                    np.ones(n, bool) if live is None else np.array(live)), run, {"report": {}})
    return run


def put_generator(store: Store) -> str:
    run = f"generator/{run_id('train')}"
    store.write_json(f"{run}/model/config.json", {"x": 1})
    store.fs.pipe_file(store.path(run, "model/generator.safetensors"), b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    return run


def live_items(store: Store) -> list[str]:
    return sorted(IndexVersion(store, store.manifest()).live_rows().column("item_id").to_pylist())


def imported_then_deleted(store: Store, age_s: float = 0) -> tuple[Manifest, str]:
    """v1 imports a and b, v2 deletes a."""
    features = put_features(store, ["a", "b"], seed=1, age_s=age_s)
    v1 = store.commit(Manifest(features=[features], dim=4), "import")
    store.commit(replace(v1, extra={"tombstones": [put_tombstones(store, [("a", features)], age_s)]}), "delete a")
    return v1, features


def test_a_rollback_a_compact_overtakes_is_undone_instead_of_naming_removed_files(tmp_path, monkeypatch):
    import pipelines.maintenance as maintenance

    store = Store(tmp_path / "s")
    imported_then_deleted(store, age_s=2 * DAY)
    maintenance.run_compact(store, keep=10)  # v3: the dead row rewritten away, v1's folders still kept
    checked = maintenance.brought_back

    def compact_meanwhile(old, current):  # a `cart compact --keep 1` between the rollback's check and commit
        out = checked(old, current)
        maintenance.run_compact(store, keep=1)
        return out

    monkeypatch.setattr(maintenance, "brought_back", compact_meanwhile)
    with pytest.raises(StoreError, match="a `cart compact` removed it while this rollback ran; version 5 restores "
                                         "version 3, so nothing was rolled back"):
        maintenance.run_rollback(store, 1)
    current = store.manifest()
    assert current.version == 5 and all(store.exists(p) for p in current.features)
    assert live_items(store) == ["b"]  # the delete holds


def test_a_commit_while_compact_removes_folders_keeps_what_it_names(tmp_path):
    """The folders a version committed after the history compact chose from names are kept (a
    rollback that read the history before the compact removed it), however early it landed."""
    from pipelines.maintenance import Protected

    store = Store(tmp_path / "s")
    v1, features = imported_then_deleted(store)
    later = store.commit(replace(store.manifest(), features=[put_features(store, ["b"], seed=2)],
                                 extra={"tombstones": []}), "rewritten")
    protected = Protected(store, [later], later.version)
    assert not protected.names(features)
    store.commit(v1, "rollback to v1", base=later, reads={"*"})
    assert protected.names(features)
    # committed before the removals began, after the history was read: still seen
    early = Protected(store, [later], later.version)
    assert early.names(features)


def test_a_rollback_waits_for_a_compact_that_started_before_its_commit(tmp_path, monkeypatch):
    """A compact holds a lease while it removes: a rollback refuses to start under it, and one
    that committed while a compact started waits for it, then checks its files (and undoes)."""
    import threading

    import pipelines.maintenance as maintenance

    store = Store(tmp_path / "s")
    v1, features = imported_then_deleted(store)
    store.commit(replace(store.manifest(), features=[put_features(store, ["b"], seed=2)],
                         extra={"tombstones": []}), "rewritten")
    store.write_json(maintenance.COMPACT_LEASE, {"run": "compact-x", "started": time.time()})
    with pytest.raises(StoreError, match="a `cart compact` is removing old versions \\(run compact-x\\)"):
        maintenance.run_rollback(store, 1)
    store.remove(maintenance.COMPACT_LEASE)
    checked = maintenance.brought_back

    def compact_starts(old, current):  # a compact takes its lease between the rollback's checks and commit
        store.write_json(maintenance.COMPACT_LEASE, {"run": "compact-y", "started": time.time()})

        def removes_then_ends():
            time.sleep(1.0)
            store.remove(features)  # it had chosen before seeing the rollback's commit
            store.remove(maintenance.COMPACT_LEASE)
        threading.Thread(target=removes_then_ends).start()
        return checked(old, current)

    monkeypatch.setattr(maintenance, "brought_back", compact_starts)
    with pytest.raises(StoreError, match="removed it while this rollback ran; version 5 restores version 3"):
        maintenance.run_rollback(store, 1)
    assert all(store.exists(p) for p in store.manifest().features) and live_items(store) == ["b"]
    assert maintenance.compact_running(store) is None


def test_a_folder_a_job_still_writes_is_kept_however_long_ago_it_started(tmp_path):
    from pipelines.maintenance import run_compact

    store = Store(tmp_path / "s")
    store.commit(Manifest(features=[put_features(store, ["a"])], dim=4), "import")
    writing = put_features(store, ["x1", "x2"], age_s=25 * 3600, kind="extract")  # started 25 h ago, wrote now
    abandoned = put_features(store, ["y"], age_s=3 * DAY, kind="extract")
    old = time.time() - 2 * DAY
    for f in Path(store.path(abandoned)).rglob("*"):
        os.utime(f, (old, old))
    stale_temp, fresh_temp = Path(store.path("manifest.json.tmp-dead0001")), Path(store.path("manifest.json.tmp-live0001"))
    stale_temp.write_bytes(b"{")  # a writer killed between its temporary file and the rename
    fresh_temp.write_bytes(b"{")  # one still writing
    os.utime(stale_temp, (old, old))
    counts = run_compact(store, keep=10)
    assert store.exists(writing) and not store.exists(abandoned) and counts["folders_removed"] == 1
    assert not stale_temp.exists() and fresh_temp.exists() and counts["temporary_files_removed"] == 1


def test_compact_refuses_while_a_history_file_is_unreadable(tmp_path):
    from pipelines.maintenance import run_compact

    store = Store(tmp_path / "s")
    imported_then_deleted(store, age_s=2 * DAY)
    history = Path(store.path(store.history_path(2)))
    history.write_bytes(history.read_bytes()[:40])
    with pytest.raises(StoreError, match=r"v000002\.json: not valid JSON .* \(a history file\); `cart check"):
        run_compact(store, keep=1)
    assert all(store.exists(p) for p in store.manifest().features)
    with pytest.raises(BadInput, match="--keep must be at least 1"):
        run_compact(store, keep=0)


def test_compact_keeps_the_tombstones_an_older_serving_version_needs(tmp_path, capsys):
    """Version 1 serves while a refit awaits training; a was deleted and imported again since: the
    tombstone is what keeps version 1 from answering a's old content, so compact leaves it."""
    from pipelines.maintenance import run_compact

    store = Store(tmp_path / "s")
    features = put_features(store, ["a", "b"], seed=1)
    ids = put_ids(store, ["a", "b"])
    v1 = store.commit(Manifest(features=[features], dim=4, ids=ids, generator=put_generator(store),
                               extra={"generator_ids": ids}), "trained")
    v2 = store.commit(replace(v1, ids=put_ids(store, ["a", "b"]), generator=None), "quantize --refit")
    v3 = store.commit(replace(v2, ids=put_ids(store, ["a", "b"], live=[False, True]),
                              extra={**v2.extra, "tombstones": [put_tombstones(store, [("a", features)])]}), "delete a")
    store.commit(replace(v3, features=[features, put_features(store, ["a"], seed=4)]), "a imported again")
    assert IndexVersion.newest_servable(store).withdrawn == {"a"}
    counts = run_compact(store, keep=10)
    assert counts["rows_dropped"] == 0 and "version 1 serves until `cart train`" in capsys.readouterr().err
    assert IndexVersion.newest_servable(store).withdrawn == {"a"}


def test_a_rollback_names_content_deleted_and_imported_again(tmp_path):
    from pipelines.maintenance import brought_back

    store = Store(tmp_path / "s")
    v1, features = imported_then_deleted(store)
    store.commit(replace(store.manifest(), features=[features, put_features(store, ["a"], seed=3)]), "a again")
    current = IndexVersion(store, store.manifest())
    assert current.live_item_hashes(["a"])["a"][1] == "h3-a"
    assert brought_back(IndexVersion(store, v1), current) == ["a"]  # its content of v1 would come back


def test_compact_drops_a_legacy_duplicate_row_by_file_and_row(tmp_path):
    from pipelines.check import inspect
    from pipelines.maintenance import run_compact

    store = Store(tmp_path / "s")
    run = f"features/{run_id('extract')}"
    for k, seed in ((0, 1), (1, 2)):  # written before a run held an item once: a in both files
        store.write_table(features_table(["a", f"b{k}"], np.full((2, 4), seed, np.float32), "image",
                                         content_hashes=[f"h{seed}-a", f"h{seed}-b"]), f"{run}/part-{k:05d}.parquet")
    store.commit(Manifest(features=[run], dim=4), "legacy extract")
    assert run_compact(store, keep=10)["rows_dropped"] == 1
    version = IndexVersion(store, store.manifest())
    assert version.feature_rows().num_rows == 3 and version.live_item_hashes(["a"])["a"][1] == "h2-a"
    assert inspect(store)["problems"] == []


@pytest.mark.parametrize("damage", ["truncated", "lost"])
def test_repair_restores_a_damaged_newest_history_file_from_its_intact_pointer(tmp_path, damage):
    """Moving the history file aside (or pointing at the version before a lost one) would roll the
    store back past the delete it committed."""
    from pipelines.check import inspect, run_check

    store = Store(tmp_path / "s")
    imported_then_deleted(store)
    history = Path(store.path(store.history_path(2)))
    if damage == "truncated":
        history.write_bytes(history.read_bytes()[:40])
    else:
        history.unlink()
    assert store.manifest().version == 2 and live_items(store) == ["b"]
    assert any("holds version 2 intact (`--repair` rewrites it from there)" in line
               for line in inspect(store)["problems"])
    report = run_check(store, repair=True)
    assert any("rewritten from" in line and "intact copy of version 2" in line for line in report["repaired"])
    assert report["problems"] == [] and store.version(2).extra["tombstones"]
    assert store.manifest().version == 2 and live_items(store) == ["b"]
    assert store.commit(replace(store.manifest()), "next").version == 3


def test_check_reads_the_version_that_answers_queries(tmp_path):
    from pipelines.check import run_check

    store = Store(tmp_path / "s")
    ids = put_ids(store, ["a", "b"])
    generator = put_generator(store)
    v1 = store.commit(Manifest(features=[put_features(store, ["a", "b"])], dim=4, ids=ids, generator=generator,
                               extra={"generator_ids": ids}), "trained")
    store.commit(replace(v1, ids=put_ids(store, ["a", "b"]), generator=None), "quantize --refit")
    assert run_check(store)["servable"] and run_check(store)["problems"] == []
    Path(store.path(generator, "model/generator.safetensors")).unlink()
    report = run_check(store)
    assert not report["servable"]
    assert report["problems"] == [f"{store.uri(generator, 'model/generator.safetensors')}: missing (the generator "
                                  "cannot load) (version 1, which answers queries)"]


def test_a_pointer_lost_after_a_compact_still_finds_the_newest_version(tmp_path):
    """Without manifest.json a store is read from its newest history file, not from version 1
    (which a compact may have removed): the next commit must not make the store look new."""
    from pipelines.maintenance import run_compact

    store = Store(tmp_path / "s")
    imported_then_deleted(store, age_s=2 * DAY)
    run_compact(store, keep=1)
    assert not store.exists(store.history_path(1))
    newest = store.manifest()
    Path(store.path("manifest.json")).unlink()
    assert store.manifest() == newest and live_items(store) == ["b"]
    assert store.commit(replace(newest), "next").version == newest.version + 1
    Path(store.path("manifest.json")).unlink()
    last = Path(store.path(store.history_path(newest.version + 1)))
    last.write_bytes(last.read_bytes()[:30])
    with pytest.raises(StoreError, match="manifest.json: missing, and the newest history file is unreadable"):
        store.manifest()
    assert Store(tmp_path / "new").manifest().version == 0


def trained_twice(store: Store) -> tuple[Manifest, Manifest]:
    """v1 and v2 each servable, with their own identifiers and generator: a `compact --keep 1`
    removes v1's history file and both its folders."""
    features = put_features(store, ["a", "b"], seed=1)
    ids = put_ids(store, ["a", "b"])
    v1 = store.commit(Manifest(features=[features], dim=4, ids=ids, generator=put_generator(store),
                               extra={"generator_ids": ids}), "trained")
    ids = put_ids(store, ["a", "b"])
    v2 = store.commit(replace(v1, ids=ids, generator=put_generator(store), extra={"generator_ids": ids}), "again")
    return v1, v2


def test_compact_keeps_a_version_a_running_job_reads_until_its_lease_goes(tmp_path, capsys):
    from pipelines.check import run_check
    from pipelines.leases import READERS, missing_file, reader_lease
    from pipelines.maintenance import run_compact

    store = Store(tmp_path / "s")
    v1, _ = trained_twice(store)
    with reader_lease(store, v1.version, "retrieve").acquire():
        counts = run_compact(store, keep=1)
        assert counts["versions_read_by_jobs"] == [1] and missing_file(store, v1) is None
        assert "keeping version 1 too: a running job reads it (retrieve (retrieve-" in capsys.readouterr().err
        report = run_check(store)  # says who reads it, and reads its files too
        assert report["problems"] == [] and report["read_by_jobs"][0].startswith("version 1: retrieve (retrieve-")
        Path(store.path(v1.generator, "model/config.json")).unlink()
        assert any("(version 1, which a running job reads)" in p for p in run_check(store)["problems"])
        assert "reading: version 1: retrieve" in capsys.readouterr().out
    assert store.listdir(READERS) == []
    counts = run_compact(store, keep=1)
    assert counts["versions_read_by_jobs"] == [] and counts["folders_removed"] == 2
    assert not store.exists(v1.ids) and not store.exists(v1.generator) and store.versions() == [store.manifest()]


def test_a_lease_of_a_job_that_died_is_ignored_and_removed(tmp_path):
    """Judged by when the store last saw it written (its mtime), not by the job host's clock."""
    from pipelines.leases import LEASE_STALE_S, READERS, held_versions
    from pipelines.maintenance import run_compact

    store = Store(tmp_path / "s")
    v1, _ = trained_twice(store)
    old = time.time() - LEASE_STALE_S - 1
    store.write_json(f"{READERS}/retrieve-dead.json", {"version": 1, "job": "retrieve", "renewed": time.time()})
    Path(store.path(f"{READERS}/retrieve-half.json")).write_bytes(b'{"version": ')  # killed mid-write
    store.write_json(f"{READERS}/retrieve-behind.json", {"version": 1, "job": "retrieve", "renewed": old})
    for name in ("retrieve-dead.json", "retrieve-half.json"):
        os.utime(store.path(f"{READERS}/{name}"), (old, old))
    assert list(held_versions(store)) == [1]  # the live job whose clock runs behind keeps its version
    store.remove(f"{READERS}/retrieve-behind.json")
    assert held_versions(store) == {}
    counts = run_compact(store, keep=1)
    assert counts["versions_read_by_jobs"] == [] and not store.exists(v1.generator)
    assert store.listdir(READERS) == []


def test_compact_reads_the_reader_leases_only_under_its_own_lease(tmp_path, monkeypatch):
    """The other half of the order that closes the race (pipelines/leases.py)."""
    import pipelines.maintenance as maintenance
    from pipelines.leases import compact_running

    store = Store(tmp_path / "s")
    trained_twice(store)
    read = maintenance.held_versions
    seen = []

    def reads_leases(s, remove_stale=False, clock=None):
        seen.append((compact_running(s), clock))
        return read(s, remove_stale, clock)

    monkeypatch.setattr(maintenance, "held_versions", reads_leases)
    maintenance.run_compact(store, keep=1)
    assert seen and all(lease is not None and clock == maintenance.COMPACT_LEASE for lease, clock in seen)
    assert compact_running(store) is None


def test_a_killed_compacts_lease_stops_holding_up_jobs_once_stale(tmp_path):
    from pipelines.leases import COMPACT_LEASE, LEASE_STALE_S, compact_running, wait_for_compact

    store = Store(tmp_path / "s")
    store.write_json(COMPACT_LEASE, {"run": "compact-dead", "started": time.time()})
    assert compact_running(store)
    old = time.time() - LEASE_STALE_S - 1
    os.utime(store.path(COMPACT_LEASE), (old, old))
    t0 = time.monotonic()
    wait_for_compact(store, "retrieve")
    assert compact_running(store) is None and time.monotonic() - t0 < 1


def test_a_removal_by_another_process_is_seen_through_the_s3_listing_cache(s3_server):
    """s3fs answers `exists` and listings from what it cached: the check a job makes after taking
    its lease, and the compact's reading of the leases, must not, or they miss what another
    process did (and the job's actors fail later)."""
    from pipelines.leases import held_versions, missing_file, reader_lease

    url = f"s3://cart-test/leases-{uuid.uuid4().hex[:8]}"
    job, compact = Store(url), Store(url)
    compact.fs = type(compact.fs)(**{**compact.fs.storage_options, "skip_instance_cache": True})  # another process
    v1, _ = trained_twice(job)
    job.versions()
    job.fs.find(job.path(v1.ids))  # the job's listings are cached
    assert missing_file(job, v1) is None
    compact.remove(v1.ids)  # a folder alone (the history file stays)
    assert missing_file(job, v1) == v1.ids
    compact.remove(compact.history_path(1))
    assert missing_file(job, v1) == job.history_path(1)
    with reader_lease(job, 1, "retrieve").acquire():
        assert list(held_versions(compact)) == [1]  # the compact's listing of jobs/readers/ is now cached
        with reader_lease(job, 2, "evaluate").acquire():
            assert sorted(held_versions(compact)) == [1, 2]


def test_a_reader_lease_is_renewed_while_the_job_runs(tmp_path):
    from pipelines.leases import reader_lease

    store = Store(tmp_path / "s")
    lease = reader_lease(store, 3, "evaluate").acquire(renew_s=0.05)
    try:
        first = store.read_json(lease.path)["renewed"]
        time.sleep(0.3)
        assert store.read_json(lease.path)["renewed"] > first
        assert store.read_json(lease.path)["version"] == 3 and store.read_json(lease.path)["pid"] == os.getpid()
    finally:
        lease.release()
    assert not store.exists(lease.path)


def test_a_job_pinning_a_version_as_a_compact_removes_it_waits_and_takes_the_newer_one(tmp_path, capsys):
    """The reader's lease came too late for a compact that had chosen what to keep: the job waits
    for that compact, finds its version's files gone, and pins the newest servable one again."""
    import threading

    from pipelines.leases import COMPACT_LEASE, READERS, newest_servable_held

    store = Store(tmp_path / "s")
    features = put_features(store, ["a", "b"], seed=1)
    ids = put_ids(store, ["a", "b"])
    v1 = store.commit(Manifest(features=[features], dim=4, ids=ids, generator=put_generator(store),
                               extra={"generator_ids": ids}), "trained")
    store.write_json(COMPACT_LEASE, {"run": "compact-x", "started": time.time()})

    def train_then_compact():  # a training commits v2 and the compact removes v1, then ends
        time.sleep(0.5)
        ids = put_ids(store, ["a", "b"])
        store.commit(replace(v1, ids=ids, generator=put_generator(store), extra={"generator_ids": ids}), "train")
        store.remove(store.history_path(1))
        store.remove(v1.generator)
        store.remove(COMPACT_LEASE)

    compact = threading.Thread(target=train_then_compact)
    compact.start()
    with newest_servable_held(store, "retrieve") as version:
        assert version.version == 2
        assert [store.read_json(f"{READERS}/{n}")["version"] for n in store.listdir(READERS)] == [2]
    compact.join()
    err = capsys.readouterr().err
    assert "waiting for it to finish" in err and "needed by version 1, which retrieve reads, but removed as this job " \
        "started: taking the newest servable version again" in err
    assert store.listdir(READERS) == []


def test_a_retrieve_rerun_finishes_on_its_version_only_when_nothing_was_undone_or_deleted(tmp_path):
    """`retrieve.version_of_saved_answers`: a newer version that only added resumes on the saved
    one; a rollback, a delete or a compact since, or no saved part, starts over on the newest."""
    from pipelines.retrieve import run_signature, version_of_saved_answers
    from tests.pipelines.test_jobs import small_config

    store = Store(tmp_path / "s")
    features = put_features(store, ["a", "b"], seed=1)
    ids = put_ids(store, ["a", "b"])
    v1 = store.commit(Manifest(features=[features], dim=4, ids=ids, generator=put_generator(store),
                               extra={"generator_ids": ids}), "trained")
    cfg, queries = small_config(), pa.table({"query_id": ["q1", "q2"], "text": ["a dog", "a cat"]})
    out = str(tmp_path / "results.parquet")
    parts = Path(f"{out}.parts")
    parts.mkdir()
    (parts / "run.json").write_text(__import__("json").dumps(
        run_signature(store, IndexVersion(store, v1), cfg, 10, queries), sort_keys=True))

    def resumes_on() -> int | None:
        version = version_of_saved_answers(store, out, cfg, 10, queries)
        return None if version is None else version.version

    assert resumes_on() is None  # the newest version: nothing to choose
    added = store.commit(replace(v1, features=[features, put_features(store, ["c"], seed=2)]), "import c")
    assert resumes_on() is None  # no answer saved yet
    (parts / "part-000001-0000.parquet").write_bytes(b"")
    assert resumes_on() == 1
    store.commit(v1, "rollback to v1", base=added, reads={"*"})  # the same features, what came after undone
    assert resumes_on() is None
    store.commit(added, "import c again")
    assert resumes_on() is None  # a rollback anywhere since
    store = Store(tmp_path / "s2")
    features = put_features(store, ["a", "b"], seed=1)
    ids = put_ids(store, ["a", "b"])
    v1 = store.commit(Manifest(features=[features], dim=4, ids=ids, generator=put_generator(store),
                               extra={"generator_ids": ids}), "trained")
    (parts / "run.json").write_text(__import__("json").dumps(
        run_signature(store, IndexVersion(store, v1), cfg, 10, queries), sort_keys=True))
    deleted = store.commit(replace(v1, extra={**v1.extra, "tombstones": [put_tombstones(store, [("b", features)])]}),
                           "delete b")
    assert resumes_on() is None  # its answers may hold b
    again = store.commit(replace(deleted, features=[features, put_features(store, ["b"], seed=3)]), "b imported again")
    assert resumes_on() is None
    store.commit(replace(again, features=[put_features(store, ["a", "b"], seed=4)], extra=v1.extra), "compact")
    assert IndexVersion.answering_for(store, v1, store.manifest()).withdrawn == frozenset()  # b's takedown is lost
    assert resumes_on() is None  # so rewritten runs never resume


def test_a_lease_released_while_a_renewal_hangs_does_not_come_back(tmp_path, monkeypatch):
    import threading

    from pipelines.leases import reader_lease

    store = Store(tmp_path / "s")
    lease = reader_lease(store, 1, "retrieve").acquire(renew_s=0.05)
    write, hung = store._write_bytes, threading.Event()

    def slow_write(path, data):  # the store answers the next renewal only after the release gave up on it
        hung.set()
        time.sleep(0.5)
        write(path, data)

    monkeypatch.setattr(store, "_write_bytes", slow_write)
    hung.wait(5)
    monkeypatch.setattr("pipelines.leases.RELEASE_WAIT_S", 0.05)  # the release stops waiting for it
    lease.release()
    assert not store.exists(lease.path)
    time.sleep(1.0)  # the hung renewal lands, sees the release and removes its write
    assert not store.exists(lease.path)


def test_one_compact_at_a_time(tmp_path):
    from pipelines.leases import COMPACT_LEASE, LEASE_STALE_S, compact_lease
    from pipelines.maintenance import run_compact

    store = Store(tmp_path / "s")
    trained_twice(store)
    with compact_lease(store, "compact-first").acquire(exclusive=True):
        with pytest.raises(StoreError, match="another `cart compact` \\(run compact-first\\) is running"):
            run_compact(store, keep=1)
        with pytest.raises(StoreError, match="held by compact run compact-first"):
            compact_lease(store, "compact-second").acquire(exclusive=True)
    old = time.time() - LEASE_STALE_S - 1  # a killed compact's lease: taken over
    store.write_json(COMPACT_LEASE, {"run": "compact-dead"})
    os.utime(store.path(COMPACT_LEASE), (old, old))
    assert run_compact(store, keep=1)["folders_removed"] == 2 and not store.exists(COMPACT_LEASE)


def test_a_checking_host_whose_clock_runs_ahead_keeps_a_live_lease(tmp_path):
    """Ages are differences of the store's own times: the compact compares a lease's time with its
    own lease's, not with its host's clock."""
    from pipelines.leases import COMPACT_LEASE, READERS, held_versions

    store = Store(tmp_path / "s")
    store.write_json(f"{READERS}/retrieve-live.json", {"version": 1, "job": "retrieve"})
    store.write_json(COMPACT_LEASE, {"run": "compact-x"})
    behind = time.time() - 20 * 60  # the store stamps both 20 min behind this host's clock
    for path in (f"{READERS}/retrieve-live.json", COMPACT_LEASE):
        os.utime(store.path(path), (behind, behind))
    assert held_versions(store) == {}  # by this host's clock it looks dead
    assert list(held_versions(store, remove_stale=True, clock=COMPACT_LEASE)) == [1]
    assert store.exists(f"{READERS}/retrieve-live.json")


HOLD_A_LEASE = """
import sys, time
from cart_core.store import Store
from pipelines.leases import compact_lease, reader_lease
store = Store(sys.argv[1])
lease = compact_lease(store, "compact-killed") if sys.argv[2] == "compact" else reader_lease(store, 1, "retrieve")
lease.acquire(exclusive=sys.argv[2] == "compact")
print("held", flush=True)
time.sleep(600)
"""


def holding(store: Store, kind: str):
    """A real process holding a lease on this machine, started and waited for."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLD_A_LEASE, store.url, kind], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_lease_whose_holder_was_killed_on_this_machine_is_stale_at_once(tmp_path):
    """SIGKILL (or the OOM killer) leaves the lease behind, unreleased: on the holder's own machine the
    next compact, rollback or job sees the process gone and does not wait out LEASE_STALE_S."""
    from pipelines.leases import (COMPACT_LEASE, READERS, compact_running, held_versions, process_identity,
                                  wait_for_compact)
    from pipelines.maintenance import run_compact

    if not process_identity():
        pytest.skip("no /proc of this process's own: leases are judged by their age alone here")
    store = Store(tmp_path / "s")
    trained_twice(store)
    compact, reader = holding(store, "compact"), holding(store, "reader")
    try:
        assert compact_running(store)["run"] == "compact-killed" and list(held_versions(store)) == [1]
        with pytest.raises(StoreError, match="another `cart compact` \\(run compact-killed\\) is running"):
            run_compact(store, keep=1)
    finally:
        for proc in (compact, reader):
            proc.kill()
            proc.wait()
    assert store.exists(COMPACT_LEASE) and len(store.listdir(READERS)) == 1  # left behind, freshly written
    t0 = time.monotonic()
    wait_for_compact(store, "retrieve")
    assert compact_running(store) is None and time.monotonic() - t0 < 1
    counts = run_compact(store, keep=1)  # takes the compact lease over; the dead reader keeps nothing
    assert counts["versions_read_by_jobs"] == [] and counts["folders_removed"] == 2
    assert store.listdir(READERS) == [] and not store.exists(COMPACT_LEASE)


def test_only_a_holder_this_machine_can_see_is_judged_gone(tmp_path):
    """Another machine's lease, another container's (a host name may be shared, a PID namespace is
    not) or a lease written before the identity was kept is judged by its age alone; a PID reused by
    a later process does not keep a dead holder's lease alive."""
    from pipelines.leases import READERS, held_versions, holder_is_gone, process_identity

    mine = process_identity()
    if not mine:
        pytest.skip("no /proc: leases are judged by their age alone here")
    me = {**mine, "pid": os.getpid()}
    assert not holder_is_gone(me)
    dead = {**me, "pid_start": "1"}  # this PID, reused by this process after the holder died
    assert holder_is_gone(dead)
    for unseen in ({**dead, "boot_id": "another-boot"}, {**dead, "pid_namespace": "pid:[1]"},
                   {**dead, "host": "a-clone-of-this-machine"}, {**dead, "time_namespace": "time:[1]"},
                   {"pid": 999999999, "host": "elsewhere"}, {k: v for k, v in dead.items() if k != "boot_id"}):
        assert not holder_is_gone(unseen)
    store = Store(tmp_path / "s")
    for name, lease in (("gone", dead), ("elsewhere", {**dead, "boot_id": "another-boot"})):
        store.write_json(f"{READERS}/retrieve-{name}.json", {**lease, "version": 1, "job": "retrieve"})
    held = held_versions(store, remove_stale=True)
    assert list(held) == [1] and len(held[1]) == 1 and "retrieve-elsewhere" in held[1][0]
    assert store.listdir(READERS) == ["retrieve-elsewhere.json"]


def test_two_jobs_taking_a_dead_holders_lease_over_at_once_leave_one_holder(tmp_path, monkeypatch):
    """Judging a lease dead and removing it are two steps: a second compact may remove the lease
    the first just created and create its own. The first reads its lease back and gives up,
    leaving the second's in place."""
    import json

    import pipelines.leases as leases

    store = Store(tmp_path / "s")
    dead = {"run": "compact-dead", "job": "compact"}
    store.write_json(leases.COMPACT_LEASE, dead)
    old = time.time() - leases.LEASE_STALE_S - 1
    os.utime(store.path(leases.COMPACT_LEASE), (old, old))
    second = leases.compact_lease(store, "compact-second")

    def the_second_takes_it_over_meanwhile(_seconds):
        store.remove(leases.COMPACT_LEASE)
        assert store._create_exclusive(store.path(leases.COMPACT_LEASE), second._body())

    monkeypatch.setattr(leases, "_settle", the_second_takes_it_over_meanwhile)
    first = leases.compact_lease(store, "compact-first")
    with pytest.raises(StoreError, match="held by compact run compact-second"):
        first.acquire(exclusive=True)
    assert json.loads(Path(store.path(leases.COMPACT_LEASE)).read_text())["token"] == second.token
    monkeypatch.setattr(leases, "_settle", lambda _seconds: None)
    os.utime(store.path(leases.COMPACT_LEASE), (old, old))  # the second died too: a third takes over alone
    with leases.compact_lease(store, "compact-third").acquire(exclusive=True) as third:
        assert store.read_json(leases.COMPACT_LEASE)["token"] == third.token
    assert not store.exists(leases.COMPACT_LEASE)
