"""Batched beam search constrained to valid identifiers.

All beams of all queries advance together: one decoder call per identifier position, one
vectorised mask from the trie, one top-k over (beam x vocabulary). With fixed-length identifiers
the cost is L decoder calls per batch, independent of the number of candidates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from cart_core.trie import DecodingTrie

# step_fn(prefix codes [B*W, level], level, beams W) -> log-probabilities [B*W, V_level]
StepFn = Callable[[torch.Tensor, int, int], torch.Tensor]


@dataclass
class BeamResult:
    """Final items plus the beam at every depth (the prefixes it kept before each token): candidate
    expansion (cart_core/candidates.py) starts from them."""

    items: torch.Tensor           # item rows int64 [B, k], -1 padding
    scores: torch.Tensor          # summed log-probs [B, k], -inf padding
    level_nodes: list[torch.Tensor]   # per depth d = 0..L-1: the beam's trie nodes [B, W_d] after d tokens
    level_scores: list[torch.Tensor]  # their summed log-probs [B, W_d], -inf where invalid
    first_logp: torch.Tensor | None = None  # log-probs of every first token [B, V_0], -inf where not allowed


@torch.no_grad()
def constrained_beam_search(
    step_fn: StepFn, trie: DecodingTrie, batch_size: int, beam_size: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k distinct items per query: (item rows int64 [B, k] with -1 padding, scores [B, k])."""
    result = beam_search_with_prefixes(step_fn, trie, batch_size, beam_size, top_k)
    return result.items, result.scores


@torch.no_grad()
def beam_search_with_prefixes(
    step_fn: StepFn, trie: DecodingTrie, batch_size: int, beam_size: int, top_k: int
) -> BeamResult:
    """constrained_beam_search that also keeps the beam's prefixes at every depth."""
    if top_k > beam_size:
        raise ValueError(f"top_k={top_k} cannot exceed beam_size={beam_size}")
    device = trie.leaf_start.device
    nodes = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    scores = torch.zeros(batch_size, 1, device=device)
    prefix = torch.zeros(batch_size, 1, 0, dtype=torch.long, device=device)
    level_nodes, level_scores, first_logp = [], [], None
    for level, vocab in enumerate(trie.vocab_sizes):
        level_nodes.append(nodes)
        level_scores.append(scores)
        width = nodes.shape[1]
        logp = step_fn(prefix.reshape(batch_size * width, level), level, width).view(batch_size, width, vocab)
        logp = logp.masked_fill(~trie.allowed(level, nodes), float("-inf"))
        if level == 0:
            first_logp = logp[:, 0]
        flat = (scores.unsqueeze(-1) + logp).view(batch_size, width * vocab)
        scores, index = flat.topk(min(beam_size, flat.shape[1]), dim=1)
        beam, token = index // vocab, index % vocab
        parent_nodes = nodes.gather(1, beam)
        prefix = torch.cat([prefix.gather(1, beam.unsqueeze(-1).expand(-1, -1, level)), token.unsqueeze(-1)], -1)
        nodes = trie.advance(level, parent_nodes, token)
    valid = torch.isfinite(scores)
    items = torch.where(valid, nodes, torch.full_like(nodes, -1))
    if items.shape[1] < top_k:  # fewer live items than k
        pad = top_k - items.shape[1]
        items = torch.cat([items, items.new_full((batch_size, pad), -1)], 1)
        scores = torch.cat([scores, scores.new_full((batch_size, pad), float("-inf"))], 1)
    return BeamResult(items[:, :top_k], scores[:, :top_k], level_nodes, level_scores, first_logp)
