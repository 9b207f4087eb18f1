"""Generative retrieval: encode a batch of queries once, then constrained beam search."""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch
from tqdm.auto import tqdm

from cart_core.decoding import constrained_beam_search
from cart_core.generator import Generator
from cart_core.identifiers import IdentifierTable
from cart_core.trie import DecodingTrie


def no_answers(queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The result of queries that find nothing: rows -1, scores -inf, [queries, k]."""
    return np.full((queries, k), -1, np.int64), np.full((queries, k), -np.inf, np.float32)


class BatchedSearch:
    """search() over many queries for any retriever with search_batch(queries, k, beam_size)."""

    def search(self, queries, k: int = 10, beam_size: int = 10, batch_size: int = 64,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        if len(queries) == 0:
            return no_answers(0, k)
        rows, scores = [], []
        for start in tqdm(range(0, len(queries), batch_size), desc="retrieve", disable=not progress, leave=False):
            r, s = self.search_batch(queries[start:start + batch_size], k, beam_size)
            rows.append(r)
            scores.append(s)
        return np.concatenate(rows), np.concatenate(scores)

    def answering_only(self, live: np.ndarray) -> "BatchedSearch":
        """A copy that answers none of the rows where `live` is False, sharing the model, the item
        vectors and the neighbour lists: a takedown applied to a loaded retriever in one pass over
        the rows (a new trie mask), without reloading it. Rows are only ever taken away."""
        out = copy.copy(self)
        out.table = replace(self.table, live=np.asarray(live, bool) & self.table.live)
        out.trie = copy.copy(self.trie)  # set_live replaces the masks: the original keeps its own
        out.trie.set_live(out.table.live)
        return out


class GenerativeRetriever(BatchedSearch):
    def __init__(self, generator: Generator, table: IdentifierTable, device: str = "cpu"):
        if list(generator.cfg.vocab_sizes) != list(table.vocab_sizes):
            raise ValueError(
                f"generator vocabulary {generator.cfg.vocab_sizes} does not match identifiers {table.vocab_sizes}"
            )
        self.generator = generator.to(device).eval()
        self.table = table
        self.trie = DecodingTrie(table.codes, table.vocab_sizes, table.live).to(device)
        self.device = device

    @torch.no_grad()
    def search_batch(self, queries, k: int = 10, beam_size: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(item rows int64 [B, k], -1 where fewer than k; scores = summed log-probs [B, k])."""
        if len(queries) == 0:
            return no_answers(0, k)
        states, mask = self.generator.encode_queries(queries)
        return self.search_batch_states(states, mask, k, beam_size)

    @torch.no_grad()
    def search_batch_states(self, states: torch.Tensor, mask: torch.Tensor, k: int = 10,
                            beam_size: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Same as search_batch for already-encoded queries (states [B, S, T, H], mask [B, T])."""
        decoder = self.generator.decoder
        memory = decoder.prepare_memory(states.to(self.device), mask.to(self.device))

        def step(prefix: torch.Tensor, level: int, width: int) -> torch.Tensor:
            return decoder.next_log_probs(memory, prefix, level, width)

        items, scores = constrained_beam_search(step, self.trie, len(mask), beam_size, k)
        return items.cpu().numpy(), scores.cpu().numpy()
