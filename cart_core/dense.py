"""Dense baselines on the same inputs: faiss flat inner-product search, the ridge map from text
space into the candidate feature space, and the text-only caption centroid."""
from __future__ import annotations

import numpy as np

from cart_core._faiss import import_faiss
from cart_core.kmeans import l2_normalize


class FlatIndex:
    """Exact cosine search (faiss IndexFlatIP over L2-normalised vectors)."""

    def __init__(self, vectors: np.ndarray):
        faiss = import_faiss()
        vectors = l2_normalize(vectors)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self.index.search(l2_normalize(queries), min(k, len(self)))
        return rows.astype(np.int64), scores


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge regression y ~ x W + b (text embedding -> candidate feature space)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - y_mean))
    return w.astype(np.float32), (y_mean - x_mean @ w).astype(np.float32)


def apply_ridge(x: np.ndarray, weights: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    w, b = weights
    return np.asarray(x, dtype=np.float32) @ w + b


def caption_centroids(caption_item: np.ndarray, caption_vectors: np.ndarray, n_items: int) -> np.ndarray:
    """Mean (normalised) embedding of each item's training captions; zero rows for items with none."""
    sums = np.zeros((n_items, caption_vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, np.asarray(caption_item), caption_vectors)
    return l2_normalize(sums.astype(np.float32))
