"""`cart rollback` and `cart compact`: the store's maintenance, run beside jobs that read and commit.

* **Rollback** commits an earlier version's content as the newest version (history is never
  rewritten), and says which deleted items that brings back.
* **Compact** reclaims storage: dead feature rows rewritten away, identifier deltas folded, then
  the folders only old versions name removed, except what a running job reads (its reader lease,
  pipelines/leases.py), the newest servable version, and a version committed meanwhile.

How the two and the jobs beside them stay safe from each other: docs/design.md, "Compaction".
"""
from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cart_core.errors import BadInput, first_line
from cart_core.index_version import IndexVersion, deleted_since, is_servable, referenced_paths, save_ids
from cart_core.store import CommitConflict, Manifest, Store, StoreError
from pipelines.leases import (COMPACT_LEASE, GOES_STALE, compact_lease, compact_running, held_versions,
                              require_files, wait_for_compact)
from pipelines.parts import write_parts
from pipelines.runtime import JobSummary, log


def run_rollback(store: Store, version: int) -> dict:
    """Commit the content of an earlier version as the newest one (history is never rewritten)."""
    lease = compact_running(store)
    if lease:
        raise StoreError(f"{store.url}: a `cart compact` is removing old versions (run {lease.get('run')}): rerun "
                         f"the rollback when it has finished (its lease, {store.uri(COMPACT_LEASE)}, "
                         f"{GOES_STALE})")
    current = store.manifest()
    old = store.version(version)
    require_files(store, old, f"needed by version {version} but compacted away")
    back = brought_back(IndexVersion(store, old), IndexVersion(store, current))
    new = store.commit(old, f"rollback to v{version}", base=current, reads={"*"})
    wait_for_compact(store, "rollback")  # one that started before this commit may not have seen it
    try:  # a `cart compact` that ran since the check above may have removed what it names
        require_files(store, old, f"needed by version {version}")
    except StoreError as exc:
        try:
            undone = store.commit(current, f"undo rollback v{new.version}: a compact removed version {version}'s "
                                           "files", base=new, reads={"*"})
        except CommitConflict:
            raise StoreError(f"{exc}: a `cart compact` removed it while this rollback ran, and a commit since "
                             f"stops its undo: `cart rollback {current.version}` restores the version before") from None
        raise StoreError(f"{exc}: a `cart compact` removed it while this rollback ran; version {undone.version} "
                         f"restores version {current.version}, so nothing was rolled back") from None
    log("rollback", f"version {new.version} = version {version}")
    if back:
        log("rollback", f"{len(back)} items deleted since version {version} are indexed again with the content "
                        f"they had then (e.g. {', '.join(sorted(back)[:5])}); `cart reindex --delete` them again "
                        "if that is not meant")
    try:
        serving = IndexVersion.newest_servable(store) if not is_servable(new) else IndexVersion(store, new)
    except StoreError:  # no version has a generator yet: nothing answers before or after
        serving = None
    if serving is None:
        log("rollback", "no version has a trained generator yet: `cart train` makes one servable")
    elif serving.version != new.version:
        log("rollback", f"version {version} has no generator trained for its identifiers: `cart serve` and "
                        f"`cart retrieve` answer from version {serving.version} until `cart train` commits one")
    return {"version": new.version, "restored": version, "served": None if serving is None else serving.version,
            "brought_back": len(back)}


def brought_back(old: IndexVersion, current: IndexVersion) -> list[str]:
    """Items a rollback to `old` indexes again with the content they had there: deleted since (no
    live row now), or deleted and imported again since (their row in `old` retired; told while
    the tombstones last, i.e. until `cart compact` clears them)."""
    items = np.array(old.live_rows().column("item_id").to_pylist(), dtype=object)
    return sorted(deleted_since(items, old, current))


ORPHAN_GRACE_S = 24 * 3600  # a folder no manifest names may belong to a job still running


def run_compact(store: Store, keep: int) -> dict:
    """Reclaim storage: feature rows that are not live (deleted, replaced) are rewritten away (a new
    version), identifier deltas are folded, then folders named only by versions older than the last
    `keep` are removed. The newest servable version is always kept, with everything it names, so a
    store stays servable; a folder no version ever named is removed only once nothing was written
    to it for ORPHAN_GRACE_S (a job may still be writing it).

    Refused while a history file is unreadable (what it names cannot be known). The rewrites wait
    while a `cart train` is pending (its commit would conflict with them) and while an older
    version serves (the tombstones the rewrite clears are what keeps that version from answering
    content deleted since: IndexVersion.withdrawn_since). Before each folder is removed, a commit
    since (a rollback naming an older version's folders) is looked for, and what it names kept."""
    if keep < 1:
        raise BadInput(f"--keep must be at least 1 (the newest version is always kept), got {keep}")
    running = compact_running(store)
    if running:  # its removals and this one's rewrites would race; its lease is taken again below, atomically
        raise StoreError(f"{store.url}: another `cart compact` (run {running.get('run', '?')}) is running; rerun "
                         f"when it has finished (its lease, {store.uri(COMPACT_LEASE)}, "
                         f"{GOES_STALE})")
    version = IndexVersion.current(store)
    manifest = version.manifest
    counts = {"rows_dropped": 0, "folders_removed": 0}
    pending_train = _pending_training(store)
    waiting = _rewrites_wait(store.versions(strict=True), manifest, pending_train)
    if waiting:
        log("compact", f"feature rows and identifier deltas are not rewritten now: {waiting}")
    rows = version.feature_rows()
    stale = rows.filter(pc.invert(rows.column("live")))
    if stale.num_rows and not waiting:
        run = JobSummary("compact", store.url).run
        runs = sorted(set(stale.column("run").to_pylist()))
        counts["rows_dropped"] = stale.num_rows
        kept_rows = rows.filter(pc.and_(rows.column("live"), pc.is_in(rows.column("run"), value_set=pa.array(runs))))
        parts = []
        for path in store.parquet_files(runs):  # by (file, row): a legacy file holding an item twice keeps one
            keep_rows = kept_rows.filter(pc.equal(kept_rows.column("file"), path)).column("row").to_numpy()
            parts.append(version._read_file(path, None).take(pa.array(np.sort(keep_rows))))
        write_parts(store, pa.concat_tables(parts), f"features/{run}")
        features = [f for f in manifest.features if f not in runs] + [f"features/{run}"]
        manifest = store.commit(replace(manifest, features=features, extra={**manifest.extra, "tombstones": []}),
                                f"compact {run}: {counts['rows_dropped']} dead feature rows dropped",
                                base=manifest, reads={"*"})
    if manifest.extra.get("ids_chain") and not waiting:  # fold the id-table deltas into one table
        run = JobSummary("compact", store.url).run
        counts["id_deltas_folded"] = len(manifest.extra["ids_chain"])
        table, meta = IndexVersion(store, manifest).ids()
        save_ids(store, table, f"ids/{run}", meta)
        manifest = store.commit(replace(manifest, ids=f"ids/{run}",
                                        extra={**manifest.extra, "ids_chain": [], "generator_ids": (
                                            f"ids/{run}" if manifest.extra.get("generator_ids") == manifest.ids
                                            else manifest.extra.get("generator_ids"))}),
                                f"compact {run}: identifier deltas folded into one table", base=manifest, reads={"*"})
    # a rollback refuses to start while the lease stands; one that committed since, and a job
    # pinning a version, wait for it
    with compact_lease(store, JobSummary("compact", store.url).run).acquire(exclusive=True):  # one at a time
        _remove_unkept(store, keep, pending_train, counts)
    log("compact", json.dumps(counts))
    return counts


def _remove_unkept(store: Store, keep: int, pending_train: str | None, counts: dict) -> None:
    """Remove the history files, then the folders, that neither the last `keep` versions, the
    newest servable one nor one a running job reads (pipelines/leases.py) name (nor a version
    committed meanwhile, nor a job still writing)."""
    pointer = store.manifest().version
    versions = store.versions(strict=True)
    if not versions or versions[-1].version < pointer:
        raise StoreError(f"{store.url}: the current version {pointer} has no readable history file; "
                         f"`cart check --store {store.url} --repair` first")
    kept = versions[-keep:]
    servable = next((m for m in reversed(versions) if is_servable(m)), None)
    if servable is not None and servable.version not in {m.version for m in kept}:
        kept = [servable, *kept]
        log("compact", f"keeping version {servable.version} too: it is the newest servable one")
    held = held_versions(store, remove_stale=True, clock=COMPACT_LEASE)  # read after this compact's lease was written
    for m in versions:
        if m.version in held and m.version not in {k.version for k in kept}:
            kept = [m, *kept]
            log("compact", f"keeping version {m.version} too: a running job reads it ({'; '.join(held[m.version])})")
    ever_named = set().union(*(referenced_paths(m) for m in versions))
    kept_numbers = {m.version for m in kept}
    for m in versions:  # history first: a compact killed before its folders are gone leaves no
        if m.version not in kept_numbers:  # version naming a removed folder (a rollback could commit it)
            store.remove(store.history_path(m.version))
    protected = Protected(store, kept, versions[-1].version)
    for kind in ("features", "queries", "ids", "codebooks", "generator", "tombstones", "errors", "eval"):
        for name in store.listdir(kind):
            path = f"{kind}/{name}"
            if kind == "generator" and name == pending_train:
                continue  # an unfinished training run can still be resumed
            if not _named(path, ever_named) and _written_within(store, path, name, ORPHAN_GRACE_S):
                continue  # no version named it yet: a job may still be writing it
            if protected.names(path):
                continue  # kept versions, or one committed since (a rollback), need it
            store.remove(path)
            counts["folders_removed"] += 1
    for path in store.fs.find(store.root):  # temporary files of writers killed mid-write
        name = path.rsplit("/", 1)[-1]
        if ".tmp-" in name and not _written_within(store, path[len(store.root):].lstrip("/"), name,
                                                              ORPHAN_GRACE_S):
            store.fs.rm(path)
            counts["temporary_files_removed"] = counts.get("temporary_files_removed", 0) + 1
    counts["versions_kept"] = len(kept)
    counts["versions_read_by_jobs"] = sorted(held)


class Protected:
    """The paths compact must not remove: those the kept versions name, and those of any version
    committed after `seen` (the newest version they were chosen from), read again whenever the
    current version moves."""

    def __init__(self, store: Store, kept: list[Manifest], seen: int):
        self.store, self.seen = store, seen
        self.paths = set().union(*(referenced_paths(m) for m in kept))

    def names(self, path: str) -> bool:
        now = self.store.manifest()
        if now.version != self.seen:  # a commit since: every history file left is kept or newer
            self.paths |= set().union(referenced_paths(now), *(referenced_paths(m) for m in self.store.versions()))
            self.seen = now.version
        return _named(path, self.paths)


def _rewrites_wait(versions: list[Manifest], current: Manifest, pending_train: str | None) -> str | None:
    """Why compact's rewrites (dead rows dropped with the tombstones, id deltas folded) must wait
    now, or None."""
    if pending_train:
        return "a `cart train` run is pending (jobs/train-pending.json): its commit would conflict"
    servable = next((m for m in reversed(versions) if is_servable(m)), None)
    if servable is not None and servable.version != current.version:
        return (f"version {servable.version} serves until `cart train` commits a generator for version "
                f"{current.version}, and the tombstones keep it from answering what was deleted since")
    return None


def _pending_training(store: Store) -> str | None:
    """The run of a `cart train` not finished (jobs/train-pending.json), or None."""
    if not store.exists("jobs/train-pending.json"):
        return None
    try:
        return store.read_json("jobs/train-pending.json").get("run")
    except (ValueError, AttributeError) as exc:
        raise StoreError(f"{store.uri('jobs/train-pending.json')}: unreadable ({first_line(exc)}); remove it if no "
                         "`cart train` is running or to be resumed") from None


def _written_within(store: Store, path: str, name: str, seconds: float) -> bool:
    """Whether the run folder started (its name's time) or was last written less than `seconds`
    ago: a job that started long ago and is still writing parts keeps its folder."""
    if _younger_than(name, seconds):
        return True
    last = store.last_write(path)
    return last is not None and time.time() - last < seconds


def _named(path: str, paths: set[str]) -> bool:
    return path in paths or any(p.startswith(path + "/") for p in paths)


def _younger_than(run: str, seconds: float) -> bool:
    """Run folders are named <kind>-<UTC time>-<hex> (store.new_run_id)."""
    import calendar

    try:
        stamp = calendar.timegm(time.strptime(run.split("-")[1], "%Y%m%dT%H%M%S"))
    except (IndexError, ValueError):
        return False
    return time.time() - stamp < seconds
