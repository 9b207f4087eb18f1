"""Candidates for verification: the beam's identifiers, then the items under the beam's prefixes.

The counter u carries no content (it only numbers the items that share a prefix (k, v1..vM)), so
the generator cannot know which sibling a query means; it knows the prefix. And errors compound
along the identifier: a query often gets the cluster right and a fine code wrong. So after the
beam's own items come every live item under the beam's best full prefixes (the counter
siblings), then under its best shorter prefixes, deepest first, until `cap` candidates. Items the
generator was never trained on (just added by `cart reindex`, or indexed from features only) are
reached the same way, through the prefix their content gave them, with no flat index over them.
The number of candidates is capped per query, so verification cost does not grow with N.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from cart_core.decoding import BeamResult
from cart_core.trie import DecodingTrie


@dataclass
class Candidates:
    """Per query, up to C candidate rows in generator order (beam items first)."""

    rows: np.ndarray        # int64 [B, C], -1 padding
    logp: np.ndarray        # float32 [B, C, L]: log-prob of the candidate's first d+1 tokens where the
                            # beam kept that prefix at depth d+1, -inf where it did not
    depth: np.ndarray       # int8 [B, C]: depth of the beam prefix it was reached by (L = the item itself)
    rank: np.ndarray        # int32 [B, C]: 0-based rank in generator order

    @property
    def valid(self) -> np.ndarray:
        return self.rows >= 0

    @classmethod
    def concat(cls, parts: list["Candidates"]) -> "Candidates":
        return cls(*[np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)])


def expand_beam(beam: BeamResult, trie: DecodingTrie, cap: int, min_depth: int | None = None) -> Candidates:
    """Beam items, then live items under the beam's prefixes of depth L-1, L-2, ... min_depth (best
    prefix first within a depth), at most `cap` per query. min_depth = L means no expansion (the
    beam's items only, the ablation); the default, L-1, adds the counter siblings."""
    length = trie.length
    min_depth = length - 1 if min_depth is None else min_depth
    if not 1 <= min_depth <= length:
        raise ValueError(f"expansion depth must be in [1, {length}], got {min_depth}")
    items, item_scores = beam.items.cpu().numpy(), beam.scores.cpu().numpy()
    levels = [(d, beam.level_nodes[d].cpu().numpy(), beam.level_scores[d].cpu().numpy())
              for d in range(length - 1, min_depth - 1, -1)]
    sorted_items, live_sorted = trie.sorted_items.cpu().numpy(), trie.live_sorted.cpu().numpy()
    b = len(items)
    out = Candidates(np.full((b, cap), -1, np.int64), np.full((b, cap, length), -np.inf, np.float32),
                     np.zeros((b, cap), np.int8), np.zeros((b, cap), np.int32))
    beam_nodes = [beam.level_nodes[d].cpu().numpy() for d in range(1, length)]
    beam_scores = [beam.level_scores[d].cpu().numpy() for d in range(1, length)]
    for q in range(b):
        chosen: list[tuple[int, float, int]] = []
        seen: set[int] = set()
        for row, s in zip(items[q].tolist(), item_scores[q].tolist()):
            if row >= 0 and row not in seen and len(chosen) < cap:
                seen.add(row)
                chosen.append((row, s, length))
        for depth, nodes, scores in levels:
            if len(chosen) >= cap:
                break
            start, count = trie.node_spans[depth]
            for node, s in zip(nodes[q].tolist(), scores[q].tolist()):
                if not np.isfinite(s):
                    continue
                for pos in range(int(start[node]), int(start[node] + count[node])):
                    row = int(sorted_items[pos])
                    if live_sorted[pos] and row not in seen:
                        seen.add(row)
                        chosen.append((row, s, depth))
                        if len(chosen) >= cap:
                            break
                if len(chosen) >= cap:
                    break
        score_of = [dict(zip(n[q].tolist(), sc[q].tolist())) for n, sc in zip(beam_nodes, beam_scores)]
        for j, (row, s, depth) in enumerate(chosen):
            out.rows[q, j], out.depth[q, j], out.rank[q, j] = row, depth, j
            for d, scores_d in enumerate(score_of, start=1):
                out.logp[q, j, d - 1] = scores_d.get(int(trie.node_of_row[d][row]), -np.inf)
            if depth == length:
                out.logp[q, j, length - 1] = s
    return out
