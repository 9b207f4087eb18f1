"""A committed version's retriever, and the Ray Data stage that runs it over batches of queries.

`load_retriever` is what every job that answers queries builds on (`cart retrieve`, `cart evaluate`,
`cart serve`, the benchmarks): generate, then verify when the version's generator carries a
verifier (cart_core/hybrid.py), else the beam's ranking plus the dense fallback over pending items.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cart_core.config import CartConfig
from cart_core.index_version import IndexVersion
from cart_core.store import Store, StoreError, unloadable
from pipelines.stages import Resources, Stage, run_stage, stack_column
from pipelines.verify import query_time


def load_retriever(version: IndexVersion, device: str = "cpu", mode: str | None = None,
                   query: dict | None = None):
    """(retriever, IdentifierTable) for one committed version: generate, then verify
    (cart_core/hybrid.py) when its generator was fitted with a verifier; mode "generative" keeps
    the beam's own ranking (the ablation); `query` (pipelines.verify.query_time of the job's
    config) sets what a query costs: its candidates and the item neighbour lists
    (cart_core/neighbors.py). Both default to what the verifier was fitted with. Versions trained before verification existed get the
    generator plus the dense fallback over pending items (cart_core/fallback.py)."""
    from cart_core.fallback import HybridRetriever
    from cart_core.retrieval import GenerativeRetriever
    from pipelines.verify import load_verified

    manifest = version.manifest
    table, _ = version.ids()
    generator = load_generator(version)
    generator.grow_last_vocab(table.vocab_sizes[-1])  # an incremental add may have widened the counter
    verified = load_verified(version, generator, table, device, mode, query)
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


def load_generator(version: IndexVersion):
    """The version's generator; files that exist but do not load are a StoreError naming the folder."""
    from cart_core.generator import Generator

    store, folder = version.store, f"{version.manifest.generator}/model"
    try:
        with store.local_dir(folder) as local:
            return Generator.load(local)
    except (StoreError, MemoryError):
        raise
    except Exception as exc:  # reading files only: a truncated or foreign file
        raise unloadable(store, folder, "the generator", exc) from exc


def pending_fallback(version: IndexVersion):
    """The dense fallback over the live pending items (cart_core/fallback.py), and the rows of
    those the generator has not been fine-tuned on yet."""
    from cart_core.fallback import DenseFallback
    from cart_core.identifiers import live_rows

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


RANKED_SCHEMA = pa.schema([("pos", pa.int64()), ("query_id", pa.string()), ("item_ids", pa.list_(pa.string())),
                           ("scores", pa.list_(pa.float32()))])


def ranked_lists(positions, query_ids, rows: np.ndarray, scores: np.ndarray, item_ids: np.ndarray) -> pa.Table:
    """One row per query (RANKED_SCHEMA): its answers best first, empty slots (-1) dropped. A
    query's answer is one row, so no block boundary can split it: what lets `cart retrieve` save
    finished queries as they stream in and resume from them."""
    valid = rows >= 0
    offsets = pa.array(np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int32))
    return pa.table({
        "pos": pa.array(np.asarray(positions, dtype=np.int64)),
        "query_id": pa.array([str(q) for q in query_ids], pa.string()),
        "item_ids": pa.ListArray.from_arrays(offsets, pa.array(item_ids[rows[valid]].astype(str), pa.string())),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(scores[valid].astype(np.float32))),
    }, schema=RANKED_SCHEMA)


def flatten_ranked(table: pa.Table) -> pa.Table:
    """RANKED_SCHEMA rows as one row per (query, rank): query_id, rank (1 = best), item_id, score."""
    table = table.combine_chunks()
    lengths = pc.list_value_length(table.column("item_ids")).fill_null(0).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    owner = np.repeat(np.arange(table.num_rows), lengths)
    return pa.table({
        "query_id": pc.take(table.column("query_id"), pa.array(owner)),
        "rank": pa.array((np.arange(int(lengths.sum())) - starts[owner] + 1).astype(np.int32)),
        "item_id": pc.list_flatten(table.column("item_ids")),
        "score": pc.list_flatten(table.column("scores")),
    })


@dataclass
class RetrieveStage(Stage):
    """The committed version's retriever, loaded once per actor; a batch of queries in, one row of
    ranked answers per query out (ranked_lists; `pos` is the query's row in the job's table)."""

    name = "retrieve"
    inputs = ("pos", "query_id", "text")
    outputs = tuple(RANKED_SCHEMA.names)
    batch_format = "numpy"

    resources: Resources
    store_url: str
    version: int
    k: int
    beam_size: int
    mode: str | None = None
    query: dict | None = None
    withdrawn: tuple[str, ...] = ()  # IndexVersion.withdrawn of the version the driver chose

    def setup(self) -> None:
        store = Store(self.store_url)
        version = IndexVersion(store, store.version(self.version), withdrawn=frozenset(self.withdrawn))
        self.retriever, self.table = load_retriever(version, self.resources.device, self.mode, self.query)

    def process_batch(self, batch: dict) -> pa.Table:
        texts = [str(t) for t in batch["text"]]
        # the beam must hold k distinct identifiers
        rows, scores = self.retriever.search_batch(texts, k=self.k, beam_size=max(self.beam_size, self.k))
        return ranked_lists(batch["pos"], batch["query_id"], rows, scores, self.table.item_ids)


def retrieve_resources(cfg: CartConfig) -> Resources:
    jobs = cfg.jobs
    return Resources(jobs.retrieve_actors, jobs.retrieve_num_cpus, jobs.retrieve_num_gpus, jobs.retrieve_batch_size,
                     "jobs.retrieve_")


def retrieve_dataset(queries: pa.Table, cfg: CartConfig, k: int, version: IndexVersion):
    """Ray dataset of ranked answers, one row per query (RANKED_SCHEMA), for a table of checked
    queries; `pos` numbers them in order unless the table brings its own."""
    if "pos" not in queries.column_names:
        queries = queries.append_column("pos", pa.array(np.arange(queries.num_rows, dtype=np.int64)))
    stage = RetrieveStage(retrieve_resources(cfg), version.store.url, version.version, k,
                          cfg.eval.beam_size, cfg.verify.mode, query_time(cfg), tuple(sorted(version.withdrawn)))
    return run_stage(stage, queries.select(list(stage.inputs)))
