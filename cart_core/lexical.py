"""Lexical verification: BM25 of a query's words against an item's training captions.

The caption centroid (a mean of sentence vectors) blurs the words that decide a match: which
instrument, how many dogs, what colour. An exact-term score over the same captions carries what
the centroid averages away, at no model cost. Measured before it was wired in (dense over all
items, MiniLM, caption centroid alone → centroid + BM25, weight chosen on the caption before the
query one): VATEX-917 80.7 → 82.2 R@1, Flickr8k-976 70.7 → 72.6 (docs/benchmarks.md §0).

Words are lower-cased, split on anything that is not a letter or digit, lightly stemmed, and
hashed to 64 bits, so items added later by `cart reindex` bring their own words with no
vocabulary to update. Document frequencies and lengths are computed over the items the index is
built from (every live captioned item when a job loads a version). Memory: a CSR row per item,
8 bytes a distinct word (int32 column + fp32 weight) in a serving job, 20 while fitting (the
per-item counts are kept for the leave-one-out scores); Flickr8k's 4 training captions make
about 30 distinct words an item, VATEX's 9 about 60 (about 0.25 / 0.5 KiB an item served).
Building and the leave-one-out scores loop over captions in Python: fine at 10^4-10^5 items,
minutes at 10^6.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.sparse as sp

K1, B = 1.2, 0.75  # the usual BM25 constants; not tuned on the evaluation queries
_WORD = re.compile(r"[^\W_]+")  # runs of letters or digits, in any script
_DOUBLED = set("bcdfghjkmnpqrtvwy")  # a doubled final consonant left by -ing / -ed (not l, s, z)


def stem(word: str) -> str:
    """A light, consistent English stemmer for short captions: plural, -ing, -ed and a final e
    go, so "horses" / "horse", "running" / "run", "smiling" / "smile", "glasses" / "glass" and
    "boxes" / "box" meet. Stemming was chosen over none on the held-out caption of VATEX."""
    if len(word) <= 3:
        return word
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith("es") and word[:-2].endswith(("s", "x", "z", "ch", "sh")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            if len(word) > 3 and word[-1] == word[-2] and word[-1] in _DOUBLED:
                word = word[:-1]
            break
    if word.endswith("e") and len(word) > 3 and not word.endswith("ee"):
        word = word[:-1]
    return word


def words(text: str) -> list[str]:
    return [stem(w) for w in _WORD.findall(str(text).lower())]


@lru_cache(maxsize=1 << 16)  # words repeat: captions and queries hash a small vocabulary
def term_hash(word: str) -> int:
    """A stable 63-bit id (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") >> 1


def term_counts(texts: list[str]) -> Counter:
    """Term id -> occurrences over some captions."""
    return Counter(term_hash(w) for text in texts for w in words(text))


@dataclass
class ItemTerms:
    """Per catalog row, the term ids of its captions and their counts (CSR); an empty row: no caption.
    The stored form (Parquet list columns); TermIndex turns it into scores."""

    indptr: np.ndarray  # [N + 1] int64
    terms: np.ndarray   # [nnz] int64, distinct within a row
    counts: np.ndarray  # [nnz] int32

    @classmethod
    def from_captions(cls, item_rows: np.ndarray, texts: list[str], n_items: int) -> "ItemTerms":
        per_item: list[Counter] = [Counter() for _ in range(n_items)]
        for row, text in zip(np.asarray(item_rows, np.int64).tolist(), texts):
            per_item[row].update(term_hash(w) for w in words(text))
        return cls.from_counters(per_item)

    @classmethod
    def from_counters(cls, per_item: list[Counter]) -> "ItemTerms":
        return cls.from_lists([list(c.keys()) for c in per_item], [list(c.values()) for c in per_item])

    @classmethod
    def from_lists(cls, terms: list, counts: list) -> "ItemTerms":
        lengths = np.array([len(t) for t in terms], np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat_terms = np.array([t for row in terms for t in row], np.int64)
        flat_counts = np.array([c for row in counts for c in row], np.int32)
        if len(flat_terms) != len(flat_counts):
            raise ValueError(f"{len(flat_terms)} term ids but {len(flat_counts)} counts")
        return cls(indptr, flat_terms, flat_counts)

    @classmethod
    def from_segments(cls, n_items: int, rows: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                      terms: np.ndarray, counts: np.ndarray) -> "ItemTerms":
        """Rows from slices of flat arrays (Parquet list columns): segment j gives row rows[j] the
        entries starts[j] .. starts[j] + lengths[j]; where a row has several, the last one wins."""
        rows, starts, lengths = (np.asarray(x, np.int64) for x in (rows, starts, lengths))
        keep = np.flatnonzero(rows >= 0)[::-1]  # last segment first, so np.unique keeps it
        _, first = np.unique(rows[keep], return_index=True)
        chosen = keep[first]  # ascending rows
        size = np.zeros(n_items, np.int64)
        size[rows[chosen]] = lengths[chosen]
        indptr = np.concatenate([[0], np.cumsum(size)]).astype(np.int64)
        seg_len = lengths[chosen]
        within = np.arange(int(seg_len.sum())) - np.repeat(np.cumsum(seg_len) - seg_len, seg_len)
        pos = np.repeat(starts[chosen], seg_len) + within
        return cls(indptr, np.asarray(terms, np.int64)[pos], np.asarray(counts, np.int32)[pos])

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.terms[self.indptr[i]:self.indptr[i + 1]], self.counts[self.indptr[i]:self.indptr[i + 1]]

    def as_lists(self, rows: np.ndarray) -> tuple[list[list[int]], list[list[int]]]:
        pairs = [self.row(int(r)) for r in rows]
        return [t.tolist() for t, _ in pairs], [c.tolist() for _, c in pairs]

    def __len__(self) -> int:
        return len(self.indptr) - 1


class TermIndex:
    """BM25 document weights of every item (a sparse [N, V] matrix) over the vocabulary of its
    captions; scores a batch of queries against each query's own candidate rows."""

    def __init__(self, items: ItemTerms, keep_items: bool = True):
        """keep_items: keep the per-item counts (12 B a word) that leave_one_out needs while a
        fusion is fitted; a serving job drops them and holds the matrix alone."""
        self.items = items if keep_items else None
        n = len(items)
        self.vocab, column = np.unique(items.terms, return_inverse=True)
        owner = np.repeat(np.arange(n), np.diff(items.indptr))
        length = np.bincount(owner, weights=items.counts, minlength=n).astype(np.float64)
        documents = max(int((length > 0).sum()), 1)
        self.mean_length = float(length[length > 0].mean()) if (length > 0).any() else 1.0
        self.length = length
        df = np.bincount(column, minlength=len(self.vocab))
        self.idf = np.log1p((documents - df + 0.5) / (df + 0.5))
        tf = items.counts.astype(np.float64)
        weight = self.idf[column] * tf * (K1 + 1) / (tf + self._norm(length[owner]))
        self.matrix = sp.csr_matrix((weight.astype(np.float32), column.astype(np.int32), items.indptr),
                                    shape=(n, len(self.vocab)))

    def _norm(self, length: np.ndarray) -> np.ndarray:
        return K1 * (1 - B + B * length / self.mean_length)

    def columns(self, text: str) -> np.ndarray:
        """The vocabulary columns of a query's distinct words (words no item has are dropped)."""
        ids = np.unique(np.array([term_hash(w) for w in words(text)], np.int64))
        if len(ids) == 0 or len(self.vocab) == 0:
            return np.zeros(0, np.int64)
        pos = np.searchsorted(self.vocab, ids).clip(max=len(self.vocab) - 1)
        return pos[self.vocab[pos] == ids]

    def queries(self, texts: list[str]) -> sp.csr_matrix:
        """[B, V] 0/1: which words each query has."""
        cols = [self.columns(t) for t in texts]
        indptr = np.concatenate([[0], np.cumsum([len(c) for c in cols])]).astype(np.int64)
        data = np.ones(int(indptr[-1]), np.float32)
        flat = np.concatenate(cols).astype(np.int32) if cols else np.zeros(0, np.int32)
        return sp.csr_matrix((data, flat, indptr), shape=(len(texts), len(self.vocab)))

    def score(self, queries: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
        """BM25 [B, C] of query b against its candidate rows[b]: the candidates' rows times the
        query's 0/1 row, element-wise, so the work is the candidates' words (C a query, whatever N
        and whatever the vocabulary size)."""
        b, c = rows.shape
        if b == 0 or c == 0:
            return np.zeros(rows.shape, np.float32)
        candidates = self.matrix[np.asarray(rows, np.int64).ravel()]
        repeated = queries[np.repeat(np.arange(b), c)]
        return np.asarray(candidates.multiply(repeated).sum(1), np.float32).reshape(b, c)

    def score_all(self, queries: sp.csr_matrix, rows: np.ndarray | None = None) -> np.ndarray:
        """BM25 [B, n] against every item (or `rows`): the dense look-up's version."""
        matrix = self.matrix if rows is None else self.matrix[rows]
        return np.asarray((queries @ matrix.T).todense(), np.float32)

    def leave_one_out(self, texts: list[str], rows: np.ndarray) -> np.ndarray:
        """BM25 [B] of each text against its own item's captions without that text: what a held-out
        training caption scores its item with, when the item's terms include it."""
        if self.items is None:
            raise ValueError("leave_one_out needs the item counts: build the TermIndex with keep_items=True")
        out = np.zeros(len(texts), np.float32)
        for i, (text, row) in enumerate(zip(texts, np.asarray(rows, np.int64).tolist())):
            own = Counter(term_hash(w) for w in words(text))
            terms, counts = self.items.row(row)
            doc = {int(t): int(c) - own.get(int(t), 0) for t, c in zip(terms, counts)}
            length = max(self.length[row] - sum(own.values()), 0.0)
            norm = self._norm(np.array(length))
            for t in own:
                tf = doc.get(t, 0)
                if tf > 0:
                    col = np.searchsorted(self.vocab, t)
                    out[i] += self.idf[col] * tf * (K1 + 1) / (tf + norm)
        return out
