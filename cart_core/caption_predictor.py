"""The text side of an item without captions, predicted from its feature.

A ridge map from the item feature (CLIP / CLAP / VideoMAE, L2-normalised) to the item's caption
centroid (L2-normalised), fitted on the items that have captions. An item without captions is then
scored by the cosine of the query's sentence vector to its predicted centroid: the signal
`predicted_caption_cos` (0 for items with captions, which have the real centroid).

Why: the other score such an item had is the aligner's, which maps the query into the feature
space. Mapping the item into the text space instead finds far more never-trained items (holdout
seed 1 of benchmarks/quality.py's inductive protocol, unseen-only catalog, R@1 / R@10): VATEX 9.7 / 41.6
against 1.9 / 15.5 for the text -> feature ridge; Flickr8k 46.4 / 89.3 against 30.1 / 70.8.

Cost: W is Df x Dt (512 x 384, 786 KB) plus a bias; normalize(W^T f + b) . q is computed as
((W q) . f + b . q) / |W^T f + b| on the stored feature, so the index keeps one float per item
(that norm, computed at load), not a second centroid table.

Cross-fitting: the fusion weights of items without captions are fitted on held-out captions whose
items are shown captionless (cart_core/hybrid.py). A map fitted on those very items would predict
their centroids too well, so that fit uses `crossfit` predictions: each captioned item's centroid
predicted by a map fitted without its fold. The ridge strength is chosen by the same folds (the
share of held-out items whose true centroid ranks its own prediction first among its fold's).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cart_core.dense import apply_ridge, fit_ridge
from cart_core.kmeans import l2_normalize
from cart_core.settings import PredictorConfig  # noqa: F401  (re-exported)


@dataclass
class CaptionPredictor:
    weight: np.ndarray        # [Df, Dt] float32
    bias: np.ndarray          # [Dt] float32
    alpha: float = 0.0
    report: dict = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return self.weight.shape[0]

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted caption centroids [N, Dt], L2-normalised."""
        return l2_normalize(apply_ridge(l2_normalize(np.asarray(features, np.float32)), (self.weight, self.bias)))

    def query_side(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(W q [B, Df], b . q [B]): dot the first with a normalised feature, add the second, divide
        by item_norms.

        In torch, not numpy, because it runs between the query encoder's torch work: numpy's
        OpenBLAS threads spin for a while after each product and took the 2 cores from torch's
        next batch (this one product made MiniLM encode 976 Flickr8k queries in 3.4 s instead of
        2.3 s; the hybrid's latency against beam search alone went from 1.27 x to 1.05 x,
        docs/benchmarks.md §0)."""
        q = torch.from_numpy(np.ascontiguousarray(queries, np.float32))
        with torch.no_grad():
            mapped = q @ torch.as_tensor(np.asarray(self.weight, np.float32)).T
            offset = q @ torch.as_tensor(np.asarray(self.bias, np.float32))
        return mapped.numpy(), offset.numpy()

    def item_norms(self, features: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """|W^T f + b| [N] float32 for stored (normalised, fp16 allowed) features; 0 for a zero row."""
        out = np.empty(len(features), np.float32)
        for start in range(0, len(features), chunk):
            f = np.asarray(features[start:start + chunk], np.float32)
            norms = np.linalg.norm(f @ self.weight + self.bias, axis=1)
            out[start:start + chunk] = np.where(np.abs(f).sum(1) > 0, norms, 0.0)
        return out

    def save(self, folder: str | Path) -> None:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"weight": np.ascontiguousarray(self.weight), "bias": np.ascontiguousarray(self.bias)},
                  folder / "caption_predictor.safetensors")
        (folder / "caption_predictor.json").write_text(json.dumps(
            {"feature_dim": int(self.weight.shape[0]), "text_dim": int(self.weight.shape[1]), "alpha": self.alpha,
             "report": self.report}, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "CaptionPredictor":
        from safetensors.numpy import load_file

        folder = Path(folder)
        meta = json.loads((folder / "caption_predictor.json").read_text())
        tensors = load_file(folder / "caption_predictor.safetensors")
        shape = (int(meta["feature_dim"]), int(meta["text_dim"]))
        if tensors["weight"].shape != shape or tensors["bias"].shape != (shape[1],):
            raise ValueError(f"{folder}/caption_predictor.safetensors: weight {tensors['weight'].shape}, "
                             f"bias {tensors['bias'].shape}, expected {shape} and ({shape[1]},)")
        return cls(tensors["weight"].astype(np.float32), tensors["bias"].astype(np.float32), float(meta["alpha"]),
                   meta.get("report", {}))

    @staticmethod
    def exists(folder: str | Path) -> bool:
        return (Path(folder) / "caption_predictor.json").exists()


def fit_caption_predictor(features: np.ndarray, centroids: np.ndarray, cfg: PredictorConfig | None = None
                          ) -> tuple[CaptionPredictor | None, np.ndarray | None]:
    """(predictor fitted on every item with a centroid, crossfit [N, Dt]): crossfit holds each
    captioned item's centroid predicted without its fold and each other item's full prediction,
    L2-normalised. features [N, Df], centroids [N, Dt] (zero row: no captions). (None, None) when
    fewer than two items a fold have both: too few to fit or to choose the ridge strength."""
    cfg = cfg or PredictorConfig()
    if len(features) != len(centroids):
        raise ValueError(f"{len(features)} item features for {len(centroids)} caption centroids")
    x = l2_normalize(np.asarray(features, np.float32))
    y = l2_normalize(np.asarray(centroids, np.float32))
    captioned = np.flatnonzero((np.abs(y).sum(1) > 0) & (np.abs(x).sum(1) > 0))
    if cfg.folds < 2:
        raise ValueError(f"caption predictor folds must be at least 2, got {cfg.folds}")
    if len(captioned) < 2 * cfg.folds:
        return None, None
    fold = np.random.default_rng(cfg.seed).permutation(len(captioned)) % cfg.folds
    best = None
    for alpha in cfg.alphas:
        pred = _crossfit(x, y, captioned, fold, cfg.folds, alpha)
        score = float(np.mean([_own_first(y[captioned[fold == f]], pred[captioned[fold == f]])
                               for f in range(cfg.folds)]))
        if best is None or score > best[0]:
            best = (score, alpha, pred)
    score, alpha, pred = best
    full = CaptionPredictor(*fit_ridge(x[captioned], y[captioned], alpha=alpha), alpha=float(alpha),
                            report={"fold_R@1": round(100 * score, 2), "items": int(len(captioned)), "folds": cfg.folds})
    crossfit = full.predict(x)
    crossfit[captioned] = pred[captioned]
    return full, crossfit.astype(np.float32)


def _crossfit(x: np.ndarray, y: np.ndarray, captioned: np.ndarray, fold: np.ndarray, folds: int,
              alpha: float) -> np.ndarray:
    pred = np.zeros((len(x), y.shape[1]), np.float32)
    for f in range(folds):
        train, test = captioned[fold != f], captioned[fold == f]
        pred[test] = apply_ridge(x[test], fit_ridge(x[train], y[train], alpha=alpha))
    return l2_normalize(pred)


def _own_first(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Share of items whose true centroid is nearest its own prediction among the fold's."""
    return float(np.mean(np.argmax(truth @ predicted.T, axis=1) == np.arange(len(truth))))
