"""One set of query rules for `cart serve`, `cart retrieve` and `cart evaluate`.

A query is normalised before it costs anything: Unicode NFC, control and format characters to
spaces, whitespace collapsed. It is refused when it is not text, not valid Unicode (a lone
surrogate cannot be encoded, and the tokenizer would fail on it inside a shared batch), empty
after normalisation, or longer than `queries.max_chars`. `k` must be in [1, queries.max_k].

The server answers a refused query with 400 and its reason; the batch jobs skip refused rows and
count them per reason (the first row of each named in the log and the job summary). Files are
read and checked here, before Ray starts, so a wrong path or column costs seconds, not a cluster
start-up. Messages never echo more than a bounded slice of the user's text (`errors.shown`).
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cart_core.config import QueryConfig
from cart_core.errors import BadInput, InputNotFound, LocatedError, first_line, shown
from pipelines.runtime import log

_SPACES = re.compile(r"\s+")


class QueryRefused(BadInput):
    """One query breaks a rule; `reason` is the message without the query's position."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)

    def __reduce__(self):
        return (type(self), (self.reason,))


def normalize_query(text: object, rules: QueryConfig) -> str:
    """The text the model sees, or QueryRefused saying why there is none."""
    if text is None:
        raise QueryRefused("query is null")
    if not isinstance(text, str):
        raise QueryRefused(f"query must be text, got {type(text).__name__}")
    if len(text) > 8 * rules.max_chars:  # cheap bound before any per-character work
        raise QueryRefused(f"query is {len(text)} characters; at most {rules.max_chars}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise QueryRefused(f"query is not valid Unicode (lone surrogate at character {exc.start})") from None
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in text)
    text = _SPACES.sub(" ", text).strip()
    if not text:
        raise QueryRefused("query is empty")
    if len(text) > rules.max_chars:
        raise QueryRefused(f"query is {len(text)} characters; at most {rules.max_chars}")
    return text


def check_k(k: object, rules: QueryConfig) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= rules.max_k:
        raise QueryRefused(f"k must be an integer in [1, {rules.max_k}], got {shown(k)}"
                           f"{' (raise queries.max_k to allow more)' if isinstance(k, int) and k > rules.max_k else ''}")
    return k


@dataclass
class QueryTable:
    """The queries that pass, normalised, and what was skipped (reason -> count, first row)."""

    table: pa.Table
    rows_read: int
    source_rows: list[int] = field(default_factory=list)  # the file row of each kept query
    skipped: Counter = field(default_factory=Counter)
    first_skipped: dict[str, int] = field(default_factory=dict)

    def report(self) -> dict:
        return {"queries_read": self.rows_read, "queries_skipped": sum(self.skipped.values()),
                "skipped_by_reason": {r: {"count": n, "first_row": self.first_skipped[r]}
                                      for r, n in self.skipped.items()}}

    def describe_skips(self, path: str) -> list[str]:
        return [f"{path}: {n} quer{'y' if n == 1 else 'ies'} skipped: {reason} (first at row {self.first_skipped[reason]})"
                for reason, n in self.skipped.items()]


def read_query_table(path: str, rules: QueryConfig, need_item: bool = False) -> QueryTable:
    """query_id, text[, item_id] from a Parquet file (local or s3://), checked and normalised.

    Refused as a whole (BadInput): a missing or unreadable file, missing columns, a text column that
    is not text, a null or duplicate query_id, a null item_id. Skipped and counted: queries that
    break a rule of `normalize_query`."""
    import fsspec

    try:
        fs, fpath = fsspec.core.url_to_fs(path)
        exists = fs.exists(fpath)
    except Exception as exc:  # a malformed URL, unreachable endpoint, missing credentials
        raise BadInput(f"{path}: cannot open ({type(exc).__name__}: {first_line(exc)})") from None
    if not exists:
        raise InputNotFound(f"{path}: file not found")
    if fs.isdir(fpath):
        raise BadInput(f"{path}: is a folder; give a Parquet file")
    required = ["query_id", "text"] + (["item_id"] if need_item else [])
    try:
        with fs.open(fpath, "rb") as f:
            schema = pq.read_schema(f)
            missing = [c for c in required if c not in schema.names]
            if missing:
                raise BadInput(f"{path}: missing required column(s) {', '.join(missing)} "
                               f"(found: {', '.join(schema.names)})")
            f.seek(0)
            table = pq.read_table(f, columns=required)
    except BadInput:
        raise
    except Exception as exc:  # pyarrow's own reason, with the file it was about
        raise BadInput(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    return check_query_rows(table, path, rules, need_item)


def check_query_rows(table: pa.Table, path: str, rules: QueryConfig, need_item: bool = False) -> QueryTable:
    """The rules of `read_query_table` on a table already read (`where` names it in messages)."""
    table = _decoded(table, "text", nulls_too=True)
    table = _decoded(_decoded(table, "query_id"), "item_id") if need_item else _decoded(table, "query_id")
    if not pa.types.is_string(table.schema.field("text").type) and \
            not pa.types.is_large_string(table.schema.field("text").type):
        raise BadInput(f"{path}: column text must hold strings, got {table.schema.field('text').type}")
    query_ids = _id_column(table, "query_id", path)
    duplicate = _first_duplicate(query_ids)
    if duplicate is not None:
        row, first = duplicate
        raise LocatedError(path, row, f"duplicate query_id {shown(query_ids[row])} (first at row {first})")
    items = _id_column(table, "item_id", path) if need_item else None
    out = QueryTable(table=pa.table({}), rows_read=table.num_rows)
    keep, texts = [], []
    for row, text in enumerate(table.column("text").to_pylist()):
        try:
            texts.append(normalize_query(text, rules))
            keep.append(row)
        except QueryRefused as exc:
            out.skipped[exc.reason] += 1
            out.first_skipped.setdefault(exc.reason, row)
    columns = {"query_id": pa.array([query_ids[r] for r in keep], pa.string()), "text": pa.array(texts, pa.string())}
    if items is not None:
        columns["item_id"] = pa.array([items[r] for r in keep], pa.string())
    out.table, out.source_rows = pa.table(columns), keep
    return out


def _decoded(table: pa.Table, name: str, nulls_too: bool = False) -> pa.Table:
    """A pandas category column (Arrow dictionary of strings or integers) as its values; with
    `nulls_too`, a column of nulls only, whatever type its writer gave them (null, or pandas'
    double for an all-null category), as strings."""
    kind = table.schema.field(name).type
    column = table.column(name)
    if nulls_too and len(column) and column.null_count == len(column) and not pa.types.is_string(kind):
        column = pa.nulls(len(column), pa.string())
    elif pa.types.is_dictionary(kind):
        column = column.cast(kind.value_type)
    else:
        return table
    return table.set_column(table.schema.get_field_index(name), name, column)


def _id_column(table: pa.Table, name: str, path: str) -> list[str]:
    col = table.column(name)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_integer(col.type)):
        raise BadInput(f"{path}: column {name} must hold strings or integers, got {col.type}")
    nulls = pc.is_null(col)
    if pc.any(nulls).as_py():
        row = pc.index(nulls, True).as_py()
        raise LocatedError(path, row, f"{name} is null")
    return [str(v) for v in col.to_pylist()]


def _first_duplicate(values: list[str]) -> tuple[int, int] | None:
    seen: dict[str, int] = {}
    for row, value in enumerate(values):
        if value in seen:
            return row, seen[value]
        seen[value] = row
    return None


def load_queries(path: str, rules: QueryConfig, job: str, need_item: bool = False) -> QueryTable:
    """The checked, normalised queries of a batch job; refused rows are logged per reason."""
    queries = read_query_table(path, rules, need_item)
    for line in queries.describe_skips(path):
        log(job, line)
    if queries.table.num_rows == 0:
        raise BadInput(f"{path}: no query left to search ({queries.rows_read} rows, "
                       f"{sum(queries.skipped.values())} skipped)")
    return queries
