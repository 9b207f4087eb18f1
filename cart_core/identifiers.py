"""Identifiers (k, v1 ... vM, u): coarse cluster, fine residual codes, uniqueness counter.

Each position has its own vocabulary; the decoder sees token = offset[position] + code. The
counter u numbers the candidates that share a prefix (k, v1 ... vM) in item_id order, so given the
same codes u does not depend on row order (and the fitted codebooks are seeded, so the same input
file yields the same identifiers).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cart_core.errors import ConfigError


@dataclass
class IdentifierTable:
    item_ids: np.ndarray      # object [N]
    codes: np.ndarray         # int64 [N, L]: k, v1..vM, u (raw codes, position-local)
    vocab_sizes: list[int]    # per position
    live: np.ndarray          # bool [N]; False = tombstoned

    @property
    def length(self) -> int:
        return int(self.codes.shape[1])

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.vocab_sizes)[:-1]]).astype(np.int64)

    def tokens(self) -> np.ndarray:
        """Global token ids (offset + code), the decoder's vocabulary."""
        return self.codes + self.offsets[None, :]

    def collision_stats(self) -> dict[str, float]:
        """How much the counter u has to do: 0 collisions means (k, v) alone is unique."""
        suffix = self.codes[:, -1]
        _, counts = np.unique(self.codes[:, :-1], axis=0, return_counts=True)
        return {
            "items": int(len(self.codes)),
            "distinct_prefixes": int(len(counts)),
            "items_with_collision": int(np.sum(counts[counts > 1])),
            "collision_rate": float(np.mean(suffix > 0)) if len(suffix) else 0.0,
            "max_items_per_prefix": int(counts.max()) if len(counts) else 0,
            "mean_items_per_prefix": float(counts.mean()) if len(counts) else 0.0,
        }

    def save(self, path: str | Path) -> None:
        """Parquet table (item_id, tokens, coarse, fine, suffix, live) + JSON vocabulary sidecar."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.table({
            "item_id": pa.array(self.item_ids.tolist(), pa.string()),
            "tokens": _int_lists(self.codes),
            "coarse": pa.array(self.codes[:, 0].astype(np.int32)),
            "fine": _int_lists(self.codes[:, 1:-1]),
            "suffix": pa.array(self.codes[:, -1].astype(np.int32)),
            "live": pa.array(self.live),
        })
        pq.write_table(table, path)
        path.with_suffix(".json").write_text(json.dumps({"vocab_sizes": self.vocab_sizes}))

    @classmethod
    def load(cls, path: str | Path) -> "IdentifierTable":
        path = Path(path)
        table = pq.read_table(path)
        tokens = table.column("tokens").combine_chunks()
        width = len(tokens[0]) if len(tokens) else 0
        codes = tokens.flatten().to_numpy().astype(np.int64).reshape(len(tokens), width)
        vocab = json.loads(path.with_suffix(".json").read_text())["vocab_sizes"]
        return cls(
            np.array(table.column("item_id").to_pylist(), dtype=object), codes, vocab,
            table.column("live").to_numpy(zero_copy_only=False).astype(bool),
        )


def _int_lists(codes: np.ndarray) -> pa.Array:
    """[N, W] ints as list<int32> without a Python list per row (fast at millions of rows)."""
    n, w = codes.shape
    offsets = pa.array(np.arange(0, (n + 1) * w, w, dtype=np.int32) if n else np.zeros(1, np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(codes.astype(np.int32).reshape(-1)))


def assign_suffix(item_ids: np.ndarray, prefix: np.ndarray) -> np.ndarray:
    """Counter u in [0, n) among rows sharing a prefix, ordered by item_id (deterministic)."""
    n = len(item_ids)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    keys = [np.asarray(item_ids).astype(str)] + [prefix[:, j] for j in range(prefix.shape[1] - 1, -1, -1)]
    order = np.lexsort(keys)  # sort by prefix, then item_id
    sorted_prefix = prefix[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = np.any(sorted_prefix[1:] != sorted_prefix[:-1], axis=1)
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    suffix = np.empty(n, dtype=np.int64)
    suffix[order] = np.arange(n) - group_start
    return suffix


def build_identifiers(
    item_ids: np.ndarray,
    coarse: np.ndarray,
    fine: np.ndarray,
    *,
    n_clusters: int,
    codebook_size: int,
    suffix_vocab: int | None = None,
) -> IdentifierTable:
    """Stack (k, v1..vM) and a uniqueness counter into one identifier per item."""
    item_ids = np.asarray(item_ids, dtype=object)
    prefix = np.concatenate([np.asarray(coarse).reshape(-1, 1), np.asarray(fine).reshape(len(coarse), -1)], 1)
    prefix = prefix.astype(np.int64)
    suffix = assign_suffix(item_ids, prefix)
    needed = int(suffix.max()) + 1 if len(suffix) else 1
    if suffix_vocab is not None and suffix_vocab < needed:
        raise ConfigError(f"suffix_vocab={suffix_vocab} is too small: a prefix holds {needed} items")
    vocab = [n_clusters] + [codebook_size] * (prefix.shape[1] - 1) + [suffix_vocab or needed]
    codes = np.concatenate([prefix, suffix[:, None]], 1)
    return IdentifierTable(item_ids, codes, vocab, np.ones(len(item_ids), dtype=bool))


def extend_identifiers(table: IdentifierTable, item_ids: np.ndarray, prefix: np.ndarray) -> IdentifierTable:
    """Append items under frozen codebooks: existing rows (and their identifiers) never change.

    A new item's counter continues after every row already under its prefix, tombstoned ones
    included, so u stays 0..n-1 within each prefix (what the decoding tables rely on) and a
    deleted identifier is never handed to another item. The counter's vocabulary grows when a
    prefix outgrows it."""
    item_ids = np.asarray(item_ids, dtype=object)
    prefix = np.asarray(prefix, dtype=np.int64).reshape(len(item_ids), table.length - 1)
    if len(item_ids) == 0:
        return table
    # rows already under each new item's prefix (tombstoned ones included); prefixes as one
    # mixed-radix int64 key each, so this is a sort of N ints, not of N tuples
    radix = np.asarray(table.vocab_sizes[:-1], dtype=np.int64)
    weights = np.concatenate([np.cumprod(radix[::-1])[::-1][1:], [1]]).astype(np.int64)
    old_keys = np.sort(table.codes[:, :-1] @ weights)
    new_keys = prefix @ weights
    used = np.searchsorted(old_keys, new_keys, side="right") - np.searchsorted(old_keys, new_keys, side="left")
    # plus the new items' own counter within their prefix, in item_id order (deterministic)
    suffix = used + assign_suffix(item_ids, prefix)
    codes = np.concatenate([table.codes, np.concatenate([prefix, suffix[:, None]], 1)])
    vocab = list(table.vocab_sizes[:-1]) + [max(table.vocab_sizes[-1], int(codes[:, -1].max()) + 1)]
    return IdentifierTable(np.concatenate([table.item_ids, item_ids]), codes, vocab,
                           np.concatenate([table.live, np.ones(len(item_ids), dtype=bool)]))


def appended_rows(table: IdentifierTable, start: int) -> IdentifierTable:
    """Rows start.. of a table (what a reindex appended), with the whole table's vocabulary."""
    return IdentifierTable(table.item_ids[start:], table.codes[start:], list(table.vocab_sizes), table.live[start:])


def apply_delta(table: IdentifierTable, appended: IdentifierTable, dead_rows: np.ndarray) -> IdentifierTable:
    """The table a delta describes: rows dead_rows of `table` tombstoned, then `appended` added.

    Together with appended_rows this lets an index of millions take a small change without
    rewriting every row (the id table of a reindex holds only what it changed)."""
    live = table.live.copy()
    dead_rows = np.asarray(dead_rows, dtype=np.int64)
    wrong = dead_rows[(dead_rows < 0) | (dead_rows >= len(live))]
    if len(wrong):  # -1 would silently kill the last row
        raise ValueError(f"dead row {int(wrong[0])} is outside the table it marks ({len(live)} rows)")
    live[dead_rows] = False
    codes = appended.codes.reshape(len(appended.item_ids), table.length) if len(appended.item_ids) else \
        np.zeros((0, table.length), dtype=np.int64)
    return IdentifierTable(np.concatenate([table.item_ids, appended.item_ids]), np.concatenate([table.codes, codes]),
                           list(appended.vocab_sizes), np.concatenate([live, appended.live]))


def live_rows(table: IdentifierTable, items: list[str]) -> dict[str, int]:
    """item_id -> its live row in the id table, for `items` only (vectorised hash look-up)."""
    if not items:
        return {}
    found = live_row_index(table, items)
    return {item: int(r) for item, r in zip(items, found.tolist()) if r >= 0}


def live_row_index(table: IdentifierTable, items) -> np.ndarray:
    """int64 [len(items)]: each item's live row in the id table, -1 where it has none. `items`: ids
    as a list or an Arrow string column; no Python object per item, so a reader placing 1M rows
    (pipelines/verify.py) does it in Arrow and numpy."""
    wanted = items if isinstance(items, (pa.Array, pa.ChunkedArray)) else pa.array(list(items), pa.string())
    if len(wanted) == 0:
        return np.zeros(0, np.int64)
    rows = np.flatnonzero(table.live)
    where = pc.index_in(wanted.cast(pa.string()), value_set=pa.array(table.item_ids[rows], pa.string()))
    found = np.asarray(where.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
    out = np.full(len(found), -1, np.int64)
    hit = found >= 0
    out[hit] = rows[found[hit]]  # no live row at all: every item misses
    return out
