"""`cart retrieve`: batch offline retrieval as a streaming Ray Data job.

Queries (query_id, text[, item_id]) are read from Parquet (local or S3) and checked by the rules
`cart serve` applies (pipelines/queries.py) before Ray starts; then they flow through an actor
pool; each actor loads the committed generator + identifier table once and runs
constrained beam search per batch. Results (query_id, rank, item_id, score) stream back to the
driver, which appends them to one Parquet file, so memory stays flat for millions of queries.
"""
from __future__ import annotations

import os
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from cart_core.config import CartConfig
from cart_core.errors import BadInput
from cart_core.index_version import IndexVersion
from cart_core.store import Store
from pipelines.queries import check_k, load_queries
from pipelines.runtime import JobSummary, init_ray, log
from pipelines.verify import query_time, verify_settings
from pipelines.search import retrieve_dataset

RESULT_SCHEMA = pa.schema([("query_id", pa.string()), ("rank", pa.int32()), ("item_id", pa.string()),
                           ("score", pa.float32())])


def check_output(out: str, inputs: tuple[str, ...] = ()) -> None:
    """Refuse an output path that cannot be written, before any work: a folder, or an input file."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(out)
    if fs.isdir(path):
        raise BadInput(f"{out}: is a folder; give the Parquet file to write")
    for given in inputs:
        if given and fsspec.core.url_to_fs(given)[1] == path:
            raise BadInput(f"{out}: is also an input; write the results elsewhere")


def temp_name(path: str) -> str:
    """A sibling temp file carrying this process's id, so a rerun can tell a dead job's leftover."""
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_dead_temps(fs, path: str) -> list[str]:
    """Temp files of `path` left by a killed job on this machine (their process is gone)."""
    removed = []
    for name in fs.glob(f"{path}.tmp-*"):
        pid = name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            fs.rm(name)
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_results(results_ds, out: str) -> int:
    """Stream result batches into one Parquet file: written to a temp beside it, renamed when whole,
    and the temp removed when the job fails (SIGTERM and Ctrl-C included: the CLI raises on both)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(out)
    if "file" in fs.protocol:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for name in remove_dead_temps(fs, path):
        log("retrieve", f"removed {name}, left by a killed run")
    target, rows = temp_name(path), 0
    try:
        with fs.open(target, "wb") as f, pq.ParquetWriter(f, RESULT_SCHEMA) as writer:
            for batch in results_ds.iter_batches(batch_format="pyarrow", batch_size=65536):
                writer.write_table(batch.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA))
                rows += batch.num_rows
        fs.mv(target, path)
    except BaseException:
        if fs.exists(target):
            fs.rm(target)
        raise
    return rows


def run_retrieve(store: Store, queries: str, out: str, cfg: CartConfig, k: int = 10,
                 address: str | None = None) -> dict:
    check_k(k, cfg.queries)
    check_output(out, (queries,))
    checked = load_queries(queries, cfg.queries, "retrieve")  # every input check runs before Ray starts
    version = IndexVersion.newest_servable(store)
    version.ids()  # a damaged identifier table fails here, naming its folder, not in an actor a minute later
    verify_settings(version, query=query_time(cfg))  # logs the verify.* settings that differ from the fitted ones
    init_ray(address)
    summary = JobSummary("retrieve", store.url)
    manifest = version.manifest
    n = checked.table.num_rows
    t0 = time.perf_counter()
    rows = write_results(retrieve_dataset(checked.table, cfg, k, version), out)
    elapsed = summary.time("retrieve_s", t0)
    summary.counts.update(queries=int(n), result_rows=int(rows), queries_skipped=sum(checked.skipped.values()))
    summary.extra.update(version=manifest.version, out=out, k=k, beam_size=cfg.eval.beam_size,
                         queries_per_s=n / max(elapsed, 1e-9), skipped=checked.report()["skipped_by_reason"])
    log("retrieve", f"{n} queries -> {rows} rows in {out} ({n / max(elapsed, 1e-9):.0f} queries/s, "
                    f"version {manifest.version})")
    return summary.write(store)
