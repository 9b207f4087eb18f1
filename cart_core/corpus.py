"""Corpus loading, validation, caption splits and a synthetic fallback corpus.

A corpus folder holds ``items.parquet`` (``item_id``, ``embedding`` and optionally ``modality``
plus free extra columns) and ``captions.parquet`` (``item_id``, ``caption`` and optionally
``caption_index``). Every later stage (clustering, code assignment, training, evaluation)
assumes the invariants checked here -- unique ids, one finite non-zero vector of one dimension
per item, captions that name known items -- so a bad file fails here with the file, the row and
the reason instead of as a NaN loss or an index error hours later.

Validation is vectorised with pyarrow/numpy: there is no per-row Python loop over embeddings,
so a million 512-d items load in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cart_core.errors import LocatedError

__all__ = [
    "CorpusError",
    "Corpus",
    "load_corpus",
    "check_min_items",
    "split_captions",
    "synthetic_corpus",
    "write_corpus",
]

ITEMS_FILE = "items.parquet"
CAPTIONS_FILE = "captions.parquet"
SYNTHETIC = "synthetic"
BAD_CAPTION_MODES = ("error", "skip")
MAX_REPORTED_SKIPS = 20
# Rows per block when scanning embeddings for NaN/inf/zero rows: bounds the boolean
# temporaries to a few tens of MB whatever the corpus size.
_SCAN_BLOCK = 65_536


class CorpusError(LocatedError):
    """Bad input in an items / captions table; the message always names the file, the row (0-based
    parquet row, when there is one) and the reason, so the user can go straight to the offending record."""


def _empty_report() -> dict:
    return {
        "items": 0,
        "captions": 0,
        "skipped_captions": {"unknown_item": 0, "empty": 0},
        "skipped_rows": [],
    }


@dataclass(eq=False)
class Corpus:
    """Validated items and their captions, held as flat arrays for vectorised downstream use."""

    item_ids: np.ndarray  # object [N] of str, file order
    embeddings: np.ndarray  # float32 [N, d], C-contiguous
    modality: np.ndarray  # object [N]
    caption_item: np.ndarray  # int64 [C], row into item_ids
    caption_index: np.ndarray  # int64 [C]
    caption_text: list[str]  # [C]
    source: str  # folder path or "synthetic"
    report: dict = field(default_factory=_empty_report)

    def __post_init__(self) -> None:
        """Catch hand-built corpora whose arrays disagree before they reach a model."""
        n = len(self.item_ids)
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != n:
            raise ValueError(f"embeddings shape {self.embeddings.shape} does not match {n} items")
        if len(self.modality) != n:
            raise ValueError(f"modality has {len(self.modality)} entries for {n} items")
        c = len(self.caption_item)
        if len(self.caption_index) != c or len(self.caption_text) != c:
            raise ValueError("caption_item, caption_index and caption_text differ in length")

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])

    def index_of(self) -> dict[str, int]:
        """item_id -> row. Built on each call (O(N)): keep the result if you need it often."""
        return {item_id: i for i, item_id in enumerate(self.item_ids.tolist())}

    def file_path(self, name: str) -> str:
        """Path used in error messages about this corpus ("synthetic" for generated ones)."""
        return SYNTHETIC if self.source == SYNTHETIC else f"{self.source}/{name}"


# --------------------------------------------------------------------------- reading helpers


def _read_table(path: Path, required: tuple[str, ...], optional: tuple[str, ...]) -> pa.Table:
    """Read only the columns we use, after checking the required ones exist."""
    if not path.is_file():
        raise CorpusError(path, None, "file not found")
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(path, None, f"cannot read parquet file ({exc})") from exc
    missing = [c for c in required if c not in names]
    if missing:
        raise CorpusError(
            path, None, f"missing required column(s) {', '.join(missing)} (found: {', '.join(names)})"
        )
    columns = list(required) + [c for c in optional if c in names]
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(path, None, f"cannot read parquet file ({exc})") from exc


def _first_true(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def _bool_mask(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """pyarrow boolean result -> numpy bool, nulls counted as False."""
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def _string_column(table: pa.Table, name: str, path: Path) -> pa.ChunkedArray:
    """Return the column as utf8 strings; dictionary-encoded strings are decoded."""
    col = table.column(name)
    typ = col.type
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
        col = col.cast(typ)
    is_view = getattr(pa.types, "is_string_view", lambda t: False)  # pyarrow >= 16
    if pa.types.is_large_string(typ) or is_view(typ):
        col = col.cast(pa.string())
    elif not pa.types.is_string(typ):
        raise CorpusError(path, None, f"column {name} must hold strings, got {col.type}")
    return col


def _blank_mask(col: pa.ChunkedArray) -> np.ndarray:
    """True where a string is null, empty or whitespace only."""
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0)
    return _bool_mask(pc.or_kleene(pc.is_null(col), blank))


# --------------------------------------------------------------------------- items


def _validate_item_ids(table: pa.Table, path: Path) -> np.ndarray:
    col = _string_column(table, "item_id", path)
    null_row = _first_true(_bool_mask(pc.is_null(col))) if col.null_count else None
    if null_row is not None:
        raise CorpusError(path, null_row, "item_id is null")
    empty_row = _first_true(_blank_mask(col))
    if empty_row is not None:
        raise CorpusError(path, empty_row, "item_id is empty")
    ids = np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)
    dup = _first_true(pd.Series(ids).duplicated(keep="first").to_numpy())
    if dup is not None:
        first = _first_true(ids[:dup] == ids[dup])
        raise CorpusError(path, dup, f"duplicate item_id {ids[dup]!r} (first seen at row {first})")
    return ids


def _embedding_dim(col: pa.ChunkedArray, path: Path) -> int:
    """Dimension shared by all rows; a variable list column must have one length throughout."""
    typ = col.type
    if pa.types.is_fixed_size_list(typ):
        d = typ.list_size
    else:
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        d = int(lengths[0])
        bad = _first_true(lengths != d)
        if bad is not None:
            raise CorpusError(
                path, bad, f"embedding has {int(lengths[bad])} values, expected {d} (dimension of row 0)"
            )
    if d == 0:
        raise CorpusError(path, 0, "embedding has 0 values")
    return d


def _embedding_matrix(table: pa.Table, path: Path) -> np.ndarray:
    """Copy the embedding column into one writable float32 [N, d] array, chunk by chunk."""
    col = table.column("embedding")
    typ = col.type
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)):
        raise CorpusError(path, None, f"column embedding must be a list of numbers, got {typ}")
    value_type = typ.value_type
    if not (pa.types.is_floating(value_type) or pa.types.is_integer(value_type)):
        raise CorpusError(path, None, f"column embedding must be a list of numbers, got {typ}")
    if col.null_count:
        raise CorpusError(path, _first_true(_bool_mask(pc.is_null(col))), "embedding is null")
    d = _embedding_dim(col, path)
    out = np.empty((len(col), d), dtype=np.float32)
    start = 0
    for chunk in col.chunks:
        m = len(chunk)
        if m == 0:
            continue
        values = chunk.flatten()  # respects slice offsets; no null rows remain
        if values.null_count:
            pos = _first_true(_bool_mask(pc.is_null(values)))
            raise CorpusError(path, start + pos // d, "embedding contains a null value")
        if values.type != pa.float32():
            values = pc.cast(values, pa.float32(), safe=False)
        out[start : start + m] = values.to_numpy(zero_copy_only=False).reshape(m, d)
        start += m
    return out


def _check_embedding_values(emb: np.ndarray, path: Path) -> None:
    """Reject NaN/inf (poison every distance) and all-zero rows (cannot be L2-normalised)."""
    for lo in range(0, emb.shape[0], _SCAN_BLOCK):
        block = emb[lo : lo + _SCAN_BLOCK]
        finite = np.isfinite(block)
        bad = _first_true(~finite.all(axis=1))
        if bad is not None:
            row = block[bad]
            col = _first_true(~np.isfinite(row))
            kind = "NaN" if np.isnan(row[col]) else "inf"
            raise CorpusError(path, lo + bad, f"embedding contains {kind} (value {col})")
        zero = _first_true(~block.any(axis=1))
        if zero is not None:
            raise CorpusError(path, lo + zero, "embedding is all zeros (cannot be normalised)")


def _modality(table: pa.Table, path: Path) -> np.ndarray:
    if "modality" not in table.column_names:
        return np.full(table.num_rows, "unknown", dtype=object)
    col = pc.fill_null(_string_column(table, "modality", path), "unknown")
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)


def _load_items(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    table = _read_table(path, ("item_id", "embedding"), ("modality",))
    if table.num_rows == 0:
        raise CorpusError(path, None, "corpus is empty")
    ids = _validate_item_ids(table, path)
    emb = _embedding_matrix(table, path)
    _check_embedding_values(emb, path)
    return ids, emb, _modality(table, path)


# --------------------------------------------------------------------------- captions


def _caption_indices(table: pa.Table, raw_ids: pa.ChunkedArray, path: Path) -> np.ndarray:
    """caption_index column as int64, or the per-item order in the file when it is absent."""
    if "caption_index" not in table.column_names:
        keys = pd.Series(raw_ids.to_numpy(zero_copy_only=False), dtype=object).fillna("\0null")
        return keys.groupby(keys, sort=False).cumcount().to_numpy(dtype=np.int64)
    col = table.column("caption_index")
    if not pa.types.is_integer(col.type):
        raise CorpusError(path, None, f"column caption_index must hold integers, got {col.type}")
    if col.null_count:
        raise CorpusError(path, _first_true(_bool_mask(pc.is_null(col))), "caption_index is null")
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.int64)


def _bad_caption_rows(
    caption_item: np.ndarray, text_col: pa.ChunkedArray
) -> tuple[np.ndarray, np.ndarray]:
    """Masks of rows naming an unknown item, and (otherwise valid) rows with no caption text."""
    unknown = caption_item < 0
    empty = _blank_mask(text_col) & ~unknown
    return unknown, empty


def _reason(unknown: bool, raw_id: Any) -> str:
    if unknown:
        return "caption names no item_id (null)" if raw_id is None else f"unknown item_id {raw_id!r}"
    return "caption is empty"


def _load_captions(
    path: Path, ids: np.ndarray, bad_captions: str, report: dict
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    table = _read_table(path, ("item_id", "caption"), ("caption_index",))
    raw_ids = _string_column(table, "item_id", path)
    text_col = _string_column(table, "caption", path)
    index = _caption_indices(table, raw_ids, path)
    raw = raw_ids.to_numpy(zero_copy_only=False)
    caption_item = pd.Index(ids).get_indexer(raw).astype(np.int64)
    unknown, empty = _bad_caption_rows(caption_item, text_col)
    bad = unknown | empty
    bad_rows = np.flatnonzero(bad)
    if bad_rows.size and bad_captions == "error":
        r = int(bad_rows[0])
        raise CorpusError(path, r, _reason(bool(unknown[r]), raw[r]))
    report["skipped_captions"]["unknown_item"] += int(unknown.sum())
    report["skipped_captions"]["empty"] += int(empty.sum())
    room = MAX_REPORTED_SKIPS - len(report["skipped_rows"])
    for r in bad_rows[: max(room, 0)].tolist():
        report["skipped_rows"].append((str(path), r, _reason(bool(unknown[r]), raw[r])))
    keep = ~bad
    texts = text_col.filter(pa.array(keep)) if bad_rows.size else text_col
    return caption_item[keep], index[keep], texts.to_pylist()


# --------------------------------------------------------------------------- public API


def load_corpus(folder: str | Path, *, captions: bool = True, bad_captions: str = "error") -> Corpus:
    """Load and validate a corpus folder; raise CorpusError naming file, row and reason.

    bad_captions="skip" drops captions that name an unknown item or are empty, counting them in
    ``report["skipped_captions"]`` (real caption dumps often hold a few such rows); item
    problems are always fatal because every item becomes a retrieval target.
    """
    if bad_captions not in BAD_CAPTION_MODES:
        raise ValueError(f"bad_captions must be one of {BAD_CAPTION_MODES}, got {bad_captions!r}")
    root = Path(folder)
    if not root.is_dir():
        raise CorpusError(root, None, "file not found")
    corpus = load_corpus_files(root / ITEMS_FILE, root / CAPTIONS_FILE if captions else None,
                               bad_captions=bad_captions)
    corpus.source = str(folder)
    return corpus


def load_corpus_files(items: str | Path, captions: str | Path | None = None, *,
                      bad_captions: str = "error") -> Corpus:
    """Same validation as load_corpus, for an items file and an optional captions file anywhere."""
    if bad_captions not in BAD_CAPTION_MODES:
        raise ValueError(f"bad_captions must be one of {BAD_CAPTION_MODES}, got {bad_captions!r}")
    items = Path(items)
    ids, emb, modality = _load_items(items)
    report = _empty_report()
    report["items"] = len(ids)
    if captions is not None:
        cap_item, cap_index, cap_text = _load_captions(Path(captions), ids, bad_captions, report)
    else:
        cap_item, cap_index, cap_text = np.zeros(0, np.int64), np.zeros(0, np.int64), []
    report["captions"] = len(cap_text)
    return Corpus(ids, emb, modality, cap_item, cap_index, cap_text, str(items.parent), report)


def check_min_items(corpus: Corpus, n: int, what: str) -> None:
    """Fail early, with the corpus named, when a setting (e.g. a cluster count) exceeds N."""
    if len(corpus) < n:
        raise CorpusError(
            corpus.file_path(ITEMS_FILE), None, f"corpus has {len(corpus)} items, fewer than {what}={n}"
        )


def split_captions(
    corpus: Corpus, query_caption_index: int
) -> tuple[tuple[np.ndarray, list[str]], tuple[np.ndarray, list[str]]]:
    """Transductive protocol: captions numbered ``query_caption_index`` are the queries, every
    other caption is training data for the same items.

    Returns ((train_item, train_text), (query_item, query_text)); *_item index corpus rows.
    """
    is_query = corpus.caption_index == query_caption_index
    if not is_query.any():
        raise CorpusError(
            corpus.file_path(CAPTIONS_FILE),
            None,
            f"no caption has caption_index={query_caption_index} ({len(corpus.caption_text)} captions)",
        )
    texts = corpus.caption_text
    train_rows = np.flatnonzero(~is_query)
    query_rows = np.flatnonzero(is_query)
    train = (corpus.caption_item[train_rows].copy(), [texts[i] for i in train_rows.tolist()])
    query = (corpus.caption_item[query_rows].copy(), [texts[i] for i in query_rows.tolist()])
    return train, query


def write_corpus(corpus: Corpus, folder: str | Path) -> None:
    """Write items.parquet / captions.parquet in the layout load_corpus reads."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    emb = np.ascontiguousarray(corpus.embeddings, dtype=np.float32)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), corpus.dim)
    items = pa.table(
        {
            "item_id": pa.array(corpus.item_ids.tolist(), pa.string()),
            "modality": pa.array(corpus.modality.tolist(), pa.string()),
            "embedding": embedding,
        }
    )
    pq.write_table(items, root / ITEMS_FILE)
    index = np.asarray(corpus.caption_index, dtype=np.int64)
    if index.size and (index.min() < np.iinfo(np.int16).min or index.max() > np.iinfo(np.int16).max):
        raise ValueError("caption_index does not fit in int16")
    captions = pa.table(
        {
            "item_id": pa.array(corpus.item_ids[corpus.caption_item].tolist(), pa.string()),
            "caption_index": pa.array(index.astype(np.int16), pa.int16()),
            "caption": pa.array(list(corpus.caption_text), pa.string()),
        }
    )
    pq.write_table(captions, root / CAPTIONS_FILE)


# --------------------------------------------------------------------------- synthetic corpus

_TOPICS = (
    "dog", "cat", "horse", "bird", "child", "woman", "man", "car", "boat", "bicycle",
    "train", "cow", "sheep", "duck", "bus", "truck", "girl", "boy", "goat", "tractor",
)
_COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "orange", "purple", "grey")
_OBJECTS = ("ball", "hat", "umbrella", "bag", "kite", "box", "scarf", "bottle", "book", "flag")
_PLACES = ("beach", "park", "street", "forest", "kitchen", "field", "river", "mountain", "garden", "station")
_PREFIXES = ("a", "the", "a photo of a", "there is a", "one")
_ATTRIBUTE_LISTS = (_COLOURS, _OBJECTS, _PLACES)
# Probability an attribute is the topic's favourite value: makes attributes topic-correlated
# while leaving enough spread that most items get a distinct (topic, attributes) tuple.
_TOPIC_BIAS = 0.3
_DROP_P = 0.25


def _topic_words(n_topics: int) -> list[str]:
    """Distinct topic words; cycles through the list with a numeric suffix past its end."""
    return [
        _TOPICS[t % len(_TOPICS)] + ("" if t < len(_TOPICS) else str(t // len(_TOPICS)))
        for t in range(n_topics)
    ]


def _draw_attributes(rng: np.random.Generator, topic: np.ndarray, n_topics: int) -> np.ndarray:
    """[N, 3] attribute ids (colour, object, place), each biased towards its topic's favourite."""
    n = topic.shape[0]
    attrs = np.empty((n, len(_ATTRIBUTE_LISTS)), dtype=np.int64)
    for j, words in enumerate(_ATTRIBUTE_LISTS):
        favourite = rng.integers(0, len(words), size=n_topics)
        uniform = rng.integers(0, len(words), size=n)
        attrs[:, j] = np.where(rng.random(n) < _TOPIC_BIAS, favourite[topic], uniform)
    return attrs


def _synthetic_embeddings(
    rng: np.random.Generator, topic: np.ndarray, attrs: np.ndarray, n_topics: int, dim: int
) -> np.ndarray:
    """Topic centre + smaller attribute directions + noise, L2-normalised.

    The topic centre dominates (so clustering recovers topics); the attribute directions let a
    caption -> embedding mapping distinguish items inside a topic, as with real image features.
    """
    def unit(k: int) -> np.ndarray:
        v = rng.standard_normal((k, dim))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    centres = unit(n_topics)
    emb = centres[topic].copy()
    for j, words in enumerate(_ATTRIBUTE_LISTS):
        emb += 0.35 * unit(len(words))[attrs[:, j]]
    emb += 0.35 * rng.standard_normal(emb.shape) / np.sqrt(dim)  # noise of norm ~0.35
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return np.ascontiguousarray(emb, dtype=np.float32)


def _caption(rng: np.random.Generator, topic_word: str, colour: str, obj: str, place: str) -> str:
    """One template sentence; the colour, object and place phrases are each randomly dropped
    (never all three) and the object/place phrases come in random order."""
    keep = rng.random(3) >= _DROP_P
    if not keep.any():
        keep[rng.integers(0, 3)] = True
    subject = f"{colour} {topic_word}" if keep[0] else topic_word
    phrases = []
    if keep[1]:
        phrases.append(f"with a {obj}")
    if keep[2]:
        phrases.append(rng.choice(["in the", "at the", "near the"]) + f" {place}")
    rng.shuffle(phrases)
    prefix = _PREFIXES[rng.integers(0, len(_PREFIXES))]
    if phrases and rng.random() < 0.2:  # occasionally lead with a phrase
        return f"{phrases[0]}, {prefix} {subject} {' '.join(phrases[1:])}".strip()
    return " ".join([prefix, subject, *phrases])


def synthetic_corpus(
    n_items: int = 600, dim: int = 64, n_captions: int = 5, n_topics: int = 12, seed: int = 0
) -> Corpus:
    """A generated corpus whose captions predict their item, for tests and the demo when real
    data is absent. Deterministic given ``seed``."""
    if n_items < 1 or dim < 2 or n_captions < 1 or n_topics < 1:
        raise ValueError("synthetic_corpus needs n_items>=1, dim>=2, n_captions>=1, n_topics>=1")
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, n_topics, size=n_items)
    attrs = _draw_attributes(rng, topic, n_topics)
    emb = _synthetic_embeddings(rng, topic, attrs, n_topics, dim)
    words = _topic_words(n_topics)
    texts = [
        _caption(rng, words[topic[i]], _COLOURS[attrs[i, 0]], _OBJECTS[attrs[i, 1]], _PLACES[attrs[i, 2]])
        for i in range(n_items)
        for _ in range(n_captions)
    ]
    report = _empty_report()
    report["items"] = n_items
    report["captions"] = len(texts)
    return Corpus(
        item_ids=np.array([f"syn-{i:05d}" for i in range(n_items)], dtype=object),
        embeddings=emb,
        modality=np.full(n_items, "image", dtype=object),
        caption_item=np.repeat(np.arange(n_items, dtype=np.int64), n_captions),
        caption_index=np.tile(np.arange(n_captions, dtype=np.int64), n_items),
        caption_text=texts,
        source=SYNTHETIC,
        report=report,
    )
