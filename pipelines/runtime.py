"""What every Ray job shares: connecting to Ray, the job summary, one-line progress messages."""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field

from cart_core.store import Store, new_run_id


def init_ray(address: str | None = None) -> None:
    """Join a cluster (`auto`, `ray://host:10001`, `host:6379`) or start a local Ray in-process.

    Inside `ray job submit` RAY_ADDRESS is set, so `auto` is implied there."""
    import ray

    if ray.is_initialized():
        return
    # "local" always starts a fresh in-process Ray: a bare ray.init() would join whatever cluster
    # a stale /tmp/ray/ray_current_cluster names
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs = {"log_to_driver": True}
    if address == "local":
        kwargs.update(include_dashboard=False)
    ray.init(address=address, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty() or os.environ.get("CART_PROGRESS") == "1"


def ray_started_here() -> bool:
    """Whether this process started the Ray it uses (`ray.init(address="local")`): nothing can add
    nodes to it, so work that does not fit its CPUs never starts."""
    import ray

    try:
        return bool(ray._private.worker.global_worker.node.head)
    except AttributeError:  # not connected, or Ray's internals moved: assume a cluster that may grow
        return False


def crash_point(name: str) -> None:
    """Fault injection for the tests: CART_CRASH_AT=<name> kills the run at that step."""
    if os.environ.get("CART_CRASH_AT") == name:
        raise RuntimeError(f"injected crash at {name}")


def log(job: str, message: str) -> None:
    print(f"[cart {job}] {message}", file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    """Peak resident memory of this process (the driver) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class JobSummary:
    """Counts, timings and errors of one job; written to `jobs/<run>.json` in the store."""

    job: str
    store: str
    run: str = ""
    counts: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.run = self.run or new_run_id(self.job)
        self._t0 = time.perf_counter()

    def time(self, name: str, since: float) -> float:
        self.timings[name] = round(time.perf_counter() - since, 3)
        return self.timings[name]

    def as_dict(self) -> dict:
        return {"job": self.job, "store": self.store, "run": self.run, "counts": self.counts,
                "timings": {**self.timings, "total_s": round(time.perf_counter() - self._t0, 3)},
                "errors": self.errors, "driver_peak_rss_mib": round(peak_rss_mib(), 1), **self.extra}

    def write(self, store: Store) -> dict:
        data = self.as_dict()
        store.write_json(f"jobs/{self.run}.json", data)
        log(self.job, json.dumps({k: data[k] for k in ("counts", "timings", "errors")}))
        return data
