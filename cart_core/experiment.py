"""The transductive protocol end to end on one machine: identifiers, generator, baselines, metrics.

Protocol (DESIGN.md §5): caption #q of every candidate is the query, the other captions are
training queries; every candidate is in the catalog. Used by `cart demo` and benchmarks/quality.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from cart_core.config import CartConfig
from cart_core.corpus import Corpus, check_min_items, split_captions
from cart_core.dense import FlatIndex, apply_ridge, caption_centroids, fit_ridge
from cart_core.generator import Generator
from cart_core.hybrid import VerifiedRetriever, holdout_mask
from cart_core.hybrid import fit_hybrid, item_neighbors
from cart_core.identifiers import IdentifierTable
from cart_core.indexing import build_index, identifier_inputs
from cart_core.metrics import retrieval_metrics
from cart_core.retrieval import GenerativeRetriever
from cart_core.prototypes import fit_additive_prototypes
from cart_core.text import TextEncoder
from cart_core.verify import dense_scores
from cart_core.training import train_generator

PROTOCOL = "transductive"


@dataclass
class PreparedCorpus:
    """What every method on one corpus shares: the split and the MiniLM sentence vectors."""

    corpus: Corpus
    train_item: np.ndarray
    train_text: list[str]
    query_item: np.ndarray
    query_text: list[str]
    train_vec: np.ndarray
    query_vec: np.ndarray
    centroids: np.ndarray
    encoder: TextEncoder
    timings: dict = field(default_factory=dict)


def prepare(corpus: Corpus, cfg: CartConfig, encoder: TextEncoder | None = None) -> PreparedCorpus:
    (train_item, train_text), (query_item, query_text) = split_captions(corpus, cfg.eval.query_caption_index)
    encoder = encoder or TextEncoder(cfg.generator.text_encoder, cfg.generator.max_query_tokens)
    t0 = time.perf_counter()
    train_vec = encoder.sentence_embeddings(train_text)
    query_vec = encoder.sentence_embeddings(query_text)
    elapsed = time.perf_counter() - t0
    centroids = caption_centroids(train_item, train_vec, len(corpus))
    encode_qps = (len(train_text) + len(query_text)) / max(elapsed, 1e-9)
    return PreparedCorpus(corpus, train_item, train_text, query_item, query_text, train_vec, query_vec,
                          centroids, encoder, {"sentence_embed_s": elapsed, "encode_queries_per_s": encode_qps})


def record(method: str, metrics: dict, queries_per_s: float, **extra) -> dict:
    return {"method": method, "protocol": PROTOCOL, **metrics, "queries_per_s": queries_per_s, **extra}


def _timed_search(index: FlatIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    rows, _ = index.search(queries, k)
    return rows, len(queries) / max(time.perf_counter() - t0, 1e-9)


def dense_baselines(prep: PreparedCorpus) -> list[dict]:
    """Caption centroid (text only) and MiniLM -> feature-space ridge + faiss flat search.

    Every item is ranked (so MdR is exact); queries_per_s includes MiniLM query encoding, like
    the generative row."""
    n = len(prep.corpus)
    encode_qps = prep.timings["encode_queries_per_s"]
    out = []
    rows, qps = _timed_search(FlatIndex(prep.centroids), prep.query_vec, n)
    out.append(record("caption_centroid", retrieval_metrics(rows, prep.query_item), _with_encode(qps, encode_qps)))
    ridge = fit_ridge(prep.train_vec, prep.corpus.embeddings[prep.train_item], alpha=0.01)
    rows, qps = _timed_search(FlatIndex(prep.corpus.embeddings), apply_ridge(prep.query_vec, ridge), n)
    out.append(record("faiss_flat_ridge", retrieval_metrics(rows, prep.query_item), _with_encode(qps, encode_qps)))
    return out


def _with_encode(search_qps: float, encode_qps: float) -> float:
    return 1.0 / (1.0 / search_qps + 1.0 / encode_qps)


def init_prototypes(generator: Generator, table: IdentifierTable, centroids: np.ndarray) -> None:
    """Start the prototype head from the items' caption centroids (items without captions skipped)."""
    has_caption = np.linalg.norm(centroids, axis=1) > 0
    protos = fit_additive_prototypes(table.tokens()[has_caption], sum(table.vocab_sizes), centroids[has_caption])
    generator.decoder.prototypes.data.copy_(torch.from_numpy(protos))


@dataclass
class GenerativeRun:
    record: dict
    table: IdentifierTable
    generator: Generator
    index_report: dict
    train_history: dict
    holdout: np.ndarray        # bool per training caption: kept from the generator to fit the fusion


def run_generative(prep: PreparedCorpus, cfg: CartConfig, method: str = "generative",
                   progress: bool = True) -> GenerativeRun:
    corpus = prep.corpus
    check_min_items(corpus, cfg.identifiers.n_clusters, "identifiers.n_clusters")
    vectors = identifier_inputs(cfg.identifiers.source, corpus.embeddings, prep.centroids)
    t0 = time.perf_counter()
    table, _, index_report = build_index(corpus.item_ids, vectors, cfg.identifiers, progress=progress)
    index_s = time.perf_counter() - t0
    gen_cfg = replace(cfg.generator, vocab_sizes=list(table.vocab_sizes))
    generator = Generator(gen_cfg, text_encoder=prep.encoder if gen_cfg.query == "text" else None)
    if gen_cfg.output_head == "prototype":
        init_prototypes(generator, table, prep.centroids)
    holdout = holdout_mask(len(prep.train_text), cfg.verify.holdout, cfg.train.seed)
    fit_rows = np.flatnonzero(~holdout)
    history = train_generator(generator, [prep.train_text[i] for i in fit_rows], table.codes[prep.train_item[fit_rows]],
                              cfg.train, progress=progress)
    retriever = GenerativeRetriever(generator, table)
    t0 = time.perf_counter()
    rows, _ = retriever.search(prep.query_text, k=cfg.eval.k, beam_size=cfg.eval.beam_size,
                               batch_size=cfg.eval.batch_size, progress=progress)
    qps = len(prep.query_text) / (time.perf_counter() - t0)
    rec = record(method, retrieval_metrics(rows, prep.query_item), qps,
                 index_s=index_s, train_s=history["train_s"], beam_size=cfg.eval.beam_size,
                 generator_pairs=int(len(fit_rows)))
    return GenerativeRun(rec, table, generator, index_report, history, holdout)


@dataclass
class HybridRun:
    records: list[dict]
    retriever: VerifiedRetriever
    fusion_report: dict


def fit_verified(generator: Generator, table: IdentifierTable, train_text: list[str], train_item: np.ndarray,
                 train_vec: np.ndarray, holdout: np.ndarray, features: np.ndarray, cfg: CartConfig,
                 progress: bool = True) -> VerifiedRetriever:
    """cart_core.hybrid.fit_hybrid with the experiment's settings, its fitting time in the report."""
    t0 = time.perf_counter()
    retriever = fit_hybrid(generator, table, train_text, train_item, train_vec, holdout, features, cfg.verify,
                                 cfg.eval.beam_size, cfg.eval.batch_size, progress)
    retriever.fusion.report["fit_s"] = time.perf_counter() - t0
    retriever.neighbors = item_neighbors(retriever.items, table, cfg.verify, progress)  # None unless asked for
    return retriever


def run_hybrid(prep: PreparedCorpus, run: GenerativeRun, cfg: CartConfig, method: str = "hybrid (generate + verify)",
               progress: bool = True, retriever: VerifiedRetriever | None = None) -> HybridRun:
    """The hybrid row, and the same fused score over every item (what the candidate cap costs)."""
    retriever = retriever or fit_verified(run.generator, run.table, prep.train_text, prep.train_item, prep.train_vec,
                                          run.holdout, prep.corpus.embeddings, cfg, progress)
    t0 = time.perf_counter()
    rows, _ = retriever.search(prep.query_text, k=cfg.eval.k, beam_size=cfg.eval.beam_size,
                               batch_size=cfg.eval.batch_size, progress=progress)
    qps = len(prep.query_text) / (time.perf_counter() - t0)
    fusion = retriever.fusion
    rec = record(method, retrieval_metrics(rows, prep.query_item), qps, beam_size=cfg.eval.beam_size,
                 candidates=cfg.verify.candidates, signals=list(fusion.names),
                 weights=[round(w, 3) for w in fusion.weights], fusion=fusion.report)
    return HybridRun([rec, dense_fused(prep, retriever)], retriever, fusion.report)


def dense_fused(prep: PreparedCorpus, retriever: VerifiedRetriever) -> dict:
    """The hybrid's dense signals and weights over the whole catalog (cart_core.verify.dense_scores)."""
    fusion = retriever.fusion
    t0 = time.perf_counter()
    score = dense_scores(prep.query_vec, retriever.items, retriever.aligner, fusion.names, fusion.weights,
                         query_texts=prep.query_text)
    rows = np.argsort(-score, axis=1)[:, :10]
    qps = _with_encode(len(prep.query_vec) / max(time.perf_counter() - t0, 1e-9), prep.timings["encode_queries_per_s"])
    dense_names = [n_ for n_ in fusion.names if not n_.startswith("gen_")]
    return record("dense: " + " + ".join(dense_names) + " (all items, hybrid's weights)",
                  retrieval_metrics(rows, prep.query_item), qps)
