"""Findable before the generator has learned them: a dense look-up over recently added items,
merged into the generative ranking.

After an incremental add the new identifiers are in the decoding tables at once, but the
generator has never been trained to produce them. Until its fine-tune finishes, the added
("pending") items are also searched densely — by the mean MiniLM embedding of their captions,
the caption-centroid retriever — and the two ranked lists are merged with reciprocal-rank fusion
(score = sum over lists of 1 / (c + rank)), which needs no calibration between log-probabilities
and cosines.
"""
from __future__ import annotations

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


def reciprocal_rank_fusion(lists: list[np.ndarray], k: int, c: float = RRF_C) -> tuple[np.ndarray, np.ndarray]:
    """Merge ranked row lists (each [B, k_i], -1 = empty) into the top k rows per query."""
    b = len(lists[0])
    out_rows = np.full((b, k), -1, dtype=np.int64)
    out_scores = np.zeros((b, k), dtype=np.float32)
    for q in range(b):
        score: dict[int, float] = {}
        for ranked in lists:
            for rank, row in enumerate(ranked[q].tolist()):
                if row >= 0:
                    score[row] = score.get(row, 0.0) + 1.0 / (c + rank + 1)
        best = sorted(score.items(), key=lambda kv: -kv[1])[:k]
        for j, (row, s) in enumerate(best):
            out_rows[q, j], out_scores[q, j] = row, s
    return out_rows, out_scores


class HybridRetriever:
    """A GenerativeRetriever plus a DenseFallback over pending items (same search_batch API)."""

    def __init__(self, retriever, fallback: DenseFallback, encode_text):
        self.retriever, self.fallback, self.encode_text = retriever, fallback, encode_text
        self.table = retriever.table

    def search_batch(self, queries, k: int = 10, beam_size: int = 10) -> tuple[np.ndarray, np.ndarray]:
        rows, scores = self.retriever.search_batch(queries, k, beam_size)
        if len(self.fallback) == 0:
            return rows, scores
        dense_rows, _ = self.fallback.search(self.encode_text(list(queries)), k)
        live = self.table.live
        dense_rows = np.where(dense_rows >= 0, np.where(live[dense_rows.clip(0)], dense_rows, -1), -1)
        return reciprocal_rank_fusion([rows, dense_rows], k)
