"""The one way our jobs run work on Ray Data: a `Stage` and `run_stage`.

A stage declares what it needs and what it does, in the spirit of NVIDIA NeMo Curator's stages:

- `resources`: the autoscaling actor pool (1..actors), CPUs and GPUs per actor, rows per batch;
- `inputs` / `outputs`: the columns it reads and the columns every batch it returns carries;
- `setup()`: runs once per actor (load a model, read codebooks), never on the driver;
- `process_batch(batch)`: one batch in (pyarrow or numpy, `batch_format`), one batch out.

A stage whose rows can fail one by one (a file that does not decode) returns them with
`status = "error"` and a `reason`; the driver sends those to the errors table
through `pipelines.parts.ErrorLog`, the same way for every job. The stage object is built on
the driver from the config, so it holds only small settings; `run_stage` ships it to each actor
with the driver's storage settings (so actors open s3:// exactly as the driver does).

Extract, caption, quantize (caption embeddings, code assignment), retrieve and evaluate all run
through `run_stage`; nothing else in `pipelines/` calls `map_batches` with an actor pool.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import numpy as np
import pyarrow as pa

MAX_BLOCK_ROWS = 256                 # rows per input block fed to the pool (more blocks than actors)


@dataclass(frozen=True)
class Resources:
    """What one stage asks of the cluster: an autoscaling pool of 1..actors actors, each reserving
    num_cpus / num_gpus, fed batch_size rows at a time. Every stage names all four (from its
    config section), so no job runs on a size nobody chose."""

    actors: int
    num_cpus: float
    num_gpus: float
    batch_size: int
    section: str = ""  # the config keys these come from, as `<section><key>` (e.g. "jobs.retrieve_"), for messages

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"


class Stage:
    """Subclass with the class attributes below and `process_batch`; `setup` when it loads things."""

    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]]
    outputs: ClassVar[tuple[str, ...]]
    batch_format: ClassVar[str] = "pyarrow"   # "pyarrow" | "numpy"
    resources: Resources

    def setup(self) -> None:
        """Once per actor, before its first batch."""

    def process_batch(self, batch: Any) -> Any:
        raise NotImplementedError


class StageActor:
    """The Ray Data actor behind every stage: sets the storage settings, calls setup once, then
    checks each batch against the stage's declared columns (a wrong column is a bug, named)."""

    def __init__(self, stage: Stage, env: dict[str, str]):
        os.environ.update(env)
        self.stage = stage
        stage.setup()

    def __call__(self, batch):
        stage = self.stage
        missing = [c for c in stage.inputs if c not in _columns(batch)]
        if missing:
            raise KeyError(f"stage {stage.name}: input batch lacks column(s) {missing}; has {_columns(batch)}")
        out = stage.process_batch(batch)
        missing = [c for c in stage.outputs if c not in _columns(out)]
        if missing:
            raise KeyError(f"stage {stage.name}: process_batch returned no {missing} column(s)")
        return out


def _columns(batch) -> list[str]:
    return list(batch.column_names) if isinstance(batch, pa.Table) else list(batch)


def storage_env() -> dict[str, str]:
    """The driver's S3 settings (endpoint, region, credentials from AWS_* variables), handed to
    the actors as a constructor argument (not a runtime_env, which the dashboard displays). Empty
    when none are set: the workers then use their own credentials (e.g. an instance role)."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def block_rows(n: int, batch_size: int, actors: int) -> int:
    """Rows per Ray block: several blocks per actor (so the pool scales and progress moves),
    whole batches each, and small enough that a block's results stream back early."""
    per = -(-n // max(1, actors * 4))
    return int(min(max(batch_size, per), max(batch_size, MAX_BLOCK_ROWS)) // batch_size * batch_size)


def run_stage(stage: Stage, source):
    """The Ray dataset of `stage` applied to `source`: a pyarrow Table on the driver (cut into
    blocks sized for the pool) or a Ray dataset (read_parquet, an earlier stage)."""
    import ray

    res = stage.resources
    check_actor_fits(stage)
    if isinstance(source, pa.Table):
        missing = [c for c in stage.inputs if c not in source.column_names]
        if missing:
            raise KeyError(f"stage {stage.name}: input table lacks column(s) {missing}")
        step = block_rows(source.num_rows, res.batch_size, res.actors)
        source = ray.data.from_arrow([source.slice(s, step) for s in range(0, max(source.num_rows, 1), step)])
    return source.map_batches(
        StageActor, fn_constructor_args=(stage, storage_env()), batch_size=res.batch_size,
        batch_format=stage.batch_format, num_cpus=res.num_cpus, num_gpus=res.num_gpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, res.actors)))


def check_actor_fits(stage: Stage) -> None:
    """An actor that no node up now can hold would leave Ray Data waiting for ever, without a word:
    refused on a Ray this process started (nothing can add nodes to it); on a cluster, said, since
    an autoscaler may add such a node. Counted in Ray's fixed point (1e-4 of a resource)."""
    check_resources_fit(stage.name, stage.resources)


def check_resources_fit(name: str, res: Resources) -> None:
    """`check_actor_fits` for a stage not built yet (a job checks before it writes anything)."""
    import ray

    from pipelines.runtime import log, ray_started_here

    need = [("CPU", res.num_cpus), ("GPU", res.num_gpus)]
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(all(round(r.get(kind, 0) * 10_000) >= round(amount * 10_000) for kind, amount in need) for r in nodes):
        return
    asked = f"one {name} actor needs {res.num_cpus:g} CPU" + (f" + {res.num_gpus:g} GPU" if res.num_gpus else "")
    have = ", ".join(f"{r.get('CPU', 0):g} CPU + {r.get('GPU', 0):g} GPU" for r in nodes) or "no node"
    names = ["num_cpus", "num_gpus"] if res.num_gpus else ["num_cpus"]
    keys = " / ".join(f"{res.section}{n}" for n in names) if res.section else "its " + " / ".join(names)
    if ray_started_here():
        from cart_core.errors import BadInput

        raise BadInput(f"{asked}; no node of this machine's Ray has that ({have}): lower {keys} or pass "
                       "--address of a cluster with such a node")
    log(name, f"{asked}, which no node up now has ({have}): waiting for one (an autoscaler's); {keys} "
                    "set what an actor asks for")


def stream(ds, total: int, desc: str, count=lambda batch: batch.num_rows) -> Iterator[pa.Table]:
    """Iterate a stage's results (pyarrow) as they finish, with an items progress bar."""
    with progress(total, desc) as bar:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            bar.update(count(batch))
            yield batch


def progress(total: int, desc: str):
    """An items progress bar on a terminal (or with CART_PROGRESS=1, like Ray Data's own bars)."""
    from tqdm import tqdm

    show = sys.stderr.isatty() or os.environ.get("CART_PROGRESS") == "1"
    return tqdm(total=total, desc=desc, unit="item", disable=not show)


def column_rows(column, width: int = 0) -> np.ndarray:
    """float32 [n, width] from an Arrow list column (a table's, not a Ray batch's): a fixed-size
    list is read from its flat values (one copy, no numpy object per row: 1M x 512 in about a
    second); any other list goes through stack_column. `width` as in stack_column."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_fixed_size_list(column.type) and column.null_count == 0:
        size = column.type.list_size
        flat = column.flatten().to_numpy(zero_copy_only=False)
        return np.ascontiguousarray(flat.reshape(len(column), size), dtype=np.float32)
    return stack_column(column.to_numpy(zero_copy_only=False), width)


def stack_column(values, width: int = 0) -> np.ndarray:
    """Fixed-size-list columns reach numpy batches as object arrays of rows: stack them. `width`:
    the row length an empty column stacks to (a table whose rows a filter removed keeps its schema)."""
    arr = np.asarray(values)
    if arr.dtype == object:
        arr = np.stack(list(arr)) if len(arr) else np.zeros((0, width), np.float32)
    return np.ascontiguousarray(arr, dtype=np.float32)
