"""Build identifiers for a catalog: K-Means coarse token, RQ-VAE (or residual k-means) fine tokens,
uniqueness counter. The input vectors are a config choice (candidate features, the mean embedding
of each candidate's training captions, or both)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from cart_core._faiss import import_faiss
from cart_core.config import IdentifierConfig
from cart_core.identifiers import IdentifierTable, build_identifiers
from cart_core.kmeans import CoarseQuantizer, cluster_imbalance, l2_normalize
from cart_core.rqvae import RQVAE, code_perplexity, fit_rqvae


@dataclass
class Codebooks:
    coarse: CoarseQuantizer | None
    rqvae: RQVAE | None
    residual_books: list[np.ndarray] | None  # residual k-means ablation


def identifier_inputs(source: str, features: np.ndarray, caption_vectors: np.ndarray | None) -> np.ndarray:
    """The vectors identifiers are built from; 'both' concatenates the normalised halves."""
    if source == "features":
        return l2_normalize(features)
    if caption_vectors is None:
        raise ValueError(f"identifiers.source={source!r} needs caption vectors")
    if source == "captions":
        return l2_normalize(caption_vectors)
    if source == "both":
        return l2_normalize(np.concatenate([l2_normalize(features), l2_normalize(caption_vectors)], 1))
    raise ValueError(f"identifiers.source must be features | captions | both, got {source!r}")


def _residual_kmeans(x: np.ndarray, levels: int, k: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    faiss = import_faiss()
    books, codes, residual = [], [], np.ascontiguousarray(x, dtype=np.float32)
    for level in range(levels):
        km = faiss.Kmeans(residual.shape[1], min(k, len(residual)), niter=20, seed=seed + level, verbose=False,
                          min_points_per_centroid=1)
        km.train(residual)
        _, idx = km.index.search(residual, 1)
        books.append(km.centroids.copy())
        codes.append(idx[:, 0])
        residual = np.ascontiguousarray(residual - km.centroids[idx[:, 0]])
    return books, np.stack(codes, 1).astype(np.int64)


def build_index(
    item_ids: np.ndarray, vectors: np.ndarray, cfg: IdentifierConfig, *, progress: bool = True
) -> tuple[IdentifierTable, Codebooks, dict]:
    """Fit codebooks on `vectors` (already chosen by identifier_inputs) and assign every item an id."""
    timings, report = {}, {}
    t0 = time.perf_counter()
    n = len(vectors)
    if cfg.coarse:
        quantizer = CoarseQuantizer.fit(
            vectors, cfg.n_clusters, spherical=cfg.spherical, sample_size=cfg.kmeans_sample, seed=cfg.seed
        )
        coarse, dist = quantizer.assign(vectors)
        residual = quantizer.residuals(vectors, coarse)
        report["kmeans"] = {**cluster_imbalance(coarse, cfg.n_clusters), "mean_sq_distance": float(dist.mean())}
    else:
        quantizer, coarse, residual = None, np.zeros(n, dtype=np.int64), vectors
    timings["kmeans_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rq, books = None, None
    k = cfg.rqvae.codebook_size
    if cfg.fine == "rqvae":
        rq, rq_report = fit_rqvae(residual, cfg.rqvae, progress=progress)
        fine = rq.encode(residual)
        report["rqvae"] = rq_report
    elif cfg.fine == "residual_kmeans":
        books, fine = _residual_kmeans(residual, cfg.rqvae.levels, k, cfg.seed)
        report["residual_kmeans"] = {"perplexity": code_perplexity(fine, k)}
    elif cfg.fine == "none":
        fine = np.zeros((n, 0), dtype=np.int64)
    else:
        raise ValueError(f"identifiers.fine must be rqvae | residual_kmeans | none, got {cfg.fine!r}")
    timings["fine_s"] = time.perf_counter() - t0
    table = build_identifiers(
        item_ids, coarse, fine, n_clusters=cfg.n_clusters if cfg.coarse else 1, codebook_size=k
    )
    if not cfg.coarse:  # drop the constant first position
        table = IdentifierTable(table.item_ids, table.codes[:, 1:], table.vocab_sizes[1:], table.live)
    report["collisions"] = table.collision_stats()
    report["vocab_sizes"] = table.vocab_sizes
    report["timings"] = timings
    return table, Codebooks(quantizer, rq, books), report
