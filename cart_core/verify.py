"""Verification signals: dense scores the index already holds, computed for each candidate.

Per item the index keeps two vectors (both optional, fp16 in memory):
  * the caption centroid: mean MiniLM embedding of the item's captions / pseudo-queries
    (384 dims, 768 bytes an item), the text side, scored by plain cosine and by a learned
    metric (cart_core/caption_metric.py; 4 more bytes an item, |W c|, computed at load);
  * the item's own feature (CLIP / CLAP / VideoMAE, e.g. 512 dims, 1 KiB an item), scored against
    the query mapped into that space by the QueryAligner (cart_core/alignment.py), the
    cross-modal side that also finds items without captions.
  * the BM25 weights of the words of the item's captions (cart_core/lexical.py, about 8 bytes a
    distinct word), the exact-term side the centroid averages away;
  * for an item without captions, its caption centroid predicted from its feature
    (cart_core/caption_predictor.py; 4 bytes an item, a norm computed at load).
The generator's log-probabilities of the candidate's prefixes are signals too. Every signal is
computed for at most C candidates per query, so its cost does not depend on the catalog size.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from cart_core.alignment import QueryAligner
from cart_core.candidates import Candidates
from cart_core.caption_metric import CaptionMetric
from cart_core.caption_predictor import CaptionPredictor
from cart_core.kmeans import l2_normalize
from cart_core.lexical import TermIndex
from cart_core.settings import SIGNALS


def unit_half(x: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """Rows L2-normalised, as float16: what item vectors are stored as. Block by block (the same
    values as l2_normalize(x).astype(float16), row by row), so 1M x 512 rows never take a float32
    copy of 2 GB beside the input."""
    out = np.empty(np.shape(x), np.float16)
    for start in range(0, len(out), block):
        out[start:start + block] = l2_normalize(np.asarray(x[start:start + block], np.float32))
    return out


@dataclass
class ItemVectors:
    """Per catalog row: caption centroid (zero row = no caption) and feature, fp16, L2-normalised,
    the BM25 index of the captions' words, and the learned metric the centroids are also compared
    under. Read-only once built: the caption mask, the metric's item norms and torch views are
    derived once (build a new one to change it)."""

    captions: np.ndarray | None   # [N, Dt]
    features: np.ndarray | None   # [N, Df]
    terms: TermIndex | None = None
    metric: CaptionMetric | None = None
    predictor: CaptionPredictor | None = None

    @classmethod
    def build(cls, captions: np.ndarray | None, features: np.ndarray | None,
              terms: TermIndex | None = None, metric: CaptionMetric | None = None,
              predictor: CaptionPredictor | None = None) -> "ItemVectors":
        def half(x):
            return None if x is None else unit_half(x)
        if terms is not None and len(terms.length) != len(captions if captions is not None else features):
            raise ValueError(f"{len(terms.length)} item term rows for "
                             f"{len(captions if captions is not None else features)} item vectors")
        if metric is not None and captions is not None and metric.dim != np.shape(captions)[1]:
            raise ValueError(f"caption metric of {metric.dim} dims for {np.shape(captions)[1]}-dim caption centroids")
        if predictor is not None and features is not None and predictor.feature_dim != np.shape(features)[1]:
            raise ValueError(f"caption predictor of {predictor.feature_dim} feature dims for "
                             f"{np.shape(features)[1]}-dim item features")
        return cls(half(captions), half(features), terms, metric if captions is not None else None,
                   predictor if features is not None else None)

    def bytes_per_item(self) -> int:
        dense = sum(x.shape[1] * x.itemsize for x in (self.captions, self.features) if x is not None)
        if self.metric is not None:
            dense += 4  # metric_norms
        if self.predictor is not None:
            dense += 4  # predictor_norms
        if self.terms is not None:
            matrix = self.terms.matrix
            dense += (matrix.data.nbytes + matrix.indices.nbytes) // max(matrix.shape[0], 1)
        return dense

    @cached_property
    def has_caption(self) -> np.ndarray | None:
        """[N] bool: the item has a caption centroid (a zero row means none)."""
        return None if self.captions is None else np.abs(self.captions).sum(1) > 0

    @cached_property
    def metric_norms(self) -> np.ndarray | None:
        """[N] float32 |W c| of every centroid under the learned metric (0: no caption)."""
        if self.metric is None or self.captions is None:
            return None
        return self.metric.item_norms(self.captions)

    @cached_property
    def predictor_norms(self) -> np.ndarray | None:
        """[N] float32 |W^T f + b| of every feature under the caption predictor (0: no feature)."""
        if self.predictor is None or self.features is None:
            return None
        return self.predictor.item_norms(self.features)

    @cached_property
    def caption_tensor(self) -> torch.Tensor | None:
        return None if self.captions is None else _shared_tensor(self.captions)

    @cached_property
    def feature_tensor(self) -> torch.Tensor | None:
        return None if self.features is None else _shared_tensor(self.features)


def _shared_tensor(x: np.ndarray) -> torch.Tensor:
    """A torch view of an fp16 table (a copy only when numpy's array cannot be shared)."""
    if not (x.flags.c_contiguous and x.flags.writeable):
        x = np.ascontiguousarray(x).copy()
    return torch.from_numpy(x)


def gathered_dot(queries: np.ndarray, table: torch.Tensor, rows: np.ndarray,
                 only: np.ndarray | None = None) -> np.ndarray:
    """queries [B, D] . table[rows] [B, C, D] -> [B, C] float32. One query at a time, so its C
    gathered fp16 rows are converted and used while they are still in cache: gathering the whole
    batch first (64 queries x 300 candidates x 512 dims) leaves cache, and was 9x slower on the
    2-vCPU box (25 ms against 2.8 ms a batch). only [B, C] bool: compute just those cells (0
    elsewhere), for a score that only some candidates have."""
    q = torch.from_numpy(np.ascontiguousarray(queries, np.float32))
    r = torch.from_numpy(np.ascontiguousarray(rows, np.int64))
    if only is None:
        out = torch.empty(r.shape, dtype=torch.float32)
        for b in range(len(r)):
            out[b] = table.index_select(0, r[b]).float() @ q[b]
        return out.numpy()
    out = torch.zeros(r.shape, dtype=torch.float32)
    for b in np.flatnonzero(np.asarray(only).any(1)):
        cells = torch.from_numpy(np.flatnonzero(only[b]))
        out[b, cells] = table.index_select(0, r[b, cells]).float() @ q[b]
    return out.numpy()


def caption_sums(item_rows: np.ndarray, vectors: np.ndarray, n_items: int) -> np.ndarray:
    """Per item, the sum of its caption vectors (normalise for the centroid; subtract one caption
    for its leave-one-out centroid)."""
    sums = np.zeros((n_items, vectors.shape[1]), np.float64)
    np.add.at(sums, np.asarray(item_rows, np.int64), vectors)
    return sums.astype(np.float32)


def _floored(logp: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """-inf (prefix not kept by the beam) -> 1 below the query's worst kept value."""
    finite = np.isfinite(logp) & valid
    worst = np.where(finite, logp, np.inf).min(1, keepdims=True)
    worst = np.where(np.isfinite(worst), worst, 0.0)
    return np.where(finite, logp, worst - 1.0).astype(np.float32)


def candidate_signals(query_vectors: np.ndarray, cands: Candidates, items: ItemVectors,
                      aligner: QueryAligner | None = None, feature_queries: np.ndarray | None = None,
                      gold_captions: tuple[np.ndarray, np.ndarray] | None = None,
                      names: list[str] | None = None, query_terms=None,
                      gold_terms: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """name -> [B, C] float32. query_vectors: the queries' sentence vectors (text side).
    feature_queries: queries already in the feature space (vector queries); else the aligner maps
    query_vectors there. gold_captions (gold rows [B], leave-one-out centroids [B, Dt]) replaces the
    gold item's centroid when fitting on held-out training captions, so a query never meets itself.
    names: compute only these signals (what a fitted fusion uses); None: every signal there is.
    query_terms: the queries' words (TermIndex.queries) for the BM25 signal; gold_terms [B]: the
    gold item's leave-one-out BM25, the lexical counterpart of gold_captions."""
    rows = cands.rows.clip(0)
    valid = cands.valid
    wanted = set(SIGNALS) | {"no_caption", "feature_cos_uncaptioned"} if names is None else set(names)
    out: dict[str, np.ndarray] = {}
    if items.captions is not None and wanted & {"caption_cos", "no_caption", "feature_cos_uncaptioned"}:
        cos = gathered_dot(query_vectors, items.caption_tensor, rows)
        has = items.has_caption[rows]
        if gold_captions is not None:
            gold, loo = gold_captions
            own = cands.rows == np.asarray(gold)[:, None]
            loo_cos = np.einsum("bd,bd->b", np.asarray(query_vectors, np.float32), l2_normalize(loo))
            cos = np.where(own, loo_cos[:, None], cos)
            has = np.where(own, (np.abs(loo).sum(-1) > 0)[:, None], has)
        out["caption_cos"] = np.where(has, cos, 0.0).astype(np.float32)
        out["no_caption"] = (~has).astype(np.float32)
    if items.captions is not None and items.metric is not None and "caption_metric_cos" in wanted:
        out["caption_metric_cos"] = _metric_cos(query_vectors, cands, items, gold_captions)
    if items.terms is not None and query_terms is not None and "caption_bm25" in wanted:
        bm25 = items.terms.score(query_terms, rows)
        if gold_terms is not None and gold_captions is not None:
            own = cands.rows == np.asarray(gold_captions[0])[:, None]
            bm25 = np.where(own, np.asarray(gold_terms, np.float32)[:, None], bm25)
        out["caption_bm25"] = bm25
    if items.features is not None and (aligner is not None or feature_queries is not None) \
            and wanted & {"feature_cos", "feature_cos_uncaptioned"}:
        mapped = feature_queries if feature_queries is not None else aligner.map(query_vectors)
        mapped = l2_normalize(np.asarray(mapped, np.float32))
        out["feature_cos"] = gathered_dot(mapped, items.feature_tensor, rows)
        if "no_caption" in out:  # an item without captions leans on its feature alone: its own weight
            out["feature_cos_uncaptioned"] = out["feature_cos"] * out["no_caption"]
    if "predicted_caption_cos" in wanted and "no_caption" in out and feature_queries is None \
            and items.predictor is not None and np.shape(query_vectors)[1] == items.predictor.weight.shape[1]:
        out["predicted_caption_cos"] = predicted_caption_cos(query_vectors, rows, items,
                                                              (out["no_caption"] > 0) & valid)
    out.update(generator_signals(cands, wanted))
    return {k: np.where(valid, v, 0.0).astype(np.float32) for k, v in out.items()}


def predicted_caption_cos(query_vectors: np.ndarray, rows: np.ndarray, items: ItemVectors,
                          only: np.ndarray | None = None) -> np.ndarray:
    """cos(q, predicted centroid of item rows[b, c]) [B, C] from the stored features and their
    norms under the predictor (cart_core/caption_predictor.py); 0 for an item without a feature.
    only [B, C] bool: score just those candidates (the ones without captions), 0 elsewhere: on a
    catalog whose items all have captions the signal then costs nothing."""
    if only is not None and not np.any(only):  # every candidate has captions: nothing to compute
        return np.zeros(np.shape(rows), np.float32)
    mapped, offset = items.predictor.query_side(query_vectors)
    norms = items.predictor_norms[rows]
    if only is not None:
        norms = np.where(only, norms, 0.0)
    dot = gathered_dot(mapped, items.feature_tensor, rows, only) + offset[:, None]
    return np.where(norms > 0, dot / np.maximum(norms, 1e-12), 0.0).astype(np.float32)


def _metric_cos(query_vectors: np.ndarray, cands: Candidates, items: ItemVectors,
                gold_captions: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """normalize(W q) . normalize(W c) per candidate, from the stored centroids and their norms
    (0 for an item without captions); the gold item's leave-one-out centroid when fitting."""
    rows = cands.rows.clip(0)
    norms = items.metric_norms[rows]
    dot = gathered_dot(items.metric.query_side(query_vectors), items.caption_tensor, rows)
    cos = np.where(norms > 0, dot / np.maximum(norms, 1e-12), 0.0)
    if gold_captions is not None:
        gold, loo = gold_captions
        own = cands.rows == np.asarray(gold)[:, None]
        has = np.abs(loo).sum(-1) > 0
        loo_cos = np.where(has, items.metric.cosine(query_vectors, np.where(has[:, None], loo, 1.0)), 0.0)
        cos = np.where(own, loo_cos[:, None], cos)
    return cos.astype(np.float32)


def generator_signals(cands: Candidates, names: set[str] | list[str]) -> dict[str, np.ndarray]:
    """The generator's log-probability signals among `names`, floored per query over the whole
    candidate set (recompute them when candidates are joined)."""
    out = {}
    if "gen_item_logp" in names:
        out["gen_item_logp"] = _floored(cands.logp[..., -1], cands.valid)
    if "gen_cluster_logp" in names:
        out["gen_cluster_logp"] = _floored(cands.logp[..., 0], cands.valid)
    return {k: np.where(cands.valid, v, 0.0).astype(np.float32) for k, v in out.items()}


def dense_scores(query_vectors: np.ndarray, items: ItemVectors, aligner: QueryAligner | None, names: list[str],
                 weights: list[float], rows: np.ndarray | None = None, query_texts: list[str] | None = None) -> np.ndarray:
    """The fused dense signals of every item (or of `rows`) [B, n], no generator and no cap: the
    dense look-up with the hybrid's own information and weights, the bar the hybrid is held to.
    The generator's signals, which a dense look-up does not have, are left out; the BM25 signal
    takes part when query_texts are given."""
    rows = np.arange(len(items.captions if items.captions is not None else items.features)) if rows is None else rows
    q = np.asarray(query_vectors, np.float32)
    weight = dict(zip(names, weights))
    score = np.zeros((len(q), len(rows)), np.float32)
    no_caption = np.zeros((1, len(rows)), np.float32)
    if items.captions is not None:
        cent = items.captions[rows].astype(np.float32)
        no_caption = (np.abs(cent).sum(1) == 0)[None, :].astype(np.float32)
        score += weight.get("caption_cos", 0.0) * (q @ cent.T) + weight.get("no_caption", 0.0) * no_caption
        if items.metric is not None and weight.get("caption_metric_cos", 0.0):
            norms = items.metric_norms[rows]
            metric_cos = (items.metric.query_side(q) @ cent.T) / np.maximum(norms, 1e-12)[None, :]
            score += weight["caption_metric_cos"] * np.where(norms[None, :] > 0, metric_cos, 0.0)
    if items.terms is not None and query_texts is not None and weight.get("caption_bm25", 0.0):
        score += weight["caption_bm25"] * items.terms.score_all(items.terms.queries(query_texts), rows)
    if items.features is not None and aligner is not None:
        feature_cos = aligner.map(q) @ items.features[rows].astype(np.float32).T
        score += (weight.get("feature_cos", 0.0) + weight.get("feature_cos_uncaptioned", 0.0) * no_caption) * feature_cos
    if items.predictor is not None and weight.get("predicted_caption_cos", 0.0) \
            and q.shape[1] == items.predictor.weight.shape[1]:
        mapped, offset = items.predictor.query_side(q)
        norms = items.predictor_norms[rows]
        dot = mapped @ items.features[rows].astype(np.float32).T + offset[:, None]
        predicted = np.where(norms[None, :] > 0, dot / np.maximum(norms, 1e-12)[None, :], 0.0)
        score += weight["predicted_caption_cos"] * no_caption * predicted
    return score


def mask_captions(signals: dict[str, np.ndarray], share: float, seed: int = 0) -> dict[str, np.ndarray]:
    """A copy with the caption signal removed for `share` of the candidates, so fusion weights
    are fitted for items without captions too (held-out queries all have captioned items). Share 0
    hides nothing but still computes the captionless signals (for items that truly lack captions
    among the candidates; the predicted caption cosine from its cross-fitted form), the
    reference the masked copies are compared with."""
    if "caption_cos" not in signals:
        return signals
    drop = np.random.default_rng(seed).random(signals["caption_cos"].shape) < share
    out = dict(signals)
    out["caption_cos"] = np.where(drop, 0.0, signals["caption_cos"]).astype(np.float32)
    out["no_caption"] = np.where(drop, 1.0, signals["no_caption"]).astype(np.float32)
    for name in ("caption_metric_cos", "caption_bm25"):
        if name in signals:
            out[name] = np.where(drop, 0.0, signals[name]).astype(np.float32)
    if "feature_cos" in signals:
        out["feature_cos_uncaptioned"] = out["feature_cos"] * out["no_caption"]
    if "predicted_caption_cos_fit" in signals:  # cross-fitted: a masked item's own captions never fitted it
        out["predicted_caption_cos"] = (signals["predicted_caption_cos_fit"] * out["no_caption"]).astype(np.float32)
    return out


def mask_captions_repeated(signals: dict[str, np.ndarray], share: float, repeats: int,
                           seed: int = 0) -> dict[str, np.ndarray]:
    """`repeats` masked copies (seeds seed, seed + 1, ...) stacked along the query axis: row
    r * B + b is query b under mask r; tile the candidates' valid [B, C] and target [B] to match.

    Why: which candidates one seeded mask hides moves the weights of items without captions a
    lot (Flickr8k, 200 never-trained items, development split: unseen R@1 4.1 to 10.4 over four
    mask seeds at the same setting); four masks stacked gave 7.8 and 7.7 for two disjoint seed
    sets (docs/benchmarks.md §0)."""
    if repeats < 1:
        raise ValueError(f"mask repeats must be at least 1, got {repeats}")
    copies = [mask_captions(signals, share, seed=seed + r) for r in range(repeats)]
    return {name: np.concatenate([c[name] for c in copies]) for name in copies[0]}
