"""Coarse quantizer: the first identifier token is the K-Means cluster of a candidate.

faiss K-Means is fitted on a sample (training cost independent of corpus size) and assignment
runs in batches, so a million candidates never need more than one batch of distances in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cart_core._faiss import import_faiss


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation in float32 (spherical K-Means and cosine search need it)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


@dataclass
class CoarseQuantizer:
    """K-Means centroids plus the options they were fitted with."""

    centroids: np.ndarray  # float32 [k, d]
    spherical: bool

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        n_clusters: int,
        *,
        spherical: bool = True,
        sample_size: int = 65536,
        n_iter: int = 25,
        n_redo: int = 1,
        seed: int = 0,
    ) -> "CoarseQuantizer":
        """Fit on at most `sample_size` rows drawn with a fixed seed (same input -> same centroids);
        `n_redo` restarts keep the best objective."""
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        if len(x) < n_clusters:
            raise ValueError(f"cannot fit {n_clusters} clusters on {len(x)} vectors")
        faiss = import_faiss()
        x = l2_normalize(x) if spherical else np.ascontiguousarray(x, dtype=np.float32)
        rng = np.random.default_rng(seed)
        if len(x) > sample_size:
            x = x[np.sort(rng.choice(len(x), sample_size, replace=False))]
        km = faiss.Kmeans(
            x.shape[1], n_clusters, niter=n_iter, nredo=n_redo, seed=seed, spherical=spherical,
            max_points_per_centroid=max(256, -(-len(x) // n_clusters)), min_points_per_centroid=1, verbose=False,
        )
        km.train(x)
        return cls(np.ascontiguousarray(km.centroids, dtype=np.float32), spherical)

    def assign(self, x: np.ndarray, batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid per row, in batches: (labels int64 [N], squared distance float32 [N])."""
        faiss = import_faiss()
        index = faiss.IndexFlatL2(self.centroids.shape[1])
        index.add(self.centroids)
        labels = np.empty(len(x), dtype=np.int64)
        dists = np.empty(len(x), dtype=np.float32)
        for start in range(0, len(x), batch_size):
            chunk = self._prepare(x[start:start + batch_size])
            d, i = index.search(chunk, 1)
            labels[start:start + len(chunk)] = i[:, 0]
            dists[start:start + len(chunk)] = d[:, 0]
        return labels, dists

    def residuals(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """What the cluster centre does not explain: the input the RQ-VAE quantizes."""
        return self._prepare(x) - self.centroids[labels]

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        return l2_normalize(x) if self.spherical else np.ascontiguousarray(x, dtype=np.float32)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "kmeans_centroids.npy", self.centroids)
        (folder / "kmeans_spherical.txt").write_text("1" if self.spherical else "0")

    @classmethod
    def load(cls, folder: str | Path) -> "CoarseQuantizer":
        folder = Path(folder)
        spherical = (folder / "kmeans_spherical.txt").read_text().strip() == "1"
        return cls(np.load(folder / "kmeans_centroids.npy"), spherical)


def cluster_imbalance(labels: np.ndarray, n_clusters: int) -> dict[str, float]:
    """Cluster-size statistics; imbalance = k * sum(p_i^2) (1.0 = perfectly even, as faiss reports)."""
    sizes = np.bincount(labels, minlength=n_clusters).astype(np.float64)
    p = sizes / max(sizes.sum(), 1.0)
    return {
        "imbalance": float(n_clusters * np.sum(p * p)),
        "min_size": int(sizes.min()),
        "max_size": int(sizes.max()),
        "empty_clusters": int(np.sum(sizes == 0)),
    }
