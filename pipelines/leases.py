"""Who holds what in a store while jobs run: the leases `cart compact` respects.

Two kinds, both small JSON files under `jobs/`:

* `jobs/compact-running.json`: a `cart compact` is removing history files and folders. A rollback
  refuses to start under it, and a reader that pins a version after it started waits for it (what
  it removes is known only once it is done).
* `jobs/readers/<run>.json`: a long job (`cart retrieve`, `cart evaluate`, `cart train`) reads one
  version for its whole run; its Ray actors may start minutes after the driver chose the version.
  `cart compact` keeps every version a fresh reader lease names, with all its files. The job
  renews its lease every READER_RENEW_S; one not renewed for READER_STALE_S belongs to a job that
  died (SIGKILL, a lost node) and is ignored, then removed by the next compact.

The order that makes a version safe to read: the reader writes its lease, then waits for any
compact holding its lease, then checks the version's files. A compact writes its lease before it
reads the reader leases. So either the compact sees the reader's lease, or the reader sees the
compact's and checks the files only after it finished (and takes a newer version if they are gone).
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
LEASE_STALE_S = 6 * 3600  # a compact lease older than this belongs to a compact that was killed
READERS = "jobs/readers"
READER_RENEW_S = 60.0
READER_STALE_S = 15 * 60.0  # a reader lease not renewed for this long belongs to a job that died


def compact_running(store: Store) -> dict | None:
    """The lease of a `cart compact` removing history and folders now, or None (none, or a stale one)."""
    if not store.exists(COMPACT_LEASE):
        return None
    try:
        lease = store.read_json(COMPACT_LEASE)
        started = float(lease.get("started", 0))
    except (ValueError, TypeError, AttributeError, FileNotFoundError):
        return None
    return lease if time.time() - started < LEASE_STALE_S else None


def wait_for_compact(store: Store, job: str, poll_s: float = 1.0) -> None:
    """Until no `cart compact` holds its lease: what it removes is known only once it is done."""
    said = False
    while compact_running(store):
        if not said:
            log(job, "a `cart compact` is removing old versions: waiting for it to finish (remove "
                     f"{store.uri(COMPACT_LEASE)} if none runs)")
            said = True
        time.sleep(poll_s)


def missing_file(store: Store, manifest: Manifest) -> str | None:
    """The first file or folder a reader of `manifest` opens that is not there (its history file
    included: Ray actors read the version by number), or None."""
    for path in [store.history_path(manifest.version), *sorted(referenced_paths(manifest))]:
        if not store.exists(path):
            return path
    return None


def require_files(store: Store, manifest: Manifest, why: str) -> None:
    path = missing_file(store, manifest)
    if path is not None:
        raise StoreError(f"{store.uri(path)}: {why}")


class ReaderLease:
    """`jobs/readers/<run>.json`: keeps `cart compact` from removing `version` while `job` reads it.
    A daemon thread renews it; `release` removes it."""

    def __init__(self, store: Store, version: int, job: str):
        self.store, self.version, self.job = store, version, job
        self.path = f"{READERS}/{new_run_id(job)}.json"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        self.store.write_json(self.path, {"version": self.version, "job": self.job, "host": socket.gethostname(),
                                          "pid": os.getpid(), "renewed": time.time()})

    def acquire(self, renew_s: float = READER_RENEW_S) -> "ReaderLease":
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

    @contextmanager
    def held(self) -> Iterator["ReaderLease"]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.store.remove(self.path)
        except Exception as exc:  # it goes stale and the next compact removes it
            log(self.job, f"could not remove {self.store.uri(self.path)}: {exc}")


def held_versions(store: Store, remove_stale: bool = False) -> dict[int, list[str]]:
    """version -> the jobs whose fresh reader leases hold it. With `remove_stale`, leases not
    renewed for READER_STALE_S (and unreadable ones older than that) are removed."""
    held: dict[int, list[str]] = {}
    for name in store.listdir(READERS):
        path = f"{READERS}/{name}"
        try:
            lease = store.read_json(path)
            renewed, version = float(lease["renewed"]), int(lease["version"])
        except FileNotFoundError:  # released meanwhile
            continue
        except (ValueError, TypeError, KeyError, AttributeError):  # written half by a job killed mid-write?
            last = store.last_write(path)
            if remove_stale and last is not None and time.time() - last > READER_STALE_S:
                store.remove(path)
            continue
        if time.time() - renewed > READER_STALE_S:
            if remove_stale:
                store.remove(path)
            continue
        held.setdefault(version, []).append(f"{lease.get('job', '?')} ({name.removesuffix('.json')}, "
                                            f"host {lease.get('host', '?')}, pid {lease.get('pid', '?')})")
    return held


@contextmanager
def newest_servable_held(store: Store, job: str, prefer: Callable[[], IndexVersion | None] = lambda: None,
                         tries: int = 3) -> Iterator[IndexVersion]:
    """The newest servable version (or the one `prefer` returns, e.g. the version a resumed job's
    saved answers come from), held by a reader lease until the block ends: what a long job whose
    actors load the version later reads, safe from a `cart compact` running meanwhile."""
    lease = None
    try:
        for _ in range(tries):
            version = prefer() or IndexVersion.newest_servable(store)
            lease = ReaderLease(store, version.version, job).acquire()
            wait_for_compact(store, job)  # one that chose what to keep before this lease existed
            gone = missing_file(store, version.manifest)
            if gone is None:
                break
            lease.release()
            lease = None
            log(job, f"version {version.version} lost {store.uri(gone)} to a `cart compact` as this job started: "
                     "taking the newest servable version again")
        else:
            raise StoreError(f"{store.url}: the newest servable version was removed by `cart compact` {tries} times "
                             "as this job started; rerun it when no compact runs")
        yield version
    finally:
        if lease is not None:
            lease.release()
