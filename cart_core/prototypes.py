"""Additive token prototypes: a starting point for the generator's output layer.

Find one vector per identifier token such that an item's target vector (for example the mean
text embedding of its training captions) is approximated by the sum of its tokens' vectors:
    min_E  sum_i || t_i - sum_l E[tok_il] ||^2 + lam ||E||^2
(a ridge regression on one-hot token indicators). With these as output embeddings and the pooled
query as decoder state, the summed token scores of an identifier equal the query's cosine to the
item's approximated target, so beam search starts as an additive-quantization version of the
caption-centroid retriever and training refines it.
"""
from __future__ import annotations

import numpy as np


def fit_additive_prototypes(tokens: np.ndarray, n_tokens: int, targets: np.ndarray, lam: float = 1e-2) -> np.ndarray:
    """tokens int [N, L] global token ids, targets [N, H] -> prototypes float32 [n_tokens, H]."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) != len(targets):
        raise ValueError(f"{len(tokens)} identifiers but {len(targets)} target vectors")
    gram = np.zeros((n_tokens, n_tokens))
    for a in range(tokens.shape[1]):
        for b in range(tokens.shape[1]):
            np.add.at(gram, (tokens[:, a], tokens[:, b]), 1.0)
    rhs = np.zeros((n_tokens, targets.shape[1]))
    for a in range(tokens.shape[1]):
        np.add.at(rhs, tokens[:, a], targets)
    return np.linalg.solve(gram + lam * np.eye(n_tokens), rhs).astype(np.float32)
