"""Decoding tables: which token may follow a given identifier prefix, as dense per-level tensors.

Identifiers have a fixed length L, so the prefix tree is stored level by level:
  * levels 0 .. L-2: `children[l]` is an int tensor [nodes at depth l, V_l] holding the child node
    id (or -1), and `live_below[l+1]` counts live items under each node, so a subtree whose items
    were all deleted is masked too;
  * level L-1 (the counter u): the u values under a prefix are 0 .. n-1, so a prefix only needs the
    start of its items in code-sorted order and their count; the leaf is an item row.
A mask for a whole batch of beams is then a couple of gathers, with no Python loop per beam.
"""
from __future__ import annotations

import numpy as np
import torch


class DecodingTrie:
    def __init__(self, codes: np.ndarray, vocab_sizes: list[int], live: np.ndarray | None = None):
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[1] != len(vocab_sizes):
            raise ValueError(f"codes must be [N, {len(vocab_sizes)}], got {codes.shape}")
        if len(codes) == 0:
            raise ValueError("cannot build a decoding trie over an empty catalog")
        if np.any(codes < 0) or np.any(codes >= np.asarray(vocab_sizes)[None, :]):
            raise ValueError("identifier code outside its position's vocabulary")
        self.vocab_sizes = list(vocab_sizes)
        self.length = len(vocab_sizes)
        order = np.lexsort([codes[:, j] for j in range(self.length - 1, -1, -1)])
        self.sorted_items = torch.from_numpy(order)          # sorted position -> item row
        sorted_codes = codes[order]
        if np.any(np.all(sorted_codes[1:] == sorted_codes[:-1], axis=1)):
            raise ValueError("identifiers are not unique")
        self.children: list[torch.Tensor] = []
        self._node_of_item: list[np.ndarray] = [np.zeros(len(codes), dtype=np.int64)]
        node = self._node_of_item[0]
        for level in range(self.length - 1):
            key = node * vocab_sizes[level] + sorted_codes[:, level]
            uniq, child = np.unique(key, return_inverse=True)
            table = np.full((int(node.max()) + 1, vocab_sizes[level]), -1, dtype=np.int64)
            table[uniq // vocab_sizes[level], uniq % vocab_sizes[level]] = np.arange(len(uniq))
            self.children.append(torch.from_numpy(table))
            node = child.reshape(-1)
            self._node_of_item.append(node)
        n_prefix = int(node.max()) + 1
        # candidate expansion (cart_core/candidates.py): per depth d, item row -> its node, and each
        # node's items as one contiguous span [start, start + count) of the code-sorted order
        self.node_of_row: list[np.ndarray] = []
        self.node_spans: list[tuple[np.ndarray, np.ndarray]] = []
        for sorted_nodes in self._node_of_item:
            of_row = np.empty(len(codes), dtype=np.int64)
            of_row[order] = sorted_nodes
            n_nodes = int(sorted_nodes.max()) + 1
            self.node_of_row.append(of_row)
            self.node_spans.append((np.searchsorted(sorted_nodes, np.arange(n_nodes)),
                                    np.bincount(sorted_nodes, minlength=n_nodes)))
        self.leaf_start = torch.from_numpy(np.searchsorted(node, np.arange(n_prefix)).astype(np.int64))
        self.leaf_count = torch.from_numpy(np.bincount(node, minlength=n_prefix).astype(np.int64))
        suffix = sorted_codes[:, -1]
        if np.any(suffix != np.arange(len(node)) - self.leaf_start.numpy()[node]):
            raise ValueError("uniqueness counters must be 0..n-1 within each prefix")
        self.set_live(np.ones(len(codes), dtype=bool) if live is None else live)

    def set_live(self, live: np.ndarray) -> None:
        """Tombstones: items with live=False can never be decoded again."""
        live = np.asarray(live, dtype=bool)
        if live.shape != (len(self._node_of_item[0]),):
            raise ValueError(f"live mask has shape {live.shape}, expected ({len(self._node_of_item[0])},)")
        device = self.leaf_start.device
        live_sorted = live[self.sorted_items.cpu().numpy()]
        self.live_sorted = torch.from_numpy(live_sorted).to(device)
        self.live_below = [
            torch.from_numpy(np.bincount(nodes, weights=live_sorted, minlength=int(nodes.max()) + 1)).to(device)
            for nodes in self._node_of_item
        ]

    def to(self, device: str | torch.device) -> "DecodingTrie":
        self.children = [c.to(device) for c in self.children]
        self.live_below = [c.to(device) for c in self.live_below]
        for name in ("sorted_items", "leaf_start", "leaf_count", "live_sorted"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def allowed(self, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """Bool mask [..., V_level] of tokens that keep each prefix node on a live identifier."""
        if level < self.length - 1:
            child = self.children[level][nodes]
            below = self.live_below[level + 1]
            return (child >= 0) & (below[child.clamp_min(0)] > 0)
        u = torch.arange(self.vocab_sizes[-1], device=nodes.device)
        pos = self.leaf_start[nodes].unsqueeze(-1) + u
        inside = u < self.leaf_count[nodes].unsqueeze(-1)
        return inside & self.live_sorted[pos.clamp_max(len(self.live_sorted) - 1)]

    def advance(self, level: int, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Child node after `tokens`; at the last level, the item row. Invalid moves give 0/garbage
        and must be carried with a -inf score by the caller."""
        if level < self.length - 1:
            return self.children[level][nodes, tokens].clamp_min(0)
        pos = (self.leaf_start[nodes] + tokens).clamp_max(len(self.sorted_items) - 1)
        return self.sorted_items[pos]
