"""Build identifiers for a catalog: K-Means coarse token, RQ-VAE (or residual k-means) fine tokens,
uniqueness counter. The input vectors are a config choice (candidate features, the mean embedding
of each candidate's training captions, or both)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cart_core.errors import ConfigError
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
        raise ConfigError(f"identifiers.source={source!r} needs caption vectors")
    if source == "captions":
        return l2_normalize(caption_vectors)
    if source == "both":
        return l2_normalize(np.concatenate([l2_normalize(features), l2_normalize(caption_vectors)], 1))
    raise ConfigError(f"identifiers.source must be features | captions | both, got {source!r}")


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


def fit_codebooks(vectors: np.ndarray, cfg: IdentifierConfig, *, progress: bool = True) -> tuple[Codebooks, dict]:
    """Fit K-Means on `vectors` (itself subsampled to cfg.kmeans_sample) and the fine quantizer on
    their residuals. Distributed jobs pass a sample of the catalog here, then `encode` every item."""
    timings, report = {}, {}
    t0 = time.perf_counter()
    if cfg.coarse:
        quantizer = CoarseQuantizer.fit(
            vectors, cfg.n_clusters, spherical=cfg.spherical, sample_size=cfg.kmeans_sample, seed=cfg.seed
        )
        coarse, dist = quantizer.assign(vectors)
        residual = quantizer.residuals(vectors, coarse)
        report["kmeans"] = {**cluster_imbalance(coarse, cfg.n_clusters), "mean_sq_distance": float(dist.mean())}
    else:
        quantizer, residual = None, vectors
    timings["kmeans_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rq, books = None, None
    if cfg.fine == "rqvae":
        rq, report["rqvae"] = fit_rqvae(residual, cfg.rqvae, progress=progress)
    elif cfg.fine == "residual_kmeans":
        books, fine = _residual_kmeans(residual, cfg.rqvae.levels, cfg.rqvae.codebook_size, cfg.seed)
        report["residual_kmeans"] = {"perplexity": code_perplexity(fine, cfg.rqvae.codebook_size)}
    elif cfg.fine != "none":
        raise ConfigError(f"identifiers.fine must be rqvae | residual_kmeans | none, got {cfg.fine!r}")
    timings["fine_s"] = time.perf_counter() - t0
    report["timings"] = timings
    return Codebooks(quantizer, rq, books), report


def encode(codebooks: Codebooks, vectors: np.ndarray) -> dict[str, np.ndarray]:
    """Codes of every row with fitted codebooks: coarse [N], fine [N, M], and the drift signals
    (squared distance to the assigned centroid, RQ-VAE reconstruction error of the residual)."""
    n = len(vectors)
    if codebooks.coarse is not None:
        coarse, dist = codebooks.coarse.assign(vectors)
        residual = codebooks.coarse.residuals(vectors, coarse)
    else:
        coarse, dist, residual = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.float32), vectors
    recon = np.zeros(n, dtype=np.float32)
    if codebooks.rqvae is not None:
        fine = codebooks.rqvae.encode(residual)
        recon = codebooks.rqvae.reconstruction_error(residual)
    elif codebooks.residual_books is not None:
        faiss = import_faiss()
        fine, r = [], np.ascontiguousarray(residual, dtype=np.float32)
        for book in codebooks.residual_books:
            index = faiss.IndexFlatL2(book.shape[1])
            index.add(np.ascontiguousarray(book, dtype=np.float32))
            idx = index.search(r, 1)[1][:, 0]
            fine.append(idx)
            r = np.ascontiguousarray(r - book[idx])
        fine = np.stack(fine, 1).astype(np.int64)
        recon = (r ** 2).sum(1).astype(np.float32)
    else:
        fine = np.zeros((n, 0), dtype=np.int64)
    return {"coarse": coarse.astype(np.int64), "fine": np.asarray(fine, dtype=np.int64),
            "assign_sq_distance": dist.astype(np.float32), "recon_error": recon}


def save_codebooks(codebooks: Codebooks, cfg: IdentifierConfig, folder: str | Path) -> None:
    """kmeans/ (npy) + rqvae/ (safetensors) + meta.json: plain formats, no pickle."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if codebooks.coarse is not None:
        codebooks.coarse.save(folder / "kmeans")
    if codebooks.rqvae is not None:
        codebooks.rqvae.save(folder / "rqvae")
    if codebooks.residual_books is not None:
        np.save(folder / "residual_books.npy", np.stack(codebooks.residual_books))
    meta = {"identifiers": asdict(cfg), "vocab_prefix": prefix_vocab(cfg)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


def load_codebooks(folder: str | Path) -> tuple[Codebooks, dict]:
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    coarse = CoarseQuantizer.load(folder / "kmeans") if (folder / "kmeans").exists() else None
    rq = RQVAE.load(folder / "rqvae") if (folder / "rqvae").exists() else None
    books = list(np.load(folder / "residual_books.npy")) if (folder / "residual_books.npy").exists() else None
    return Codebooks(coarse, rq, books), meta


def prefix_vocab(cfg: IdentifierConfig) -> list[int]:
    """Vocabulary sizes of (k, v1..vM) for this config (the counter's size depends on the data)."""
    levels = 0 if cfg.fine == "none" else cfg.rqvae.levels
    return ([cfg.n_clusters] if cfg.coarse else []) + [cfg.rqvae.codebook_size] * levels


def identifiers_from_codes(item_ids: np.ndarray, coarse: np.ndarray, fine: np.ndarray,
                           cfg: IdentifierConfig) -> IdentifierTable:
    table = build_identifiers(item_ids, coarse, fine, n_clusters=cfg.n_clusters if cfg.coarse else 1,
                              codebook_size=cfg.rqvae.codebook_size)
    if not cfg.coarse:  # drop the constant first position
        table = IdentifierTable(table.item_ids, table.codes[:, 1:], table.vocab_sizes[1:], table.live)
    return table


def build_index(
    item_ids: np.ndarray, vectors: np.ndarray, cfg: IdentifierConfig, *, progress: bool = True
) -> tuple[IdentifierTable, Codebooks, dict]:
    """Fit codebooks on `vectors` (already chosen by identifier_inputs) and assign every item an id."""
    codebooks, report = fit_codebooks(vectors, cfg, progress=progress)
    codes = encode(codebooks, vectors)
    table = identifiers_from_codes(item_ids, codes["coarse"], codes["fine"], cfg)
    report["collisions"] = table.collision_stats()
    report["vocab_sizes"] = table.vocab_sizes
    return table, codebooks, report
