"""Findable before the generator has learned them: a dense look-up over recently added items,
merged into the generative ranking.

After an incremental add the new identifiers are in the decoding tables at once, but the
generator has never been trained to produce them. Until its fine-tune finishes, the added
("pending") items are also searched densely — by the mean MiniLM embedding of their captions,
the caption-centroid retriever — and the two ranked lists are merged with reciprocal-rank fusion
(score = best over lists of 1 / (c + rank)), which needs no calibration between log-probabilities
and cosines.

Reciprocal-rank fusion alone puts a pending item at rank 2 at best whenever the generator returns
anything (R@5 high, R@1 near zero). So the fallback also carries a calibrated acceptance
threshold: a pending item whose cosine to the query beats what queries of *other* (old) items
reach against the pending items -- the (1 - fpr) quantile of their best cosine -- goes first.
Old queries are then displaced at a rate of about `fpr`, measured, not guessed.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np

from cart_core.dense import FlatIndex
from cart_core.kmeans import l2_normalize

RRF_C = 60.0


class DenseFallback:
    """Cosine search over a few item rows of the catalog (the pending items)."""

    def __init__(self, item_rows: np.ndarray, vectors: np.ndarray):
        if len(item_rows) != len(vectors):
            raise ValueError(f"{len(item_rows)} pending items but {len(vectors)} vectors")
        self.item_rows = np.asarray(item_rows, dtype=np.int64)
        self.index = FlatIndex(l2_normalize(vectors)) if len(item_rows) else None

    def __len__(self) -> int:
        return len(self.item_rows)

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(catalog rows [B, k'], cosine [B, k']), k' = min(k, pending items)."""
        if self.index is None:
            return np.zeros((len(query_vectors), 0), np.int64), np.zeros((len(query_vectors), 0), np.float32)
        rows, scores = self.index.search(l2_normalize(query_vectors), min(k, len(self.item_rows)))
        return self.item_rows[rows], scores


def reciprocal_rank_fusion(lists: list[np.ndarray], k: int, c: float = RRF_C,
                           combine: str = "sum") -> tuple[np.ndarray, np.ndarray]:
    """Merge ranked row lists (each [B, k_i], -1 = empty) into the top k rows per query.

    combine="sum" is classic RRF; "max" scores a row by its best rank in any list, which
    interleaves the lists (ties go to the earlier list) and never lets a row outrank another just
    because it appears in more lists."""
    if combine not in ("sum", "max"):
        raise ValueError(f"combine must be 'sum' or 'max', got {combine!r}")
    merge = (lambda a, b: a + b) if combine == "sum" else max
    b = len(lists[0])
    out_rows = np.full((b, k), -1, dtype=np.int64)
    out_scores = np.zeros((b, k), dtype=np.float32)
    for q in range(b):
        score: dict[int, float] = {}
        for ranked in lists:
            for rank, row in enumerate(ranked[q].tolist()):
                if row >= 0:
                    score[row] = merge(score.get(row, 0.0), 1.0 / (c + rank + 1))
        best = sorted(score.items(), key=lambda kv: -kv[1])[:k]  # stable: ties keep first-seen order
        for j, (row, s) in enumerate(best):
            out_rows[q, j], out_scores[q, j] = row, s
    return out_rows, out_scores


def acceptance_threshold(impostor_queries: np.ndarray, pending_vectors: np.ndarray, fpr: float) -> float:
    """Cosine above which a pending item is put first: the (1 - fpr) quantile of the best cosine
    that queries of other items (impostors) reach against the pending items."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    if len(impostor_queries) == 0 or len(pending_vectors) == 0:
        return float("inf")  # nothing to calibrate on: never accept on the cosine alone
    best = (l2_normalize(impostor_queries) @ l2_normalize(pending_vectors).T).max(axis=1)
    return float(np.quantile(best, 1.0 - fpr))


def accept_first(fused: np.ndarray, dense_rows: np.ndarray, dense_scores: np.ndarray, threshold: float,
                 k: int) -> np.ndarray:
    """Rows [B, k]: dense hits scoring >= threshold first (best first), then the fused ranking."""
    out = np.full((len(fused), k), -1, dtype=np.int64)
    for q in range(len(fused)):
        first = [int(r) for r, s in zip(dense_rows[q], dense_scores[q]) if r >= 0 and s >= threshold]
        rest = [int(r) for r in fused[q] if r >= 0 and int(r) not in first]
        ranked = (first + rest)[:k]
        out[q, :len(ranked)] = ranked
    return out


class HybridRetriever:
    """A GenerativeRetriever plus a DenseFallback over pending items (same search_batch API);
    with a threshold (acceptance_threshold), confident dense hits go first."""

    def __init__(self, retriever, fallback: DenseFallback, encode_text, threshold: float | None = None,
                 table=None, interleave: int | None = None):
        self.retriever, self.fallback, self.encode_text = retriever, fallback, encode_text
        self.threshold = threshold
        self.interleave = interleave  # at most this many dense hits below the threshold are merged in
        self.table = retriever.table if table is None else table  # the generator may decode fewer rows

    def answering_only(self, live: np.ndarray) -> "HybridRetriever":
        """A copy that answers none of the rows where `live` is False (BatchedSearch.answering_only):
        the generator stops decoding them, and the dense hits are filtered by the table's mask."""
        out = copy.copy(self)
        out.retriever = self.retriever.answering_only(live)
        out.table = replace(self.table, live=np.asarray(live, bool) & self.table.live)
        return out

    def search_batch(self, queries, k: int = 10, beam_size: int = 10) -> tuple[np.ndarray, np.ndarray]:
        rows, scores = self.retriever.search_batch(queries, k, beam_size)
        if len(self.fallback) == 0 or len(queries) == 0:
            return rows, scores
        dense_rows, dense_scores = self.fallback.search(self.encode_text(list(queries)), k)
        live = self.table.live
        dense_rows = np.where(dense_rows >= 0, np.where(live[dense_rows.clip(0)], dense_rows, -1), -1)
        if self.interleave is not None and self.threshold is not None:
            # below the threshold only the first `interleave` dense hits compete for a place, so old
            # queries keep their generative ranks 2..k (hits are sorted by score: accepted ones first)
            below = np.cumsum((dense_rows >= 0) & (dense_scores < self.threshold), axis=1)
            dense_rows = np.where((dense_scores >= self.threshold) | (below <= self.interleave), dense_rows, -1)
        # max, not sum: once the generator has learned the pending items they sit in both lists,
        # and summing would rank them above the generator's own first answer for old queries
        fused, fused_scores = reciprocal_rank_fusion([rows, dense_rows], k, combine="max")
        if self.threshold is None:
            return fused, fused_scores
        ranked = accept_first(fused, dense_rows, dense_scores, self.threshold, k)
        return ranked, np.where(ranked >= 0, 1.0 / (RRF_C + 1 + np.arange(k)[None, :]), 0.0).astype(np.float32)
