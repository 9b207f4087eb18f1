"""Retrieval metrics from ranked lists: R@K (%), median rank, MRR@10."""
from __future__ import annotations

import numpy as np


def gold_ranks(ranked: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """1-based rank of each query's gold item in its ranked list; inf where it was not returned."""
    ranked = np.asarray(ranked)
    hit = ranked == np.asarray(gold)[:, None]
    ranks = np.where(hit.any(1), hit.argmax(1) + 1, np.inf)
    return ranks.astype(np.float64)


def retrieval_metrics(ranked: np.ndarray, gold: np.ndarray) -> dict[str, float | None]:
    """R@1/5/10 in percent, median rank (None if the median falls outside the list), MRR@10."""
    if len(gold) == 0:
        raise ValueError("no queries to evaluate")
    ranks = gold_ranks(ranked, gold)
    median = float(np.median(ranks))
    return {
        "R@1": float(np.mean(ranks <= 1) * 100),
        "R@5": float(np.mean(ranks <= 5) * 100),
        "R@10": float(np.mean(ranks <= 10) * 100),
        "MdR": median if np.isfinite(median) else None,
        "MRR@10": float(np.mean(np.where(ranks <= 10, 1.0 / ranks, 0.0))),
        "queries": int(len(gold)),
    }
