"""Verification vectors for items added after the verifier was fitted (`cart reindex --add`).

The query aligner (cart_core/alignment.py) was trained on the old items' captions, so it scores
an old item's own captions high against that item's feature, and an added item's captions lower
against its feature: the added item competes with a handicap (Flickr8k, 100 items added to 876:
R@1 66 against 75 after a full rebuild). Retraining the aligner moves every old item's score too.

Instead, an added item with captions gets its own verification vector: its feature blended with
where the aligner maps its captions,

    v = normalize(alpha * feature + (1 - alpha) * normalize(mean aligner(caption))),

with one alpha per reindex, fitted so that an added item's caption that took no part in its
vector (leave one out) scores it, on average, as high as a caption the aligner never trained on
scores an old item (the held-out slice's mean, measured when the verifier was fitted). Old items'
vectors do not change; added items without captions keep their feature. Cost: one aligner pass
over the new captions, nothing per old item. Fitting α needs items with at least two captions
(one left out, one kept); when no added item has two, α stays 1 and the raw features are used.
"""
from __future__ import annotations

import numpy as np

from cart_core.alignment import QueryAligner
from cart_core.kmeans import l2_normalize


def held_out_feature_cos(aligner: QueryAligner, vectors: np.ndarray, features: np.ndarray) -> float:
    """Mean cosine of aligned captions the aligner did not train on to their own item's feature
    (vectors[i] is a caption of the item whose feature is features[i]): the target for added items."""
    if len(vectors) == 0:
        return float("nan")
    own = l2_normalize(np.asarray(features, np.float32))
    return float(np.mean(np.sum(aligner.map(vectors) * own, axis=1)))


def blend_added_features(aligner: QueryAligner, features: np.ndarray, caption_vectors: np.ndarray,
                         caption_rows: np.ndarray, target: float, steps: int = 40) -> tuple[np.ndarray, float]:
    """(verification vectors [n, Df] float32, alpha) for n added items; caption_vectors [m, Dq] are
    their captions' sentence vectors, caption_rows [m] the item (0..n-1) each belongs to. Items
    without captions keep their (normalised) feature; alpha = 1 when there is nothing to fit."""
    feats = l2_normalize(np.asarray(features, np.float32))
    rows = np.asarray(caption_rows, np.int64)
    if len(rows) == 0 or not np.isfinite(target):
        return feats, 1.0
    mapped = aligner.map(caption_vectors)
    sums = np.zeros_like(feats)
    np.add.at(sums, rows, mapped)
    left_out = l2_normalize(sums[rows] - mapped)   # each caption's item vector without that caption
    has_others = np.abs(left_out).sum(1) > 0

    def left_out_score(alpha: float) -> float:
        v = l2_normalize(alpha * feats[rows] + (1 - alpha) * left_out)
        return float(np.mean(np.sum(mapped * v, axis=1)[has_others])) if has_others.any() else float("nan")

    alpha = 1.0
    if has_others.any() and left_out_score(1.0) < target:
        lo, hi = 0.0, 1.0    # the score falls as alpha grows: find where it meets the target
        if left_out_score(0.0) <= target:
            hi = 0.0
        for _ in range(steps):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if left_out_score(mid) > target else (lo, mid)
        alpha = (lo + hi) / 2
    out = feats.copy()
    captioned = np.unique(rows)
    out[captioned] = l2_normalize(alpha * feats[captioned] + (1 - alpha) * l2_normalize(sums[captioned]))
    return out.astype(np.float32), float(alpha)
