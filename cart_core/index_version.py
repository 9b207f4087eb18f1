"""The one way to read a committed version of the index.

A version is a manifest plus the files it names; what a job needs from it is not the raw files but
their *live* content: feature rows with tombstones (deletes, replaced rows of updates) and
superseded duplicates removed, training queries deduplicated on (item, text), the identifier table
with its deltas applied, the pending items of the dense fallback. Every job reads through
`IndexVersion`, so no verb can bring a deleted item back by reading a feature run directly.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cart_core.identifiers import IdentifierTable, appended_rows, apply_delta
from cart_core.store import Manifest, Store, StoreError, manifest_keys


def is_servable(manifest: Manifest) -> bool:
    """A version can answer queries when its generator was trained for its identifiers."""
    return bool(manifest.generator and manifest.ids and manifest.extra.get("generator_ids") == manifest.ids)


def drop_retired_captions(batch: dict, folder_of: dict[str, int], before: dict[str, int]) -> dict:
    """Keeps the rows of a raw query-file batch (with its `path` column) that no delete retired
    (IndexVersion.retired_caption_files)."""
    later = 1 << 62  # a file of a folder after every retirement
    keep = np.array([folder_of.get(str(p), later) >= before.get(str(i), 0)
                     for p, i in zip(batch["path"], batch["item_id"])], bool)
    return {k: v[keep] for k, v in batch.items()}


def referenced_paths(manifest: Manifest) -> set[str]:
    """Every store folder or file a manifest names (what `compact` keeps and `cart check` verifies)."""
    extra = manifest.extra
    paths = {manifest.ids, *(extra.get("ids_chain") or []), manifest.codebooks, manifest.generator,
             *manifest.features, *manifest.queries, *manifest.eval_queries, *manifest.errors,
             *(extra.get("tombstones") or []), *(extra.get("retired_captions") or []), extra.get("pending")}
    return {p for p in paths if p}


@dataclass
class IndexVersion:
    """A committed version, read lazily; each table is read once and cached."""

    store: Store
    manifest: Manifest
    # items this version holds that a newer committed version deleted: a version served on behalf
    # of a newer one that has no generator yet (newest_servable) must not answer with them
    withdrawn: frozenset[str] = frozenset()
    _cache: dict = field(default_factory=dict, repr=False)

    # ---- which version ---------------------------------------------------------------------
    @classmethod
    def current(cls, store: Store) -> "IndexVersion":
        return cls(store, store.manifest())

    @classmethod
    def newest_servable(cls, store: Store) -> "IndexVersion":
        """The newest committed version that can answer queries (a fresh `cart quantize` commits
        identifiers before `cart train` has a generator for them; the previous version serves)."""
        current = store.manifest()
        if is_servable(current):
            return cls(store, current)
        for old in reversed(store.versions()):
            if is_servable(old):
                return cls.answering_for(store, old, current)
        if current.version == 0:
            raise StoreError(f"{store.url}: no index here (no committed version); `cart import` or `cart extract` "
                             "starts one, or check the --store path")
        raise StoreError(f"{store.url}: no committed version has a trained generator; run `cart train` first")

    @classmethod
    def answering_for(cls, store: Store, old: Manifest, current: Manifest) -> "IndexVersion":
        """The servable version `old` answering on behalf of the newer `current`: without the items
        deleted since (withdrawn)."""
        served = cls(store, old)
        if old.version == current.version:
            return served
        table, meta = served.ids()
        withdrawn = withdrawn_since(table, served, cls(store, current))
        if not withdrawn:
            return served
        out = cls(store, old, withdrawn=withdrawn)
        out._cache["ids"] = (withdraw(table, withdrawn), meta)  # the table is read once
        return out

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def servable(self) -> bool:
        return is_servable(self.manifest)

    # ---- features --------------------------------------------------------------------------
    def tombstones(self) -> set[tuple[str, str]]:
        """(item_id, feature run) of every feature row a delete or an update retired."""
        return retired_rows(self.store, self.manifest.extra.get("tombstones") or [])

    def feature_rows(self) -> pa.Table:
        """item_id, content_hash, run, file, row, live for every committed feature row. A row is live
        when it is not tombstoned and no later run holds a live row of the same item."""
        if "feature_rows" in self._cache:
            return self._cache["feature_rows"]
        dead = self.tombstones()
        parts = []
        for run in self.manifest.features:
            for path in self.store.parquet_files(run):
                t = self._read_file(path, ["item_id", "content_hash"])
                parts.append(t.append_column("run", pa.array([run] * t.num_rows, pa.string()))
                             .append_column("file", pa.array([path] * t.num_rows, pa.string()))
                             .append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int64))))
        if not parts:
            rows = pa.table({"item_id": pa.array([], pa.string()), "content_hash": pa.array([], pa.string()),
                             "run": pa.array([], pa.string()), "file": pa.array([], pa.string()),
                             "row": pa.array([], pa.int64()), "live": pa.array([], pa.bool_())})
        else:
            rows = pa.concat_tables(parts)
            ids, runs = rows.column("item_id").to_pylist(), rows.column("run").to_pylist()
            alive = np.array([(i, r) not in dead for i, r in zip(ids, runs)], dtype=bool) if dead \
                else np.ones(rows.num_rows, bool)
            live = np.zeros(rows.num_rows, bool)
            newest: dict[str, int] = {}
            if len(set(ids)) == len(ids):  # the usual case: every item has one row
                live = alive
            else:
                for r in np.flatnonzero(alive):
                    newest[ids[r]] = r  # later runs come later: the last live row wins
                live[list(newest.values())] = True
            rows = rows.append_column("live", pa.array(live))
        self._cache["feature_rows"] = rows
        return rows

    def feature_files(self) -> list[str]:
        return self.store.parquet_files(self.manifest.features)

    def dead_feature_keys(self) -> set[tuple[str, str]]:
        """(file, item_id) of every committed feature row that is not live: what a reader of the
        raw files (a Ray Data job) must drop."""
        rows = self.feature_rows()
        dead = rows.filter(pc.invert(rows.column("live")))
        return set(zip(dead.column("file").to_pylist(), dead.column("item_id").to_pylist()))

    def live_feature_parts(self, columns: list[str] = ("item_id", "embedding")) -> Iterator[pa.Table]:
        """live_features one feature file at a time: a reader that places rows as they come never
        holds every feature twice (1M x 512 float32 is 2 GB). The next file is read while this one
        is used (two reads in flight decode about 1.7x as fast as one after the other here)."""
        from concurrent.futures import ThreadPoolExecutor

        rows = self.feature_rows()
        files = self.feature_files()
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="feature-read") as pool:
            reads = [pool.submit(self._read_file, path, list(columns)) for path in files[:2]]
            for i, path in enumerate(files):
                t = reads[i].result()
                reads[i] = None  # each table is held only while it is used
                if i + 2 < len(files):
                    reads.append(pool.submit(self._read_file, files[i + 2], list(columns)))
                mask = rows.filter(pc.equal(rows.column("file"), path)).column("live")
                yield t.filter(mask) if not pc.all(mask).as_py() else t

    def live_features(self, columns: list[str] = ("item_id", "embedding")) -> pa.Table:
        """The live feature rows (each item at most once), with the given columns."""
        columns = list(columns)
        parts = list(self.live_feature_parts(columns))
        if not parts:
            return pa.table({c: pa.array([], pa.string()) for c in columns})
        return pa.concat_tables(parts, promote_options="default")

    def deleted_items(self, items: list[str]) -> list[str]:
        """Those of `items` a delete retired and nothing added again since (tombstoned, no live row):
        an import or extract that lists them adds them back, which its log says."""
        dead = {i for i, _ in self.tombstones()}
        if not dead:
            return []
        live = self.live_item_hashes([i for i in items if i in dead])
        return [i for i in dict.fromkeys(items) if i in dead and i not in live]

    def pinned(self) -> "IndexVersion":
        """This version with its live feature rows (item and run) kept in memory: what a long-lived
        reader (a `cart serve` replica) keeps of the version it loaded, so that later comparisons
        with newer versions (withdrawn_since) never read files `cart compact` may have removed."""
        rows = self.feature_rows()
        out = IndexVersion(self.store, self.manifest, self.withdrawn)
        out._cache["feature_rows"] = rows.filter(rows.column("live")).select(["item_id", "run", "live"])
        return out

    def live_rows(self) -> pa.Table:
        """The live feature rows (feature_rows filtered)."""
        rows = self.feature_rows()
        return rows.filter(rows.column("live"))

    def live_item_hashes(self, items: list[str] | None = None) -> dict[str, tuple[str, str]]:
        """item_id -> (feature run, content hash) of its live row, for `items` (default: all)."""
        rows = self.feature_rows()
        rows = rows.filter(rows.column("live"))
        if items is not None:
            rows = rows.filter(pc.is_in(rows.column("item_id"), value_set=pa.array(sorted(set(items)), pa.string())))
        return {i: (r, h) for i, r, h in zip(rows.column("item_id").to_pylist(), rows.column("run").to_pylist(),
                                             rows.column("content_hash").to_pylist())}

    # ---- queries ---------------------------------------------------------------------------
    def retired_captions(self, held_out: bool = False) -> dict[str, int]:
        """item_id -> how many of the manifest's query folders (eval query folders with `held_out`)
        hold captions of it that a delete retired: a deleted item keeps no captions, so one added
        again starts with only those given after (the folder lists only ever grow at the end, so
        the count pins them)."""
        key = "eval_before" if held_out else "queries_before"
        if ("retired", key) in self._cache:
            return self._cache[("retired", key)]
        files = self.manifest.extra.get("retired_captions") or []
        retired: dict[str, int] = {}
        if files:
            t = self.store.read_table(files)  # small: one row per deleted item
            befores = t.column(key).to_pylist() if key in t.column_names else [0] * t.num_rows
            for item, before in zip(t.column("item_id").to_pylist(), befores):
                retired[item] = max(retired.get(item, 0), int(before or 0))
        self._cache[("retired", key)] = retired
        return retired

    def retired_caption_files(self) -> tuple[dict[str, int], dict[str, int]]:
        """({query file: index of its folder in the manifest} for the folders holding retired
        captions, retired_captions()): what a reader of the raw query files (a Ray Data job) needs
        to drop a row, `index < before[item]` (drop_retired_captions); both maps stay as small as
        the files and the deleted items, whatever the number of captions."""
        retired = self.retired_captions()
        if not retired:
            return {}, {}
        folders = self.manifest.queries[:max(retired.values())]
        return {path: i for i, folder in enumerate(folders) for path in self.store.parquet_files(folder)}, retired

    def _live_captions(self, folders: list[str], columns: list[str], held_out: bool) -> pa.Table:
        """The rows of these query folders without the captions a delete retired."""
        retired = self.retired_captions(held_out)
        if not retired:
            return self.store.read_table(folders, columns=columns)
        parts = []
        for i, folder in enumerate(folders):
            part = self.store.read_table(folder, columns=columns)
            if not part.num_columns:  # a folder without files
                continue
            gone = [item for item, before in retired.items() if i < before]
            if gone and part.num_rows:
                part = part.filter(pc.invert(pc.is_in(part.column("item_id"), value_set=pa.array(gone, pa.string()))))
            parts.append(part)
        return pa.concat_tables(parts, promote_options="default") if parts else \
            pa.table({c: pa.array([], pa.string()) for c in columns})

    def queries(self, columns: list[str] = ("item_id", "text", "source")) -> pa.Table:
        """Training queries, each (item_id, text) once (the first committed row wins), without the
        captions a delete retired (retired_captions)."""
        columns = list(columns)
        if not self.manifest.queries:
            return pa.table({c: pa.array([], pa.string()) for c in columns})
        t = self._live_captions(self.manifest.queries, sorted(set(columns) | {"item_id", "text"}), held_out=False)
        keys = list(zip(t.column("item_id").to_pylist(), t.column("text").to_pylist()))
        if len(set(keys)) != len(keys):
            seen: set = set()
            first = [k not in seen and not seen.add(k) for k in keys]
            t = t.filter(pa.array(first))
        return t.select(columns)

    def new_captions(self, item_ids: list[str], texts: list[str]) -> tuple[list[str], list[str]]:
        """The (item, text) pairs not yet among the training queries nor earlier in the lists."""
        seen: set[tuple[str, str]] = set()
        if self.manifest.queries and item_ids:
            q = self.queries(["item_id", "text"])
            q = q.filter(pc.is_in(q.column("item_id"), value_set=pa.array(sorted(set(item_ids)), pa.string())))
            seen = set(zip(q.column("item_id").to_pylist(), q.column("text").to_pylist()))
        out_ids, out_texts = [], []
        for item, text in zip(item_ids, texts):
            if (item, text) not in seen:
                seen.add((item, text))
                out_ids.append(item)
                out_texts.append(text)
        return out_ids, out_texts

    def eval_queries(self, with_retired: bool = False) -> pa.Table:
        """Held-out queries, without those of items a delete retired the captions of (all of them
        `with_retired`)."""
        folders = self.store.require(self.manifest, "eval_queries", "cart import --holdout-caption-index N")
        columns = ["query_id", "text", "item_id"]
        return self.store.read_table(folders, columns=columns) if with_retired else \
            self._live_captions(folders, columns, held_out=True)

    # ---- identifiers -----------------------------------------------------------------------
    def ids(self) -> tuple[IdentifierTable, dict]:
        """The identifier table and its meta: the last full table (`cart quantize`, `cart compact`)
        with the deltas of the reindexes since applied in order."""
        if "ids" not in self._cache:
            table, meta = load_ids(self.store, self.manifest)
            self._cache["ids"] = (withdraw(table, self.withdrawn), meta)
        return self._cache["ids"]

    # ---- pending items (the dense fallback of `cart reindex`) -------------------------------
    def pending(self) -> pa.Table | None:
        path = self.manifest.extra.get("pending")
        if not path:
            return None
        return self._read_file(self.store.path(path), None)

    def untrained_pending(self) -> list[str]:
        """Pending items no fine-tune has taught the generator yet."""
        pending = self.pending()
        if pending is None:
            return []
        trained = set(self.manifest.extra.get("pending_trained") or [])
        runs = pending_runs(pending, self.manifest.extra.get("pending"))
        return [item for item, r in zip(pending.column("item_id").to_pylist(), runs) if r not in trained]

    def _read_file(self, path: str, columns: list[str] | None) -> pa.Table:
        try:
            with self.store.fs.open(path, "rb") as f:
                return pq.read_table(f, columns=columns)
        except (pa.ArrowInvalid, OSError) as exc:
            raise StoreError(f"{path}: unreadable ({exc}); `cart check --store {self.store.url}` lists what "
                             "is damaged") from None


def pending_runs(pending: pa.Table, path: str | None) -> list[str]:
    """The reindex run that added each pending row (a table written before runs were recorded
    counts as one run named by its path)."""
    if "run" in pending.column_names:
        return [str(r) for r in pending.column("run").to_pylist()]
    return [str(path)] * pending.num_rows


def withdrawn_since(table: IdentifierTable, held: "IndexVersion", current: "IndexVersion") -> frozenset[str]:
    """The live items of `table` (built from `held`'s feature rows) that were deleted since
    `held`: no live row in `current` (a takedown while a refit awaits training, a rollback forward
    past a delete), or their row in `held` retired by `current` (deleted and imported again: the
    identifier and captions in `table` are those of the content taken down). Rows retired only
    count until `cart compact` clears the tombstones; content that changed without a delete
    (nothing retired) is not withdrawn.

    Nothing is read when both versions name the same feature runs and tombstones: their live rows
    are then the same (a training's or a caption's commit). When `current` only appended runs and
    tombstones to `held`'s (every import, reindex and delete), only the new tombstones are read:
    a row `held` had live stays live unless one of them retires it, so the answer costs what was
    deleted, not the catalog (a takedown at 1M items: 1.2 s before, see docs/benchmarks.md).
    Anything else (a compact, a rollback) compares the live rows in full."""
    return deleted_since(table.item_ids[table.live], held, current)


def deleted_since(items: np.ndarray, held: "IndexVersion", current: "IndexVersion") -> frozenset[str]:
    """withdrawn_since for `items` (item ids live in `held`): those whose content in `held` was
    taken down since (what a rollback to `held` would bring back)."""
    held_tombs = list(held.manifest.extra.get("tombstones") or [])
    current_tombs = list(current.manifest.extra.get("tombstones") or [])
    if held.manifest.features == current.manifest.features and held_tombs == current_tombs:
        return frozenset()
    # only tombstone runs `held` does not name can retire its rows (runs are never rewritten; a
    # merged run's rows that `held` had retired match none of its live rows): `held`'s own
    # tombstone files are never read, so a version `cart compact` cleared can still be held
    newer = [r for r in current_tombs if r not in set(held_tombs)]
    retired = _held_rows_retired(items, held, retired_rows(current.store, newer))
    if only_appended(held.manifest, current.manifest):  # a row `held` had live stays live unless a new tombstone retires it
        return retired
    return retired | _without_live_row(items, current)


def only_appended(held: Manifest, current: Manifest) -> bool:
    """Whether `current` only appended feature runs and tombstones to `held`'s (every import,
    reindex and delete; not a compact, which rewrites runs, nor a rollback to fewer runs): then
    what `held` had live and `current` deleted is exactly what the new tombstones retire."""
    return (current.features[:len(held.features)] == held.features
            and set(held.extra.get("tombstones") or []) <= set(current.extra.get("tombstones") or []))


def retired_rows(store: Store, runs: list[str]) -> set[tuple[str, str]]:
    """(item_id, feature run) of every feature row the tombstone runs `runs` retire."""
    if not runs:
        return set()
    t = store.read_table(runs, columns=["item_id", "feature_run"])
    return set(zip(t.column("item_id").to_pylist(), t.column("feature_run").to_pylist()))


def _held_rows_retired(items: np.ndarray, held: "IndexVersion", retired: set[tuple[str, str]]) -> frozenset[str]:
    """Those of `items` whose live row in `held` is one of the `retired` rows (only the rows of
    the retired items are looked at)."""
    if not retired:
        return frozenset()
    rows = held.live_rows()
    named = rows.filter(pc.is_in(rows.column("item_id"), value_set=pa.array(sorted({i for i, _ in retired}),
                                                                            pa.string())))
    gone = {item for item, run in zip(named.column("item_id").to_pylist(), named.column("run").to_pylist())
            if (item, run) in retired}
    return _among(items, gone)


def _without_live_row(items: np.ndarray, current: "IndexVersion") -> frozenset[str]:
    """Those of `items` with no live row in `current` (reads every feature row's item)."""
    ids = pa.array(np.asarray(items, object), pa.string())
    alive = current.live_rows().column("item_id").combine_chunks().cast(pa.string())
    return frozenset(ids.filter(pc.invert(pc.is_in(ids, value_set=alive))).to_pylist())


def _among(items: np.ndarray, named: set[str]) -> frozenset[str]:
    """Those of `named` that are in `items`."""
    if not named:
        return frozenset()
    items = np.asarray(items, object)
    hit = pc.is_in(pa.array(items, pa.string()), value_set=pa.array(sorted(named), pa.string()))
    return frozenset(items[hit.to_numpy(zero_copy_only=False)].tolist())


def only_deleted(before: "IndexVersion", after: "IndexVersion") -> bool:
    """Whether the commit from `before` to `after` only deleted items: the identifier table is the
    same with rows marked dead, every feature row it retired belongs to an item now dead, and no
    feature, caption or codebook changed (an update or new captions are not a delete). A
    generator trained for `before`'s identifiers then serves `after`: decoding never reaches a
    dead row, and the verifier masks deleted items (`deletes_since`)."""
    b, a = before.manifest, after.manifest
    if not (b.ids and a.ids):
        return False
    if (b.features, b.queries, b.eval_queries, b.codebooks, b.dim) != (a.features, a.queries, a.eval_queries,
                                                                       a.codebooks, a.dim):
        return False
    old, _ = before.ids()
    new, _ = after.ids()
    if (old.codes.shape != new.codes.shape or list(old.vocab_sizes) != list(new.vocab_sizes)
            or not np.array_equal(old.codes, new.codes) or not np.array_equal(old.item_ids, new.item_ids)
            or np.any(new.live & ~old.live)):
        return False
    retired = {item for item, _ in after.tombstones() - before.tombstones()}
    return not retired & set(new.item_ids[new.live].tolist())


def deletes_since(store: Store, base: Manifest, reads: set[str], writes: set[str]) -> Manifest:
    """The version a long job commits on: `base`, or the newest version when every commit since
    either only deleted items (`only_deleted`: a takedown while `cart quantize` or `cart train`
    ran) or changed none of the keys the job read or writes (`manifest_keys` names), and at least
    one deleted. The job then commits over the deletes, which stay in force (the caller marks the
    items deleted since `base` dead in what it built). Anything else, an unreadable version in
    between, or a commit that changed the generator (two trainings racing), leaves `base`:
    Store.commit replays or refuses as before."""
    newest = store.manifest()
    if newest.version <= base.version:
        return base
    deleted, watched = False, reads | writes
    older = IndexVersion(store, base)
    for number in range(base.version + 1, newest.version + 1):
        try:
            newer = IndexVersion(store, newest if number == newest.version else store.version(number))
        except StoreError:
            return base
        before, after = manifest_keys(older.manifest), manifest_keys(newer.manifest)
        if before.get("generator") != after.get("generator"):
            return base
        if any(before.get(k) != after.get(k) for k in watched):
            if not only_deleted(older, newer):
                return base
            deleted = True
        older = newer  # each version's tables are read once
    return newest if deleted else base


def withdraw(table: IdentifierTable, withdrawn: frozenset[str]) -> IdentifierTable:
    """The table with the withdrawn items marked not live: answered by nothing, like deleted ones."""
    if not withdrawn:
        return table
    gone = pc.is_in(pa.array(table.item_ids, pa.string()), value_set=pa.array(sorted(withdrawn), pa.string()))
    return replace(table, live=table.live & ~gone.to_numpy(zero_copy_only=False))


def load_ids(store: Store, manifest: Manifest) -> tuple[IdentifierTable, dict]:
    folder = store.require(manifest, "ids", "cart quantize")
    table, meta = None, {}
    for part in [*(manifest.extra.get("ids_chain") or []), folder]:
        with store.local_dir(part) as local:
            try:
                meta = json.loads((local / "meta.json").read_text())
                if (local / "ids.parquet").exists():
                    table = IdentifierTable.load(local / "ids.parquet")
                elif table is None:
                    raise StoreError(f"{store.uri(part)}: an identifier delta without the table it extends "
                                     "(manifest extra.ids_chain is incomplete)")
                else:
                    table = apply_delta(table, IdentifierTable.load(local / "append.parquet"),
                                        np.load(local / "dead.npy"))
            except (FileNotFoundError, ValueError, OSError, pa.ArrowInvalid) as exc:
                raise StoreError(f"{store.uri(part)}: identifier table unreadable ({exc}); "
                                 f"`cart check --store {store.url}` lists what is damaged") from None
    return table, meta


def save_ids(store: Store, table: IdentifierTable, folder: str, meta: dict, *, base_rows: int | None = None) -> None:
    """The identifier table under `folder`: whole (ids.parquet), or, given base_rows, as a delta over
    the committed table of base_rows rows -- the rows appended after it (append.parquet) and its rows
    tombstoned since (dead.npy) -- so adding 10k items to 1M writes 10k rows, not 1.01M."""
    with tempfile.TemporaryDirectory(prefix="cart-ids-") as tmp:
        if base_rows is None:
            table.save(Path(tmp) / "ids.parquet")
        else:
            appended_rows(table, base_rows).save(Path(tmp) / "append.parquet")
            np.save(Path(tmp) / "dead.npy", np.flatnonzero(~table.live[:base_rows]).astype(np.int64))
        (Path(tmp) / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        store.put_dir(tmp, folder)
