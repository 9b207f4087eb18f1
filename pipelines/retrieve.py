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
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cart_core.config import CartConfig
from cart_core.errors import BadInput
from cart_core.index_version import IndexVersion
from cart_core.store import Manifest, Store
from pipelines.queries import QueryTable, check_k, read_query_table
from pipelines.runtime import JobSummary, init_ray, log

RESULT_SCHEMA = pa.schema([("query_id", pa.string()), ("rank", pa.int32()), ("item_id", pa.string()),
                           ("score", pa.float32())])


def load_retriever(version: IndexVersion, device: str = "cpu", mode: str | None = None):
    """(retriever, IdentifierTable) for one committed version: generate, then verify
    (cart_core/hybrid.py) when its generator was fitted with a verifier; mode "generative" keeps
    the beam's own ranking (the ablation). Versions trained before verification existed get the
    generator plus the dense fallback over pending items (cart_core/fallback.py)."""
    from cart_core.fallback import HybridRetriever
    from cart_core.generator import Generator
    from cart_core.retrieval import GenerativeRetriever
    from pipelines.verify import load_verified

    store, manifest = version.store, version.manifest
    table, _ = version.ids()
    with store.local_dir(f"{manifest.generator}/model") as folder:
        generator = Generator.load(folder)
    generator.grow_last_vocab(table.vocab_sizes[-1])  # an incremental add may have widened the counter
    verified = load_verified(version, generator, table, device, mode)
    if verified is not None:
        # pending items stay decodable: verification ranks them, expansion reaches them by prefix
        return verified, table
    pending = manifest.extra.get("pending")
    if not (pending and generator.text_encoder is not None):
        return GenerativeRetriever(generator, table, device=device), table
    fallback, untrained_rows = pending_fallback(version)
    decodable = table
    if len(untrained_rows):
        # the generator has never been trained on these pending items: until their fine-tune, only
        # the dense fallback returns them, so they draw no probability from old items' prefixes
        live = table.live.copy()
        live[untrained_rows] = False
        decodable = replace(table, live=live)
    retriever = HybridRetriever(GenerativeRetriever(generator, decodable, device=device), fallback,
                                generator.text_encoder.sentence_embeddings,
                                manifest.extra.get("pending_threshold"), table=table,
                                interleave=manifest.extra.get("pending_interleave"))
    return retriever, table


def pending_fallback(version: IndexVersion):
    """The dense fallback over the live pending items (cart_core/fallback.py), and the rows of
    those the generator has not been fine-tuned on yet."""
    from cart_core.fallback import DenseFallback
    from cart_core.identifiers import live_rows
    from pipelines.quantize import stack_column

    table, _ = version.ids()
    t = version.pending()
    items = t.column("item_id").to_pylist()
    live_row = live_rows(table, items)
    keep = [j for j, i in enumerate(items) if i in live_row]
    vectors = stack_column(t.column("vector").to_numpy(zero_copy_only=False))[keep] if keep else np.zeros((0, 1))
    untrained = [live_row[i] for i in version.untrained_pending() if i in live_row]
    return (DenseFallback(np.array([live_row[items[j]] for j in keep], dtype=np.int64), vectors),
            np.array(untrained, dtype=np.int64))


def ranked_rows(query_ids, rows: np.ndarray, scores: np.ndarray, item_ids: np.ndarray) -> dict:
    """Flatten [B, k] results into one row per (query, rank), skipping empty slots (-1)."""
    b, k = rows.shape
    valid = rows >= 0
    qi, rank = np.nonzero(valid)
    return {"query_id": np.asarray([str(q) for q in query_ids], dtype=object)[qi],
            "rank": (rank + 1).astype(np.int32),
            "item_id": item_ids[rows[valid]].astype(object),
            "score": scores[valid].astype(np.float32)}


class RetrieveBatch:
    """Actor: the committed model, loaded once; a batch of queries in, ranked rows out."""

    def __init__(self, store_url: str, version: int, k: int, beam_size: int, device: str = "cpu",
                 mode: str | None = None):
        store = Store(store_url)
        self.retriever, self.table = load_retriever(IndexVersion(store, store.version(version)), device, mode)
        self.k, self.beam = k, max(beam_size, k)  # the beam must hold k distinct identifiers

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch["text"]]
        rows, scores = self.retriever.search_batch(texts, k=self.k, beam_size=self.beam)
        return ranked_rows(batch["query_id"], rows, scores, self.table.item_ids)


def retrieve_dataset(store: Store, queries_ds, cfg: CartConfig, k: int, manifest: Manifest):
    import ray

    device = "cuda" if cfg.jobs.retrieve_num_gpus > 0 else "cpu"
    # a small query file is one block, and one block feeds one actor: cut it into several
    queries_ds = queries_ds.repartition(target_num_rows_per_block=4 * cfg.jobs.retrieve_batch_size)
    return queries_ds.map_batches(
        RetrieveBatch, fn_constructor_args=(store.url, manifest.version, k, cfg.eval.beam_size, device,
                                            cfg.verify.mode),
        batch_size=cfg.jobs.retrieve_batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.jobs.retrieve_actors)),
        num_cpus=cfg.jobs.retrieve_num_cpus, num_gpus=cfg.jobs.retrieve_num_gpus,
    )


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


def load_queries(path: str, cfg: CartConfig, job: str, need_item: bool = False) -> QueryTable:
    """The checked, normalised queries of a batch job; refused rows are logged per reason."""
    queries = read_query_table(path, cfg.queries, need_item)
    for line in queries.describe_skips(path):
        log(job, line)
    if queries.table.num_rows == 0:
        raise BadInput(f"{path}: no query left to search ({queries.rows_read} rows, "
                       f"{sum(queries.skipped.values())} skipped)")
    return queries


def run_retrieve(store: Store, queries: str, out: str, cfg: CartConfig, k: int = 10,
                 address: str | None = None) -> dict:
    check_k(k, cfg.queries)
    check_output(out, (queries,))
    checked = load_queries(queries, cfg, "retrieve")  # every input check runs before Ray starts
    version = IndexVersion.newest_servable(store)
    version.ids()  # a damaged identifier table fails here, naming its folder, not in an actor a minute later
    init_ray(address)
    summary = JobSummary("retrieve", store.url)
    manifest = version.manifest
    import ray

    n = checked.table.num_rows
    t0 = time.perf_counter()
    rows = write_results(retrieve_dataset(store, ray.data.from_arrow(checked.table), cfg, k, manifest), out)
    elapsed = summary.time("retrieve_s", t0)
    summary.counts.update(queries=int(n), result_rows=int(rows), queries_skipped=sum(checked.skipped.values()))
    summary.extra.update(version=manifest.version, out=out, k=k, beam_size=cfg.eval.beam_size,
                         queries_per_s=n / max(elapsed, 1e-9), skipped=checked.report()["skipped_by_reason"])
    log("retrieve", f"{n} queries -> {rows} rows in {out} ({n / max(elapsed, 1e-9):.0f} queries/s, "
                    f"version {manifest.version})")
    return summary.write(store)
