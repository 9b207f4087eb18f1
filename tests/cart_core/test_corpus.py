"""Tests for cart_core.corpus: real-data loading, synthetic round trip, caption splits, and one
test per bad input checking that the error names the file, the row and the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cart_core.corpus import (
    Corpus,
    CorpusError,
    check_min_items,
    load_corpus,
    split_captions,
    synthetic_corpus,
    write_corpus,
)

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
FLICKR = SHARED_DATA / "flickr8k-clip-vitb32"
DIM = 4


# --------------------------------------------------------------------------- helpers


def _unit_rows(n: int, d: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(1)
    e = rng.standard_normal((n, d)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _write_items(folder: Path, ids: list, embeddings, *, fixed: bool = True, extra: dict | None = None):
    """Write items.parquet; ``embeddings`` is a list of lists (may be ragged when fixed=False)."""
    folder.mkdir(parents=True, exist_ok=True)
    if fixed:
        emb = pa.array([list(map(float, row)) for row in embeddings], pa.list_(pa.float32(), DIM))
    else:
        emb = pa.array([None if row is None else list(map(float, row)) for row in embeddings],
                       pa.list_(pa.float32()))
    cols = {"item_id": pa.array(ids, pa.string()), "embedding": emb, **(extra or {})}
    pq.write_table(pa.table(cols), folder / "items.parquet")


def _write_captions(folder: Path, ids: list, texts: list, index: list | None = None):
    cols = {"item_id": pa.array(ids, pa.string())}
    if index is not None:
        cols["caption_index"] = pa.array(index, pa.int16())
    cols["caption"] = pa.array(texts, pa.string())
    pq.write_table(pa.table(cols), folder / "captions.parquet")


@pytest.fixture
def good_folder(tmp_path: Path) -> Path:
    """Five valid items with two captions each."""
    ids = [f"it{i}" for i in range(5)]
    _write_items(tmp_path, ids, _unit_rows(5).tolist())
    _write_captions(tmp_path, [i for i in ids for _ in range(2)], [f"caption {k}" for k in range(10)],
                    [0, 1] * 5)
    return tmp_path


def _assert_error(err: CorpusError, file_name: str, row: int | None, reason: str) -> None:
    msg = str(err)
    assert file_name in msg
    assert err.path.endswith(file_name)
    assert reason in msg and reason in err.reason
    if row is None:
        assert err.row is None and ": row " not in msg
    else:
        assert err.row == row and f"row {row}:" in msg


# --------------------------------------------------------------------------- happy paths


@pytest.mark.skipif(not FLICKR.is_dir(), reason="shared real data not present")
def test_loads_real_flickr8k():
    corpus = load_corpus(FLICKR)
    assert len(corpus) == 976 and corpus.dim == 512
    assert corpus.embeddings.dtype == np.float32 and corpus.embeddings.flags["C_CONTIGUOUS"]
    assert len(corpus.caption_text) == 4880 and corpus.report["captions"] == 4880
    assert corpus.report["items"] == 976
    assert set(corpus.modality) == {"image"}
    assert corpus.caption_item.dtype == np.int64 and corpus.caption_index.dtype == np.int64
    assert np.bincount(corpus.caption_item, minlength=976).tolist() == [5] * 976
    (train_item, train_text), (query_item, query_text) = split_captions(corpus, 4)
    assert len(train_text) == 3904 and len(query_text) == 976
    assert sorted(query_item.tolist()) == list(range(976))


def test_synthetic_round_trip(tmp_path: Path):
    syn = synthetic_corpus(n_items=50, dim=16, n_captions=3, n_topics=4, seed=7)
    assert syn.source == "synthetic" and len(syn) == 50 and syn.dim == 16
    assert syn.item_ids[42] == "syn-00042"
    assert syn.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(syn.embeddings, axis=1), 1.0, rtol=1e-5)
    write_corpus(syn, tmp_path / "syn")
    back = load_corpus(tmp_path / "syn")
    assert back.source == str(tmp_path / "syn")
    np.testing.assert_array_equal(back.item_ids, syn.item_ids)
    np.testing.assert_array_equal(back.embeddings, syn.embeddings)
    np.testing.assert_array_equal(back.modality, syn.modality)
    np.testing.assert_array_equal(back.caption_item, syn.caption_item)
    np.testing.assert_array_equal(back.caption_index, syn.caption_index)
    assert back.caption_text == syn.caption_text
    assert back.index_of()["syn-00042"] == 42
    assert pq.read_schema(tmp_path / "syn" / "items.parquet").field("embedding").type == pa.list_(
        pa.float32(), 16
    )


def test_synthetic_is_deterministic_and_captions_predict_items():
    a = synthetic_corpus(n_items=120, seed=3)
    b = synthetic_corpus(n_items=120, seed=3)
    c = synthetic_corpus(n_items=120, seed=4)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert a.caption_text == b.caption_text
    assert a.caption_text != c.caption_text
    # Bag-of-words caption centroids must retrieve the right item far above chance (1/120).
    (ti, tt), (qi, qt) = split_captions(a, 4)
    vocab = {w: k for k, w in enumerate(sorted({w for t in a.caption_text for w in t.replace(",", "").split()}))}

    def bow(texts: list[str]) -> np.ndarray:
        m = np.zeros((len(texts), len(vocab)))
        for r, t in enumerate(texts):
            m[r, [vocab[w] for w in t.replace(",", "").split()]] = 1
        return m

    cent = np.zeros((len(a), len(vocab)))
    np.add.at(cent, ti, bow(tt))
    scores = bow(qt) @ (cent / np.linalg.norm(cent, axis=1, keepdims=True)).T
    recall_at_10 = np.mean([qi[r] in np.argsort(-scores[r])[:10] for r in range(len(qi))])
    assert recall_at_10 > 0.5


@pytest.mark.parametrize("query_index, n_train, n_query", [(0, 5, 5), (1, 5, 5)])
def test_split_captions_counts(good_folder: Path, query_index: int, n_train: int, n_query: int):
    corpus = load_corpus(good_folder)
    (train_item, train_text), (query_item, query_text) = split_captions(corpus, query_index)
    assert len(train_item) == len(train_text) == n_train
    assert len(query_item) == len(query_text) == n_query
    assert query_item.tolist() == [0, 1, 2, 3, 4]
    assert query_text[0] == f"caption {query_index}"
    assert not set(train_text) & set(query_text)


def test_split_captions_unknown_index(good_folder: Path):
    with pytest.raises(CorpusError) as exc:
        split_captions(load_corpus(good_folder), 9)
    _assert_error(exc.value, "captions.parquet", None, "no caption has caption_index=9")


def test_caption_index_defaults_to_per_item_order(tmp_path: Path):
    _write_items(tmp_path, ["a", "b"], _unit_rows(2).tolist())
    _write_captions(tmp_path, ["a", "b", "a", "a", "b"], ["a0", "b0", "a1", "a2", "b1"])
    corpus = load_corpus(tmp_path)
    assert corpus.caption_index.tolist() == [0, 0, 1, 2, 1]
    assert corpus.caption_item.tolist() == [0, 1, 0, 0, 1]


def test_captions_false_skips_caption_file(tmp_path: Path):
    _write_items(tmp_path, ["a", "b"], _unit_rows(2).tolist(), extra={"split": pa.array(["x", "y"])})
    corpus = load_corpus(tmp_path, captions=False)
    assert len(corpus) == 2 and corpus.caption_text == [] and corpus.report["captions"] == 0
    assert corpus.modality.tolist() == ["unknown", "unknown"]


def test_vectorised_load_of_many_multi_chunk_rows(tmp_path: Path):
    """Several row groups / chunks: rows must land at the right offsets."""
    n, d = 20_000, 8
    emb = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    ids = [f"x{i}" for i in range(n)]
    table = pa.table({"item_id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), d)})
    pq.write_table(table, tmp_path / "items.parquet", row_group_size=3000)
    corpus = load_corpus(tmp_path, captions=False)
    np.testing.assert_array_equal(corpus.embeddings, emb)
    assert corpus.item_ids[-1] == f"x{n - 1}"


# --------------------------------------------------------------------------- bad items


def _bad_rows(value_at_row_3: list[float]) -> list[list[float]]:
    rows = _unit_rows(6).tolist()
    rows[3] = value_at_row_3
    return rows


@pytest.mark.parametrize(
    "row3, reason",
    [
        ([0.1, float("nan"), 0.2, 0.3], "embedding contains NaN"),
        ([0.1, 0.2, float("inf"), 0.3], "embedding contains inf"),
        ([0.1, 0.2, 0.3, float("-inf")], "embedding contains inf"),
        ([0.0, 0.0, 0.0, 0.0], "embedding is all zeros"),
    ],
    ids=["nan", "inf", "neg-inf", "all-zero"],
)
def test_bad_embedding_values(tmp_path: Path, row3: list[float], reason: str):
    _write_items(tmp_path, [f"i{k}" for k in range(6)], _bad_rows(row3))
    with pytest.raises(CorpusError) as exc:
        load_corpus(tmp_path, captions=False)
    _assert_error(exc.value, "items.parquet", 3, reason)


def test_wrong_dimension_in_variable_list(tmp_path: Path):
    rows = _unit_rows(5).tolist()
    rows[2] = rows[2][:3]
    _write_items(tmp_path, [f"i{k}" for k in range(5)], rows, fixed=False)
    with pytest.raises(CorpusError) as exc:
        load_corpus(tmp_path, captions=False)
    _assert_error(exc.value, "items.parquet", 2, "embedding has 3 values, expected 4 (dimension of row 0)")


def test_variable_list_of_one_dimension_loads(tmp_path: Path):
    _write_items(tmp_path, ["a", "b", "c"], _unit_rows(3).tolist(), fixed=False)
    assert load_corpus(tmp_path, captions=False).dim == DIM


def test_null_embedding(tmp_path: Path):
    rows = _unit_rows(4).tolist()
    rows[1] = None
    _write_items(tmp_path, ["a", "b", "c", "d"], rows, fixed=False)
    with pytest.raises(CorpusError) as exc:
        load_corpus(tmp_path, captions=False)
    _assert_error(exc.value, "items.parquet", 1, "embedding is null")


@pytest.mark.parametrize(
    "ids, row, reason",
    [
        (["a", "b", "c", "b", "a"], 3, "duplicate item_id 'b' (first seen at row 1)"),
        (["a", None, "c", "d", "e"], 1, "item_id is null"),
        (["a", "b", " ", "d", "e"], 2, "item_id is empty"),
    ],
    ids=["duplicate", "null", "empty"],
)
def test_bad_item_ids(tmp_path: Path, ids: list, row: int, reason: str):
    _write_items(tmp_path, ids, _unit_rows(5).tolist())
    with pytest.raises(CorpusError) as exc:
        load_corpus(tmp_path, captions=False)
    _assert_error(exc.value, "items.parquet", row, reason)


def test_empty_corpus(tmp_path: Path):
    _write_items(tmp_path, [], [])
    with pytest.raises(CorpusError) as exc:
        load_corpus(tmp_path, captions=False)
    _assert_error(exc.value, "items.parquet", None, "corpus is empty")


@pytest.mark.parametrize("missing", ["folder", "items.parquet", "captions.parquet"])
def test_missing_file(tmp_path: Path, missing: str):
    folder = tmp_path / "corpus"
    if missing != "folder":
        _write_items(folder, ["a"], _unit_rows(1).tolist())
        if missing == "items.parquet":
            (folder / "items.parquet").unlink()
    with pytest.raises(CorpusError) as exc:
        load_corpus(folder)
    _assert_error(exc.value, "corpus" if missing == "folder" else missing, None, "file not found")


@pytest.mark.parametrize("file_name, column", [("items.parquet", "embedding"), ("items.parquet", "item_id"),
                                               ("captions.parquet", "caption")])
def test_missing_column(good_folder: Path, file_name: str, column: str):
    path = good_folder / file_name
    pq.write_table(pq.read_table(path).drop_columns([column]), path)
    with pytest.raises(CorpusError) as exc:
        load_corpus(good_folder)
    _assert_error(exc.value, file_name, None, f"missing required column(s) {column}")


# --------------------------------------------------------------------------- bad captions


@pytest.mark.parametrize(
    "bad_id, bad_text, reason",
    [
        ("nope", "a fine caption", "unknown item_id 'nope'"),
        ("it1", "", "caption is empty"),
        ("it1", "   ", "caption is empty"),
        ("it1", None, "caption is empty"),
    ],
    ids=["unknown-item", "empty", "whitespace", "null"],
)
def test_bad_caption_error_mode(good_folder: Path, bad_id: str, bad_text: str | None, reason: str):
    ids = ["it0", "it1", "it2", bad_id, "it3"]
    _write_captions(good_folder, ids, ["x", "y", "z", bad_text, "w"])
    with pytest.raises(CorpusError) as exc:
        load_corpus(good_folder)
    _assert_error(exc.value, "captions.parquet", 3, reason)


def test_bad_captions_counted_in_skip_mode(good_folder: Path):
    ids = ["it0", "ghost", "it1", "it2", "it3", "ghost2"]
    texts = ["x", "y", "", "  ", "w", "v"]
    _write_captions(good_folder, ids, texts)
    corpus = load_corpus(good_folder, bad_captions="skip")
    assert corpus.caption_text == ["x", "w"]
    assert corpus.caption_item.tolist() == [0, 3]
    assert corpus.report["captions"] == 2
    assert corpus.report["skipped_captions"] == {"unknown_item": 2, "empty": 2}
    rows = corpus.report["skipped_rows"]
    assert [r[1] for r in rows] == [1, 2, 3, 5]
    assert all(r[0].endswith("captions.parquet") for r in rows)
    assert rows[0][2] == "unknown item_id 'ghost'" and rows[1][2] == "caption is empty"


def test_skipped_rows_capped_at_20(good_folder: Path):
    _write_captions(good_folder, ["ghost"] * 30 + ["it0"], ["t"] * 31)
    corpus = load_corpus(good_folder, bad_captions="skip")
    assert corpus.report["skipped_captions"]["unknown_item"] == 30
    assert len(corpus.report["skipped_rows"]) == 20 and corpus.caption_item.tolist() == [0]


def test_invalid_bad_captions_value(good_folder: Path):
    with pytest.raises(ValueError, match="bad_captions"):
        load_corpus(good_folder, bad_captions="ignore")


# --------------------------------------------------------------------------- size checks


@pytest.mark.parametrize("source, file_name", [("folder", "items.parquet"), ("synthetic", "synthetic")])
def test_check_min_items(good_folder: Path, source: str, file_name: str):
    corpus: Corpus = load_corpus(good_folder) if source == "folder" else synthetic_corpus(n_items=5)
    check_min_items(corpus, 5, "n_clusters")  # equal is fine
    with pytest.raises(CorpusError) as exc:
        check_min_items(corpus, 8, "n_clusters")
    _assert_error(exc.value, file_name, None, "corpus has 5 items, fewer than n_clusters=8")


def test_error_message_format():
    assert str(CorpusError("f.parquet", 7, "bad")) == "f.parquet: row 7: bad"
    assert str(CorpusError("f.parquet", None, "bad")) == "f.parquet: bad"
    assert isinstance(CorpusError("f", None, "r"), ValueError)
