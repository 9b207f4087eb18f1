"""What a job writes before it commits: Parquet parts under `<folder>/part-NNNNN.parquet`, and
the bad rows of a stage in `errors/<run>/`. Nothing here commits: a job names the folders in one
manifest at the end, so a killed job leaves only unreferenced parts behind."""
from __future__ import annotations

import pyarrow as pa

from cart_core.store import Manifest, Store, errors_table

PART_ROWS = 20_000           # rows per part a stage streams out (about 40 MB at 512 dims)
TABLE_PART_ROWS = 200_000    # rows per part of a table written whole (import, reindex, compact)
MAX_ERROR_EXAMPLES = 20      # error reasons repeated in the job summary (all are in errors/<run>/)


class PartWriter:
    """Buffers rows and writes `<folder>/part-NNNNN.parquet` files of at most `rows` rows."""

    def __init__(self, store: Store, folder: str, rows: int = PART_ROWS):
        self.store, self.folder, self.rows = store, folder, rows
        self.pending: list[pa.Table] = []
        self.parts = self.total = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.total += table.num_rows
            if sum(t.num_rows for t in self.pending) >= self.rows:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        self.pending = []
        for start in range(0, table.num_rows, self.rows):
            self.store.write_table(table.slice(start, self.rows), f"{self.folder}/part-{self.parts:05d}.parquet")
            self.parts += 1


def write_parts(store: Store, table: pa.Table, folder: str) -> None:
    """A whole table as parts (one empty part for an empty table, so the folder always exists)."""
    if table.num_rows == 0:
        store.write_table(table, f"{folder}/part-00000.parquet")
        return
    writer = PartWriter(store, folder, TABLE_PART_ROWS)
    writer.add(table)
    writer.flush()


class ErrorLog:
    """The bad rows of one stage in one run: written to `errors/<run>/` (except those the store
    already records with the same reason, so a rerun that fails the same way commits nothing),
    counted, and the first few kept as examples for the job summary."""

    def __init__(self, store: Store, manifest: Manifest, run: str, stage: str):
        self.store, self.run, self.stage = store, run, stage
        self.writer = PartWriter(store, f"errors/{run}")
        self.seen = known_errors(store, manifest, stage)
        self.count = 0
        self.examples: list[dict] = []

    def add(self, item_ids: list, uris: list, reasons: list) -> None:
        if not item_ids:
            return
        self.count += len(item_ids)
        room = MAX_ERROR_EXAMPLES - len(self.examples)
        self.examples += [{"item_id": i, "uri": u, "reason": r} for i, u, r in list(zip(item_ids, uris, reasons))[:room]]
        table = errors_table(list(item_ids), list(uris), self.stage, list(reasons))
        keep = [(i, u, r) not in self.seen for i, u, r in zip(item_ids, uris, reasons)]
        self.writer.add(table.filter(pa.array(keep, pa.bool_())))

    def add_rows(self, rows: pa.Table) -> None:
        """Rows with item_id, uri and reason columns (a stage's `status = "error"` rows)."""
        self.add(*(rows.column(c).to_pylist() for c in ("item_id", "uri", "reason")))

    @property
    def new(self) -> int:
        """Error rows this run writes (not already recorded)."""
        return self.writer.total

    def close(self) -> dict:
        """Flush; the job summary's `errors` entry."""
        self.writer.flush()
        return {"count": self.count, "examples": self.examples,
                "table": self.store.uri("errors", self.run) if self.new else None}


def known_errors(store: Store, manifest: Manifest, stage: str) -> set[tuple]:
    """(item_id, uri, reason) of the committed errors of one stage."""
    if not manifest.errors:
        return set()
    t = store.read_table(manifest.errors, columns=["item_id", "uri", "stage", "reason"])
    return {(r["item_id"], r["uri"], r["reason"]) for r in t.to_pylist() if r["stage"] == stage}
