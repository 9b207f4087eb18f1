"""The query rules serve, retrieve and evaluate share (pipelines/queries.py), and the retrieve
output's temporary file: removed when the job fails, and when a killed run left it behind."""
from __future__ import annotations

import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cart_core.config import QueryConfig
from cart_core.errors import BadInput
from pipelines.queries import QueryRefused, check_k, normalize_query, read_query_table
from pipelines.outputs import check_output_file, check_output_folder, write_tables
from pipelines.retrieve import RESULT_SCHEMA, ResultParts
from pipelines.search import RANKED_SCHEMA

RULES = QueryConfig()


@pytest.mark.parametrize("text, expected", [
    ("a dog", "a dog"),
    ("  a\tdog\n\non the\u2028beach  ", "a dog on the beach"),
    ("cafe\u0301", "caf\u00e9"),                     # NFC
    ("a\x00dog\x07", "a dog"),                      # control characters become spaces
    ("zero\u200bwidth", "zero width"),              # format characters too
    ("x" * 1000, "x" * 1000),
])
def test_normalize_query(text, expected):
    assert normalize_query(text, RULES) == expected


@pytest.mark.parametrize("text, reason", [
    (None, "query is null"),
    (7, "query must be text, got int"),
    ("", "query is empty"),
    (" \t\x00 ", "query is empty"),
    ("a \ud800 b", "query is not valid Unicode (lone surrogate at character 2)"),
    ("x" * 1001, "query is 1001 characters; at most 1000"),
    ("x" * 60_000_000, "query is 60000000 characters; at most 1000"),
])
def test_refused_queries_say_why(text, reason):
    with pytest.raises(QueryRefused) as exc:
        normalize_query(text, RULES)
    assert exc.value.reason == reason and len(str(exc.value)) < 200


@pytest.mark.parametrize("k", [0, -3, 101, 10**9, 2.5, "3", True, None])
def test_k_outside_the_rules_is_refused(k):
    with pytest.raises(QueryRefused, match=r"k must be an integer in \[1, 100\]"):
        check_k(k, RULES)


def test_query_table_skips_and_counts_by_reason(tmp_path):
    path = tmp_path / "q.parquet"
    pq.write_table(pa.table({"query_id": [1, 2, 3, 4, 5],
                             "text": ["a dog", None, "  ", "a\u00a0cat", "y" * 2000]}), path)
    checked = read_query_table(str(path), RULES)
    assert checked.table.to_pydict() == {"query_id": ["1", "4"], "text": ["a dog", "a cat"]}
    assert checked.source_rows == [0, 3]
    assert checked.report() == {"queries_read": 5, "queries_skipped": 3, "skipped_by_reason": {
        "query is null": {"count": 1, "first_row": 1}, "query is empty": {"count": 1, "first_row": 2},
        "query is 2000 characters; at most 1000": {"count": 1, "first_row": 4}}}


def test_query_table_refuses_a_folder_and_float_ids(tmp_path):
    with pytest.raises(BadInput, match="is a folder"):
        read_query_table(str(tmp_path), RULES)
    pq.write_table(pa.table({"query_id": [1.5], "text": ["a"]}), tmp_path / "q.parquet")
    with pytest.raises(BadInput, match="column query_id must hold strings or integers, got double"):
        read_query_table(str(tmp_path / "q.parquet"), RULES)


def failing_results():
    """A result stream that breaks after its first batch, as a dying actor pool does."""
    yield pa.table({"query_id": ["q"], "rank": pa.array([1], pa.int32()), "item_id": ["i"],
                    "score": pa.array([1.0], pa.float32())})
    raise RuntimeError("actor died")


def test_failed_retrieve_leaves_no_temporary_output(tmp_path):
    out = tmp_path / "results.parquet"
    with pytest.raises(RuntimeError, match="actor died"):
        write_tables(failing_results(), str(out), RESULT_SCHEMA)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_runs_temporary_output_is_removed_by_the_next(tmp_path):
    out = tmp_path / "results.parquet"
    proc = subprocess.Popen(["true"])  # a pid that has exited
    proc.wait()
    stale = tmp_path / f"results.parquet.tmp-{proc.pid}-abcd1234"
    stale.write_bytes(b"half a file")
    live = tmp_path / f"results.parquet.tmp-{os.getpid()}-abcd1234"  # a running writer's: kept
    live.write_bytes(b"in progress")

    done = [pa.table({n: pa.array([], t) for n, t in zip(RESULT_SCHEMA.names, RESULT_SCHEMA.types)})]
    assert write_tables(done, str(out), RESULT_SCHEMA) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["results.parquet", live.name])
    assert pq.read_table(out).num_rows == 0


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("name", ["results[k=5].parquet", "res*ults?.parquet"])
def test_saved_answers_join_whatever_characters_the_output_name_holds(tmp_path, name):
    """Parts are listed, not globbed: `[k=5]` in --out made every saved part invisible (the run
    ended 'queries have no saved answer' for ever) and could remove other files' temporaries."""
    out = tmp_path / name
    dead = _dead_pid()
    stranger = tmp_path / f"results5.parquet.tmp-{dead}-abcd1234"  # what `results[k=5].parquet.tmp-*` globs
    stranger.write_bytes(b"another job's")
    own = tmp_path / f"{name}.tmp-{dead}-abcd1234"
    own.write_bytes(b"half a file")
    parts = ResultParts(str(out), {"queries": 2, "k": 1})
    assert not parts.open().any()
    parts.save([pa.table({"pos": [0, 1], "query_id": ["q0", "q1"], "item_ids": [["a"], ["b"]],
                          "scores": [[1.0], [0.5]]}, schema=RANKED_SCHEMA)])
    assert parts.answered().all()
    assert parts.join() == 2
    assert pq.read_table(out).column("item_id").to_pylist() == ["a", "b"]
    assert stranger.exists() and not own.exists()
    assert not (tmp_path / f"{name}.parts").exists()


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    (tmp_path / "notadir").write_text("a file")
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(BadInput, match="cannot be written: .*notadir is a file, not a folder"):
        check_output_file(str(tmp_path / "notadir" / "sub" / "results.parquet"))
    with pytest.raises(BadInput, match="cannot be written: .*notadir is a file, not a folder"):
        check_output_folder(str(tmp_path / "notadir" / "report"))
    with pytest.raises(BadInput, match=f"is inside the store {store}"):
        check_output_file(str(store / "manifest.json"), store_url=str(store))
    with pytest.raises(BadInput, match=f"is inside the store {store}"):
        check_output_folder(str(store / "eval"), store_url=str(store))
    with pytest.raises(BadInput, match="is a file; give the folder"):
        check_output_folder(str(tmp_path / "notadir"))
    with pytest.raises(BadInput, match="written to a local folder; give a local path"):
        check_output_folder("s3://bucket/report")
    with pytest.raises(BadInput, match=f"is inside the store {store}"):
        check_output_file(str(tmp_path / "x" / ".." / "store" / "manifest.json"), store_url=str(store))
    (tmp_path / "link").symlink_to(store)
    with pytest.raises(BadInput, match="is inside the store"):
        check_output_file(str(tmp_path / "link" / "manifest.json"), store_url=str(store))
    with pytest.raises(BadInput, match="is also an input"):
        check_output_file(str(tmp_path / "." / "q.parquet"), inputs=(str(tmp_path / "q.parquet"),))
    check_output_file(str(store / ".." / "beside.parquet"), store_url=str(store))
    check_output_file(str(tmp_path / "new" / "deeper" / "results.parquet"), store_url=str(store))  # made when written
    check_output_folder(str(tmp_path / "storefront"), store_url=str(store))  # a sibling whose name starts the same
    assert check_output_folder(f"file://{tmp_path}/report") == f"{tmp_path}/report"  # where the report is written


def test_a_text_column_of_nulls_or_categories_is_read_as_strings(tmp_path):
    path = tmp_path / "q.parquet"
    pq.write_table(pa.table({"query_id": ["a", "b"], "text": pa.array([None, None], pa.null())}), path)
    nulls = read_query_table(str(path), RULES)  # load_queries then says "no query left to search"
    assert nulls.table.num_rows == 0 and sum(nulls.skipped.values()) == 2
    empty_category = pa.DictionaryArray.from_arrays(pa.array([None, None], pa.int8()), pa.array([], pa.float64()))
    pq.write_table(pa.table({"query_id": ["a", "b"], "text": empty_category}), path)  # pandas: all-null category
    assert sum(read_query_table(str(path), RULES).skipped.values()) == 2
    categories = pa.array(["a dog", "a cat", "a dog"]).dictionary_encode()
    ids = pa.array(["a", "b", "c"]).dictionary_encode()
    items = pa.array(["i1", "i2", "i1"], pa.large_string()).dictionary_encode()
    pq.write_table(pa.table({"query_id": ids, "text": categories, "item_id": items}), path)
    read = read_query_table(str(path), RULES, need_item=True).table
    assert read.column("text").to_pylist() == ["a dog", "a cat", "a dog"]
    assert read.column("query_id").to_pylist() == ["a", "b", "c"]
    assert read.column("item_id").to_pylist() == ["i1", "i2", "i1"]


def test_an_existing_report_folder_is_judged_by_its_own_permission(tmp_path):
    """`--out .` in a home folder whose parent the user may not write in is a valid report folder."""
    closed = tmp_path / "closed"
    (closed / "home").mkdir(parents=True)
    closed.chmod(0o555)
    try:
        if os.access(closed, os.W_OK):
            pytest.skip("running as root: every folder is writable")
        check_output_folder(str(closed / "home"))
        with pytest.raises(BadInput, match="no permission to write in"):
            check_output_folder(str(closed / "report"))
    finally:
        closed.chmod(0o755)
