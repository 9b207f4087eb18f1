"""`cart retrieve`: batch offline retrieval as a streaming Ray Data job.

Queries (query_id, text[, item_id]) are read from Parquet (local or S3) and checked by the rules
`cart serve` applies (pipelines/queries.py) before Ray starts; then they flow through an actor
pool; each actor loads the committed generator + identifier table once and runs
constrained beam search per batch. Results (query_id, rank, item_id, score) stream back to the
driver, which appends them to one Parquet file; it holds at most `jobs.retrieve_save_s` of answers
(and never more than MAX_UNSAVED), so memory stays flat for millions of queries.

A job that dies loses at most the answers of its last `jobs.retrieve_save_s` seconds (none when
it is stopped by Ctrl-C, SIGTERM or a failure: it saves on the way out; SIGKILL or the OOM killer
gives it no way out): each query's answer comes back as one row, and the driver saves the
finished ones as parts in `<out>.parts/`, beside a `run.json` that pins what they answer
(store, served version, k, settings, a digest of the checked queries). The same command run
again answers only the queries no part holds; another command's parts are removed. The parts
are joined into `<out>` at the end and their folder removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cart_core.config import CartConfig
from cart_core.errors import BadInput
from cart_core.index_version import IndexVersion, is_servable, only_appended
from cart_core.store import Store, StoreError
from pipelines.leases import newest_servable_held
from pipelines.outputs import check_output_file, listed, process_alive, remove_dead_temps, write_tables
from pipelines.queries import QueryTable, check_k, load_queries
from pipelines.runtime import JobSummary, crash_point, init_ray, log
from pipelines.verify import query_time, verify_settings
from pipelines.search import RANKED_SCHEMA, flatten_ranked, retrieve_dataset, retrieve_resources
from pipelines.stages import check_resources_fit, stream

MAX_UNSAVED = 5_000_000  # answers (query x rank) the driver holds before a save, whatever jobs.retrieve_save_s says
RESULT_SCHEMA = pa.schema([("query_id", pa.string()), ("rank", pa.int32()), ("item_id", pa.string()),
                           ("score", pa.float32())])


def queries_digest(queries: pa.Table) -> str:
    """sha256 of the checked queries (query_id, text), in order: what the saved answers answer."""
    digest = hashlib.sha256()
    for batch in queries.select(["query_id", "text"]).to_batches(max_chunksize=65536):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        digest.update(sink.getvalue().to_pybytes())
    return digest.hexdigest()


class ResultParts:
    """The saved answers of one `cart retrieve` command: `<out>.parts/part-NNNNNN-*.parquet`, each
    written whole (temp + rename) in RANKED_SCHEMA; `run.json`, the command they answer; and
    `lock.json`, the process writing them (host and pid: one run per --out at a time)."""

    OURS = ("part-", "run.json", "lock.json")

    def __init__(self, out: str, signature: dict):
        import fsspec

        self.fs, path = fsspec.core.url_to_fs(out)
        self.out, self.folder, self.signature, self.saved = out, f"{path}.parts", signature, 0

    def parts(self) -> list[str]:
        return sorted(p for p in listed(self.fs, self.folder)
                      if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet"))

    def _read_json(self, name: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(f"{self.folder}/{name}"))
        except (FileNotFoundError, ValueError):
            return None

    def _check_ours(self) -> None:
        self.fs.invalidate_cache(self.folder)
        names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.folder, detail=False)]
        foreign = [n for n in names if not n.startswith(self.OURS)]
        if foreign:
            raise BadInput(f"{self.folder}: holds {foreign[0]!r}, not the saved answers of a cart retrieve; "
                           "move it or give another --out")

    def _lock(self) -> None:
        """One run per --out: a live process on this host holding the lock refuses this one."""
        held = self._read_json("lock.json")
        if held and held.get("pid") != os.getpid():
            if held.get("host") != socket.gethostname():
                raise BadInput(f"{self.folder}/lock.json: another cart retrieve on {held.get('host')} (pid "
                               f"{held.get('pid')}) writes {self.out}; if it is gone, remove that file")
            if process_alive(int(held.get("pid", -1))):
                raise BadInput(f"{self.out}: another cart retrieve (pid {held['pid']}) is writing it; "
                               "wait for it or give another --out")
        self.fs.pipe_file(f"{self.folder}/lock.json",
                          json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())

    def open(self) -> np.ndarray:
        """bool per query: answered by a part an earlier run of the same command saved. Another
        command's parts are removed; a folder of something else is refused."""
        fs = self.fs
        if fs.exists(self.folder):
            self._check_ours()
            self._lock()
            if self._read_json("run.json") != self.signature:
                for part in self.parts():
                    fs.rm(part)
                log("retrieve", f"removed the saved answers in {self.folder}: another command's (other "
                                "queries, index version, k or settings)")
                fs.pipe_file(f"{self.folder}/run.json", json.dumps(self.signature, sort_keys=True).encode())
        else:
            fs.makedirs(self.folder, exist_ok=True)
            self._lock()
            fs.pipe_file(f"{self.folder}/run.json", json.dumps(self.signature, sort_keys=True).encode())
        for name in remove_dead_temps(fs, f"{self.folder}/part", "part-*.parquet"):
            log("retrieve", f"removed {name}, left by a killed run")
        self.saved = len(self.parts())
        return self.answered()

    def answered(self) -> np.ndarray:
        """bool per query: held by a saved part."""
        done = np.zeros(self.signature["queries"], bool)
        for part in self.parts():
            with self.fs.open(part, "rb") as f:
                done[pq.read_table(f, columns=["pos"]).column("pos").to_numpy()] = True
        return done

    def save(self, tables: list[pa.Table]) -> None:
        if tables:
            self.saved += 1
            name = f"{self.folder}/part-{self.saved:06d}-{uuid.uuid4().hex[:8]}.parquet"
            # one row group per part, not one per streamed block
            write_tables([pa.concat_tables(tables)], self.fs.unstrip_protocol(name), RANKED_SCHEMA)  # s3:// stays

    def join(self) -> int:
        """Every query's answer once into `out`, one row per (query, rank) (temp + rename); then the
        parts, run.json and the lock removed, in that order. Refuses, keeping the parts, when a query
        is missing or another command's run.json took the folder over."""
        if self._read_json("run.json") != self.signature:
            raise StoreError(f"{self.folder}: another command's run.json replaced this one's; rerun it")
        missing = int((~self.answered()).sum())
        if missing:  # parts removed by hand, or another run's: keep them, say so
            raise StoreError(f"{self.folder}: {missing} queries have no saved answer; rerun the same command")
        seen = np.zeros(self.signature["queries"], bool)

        def tables():
            for part in self.parts():
                with self.fs.open(part, "rb") as f:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size=65536):
                        pos = batch.column("pos").to_numpy()
                        first = ~seen[pos] & _first_occurrence(pos)  # a query saved twice is written once
                        seen[pos[first]] = True
                        yield flatten_ranked(pa.Table.from_batches([batch]).filter(pa.array(first)))
        rows = write_tables(tables(), self.out, RESULT_SCHEMA)
        for part in self.parts():
            self.fs.rm(part)
        self.fs.rm(f"{self.folder}/run.json")
        self.fs.rm(f"{self.folder}/lock.json")
        if self.fs.exists(self.folder):
            self.fs.rm(self.folder, recursive=True)
        return rows


def _first_occurrence(pos: np.ndarray) -> np.ndarray:
    """bool per entry: the first time its value appears in `pos`."""
    first = np.zeros(len(pos), bool)
    first[np.unique(pos, return_index=True)[1]] = True
    return first


def run_signature(store: Store, version: IndexVersion, cfg: CartConfig, k: int, queries: pa.Table) -> dict:
    """What saved answers answer: a rerun resumes only the same command on the same index."""
    withdrawn = hashlib.sha256("\n".join(sorted(version.withdrawn)).encode()).hexdigest()
    return {"store": store.url, "version": version.version, "withdrawn": withdrawn, "k": k,
            "beam_size": cfg.eval.beam_size, "mode": cfg.verify.mode, "query": query_time(cfg),
            "queries": queries.num_rows, "queries_sha256": queries_digest(queries)}


def answer_and_save(results_ds, parts: ResultParts, total: int, save_s: float) -> int:
    """Stream the answers in, saving the finished queries every `save_s` seconds and once more when
    the stream ends or breaks (Ctrl-C and failures included): returns the queries answered."""
    buffer: list[pa.Table] = []
    answered, held, last = 0, 0, time.monotonic()
    try:
        for block in stream(results_ds, total, "retrieve"):
            buffer.append(block)
            answered += block.num_rows
            held += int(pc.sum(pc.list_value_length(block.column("item_ids"))).as_py() or 0)
            if time.monotonic() - last >= save_s or held >= MAX_UNSAVED:
                full, buffer, held = buffer, [], 0  # emptied first: a stop during the save cannot save it twice
                parts.save(full)
                last = time.monotonic()
                crash_point("retrieve_after_save")
    finally:
        parts.save(buffer)
    return answered


def run_retrieve(store: Store, queries: str, out: str, cfg: CartConfig, k: int = 10,
                 address: str | None = None) -> dict:
    check_k(k, cfg.queries)
    check_output_file(out, (queries,), store.url)
    checked = load_queries(queries, cfg.queries, "retrieve")  # every input check runs before Ray starts
    resumable = partial(version_of_saved_answers, store, out, cfg, k, checked.table)
    with newest_servable_held(store, "retrieve", prefer=resumable) as version:  # compact keeps it
        return _retrieve(store, version, checked, out, cfg, k, address)


def version_of_saved_answers(store: Store, out: str, cfg: CartConfig, k: int, queries: pa.Table) -> IndexVersion | None:
    """The version the saved answers of an earlier run of this command come from, when a newer one
    was committed since and they can be resumed on it: it is still in the store and servable, every
    commit since only added or deleted (no rollback: what was undone is not answered; no compact:
    cleared tombstones would hide content deleted and imported again), and nothing it holds was
    deleted since (the withdrawn items are part of the signature). A killed job's rerun then
    finishes on the version it started with."""
    parts = ResultParts(out, {})
    saved = parts._read_json("run.json")
    if not saved or saved.get("store") != store.url or not parts.parts():
        return None
    try:
        current, old = store.manifest(), store.version(int(saved["version"]))
        if old.version >= current.version or not is_servable(old):
            return None
        since = [store.version(n) for n in range(old.version + 1, current.version + 1)]
    except (StoreError, OSError, KeyError, ValueError, TypeError):  # compacted away, unreadable, or not ours
        return None
    if not only_appended(old, current) or any(m.message.startswith(("rollback", "undo rollback")) for m in since):
        return None
    version = IndexVersion.answering_for(store, old, current)
    if run_signature(store, version, cfg, k, queries) != saved:
        return None
    log("retrieve", f"the saved answers in {out}.parts come from version {version.version}: this run finishes "
                    f"on it (remove that folder to answer from the newest version instead)")
    return version


def _retrieve(store: Store, version: IndexVersion, checked: QueryTable, out: str, cfg: CartConfig, k: int,
              address: str | None) -> dict:
    version.ids()  # a damaged identifier table fails here, naming its folder, not in an actor a minute later
    verify_settings(version, query=query_time(cfg))  # logs the verify.* settings that differ from the fitted ones
    init_ray(address)
    check_resources_fit("retrieve", retrieve_resources(cfg))  # before <out>.parts is made
    summary = JobSummary("retrieve", store.url)
    manifest = version.manifest
    n = checked.table.num_rows
    t0 = time.perf_counter()
    parts = ResultParts(out, run_signature(store, version, cfg, k, checked.table))
    done = parts.open()
    if done.any():
        log("retrieve", f"resuming: {int(done.sum())} of {n} queries were answered by an earlier run of "
                        f"this command, from version {manifest.version}")
    todo = checked.table.append_column("pos", pa.array(np.arange(n, dtype=np.int64))).filter(pa.array(~done))
    try:
        if todo.num_rows:
            answer_and_save(retrieve_dataset(todo, cfg, k, version), parts, todo.num_rows, cfg.jobs.retrieve_save_s)
    except BaseException:
        log("retrieve", f"stopped: {parts.saved} part(s) of answers are saved in {parts.folder}; "
                        "the same command resumes from them")
        raise
    rows = parts.join()
    elapsed = summary.time("retrieve_s", t0)
    summary.counts.update(queries=int(n), result_rows=int(rows), queries_skipped=sum(checked.skipped.values()),
                          queries_resumed=int(done.sum()))
    answered = todo.num_rows  # this run's (the rest were answered by an earlier one)
    summary.extra.update(version=manifest.version, out=out, k=k, beam_size=max(cfg.eval.beam_size, k),
                         queries_per_s=answered / max(elapsed, 1e-9), skipped=checked.report()["skipped_by_reason"])
    log("retrieve", f"{n} queries -> {rows} rows in {out} ({answered / max(elapsed, 1e-9):.0f} queries/s, "
                    f"version {manifest.version})")
    return summary.write(store)
