"""Who holds what in a store while jobs run: the leases `cart compact` respects.

Two kinds, both small JSON files under `jobs/`, renewed by a thread of the job every LEASE_RENEW_S
and judged stale when not written for LEASE_STALE_S (a job killed outright: SIGKILL, a lost node):

* `jobs/compact-running.json`: a `cart compact` is removing history files and folders. A rollback
  refuses to start under it, and a job that pins a version waits for it (what it removes is known
  only once it is done).
* `jobs/readers/<run>.json`: a long job (`cart retrieve`, `cart evaluate`, `cart train`, a `cart
  serve` replica while it loads) reads one version; Ray actors may load it minutes after the
  driver chose it. `cart compact` keeps every version a fresh reader lease names, with all its
  files, and removes stale leases.

Freshness is judged by the store's clock (the file's mtime, S3 LastModified), so a job host whose
clock runs behind cannot have its lease taken for stale.

The order that makes a version safe to read (`hold`): the job writes its lease, waits for a
compact holding its lease, then checks the version's files, bypassing any listing cache. A
compact writes its lease before it reads the reader leases. So either the compact sees the job's
lease, or the job sees the compact's and checks the files only after it finished.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from cart_core.index_version import IndexVersion, referenced_paths
from cart_core.store import Manifest, Store, StoreError, new_run_id
from pipelines.runtime import log

COMPACT_LEASE = "jobs/compact-running.json"
READERS = "jobs/readers"
LEASE_RENEW_S = 60.0
LEASE_STALE_S = 15 * 60.0  # a lease not written for this long belongs to a job that died


class Lease:
    """A JSON file in the store that a daemon thread rewrites every `renew_s` while the job runs;
    `release` (or the end of a `with` block) stops the thread and removes the file."""

    def __init__(self, store: Store, path: str, job: str, data: dict):
        self.store, self.path, self.job, self.data = store, path, job, data
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        self.store.write_json(self.path, {**self.data, "job": self.job, "host": socket.gethostname(),
                                          "pid": os.getpid(), "renewed": time.time()})

    def acquire(self, renew_s: float = LEASE_RENEW_S) -> "Lease":
        self._write()
        self._thread = threading.Thread(target=self._renew, args=(renew_s,), name=f"cart-{self.job}-lease",
                                        daemon=True)
        self._thread.start()
        return self

    def _renew(self, renew_s: float) -> None:
        while not self._stop.wait(renew_s):
            try:
                self._write()
            except Exception as exc:  # a store briefly unreachable: the next renewal tries again
                log(self.job, f"could not renew {self.store.uri(self.path)}: {exc}")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)  # a renewal stuck on the store does not hold up the exit
        try:
            self.store.remove(self.path)
        except Exception as exc:  # it goes stale and the next compact removes it
            log(self.job, f"could not remove {self.store.uri(self.path)}: {exc}")

    def __enter__(self) -> "Lease":  # `with lease.acquire():` releases it at the end of the block
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def reader_lease(store: Store, version: int, job: str) -> Lease:
    """The lease that keeps `cart compact` from removing `version` while `job` reads it."""
    return Lease(store, f"{READERS}/{new_run_id(job)}.json", job, {"version": version})


def compact_lease(store: Store, run: str) -> Lease:
    return Lease(store, COMPACT_LEASE, "compact", {"run": run, "started": time.time()})


def _age_s(store: Store, path: str) -> float | None:
    """Seconds since the lease was last written, by the store's clock (mtime, S3 LastModified;
    never from a listing cache); None when it is gone."""
    last = store.last_write(path)
    return None if last is None else time.time() - last


def compact_running(store: Store) -> dict | None:
    """The lease of a `cart compact` removing history and folders now, or None (none, or stale)."""
    try:
        lease = store.read_json(COMPACT_LEASE)
    except (FileNotFoundError, ValueError):
        lease = None
    if not isinstance(lease, dict):
        return None
    age = _age_s(store, COMPACT_LEASE)
    return lease if age is not None and age < LEASE_STALE_S else None


def wait_for_compact(store: Store, job: str, poll_s: float = 1.0) -> None:
    """Until no `cart compact` holds its lease: what it removes is known only once it is done (a
    killed compact's lease goes stale within LEASE_STALE_S)."""
    said = False
    while compact_running(store):
        if not said:
            log(job, "a `cart compact` is removing old versions: waiting for it to finish (its lease, "
                     f"{store.uri(COMPACT_LEASE)}, goes stale {LEASE_STALE_S / 60:.0f} min after a compact dies)")
            said = True
        time.sleep(poll_s)


def missing_file(store: Store, manifest: Manifest) -> str | None:
    """The first file or folder a reader of `manifest` opens that is not there (its history file
    included: Ray actors read the version by number), or None. Never answered from a listing
    cache: another process may have removed it."""
    for path in [store.history_path(manifest.version), *sorted(referenced_paths(manifest))]:
        store._invalidate(store.path(path))
        if not store.exists(path):
            return path
    return None


def require_files(store: Store, manifest: Manifest, why: str) -> None:
    path = missing_file(store, manifest)
    if path is not None:
        raise StoreError(f"{store.uri(path)}: {why}")


def held_versions(store: Store, remove_stale: bool = False) -> dict[int, list[str]]:
    """version -> the jobs whose fresh reader leases hold it. With `remove_stale`, leases not
    written for LEASE_STALE_S (unreadable ones included) are removed."""
    held: dict[int, list[str]] = {}
    store._invalidate(store.path(READERS))
    for name in store.listdir(READERS):
        path = f"{READERS}/{name}"
        try:
            lease = store.read_json(path)
            version = int(lease["version"])
        except FileNotFoundError:  # released meanwhile
            continue
        except (ValueError, TypeError, KeyError, AttributeError):  # written half by a job killed mid-write?
            lease, version = None, None
        age = _age_s(store, path)
        if age is None:
            continue
        if version is None or age >= LEASE_STALE_S:
            if remove_stale and age >= LEASE_STALE_S:
                store.remove(path)
            continue
        held.setdefault(version, []).append(f"{lease.get('job', '?')} ({name.removesuffix('.json')}, "
                                            f"host {lease.get('host', '?')}, pid {lease.get('pid', '?')})")
    return held


def hold(store: Store, manifest: Manifest, job: str) -> Lease:
    """A reader lease on `manifest`'s version, taken in the order that makes it safe (module
    docstring). Raises StoreError, with the lease released, when a file of it is gone."""
    lease = reader_lease(store, manifest.version, job).acquire()
    try:
        wait_for_compact(store, job)  # one that chose what to keep before this lease existed
        require_files(store, manifest, f"needed by version {manifest.version}, which {job} reads, but removed")
    except BaseException:
        lease.release()
        raise
    return lease


@contextmanager
def newest_servable_held(store: Store, job: str, prefer: Callable[[], IndexVersion | None] = lambda: None,
                         tries: int = 3) -> Iterator[IndexVersion]:
    """The newest servable version (or, on the first try, the one `prefer` returns: the version a
    resumed job's saved answers come from), held until the block ends: what a long job whose
    actors load the version later reads, safe from a `cart compact` running meanwhile."""
    lease = None
    try:
        for attempt in range(tries):
            version = (prefer() if attempt == 0 else None) or IndexVersion.newest_servable(store)
            try:
                lease = hold(store, version.manifest, job)
                break
            except StoreError as exc:
                log(job, f"{exc} as this job started: taking the newest servable version again")
        else:
            raise StoreError(f"{store.url}: the newest servable version lost files {tries} times as this job "
                             "started (a `cart compact`?); rerun it when none runs, or `cart check` the store")
        yield version
    finally:
        if lease is not None:
            lease.release()
