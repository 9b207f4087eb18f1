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

Freshness is judged by the store's clock (the file's mtime, S3 LastModified): a lease's age is
its time subtracted from that of a file the checker just wrote itself (its own lease), so neither
the job host's clock nor the checker's decides. A lease whose holder ran on the checker's own
machine (same boot, same PID namespace) is judged at once instead: stale when that process is gone
(`holder_is_gone`), so a compact killed with SIGKILL or by the OOM killer holds up the next
compact, rollback or job on its host for no time, and elsewhere for LEASE_STALE_S.

The order that makes a version safe to read (`hold`): the job writes its lease, waits for a
compact holding its lease, then checks the version's files, bypassing any listing cache. A
compact writes its lease before it reads the reader leases. So either the compact sees the job's
lease, or the job sees the compact's and checks the files only after it finished.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Callable, Iterator

from cart_core.index_version import IndexVersion, referenced_paths
from cart_core.store import Manifest, Store, StoreError, new_run_id
from pipelines.runtime import log

COMPACT_LEASE = "jobs/compact-running.json"
READERS = "jobs/readers"
LEASE_RENEW_S = 60.0
LEASE_STALE_S = 15 * 60.0  # a lease not written for this long belongs to a job that died
RELEASE_WAIT_S = 10.0  # how long a release waits for a renewal in flight
TAKEOVER_SETTLE_S = 2.0  # after taking a dead holder's exclusive lease over: how long before reading it back
# what the messages say about a lease whose holder died
GOES_STALE = f"goes stale {LEASE_STALE_S / 60:.0f} min after its holder dies, at once on the holder's machine"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the PID,
    it names one process, where a PID alone may be reused. None off Linux or when it is gone."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat or ")" not in stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None


def _namespace(kind: str) -> str | None:
    """This process's `kind` namespace ("pid", "time"): /proc/self/ns/<kind>, None without one."""
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return None


_IDENTITY: dict[int, dict] = {}  # per PID: a forked child is another process


def process_identity() -> dict:
    """What says, on another process of the same machine, whether the holder still runs: the host
    and the boot (machines cloned from one snapshot share a boot id, containers on the host network
    a host name), the PID and time namespaces and the process's start. Empty where /proc is not
    this process's own (off Linux, or a PID namespace without its /proc): such a lease is judged
    by its age only. Read once per process."""
    pid = os.getpid()
    if pid not in _IDENTITY:
        try:
            own_proc = os.readlink("/proc/self") == str(pid)
        except OSError:
            own_proc = False
        boot, space, start = _read("/proc/sys/kernel/random/boot_id"), _namespace("pid"), _start_ticks(pid)
        # start times in /proc are shifted by the reader's time namespace (Linux >= 5.6); "" on a
        # kernel without them, where every process shares one clock
        _IDENTITY[pid] = {} if not own_proc or None in (boot, space, start) else {
            "boot_id": boot, "pid_namespace": space, "time_namespace": _namespace("time") or "",
            "pid_start": start, "host": socket.gethostname()}
    return dict(_IDENTITY[pid])


def holder_is_gone(lease: dict) -> bool:
    """True only when the lease was written on this machine (host, boot, PID and time namespace)
    and its process no longer runs (its PID is free, or taken by a process that started later).
    Anything this process cannot see (another machine or container, a lease without the
    identity) is False: then only its age decides."""
    pid, mine = lease.get("pid"), process_identity()
    if not mine or not isinstance(pid, int) or lease.get("pid_start") is None \
            or any(lease.get(key) != mine[key] for key in ("host", "boot_id", "pid_namespace", "time_namespace")):
        return False
    return _start_ticks(pid) != lease["pid_start"]


def _settle(seconds: float) -> None:
    """The wait between taking a lease over and reading it back (a test replays a rival's takeover here)."""
    time.sleep(seconds)


class Lease:
    """A JSON file in the store that a daemon thread rewrites every `renew_s` while the job runs;
    `release` (or the end of a `with` block) stops the thread and removes the file."""

    def __init__(self, store: Store, path: str, job: str, data: dict):
        self.store, self.path, self.job, self.data = store, path, job, data
        self.identity = process_identity()
        self.token = uuid.uuid4().hex  # tells this holder's writes from another's
        self._stop = threading.Event()
        self._writing = threading.Lock()  # a renewal and the release never interleave
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.data, **self.identity, "job": self.job, "host": socket.gethostname(),
                           "pid": os.getpid(), "token": self.token, "renewed": time.time()},
                          indent=2, sort_keys=True).encode()

    def acquire(self, renew_s: float = LEASE_RENEW_S, exclusive: bool = False) -> "Lease":
        """Writes the lease and starts renewing it. `exclusive`: only if no other holds it (an atomic
        create; a stale one is taken over: _take_over), else StoreError."""
        if exclusive:
            if not self.store._create_exclusive(self.store.path(self.path), self._body()):
                self._take_over()
        else:
            self.store._write_bytes(self.store.path(self.path), self._body())
        self._thread = threading.Thread(target=self._renew, args=(renew_s,), name=f"cart-{self.job}-lease",
                                        daemon=True)
        self._thread.start()
        return self

    def _held_by_other(self, holder: dict) -> StoreError:
        return StoreError(f"{self.store.uri(self.path)}: held by {self.job} run {holder.get('run', '?')} on "
                          f"{holder.get('host', '?')} (pid {holder.get('pid', '?')}); rerun when it has finished "
                          f"(the lease {GOES_STALE})")

    def _take_over(self) -> None:
        """The exclusive lease exists: StoreError while its holder may run; else remove it, create
        ours, and read it back after TAKEOVER_SETTLE_S. Removing is not atomic with the judgement:
        two jobs that judged the same dead lease at once may each remove and create, the later one
        removing the earlier one's new lease. Both read back: the one whose lease is not there
        anymore gives up (without removing the other's), so one holds it."""
        holder = _fresh(self.store, self.path)
        if holder is not None:
            raise self._held_by_other(holder)
        self.store.remove(self.path)  # stale: its holder died
        if not self.store._create_exclusive(self.store.path(self.path), self._body()):
            raise self._held_by_other(_fresh(self.store, self.path) or {})  # another took it over first
        _settle(TAKEOVER_SETTLE_S)
        self.store._invalidate(self.store.path(self.path))
        try:
            now = self.store.read_json(self.path)
        except (FileNotFoundError, ValueError):
            now = {}
        if not isinstance(now, dict) or now.get("token") != self.token:
            raise self._held_by_other(now if isinstance(now, dict) else {})

    def _renew(self, renew_s: float) -> None:
        while not self._stop.wait(renew_s):
            with self._writing:
                if self._stop.is_set():
                    return
                try:
                    self.store._write_bytes(self.store.path(self.path), self._body())
                except Exception as exc:  # a store briefly unreachable: the next renewal tries again
                    log(self.job, f"could not renew {self.store.uri(self.path)}: {exc}")
                if self._stop.is_set():  # released while this write hung: it must not bring the lease back
                    self._remove()

    def release(self) -> None:
        self._stop.set()
        got = self._writing.acquire(timeout=RELEASE_WAIT_S)  # a renewal stuck on the store does not hold up the exit
        try:
            self._remove()  # a renewal still in flight removes it again when its write lands
        finally:
            if got:
                self._writing.release()

    def _remove(self) -> None:
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


def _store_now(store: Store, clock: str | None) -> float:
    """Now, by the store's clock: when the checker just wrote `clock` (its own lease), that file's
    time, so that a checking host whose clock runs ahead cannot take a live lease for stale."""
    stamp = store.last_write(clock) if clock else None
    return time.time() if stamp is None else stamp


def _lease_at(store: Store, path: str, now: float) -> tuple[dict | None, float | None]:
    """The lease at `path` ({} when unreadable: a writer killed mid-write) and its age in seconds
    by the store's clock (mtime, S3 LastModified; never from a listing cache) against `now`
    (_store_now); (None, None) when it is gone."""
    try:
        lease = store.read_json(path)
    except FileNotFoundError:
        return None, None
    except ValueError:
        lease = {}
    last = store.last_write(path)
    if last is None:
        return None, None
    return (lease if isinstance(lease, dict) else {}), max(0.0, now - last)


def _stale(lease: dict, age: float) -> bool:
    """Not written for LEASE_STALE_S, or its holder ran on this machine and is gone."""
    return age >= LEASE_STALE_S or holder_is_gone(lease)


def _fresh(store: Store, path: str, clock: str | None = None) -> dict | None:
    """The lease at `path` when it was written within LEASE_STALE_S by a holder that may still run
    (an unreadable one counts as fresh until then: its holder may be alive), else None."""
    lease, age = _lease_at(store, path, _store_now(store, clock))
    return lease if age is not None and not _stale(lease, age) else None


def compact_running(store: Store, clock: str | None = None) -> dict | None:
    """The lease of a `cart compact` removing history and folders now, or None (none, or stale).
    `clock`: a file the caller just wrote (pipelines/leases._store_now)."""
    return _fresh(store, COMPACT_LEASE, clock)


def wait_for_compact(store: Store, job: str, poll_s: float = 1.0, clock: str | None = None) -> None:
    """Until no `cart compact` holds its lease: what it removes is known only once it is done (a
    killed compact's lease goes stale within LEASE_STALE_S; at once on its own machine)."""
    said = False
    while compact_running(store, clock):
        if not said:
            log(job, "a `cart compact` is removing old versions: waiting for it to finish (its lease, "
                     f"{store.uri(COMPACT_LEASE)}, {GOES_STALE})")
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


def held_versions(store: Store, remove_stale: bool = False, clock: str | None = None) -> dict[int, list[str]]:
    """version -> the jobs whose fresh reader leases hold it. With `remove_stale`, leases not
    written for LEASE_STALE_S (unreadable ones included) are removed. `clock`: a file the caller
    just wrote (its own lease), whose time is now by the store's clock."""
    held: dict[int, list[str]] = {}
    now = _store_now(store, clock)  # once: every lease is aged against the same moment
    store._invalidate(store.path(READERS))
    for name in store.listdir(READERS):
        path = f"{READERS}/{name}"
        lease, age = _lease_at(store, path, now)
        if age is None:  # released meanwhile
            continue
        if _stale(lease, age):
            if remove_stale:
                store.remove(path)
            continue
        try:
            version = int(lease["version"])
        except (KeyError, TypeError, ValueError):  # written half by a job killed mid-write: stale in time
            continue
        held.setdefault(version, []).append(f"{lease.get('job', '?')} ({name.removesuffix('.json')}, "
                                            f"host {lease.get('host', '?')}, pid {lease.get('pid', '?')})")
    return held


def hold(store: Store, manifest: Manifest, job: str) -> Lease:
    """A reader lease on `manifest`'s version, taken in the order that makes it safe (module
    docstring). Raises StoreError, with the lease released, when a file of it is gone."""
    lease = reader_lease(store, manifest.version, job).acquire()
    try:
        wait_for_compact(store, job, clock=lease.path)  # one that chose what to keep before this lease existed
        require_files(store, manifest, f"needed by version {manifest.version}, which {job} reads, but removed")
    except BaseException:
        lease.release()
        raise
    return lease


def _preferred(prefer: Callable[[], IndexVersion | None], job: str) -> IndexVersion | None:
    try:
        return prefer()
    except (StoreError, OSError) as exc:  # e.g. removed by a compact as it was read: the newest serves
        log(job, f"the version to resume on cannot be read ({exc}): taking the newest servable one")
        return None


@contextmanager
def newest_servable_held(store: Store, job: str, prefer: Callable[[], IndexVersion | None] = lambda: None,
                         tries: int = 3) -> Iterator[IndexVersion]:
    """The newest servable version (or, on the first try, the one `prefer` returns: the version a
    resumed job's saved answers come from), held until the block ends: what a long job whose
    actors load the version later reads, safe from a `cart compact` running meanwhile."""
    lease = None
    try:
        for attempt in range(tries):
            version = (_preferred(prefer, job) if attempt == 0 else None) or IndexVersion.newest_servable(store)
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
