"""`cart evaluate`: R@1/5/10, MdR, MRR@10 of the committed index beside dense baselines.

The generative rows come from the same Ray Data path as `cart retrieve`. Beside them, on the same
queries and the same committed features: MiniLM -> feature-space ridge + faiss flat search (the
"faiss + encoder" a user would otherwise deploy) and, where the store has training queries, the
caption-centroid baseline. Written as DIR/metrics.json in the `cart demo` record format.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cart_core.config import CartConfig, config_dict
from cart_core.dense import FlatIndex, apply_ridge, caption_centroids, fit_ridge
from cart_core.index_version import IndexVersion
from cart_core.metrics import retrieval_metrics
from cart_core.errors import LocatedError, shown
from cart_core.store import Store, StoreError
from cart_core.text import TextEncoder, check_encoder_settings
from pipelines.report import format_table, plot_recall, write_metrics
from pipelines.leases import newest_servable_held
from pipelines.outputs import check_output_folder
from pipelines.queries import QueryTable, check_k, check_query_rows, load_queries
from pipelines.runtime import JobSummary, init_ray, log
from pipelines.search import retrieve_dataset
from pipelines.verify import query_time, verify_settings
from pipelines.stages import stack_column

PROTOCOL = "store"  # queries come from the user or the store's held-out captions


def gold_rows(item_ids: np.ndarray, catalog: dict[str, int], where: str,
              source_rows: list[int] | None = None) -> np.ndarray:
    rows = np.array([catalog.get(str(i), -1) for i in item_ids], dtype=np.int64)
    bad = np.flatnonzero(rows < 0)
    if bad.size:
        row = int(bad[0]) if source_rows is None else source_rows[int(bad[0])]
        raise LocatedError(where, row, f"item_id {shown(item_ids[bad[0]])} is not in the index")
    return rows


def generative_record(version: IndexVersion, queries: pa.Table, cfg: CartConfig, k: int,
                      catalog: dict[str, int], gold: np.ndarray) -> dict:
    t0 = time.perf_counter()
    k = max(k, 10)  # R@10, MRR@10 and MdR need ten answers, as the baselines get (dense_records)
    results = retrieve_dataset(queries, cfg, k, version)
    ranked = np.full((queries.num_rows, k), -1, dtype=np.int64)
    position = {q: i for i, q in enumerate(queries.column("query_id").to_pylist())}
    for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
        for q, items in zip(batch.column("query_id").to_pylist(), batch.column("item_ids").to_pylist()):
            ranked[position[q], :len(items)] = [catalog[str(item)] for item in items]
    qps = queries.num_rows / (time.perf_counter() - t0)
    return {"method": "generative", "protocol": PROTOCOL, **retrieval_metrics(ranked, gold), "queries_per_s": qps,
            "ranked": k, "beam_size": max(cfg.eval.beam_size, k), "version": version.version}  # what ran


def dense_records(version: IndexVersion, queries: pa.Table, cfg: CartConfig, k: int,
                  catalog: dict[str, int], gold: np.ndarray) -> list[dict]:
    """faiss flat over the live features (+ caption centroid when training queries exist)."""
    manifest = version.manifest
    feats = version.live_features(["item_id", "embedding"])
    feats = feats.filter(pc.is_in(feats.column("item_id"), value_set=pa.array(sorted(catalog), pa.string())))
    rows = gold_rows(np.asarray(feats.column("item_id").to_pylist(), dtype=object), catalog, "features")
    emb = np.zeros((len(catalog), manifest.dim), dtype=np.float32)
    emb[rows] = stack_column(feats.column("embedding").to_numpy(zero_copy_only=False))
    encoder = TextEncoder(cfg.generator.text_encoder, cfg.generator.max_query_tokens)
    t0 = time.perf_counter()
    qvec = encoder.sentence_embeddings([str(t) for t in queries.column("text").to_pylist()])
    encode_s = time.perf_counter() - t0
    out = []
    if not manifest.queries:
        log("evaluate", "no training queries in the store: no ridge map or caption centroid baseline")
        return out
    train = version.queries(["item_id", "text"])
    train_ids = np.asarray(train.column("item_id").to_pylist(), dtype=object)
    keep = np.array([str(i) in catalog for i in train_ids])
    train_rows = gold_rows(train_ids[keep], catalog, "queries")
    tvec = encoder.sentence_embeddings([t for t, ok in zip(train.column("text").to_pylist(), keep) if ok])
    for method, index, q in (
        ("caption_centroid", FlatIndex(caption_centroids(train_rows, tvec, len(catalog))), qvec),
        ("faiss_flat_ridge", FlatIndex(emb), apply_ridge(qvec, fit_ridge(tvec, emb[train_rows], alpha=0.01))),
    ):
        t0 = time.perf_counter()
        ranked, _ = index.search(q, min(len(catalog), max(k, 10)))
        qps = len(q) / (time.perf_counter() - t0 + encode_s)
        out.append({"method": method, "protocol": PROTOCOL, **retrieval_metrics(ranked, gold), "queries_per_s": qps})
    return out


def run_evaluate(store: Store, queries: str | None, out: str, cfg: CartConfig, k: int = 10,
                 address: str | None = None) -> list[dict]:
    check_k(k, cfg.queries)
    out = check_output_folder(out, store.url)
    # a user's file is checked first; the store's held-out captions by the same rules once it is open
    checked = load_queries(queries, cfg.queries, "evaluate", need_item=True) if queries is not None else None
    with newest_servable_held(store, "evaluate") as version:  # actors starting later load it: compact keeps it
        return _evaluate(store, version, queries, checked, out, cfg, k, address)


def _evaluate(store: Store, version: IndexVersion, queries: str | None, checked: QueryTable | None, out: str,
              cfg: CartConfig, k: int, address: str | None) -> list[dict]:
    manifest = version.manifest
    table, _ = version.ids()  # before Ray starts: a damaged store fails at once
    settings = verify_settings(version, query=query_time(cfg))  # the verify.* its retriever runs with
    catalog = {str(i): r for r, i in enumerate(table.item_ids[table.live])}  # deleted items are not answers
    dropped = 0
    if checked is None:
        held_out = version.eval_queries()
        if version.retired_captions(held_out=True):  # count the held-out captions deletes retired
            dropped = version.eval_queries(with_retired=True).num_rows - held_out.num_rows
        checked = check_query_rows(held_out, store.uri("eval"), cfg.queries, need_item=True)
    q = checked.table
    if queries is None:  # the store's held-out captions of deleted items ask for nothing that exists
        live = pc.is_in(q.column("item_id"), value_set=pa.array(sorted(catalog), pa.string()))
        dropped += q.num_rows - int(pc.sum(live.cast(pa.int64())).as_py() or 0)
        q = q.filter(live)
    if q.num_rows == 0:
        raise StoreError(f"{queries or store.url}: no evaluation queries")
    gold = gold_rows(np.asarray(q.column("item_id").to_pylist(), dtype=object), catalog, queries or "eval queries",
                     checked.source_rows if queries is not None else None)
    check_encoder_settings(cfg.generator.text_encoder, cfg.generator.max_query_tokens)  # the baselines' encoder
    init_ray(address)
    summary = JobSummary("evaluate", store.url)
    summary.counts.update(eval_queries_of_deleted_items=dropped, queries_skipped=sum(checked.skipped.values()))
    t0 = time.perf_counter()
    records = [generative_record(version, q, cfg, k, catalog, gold)]
    summary.time("generative_s", t0)
    t0 = time.perf_counter()
    records += dense_records(version, q, cfg, k, catalog, gold)
    summary.time("baselines_s", t0)
    for rec in records:
        rec["dataset"] = store.url
    out_dir = Path(out)
    write_metrics(records, out_dir)
    plot_recall(records, out_dir / "recall.png", f"{store.url} (version {manifest.version}), {q.num_rows} queries")
    (out_dir / "run.json").write_text(json.dumps({"config": config_dict(cfg), "k": k, "ranked": max(k, 10),
                                                  "beam_size": max(cfg.eval.beam_size, k, 10),
                                                  "manifest": json.loads(manifest.to_json()),
                                                  "verify": dataclasses.asdict(settings) if settings else None},
                                                 indent=2, default=str))
    print(format_table(records, f"{store.url}: version {manifest.version}, {q.num_rows} queries"))
    summary.counts.update(queries=q.num_rows, items=len(catalog))
    summary.extra.update(version=manifest.version, records=records, out=str(out_dir))
    summary.write(store)
    return records


