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
        """Batches of queries, one after the other."""
        return cls(*[np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)])

    def join(self, more: "Candidates") -> "Candidates":
        """The same queries with `more` candidates after these."""
        return Candidates(*[np.concatenate([getattr(self, f.name), getattr(more, f.name)], axis=1) for f in fields(self)])


def expand_beam(beam: BeamResult, trie: DecodingTrie, cap: int, min_depth: int | None = None,
                clusters: int = 0) -> Candidates:
    """Beam items, then live items under the beam's prefixes of depth L-1, L-2, ... min_depth (best
    prefix first within a depth), at most `cap` per query. min_depth = L means no expansion (the
    beam's items only, the ablation); the default, L-1, adds the counter siblings. With
    clusters > 0, depth 1 takes that many best first tokens from the first decoding step (which
    scored them all anyway) instead of the beam's."""
    length = trie.length
    min_depth = length - 1 if min_depth is None else min_depth
    if not 1 <= min_depth <= length:
        raise ValueError(f"expansion depth must be in [1, {length}], got {min_depth}")
    prefixes = BeamPrefixes.of(beam, trie, clusters)
    items, item_scores, nodes, scores = prefixes.items, prefixes.item_scores, prefixes.nodes, prefixes.scores
    sorted_items, live_sorted = trie.sorted_items.cpu().numpy(), trie.live_sorted.cpu().numpy()
    b = len(items)
    out = Candidates(np.full((b, cap), -1, np.int64), np.full((b, cap, length), -np.inf, np.float32),
                     np.zeros((b, cap), np.int8), np.zeros((b, cap), np.int32))
    for q in range(b):
        keep = (items[q] >= 0) & np.isfinite(item_scores[q])
        rows_parts, depth_parts = [items[q][keep]], [np.full(int(keep.sum()), length)]
        for depth in range(length - 1, min_depth - 1, -1):
            kept = np.isfinite(scores[depth][q])
            pos = _span_positions(*trie.node_spans[depth], nodes[depth][q][kept], cap)
            pos = pos[live_sorted[pos]]
            rows_parts.append(sorted_items[pos])
            depth_parts.append(np.full(len(pos), depth))
        rows = np.concatenate(rows_parts).astype(np.int64)
        depth_of = np.concatenate(depth_parts)
        _, first = np.unique(rows, return_index=True)
        first = np.sort(first)[:cap]                       # each row once, in generator order
        rows, depth_of = rows[first], depth_of[first]
        n = len(rows)
        out.rows[q, :n], out.depth[q, :n], out.rank[q, :n] = rows, depth_of, np.arange(n)
        out.logp[q, :n] = prefixes.logp(trie, q, rows)
    return out


@dataclass
class BeamPrefixes:
    """What the beam kept, per query: its items and their scores, and per depth d its prefix nodes
    and their log-probabilities (depth 1 from the first decoding step when `clusters` > 0)."""

    items: np.ndarray
    item_scores: np.ndarray
    nodes: dict[int, np.ndarray]
    scores: dict[int, np.ndarray]

    @classmethod
    def of(cls, beam: BeamResult, trie: DecodingTrie, clusters: int = 0) -> "BeamPrefixes":
        nodes = {d: beam.level_nodes[d].cpu().numpy() for d in range(1, trie.length)}
        scores = {d: beam.level_scores[d].cpu().numpy() for d in range(1, trie.length)}
        if clusters > 0 and trie.length > 1 and beam.first_logp is not None:
            top = beam.first_logp.topk(min(clusters, beam.first_logp.shape[1]), dim=1)
            nodes[1] = trie.children[0][0][top.indices].clamp_min(0).cpu().numpy()
            scores[1] = top.values.cpu().numpy()
        return cls(beam.items.cpu().numpy(), beam.scores.cpu().numpy(), nodes, scores)

    def logp(self, trie: DecodingTrie, q: int, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), L]: log-prob of each row's first d+1 tokens where query q's beam kept
        that prefix, the item's own score where the beam found the item, -inf elsewhere."""
        out = np.full((len(rows), trie.length), -np.inf, np.float32)
        for depth in range(1, trie.length):
            out[:, depth - 1] = _lookup(trie.node_of_row[depth][rows], self.nodes[depth][q], self.scores[depth][q])
        keep = (self.items[q] >= 0) & np.isfinite(self.item_scores[q])
        by_row = dict(zip(self.items[q][keep].tolist(), self.item_scores[q][keep].tolist()))
        out[:, -1] = [by_row.get(r, -np.inf) for r in rows.tolist()]
        return out


def rows_as_candidates(beam: BeamResult, trie: DecodingTrie, rows: np.ndarray, clusters: int = 0,
                       first_rank: int = 0, logp: bool = True) -> Candidates:
    """Candidates for rows found another way (item neighbour lists, cart_core/neighbors.py), with
    the beam's log-probabilities of their prefixes (left -inf with logp=False, when no signal
    reads them); depth 0 marks them, ranks follow first_rank."""
    b, c = rows.shape
    out = Candidates(np.asarray(rows, np.int64), np.full((b, c, trie.length), -np.inf, np.float32),
                     np.zeros((b, c), np.int8), np.tile(np.arange(first_rank, first_rank + c, dtype=np.int32), (b, 1)))
    if not logp:
        return out
    kept = BeamPrefixes.of(beam, trie, clusters)
    for q in range(b):
        n = int((rows[q] >= 0).sum())
        out.logp[q, :n] = kept.logp(trie, q, rows[q, :n])
    return out


def _span_positions(start: np.ndarray, count: np.ndarray, nodes: np.ndarray, cap: int) -> np.ndarray:
    """Sorted positions of the items under `nodes`, node after node (at most `cap` per node)."""
    if len(nodes) == 0:
        return np.zeros(0, np.int64)
    lo, n = start[nodes], np.minimum(count[nodes], cap)
    offsets = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    return np.repeat(lo, n) + offsets


def _lookup(keys: np.ndarray, nodes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """scores[j] where nodes[j] == key (finite ones only), else -inf."""
    hit = (keys[:, None] == nodes[None, :]) & np.isfinite(scores)[None, :]
    return np.where(hit.any(1), scores[hit.argmax(1)], -np.inf).astype(np.float32)
