"""The index store: one layout on a local path or `s3://bucket/prefix`, through fsspec + pyarrow.

Layout (DESIGN.md §3, with the versioning made explicit):

    manifest.json                the one committed version (replaced atomically)
    manifests/v000042.json       every committed manifest, kept for `versions` / rollback
    features/<run>/part-*.parquet   item_id, modality, uri, content_hash, embedding
    queries/<run>/part-*.parquet    item_id, text, source (human | pseudo)
    eval/<run>/queries.parquet      query_id, text, item_id (held-out captions)
    codebooks/<run>/             kmeans/ (npy + json), rqvae/ (safetensors + json), meta.json
    ids/<run>/ids.parquet        item_id, tokens, coarse, fine, suffix, codebook_version, live
    ids/<run>/append.parquet     (a reindex) only the rows it added, + dead.npy (rows it tombstoned);
                                 manifest extra.ids_chain lists the folders it builds on
    generator/<run>/             model/ (safetensors + config.json), checkpoints/epoch-NNNN/
    errors/<run>/part-*.parquet     item_id, uri, stage, reason
    jobs/<run>.json              the summary each job writes (counts, timings, errors)

Every job writes under a fresh `<run>` folder and only then commits a manifest that points at it,
so a job killed at any point leaves the previous manifest and everything it names untouched;
folders no manifest names are garbage from dead runs.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from cart_core.errors import first_line

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


COMMIT_ATTEMPTS = 60       # lost races before a commit gives up (each retry waits longer; see _backoff)
BACKOFF_FIRST_S, BACKOFF_CAP_S = 0.005, 1.0
FALLBACK_KEYS = ("pending", "pending_threshold", "pending_interleave", "pending_trained")


_JITTER = random.Random()  # private: a library seeding the global generator must not re-synchronise committers


def backoff_bound(attempt: int) -> float:
    """The longest wait before retry `attempt` (1, 2, ...): doubles from 5 ms, at most 1 s."""
    return min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** (attempt - 1))


def _backoff(attempt: int) -> None:
    """Full-jitter exponential backoff: committers that lost a race spread out instead of colliding
    again in lock-step, so a slow one is not starved by fast ones (a fixed retry count without a
    wait lost commits under load)."""
    time.sleep(_JITTER.uniform(0, backoff_bound(attempt)))


class StoreError(RuntimeError):
    """The store is missing something a job needs; the message says what and which command makes it."""


class UnreadableFile(StoreError, ValueError):
    """A JSON file of the store that does not read (cut short, not UTF-8, written over). A
    ValueError too, so callers that pass over a damaged lease or checkpoint keep doing so; where
    nobody does, `cart` exits 2 naming the file."""


def unloadable(store: "Store", folder: str, what: str, exc: BaseException) -> StoreError:
    """The StoreError for model files that exist but cannot be loaded (truncated, foreign), naming
    the folder instead of the library's frame."""
    text = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {text[0][:200] if text else ''}"
    return StoreError(f"{store.uri(folder)}: {what} cannot be loaded ({reason}); "
                      f"`cart check --store {store.url}` lists what is damaged")


class CommitConflict(StoreError):
    """Another job committed, while this one ran, a change this job's result depends on."""


@dataclass
class Manifest:
    """What one committed version of the index consists of (paths are relative to the store root)."""

    version: int = 0
    features: list[str] = field(default_factory=list)   # committed feature runs
    queries: list[str] = field(default_factory=list)    # committed training-query runs
    eval_queries: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    codebooks: str | None = None
    ids: str | None = None
    generator: str | None = None
    dim: int | None = None
    committed_at: float = 0.0
    message: str = ""
    format: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    # ---- state changes of `extra` (each written in one place) --------------------------------
    def with_generator(self, generator: str, trained_for: str, fingerprint: str | None = None) -> "Manifest":
        """A generator trained for the identifier table `trained_for` (what makes a version servable),
        on the pairs and config `fingerprint` names (pipelines/train.py)."""
        return replace(self, generator=generator, extra={**self.extra, "generator_ids": trained_for,
                                                          "generator_fingerprint": fingerprint})

    def without_fallback(self) -> "Manifest":
        """The dense fallback over pending items retired (a full training has learned every item)."""
        return replace(self, extra={**self.extra, **dict.fromkeys(FALLBACK_KEYS)})

    def with_fallback_taught(self, runs: list[str]) -> "Manifest":
        """A fine-tune has taught the generator the pending items of these reindex runs."""
        return replace(self, extra={**self.extra, "pending_trained": sorted(set(runs))})

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> "Manifest":
        """The manifest in `text` (a file's bytes or their text); anything else is a StoreError naming `where`."""
        try:
            data = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
        except UnicodeDecodeError as exc:  # a file written over by something else (a Parquet file, say)
            raise StoreError(f"{where}: not valid JSON (not UTF-8 text at byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise StoreError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise StoreError(f"{where}: not a manifest (a JSON {type(data).__name__}, not an object)")
        if data.get("format") != FORMAT_VERSION:
            raise StoreError(f"{where}: unsupported store format {data.get('format')!r}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


UNVERSIONED = ("version", "committed_at", "message", "format", "extra")


def manifest_keys(manifest: Manifest) -> dict:
    """The manifest as flat keys: each field, and each `extra` entry as "extra.<name>"."""
    keys = {k: v for k, v in asdict(manifest).items() if k not in UNVERSIONED}
    keys.update({f"extra.{k}": v for k, v in manifest.extra.items()})
    return keys


def rebase(base: Manifest, mine: Manifest, current: Manifest, reads: set[str], where: str) -> Manifest:
    """`mine` (built on `base`) replayed on `current`, or CommitConflict (see Store.commit)."""
    if current.version == base.version:
        return mine
    before, after, ours = manifest_keys(base), manifest_keys(current), manifest_keys(mine)
    theirs_changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    merged = dict(after)
    conflicts = []
    for key in sorted(before.keys() | ours.keys()):
        if before.get(key) == ours.get(key):
            continue  # not ours to change: keep what current has
        if key not in theirs_changed:
            merged[key] = ours.get(key)
        elif _appended(before.get(key), after.get(key)) and _appended(before.get(key), ours.get(key)):
            merged[key] = after[key] + ours[key][len(before[key] or []):]
        else:
            conflicts.append(f"{key} (changed by both)")
    conflicts += [f"{k} (read by this job)" for k in sorted(theirs_changed)
                  if ("*" in reads or k in reads) and k not in {c.split(" ")[0] for c in conflicts}]
    if conflicts:
        raise CommitConflict(f"{where}: version {current.version} ({current.message!r}) was committed while this "
                             f"job worked on version {base.version}, and it conflicts: {', '.join(conflicts)}; "
                             "nothing was committed, rerun the job")
    extra = {k[len("extra."):]: v for k, v in merged.items() if k.startswith("extra.")}
    fields = {k: v for k, v in merged.items() if not k.startswith("extra.")}
    return replace(mine, **fields, extra=extra)


def _appended(old, new) -> bool:
    """`new` is the list `old` with items appended (or equal)."""
    old = old or []
    return isinstance(new, list) and isinstance(old, list) and new[:len(old)] == old


def _durable_temp(path: str, data: bytes) -> str:
    """`data` in a fsynced temporary file beside `path` (then linked or renamed into place)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def new_run_id(kind: str) -> str:
    """Sortable by time, unique across concurrent jobs."""
    return f"{kind}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


class Store:
    """A store root; `path()` gives full URLs usable by pyarrow / Ray Data with `filesystem`."""

    def __init__(self, root: str | os.PathLike, storage_options: dict | None = None):
        root = str(root)
        self.url = root.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.is_local = self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol
        if self.is_local and "://" not in self.url:
            # absolute, so that Ray workers (other working directories) open the same folder
            self.url = self.root

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # ---- paths -----------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Filesystem path (no scheme) for use with self.fs."""
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        """Full URL (with scheme for remote stores), for messages and summaries."""
        return "/".join([self.url, *[p.strip("/") for p in parts if p]])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def pyarrow_filesystem(self):
        """A pyarrow filesystem over the same fsspec one (what Ray Data's `filesystem=` takes)."""
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        if self.is_local:
            return pa.fs.LocalFileSystem()
        return PyFileSystem(FSSpecHandler(self.fs))

    # ---- manifest --------------------------------------------------------------------------
    # The committed version is the newest of an unbroken run of history files manifests/v<N>.json;
    # manifest.json is a pointer to it that readers follow forward (a committer killed between
    # its history write and its pointer write has still committed). Creating v<N+1> exclusively is
    # the commit point: an atomic link() locally, a PUT with If-None-Match: * on S3. See
    # docs/design.md "Commit protocol".
    def manifest(self) -> Manifest:
        """The committed manifest, or an empty version-0 one for a new store."""
        text = self._read_bytes(self.path(MANIFEST))
        if text is None:
            current = self._newest_history()
        else:
            try:
                current = Manifest.from_json(text, self.uri(MANIFEST))
            except StoreError as exc:
                raise StoreError(f"{exc}; `cart check --store {self.url} --repair` restores it from the newest "
                                 f"intact {self.uri('manifests')}/v*.json") from None
        return self._follow(current)

    def _newest_history(self) -> Manifest:
        """Where there is no pointer: an empty version 0 for a new store, else the newest history
        file (a pointer lost after `cart compact` removed version 1's history must not make the
        store look new: the next commit would reuse version 1 beside the newer ones)."""
        files = self.history_files()
        if not files:
            return Manifest()
        try:
            return Manifest.from_json(self.fs.cat_file(files[-1]), files[-1])
        except (StoreError, OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"{self.uri(MANIFEST)}: missing, and the newest history file is unreadable "
                             f"({first_line(exc)}); `cart check --store {self.url} --repair` restores the pointer "
                             "from the newest intact one") from None

    def _follow(self, current: Manifest) -> Manifest:
        """Newer history files than `current` are commits whose pointer update has not landed."""
        while True:
            where = self.history_path(current.version + 1)
            text = self._read_bytes(self.path(where))
            if text is None:
                return current
            current = Manifest.from_json(text, self.uri(where))

    @staticmethod
    def history_path(version: int) -> str:
        return f"manifests/v{version:06d}.json"

    def require(self, manifest: Manifest, what: str, hint: str) -> str | list[str]:
        value = getattr(manifest, what)
        if not value:
            raise StoreError(f"{self.url}: the committed index has no {what} yet; run `{hint}` first")
        return value

    def commit(self, manifest: Manifest, message: str, *, base: Manifest | None = None,
               reads: Iterable[str] = ()) -> Manifest:
        """Commit `manifest` as the next version, guarded against concurrent commits.

        `base` is the version the job read when it started: if another job committed since, the
        job's changes (its manifest against `base`) are replayed on the newer version when they do
        not touch what that version changed, and refused with `CommitConflict` (nothing written)
        when they do, or when the newer version changed a key named in `reads` (keys as in
        `manifest_keys`: "features", "extra.tombstones", or "*" for every key). Lists that both
        sides only appended to are merged. Without `base` the manifest is committed as given
        (tests and benchmarks building stores by hand). Under heavy contention a commit may wait
        up to about a minute in all before it gives up."""
        for attempt in range(COMMIT_ATTEMPTS):
            if attempt:
                _backoff(attempt)
            current = self.manifest()
            merged = manifest if base is None else rebase(base, manifest, current, set(reads), self.url)
            new = replace(merged, version=current.version + 1, committed_at=time.time(), message=message)
            text = new.to_json().encode()
            if self._create_exclusive(self.path(self.history_path(new.version)), text):
                self._advance_pointer(new.version, text)
                return new
            # another job took that version number between our read and our write: read again
        raise CommitConflict(f"{self.url}: could not commit after {COMMIT_ATTEMPTS} attempts: "
                             "other jobs keep committing; nothing was committed, rerun this job")

    def versions(self, strict: bool = False) -> list[Manifest]:
        """Every readable committed manifest, oldest first (unreadable ones: `cart check`). strict:
        an unreadable one raises instead (what a job that removes history must not guess about)."""
        out = []
        for p in self.history_files():
            try:
                out.append(Manifest.from_json(self.fs.cat_file(p), p))
            except (StoreError, OSError) as exc:
                if strict:
                    raise StoreError(f"{first_line(exc)} (a history file); `cart check --store {self.url}` says "
                                     "what is damaged and `--repair` what it can restore") from None
                continue
        return out

    def history_files(self) -> list[str]:
        folder = self.path("manifests")
        self._invalidate(folder)
        if not self.fs.exists(folder):
            return []
        return sorted(p for p in self.fs.ls(folder, detail=False) if p.endswith(".json"))

    def version(self, number: int) -> Manifest:
        where = self.history_path(number)
        text = self._read_bytes(self.path(where))
        if text is None:
            raise StoreError(f"{self.url}: no version {number} (see `cart versions`)")
        return Manifest.from_json(text, self.uri(where))

    def repair_pointer(self, manifest: Manifest) -> None:
        """Rewrite manifest.json as `manifest` (`cart check --repair`; the history is the truth)."""
        self._write_bytes(self.path(MANIFEST), manifest.to_json().encode())

    # ---- atomic primitives -----------------------------------------------------------------
    def _invalidate(self, path: str) -> None:
        if not self.is_local:
            self.fs.invalidate_cache(path)

    def _read_bytes(self, path: str) -> bytes | None:
        """The file's bytes, or None when it does not exist (one GET, no listing cache)."""
        self._invalidate(path)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def _create_exclusive(self, path: str, data: bytes) -> bool:
        """Write `path` only if it does not exist yet, atomically; False when it already did."""
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if self.is_local:
            tmp = _durable_temp(path, data)
            try:
                os.link(tmp, path)  # atomic, and fails if path exists: the compare-and-swap
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        return self._s3_put(path, data, IfNoneMatch="*")

    def _s3_put(self, path: str, data: bytes, **condition) -> bool:
        """A conditional PUT; False when the condition failed (412 / 409)."""
        from botocore.exceptions import ClientError
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(path)
        try:
            sync(self.fs.loop, self.fs._call_s3, "put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except FileExistsError:  # s3fs's translation of 412 PreconditionFailed
            return False
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = exc.response.get("Error", {}).get("Code")
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        finally:
            self._invalidate(path)
        return True

    def _advance_pointer(self, version: int, data: bytes) -> None:
        """Point manifest.json at `version` unless it already points at a newer one."""
        path = self.path(MANIFEST)
        if self.is_local:
            import fcntl

            with open(self.path(".manifest.lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if self._pointer_version(self._read_bytes(path)) < version:
                    self._write_bytes(path, data)
            return
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(path)
        for _ in range(COMMIT_ATTEMPTS):  # no wait: the commit is already durable, only the pointer lags
            try:
                head = sync(self.fs.loop, self.fs._call_s3, "get_object", Bucket=bucket, Key=key)
                current, condition = sync(self.fs.loop, head["Body"].read), {"IfMatch": head["ETag"]}
            except FileNotFoundError:
                current, condition = None, {"IfNoneMatch": "*"}
            if self._pointer_version(current) >= version or self._s3_put(path, data, **condition):
                return

    @staticmethod
    def _pointer_version(text: bytes | None) -> int:
        try:
            return int(json.loads(text)["version"]) if text else -1
        except (ValueError, KeyError, TypeError):
            return -1  # a corrupted pointer is overwritten by the next commit

    def _write_bytes(self, path: str, data: bytes) -> None:
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if self.is_local:
            os.replace(_durable_temp(path, data), path)
        else:
            self.fs.pipe_file(path, data)

    # ---- files -----------------------------------------------------------------------------
    def write_json(self, relpath: str, data: dict) -> None:
        self._write_bytes(self.path(relpath), json.dumps(data, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, relpath: str) -> dict:
        raw = self.fs.cat_file(self.path(relpath))
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise UnreadableFile(f"{self.uri(relpath)}: not valid JSON ({first_line(exc)}); `cart check --store "
                                 f"{self.url}` lists what is damaged") from None

    def write_table(self, table: pa.Table, relpath: str) -> None:
        p = self.path(relpath)
        self.fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(p, "wb") as f:
            pq.write_table(table, f)

    def parquet_files(self, folders: list[str] | str) -> list[str]:
        """Every *.parquet under the given run folders, in a stable order (fs paths)."""
        folders = [folders] if isinstance(folders, str) else folders
        files = []
        for folder in folders:
            p = self.path(folder)
            if not self.fs.exists(p):
                raise StoreError(f"{self.uri(folder)}: named by the manifest but missing")
            files += sorted(f for f in self.fs.find(p) if f.endswith(".parquet"))
        return files

    def read_table(self, folders: list[str] | str, columns: list[str] | None = None) -> pa.Table:
        files = self.parquet_files(folders)
        if not files:
            return pa.table({})
        tables = []
        for f in files:
            with self.fs.open(f, "rb") as fh:
                tables.append(pq.read_table(fh, columns=columns))
        return pa.concat_tables(tables, promote_options="default")

    def put_dir(self, local: str | Path, relpath: str) -> None:
        """Copy a local folder into the store (models are saved locally first, then uploaded)."""
        local = Path(local)
        for f in sorted(local.rglob("*")):
            if f.is_file():
                self.put_file(f, f"{relpath}/{f.relative_to(local)}")

    def put_file(self, local: str | Path, relpath: str) -> None:
        """Whole or not at all: on a local store the copy is fsynced beside `relpath` and renamed
        into place (a job killed mid-copy leaves a stray temporary file, never a short one that a
        reader would take for complete, e.g. a checkpoint's `state.json`); an S3 PUT is atomic."""
        dest = self.path(relpath)
        self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        if self.is_local:
            tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                shutil.copyfile(local, tmp)
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, dest)
            except BaseException:  # a full disk, an interrupt: no stray half copy
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
        else:
            self.fs.put_file(str(local), dest)

    @contextmanager
    def local_dir(self, relpath: str) -> Iterator[Path]:
        """A local view of a store folder: the folder itself when local, else a temporary copy."""
        if self.is_local:
            yield Path(self.path(relpath))
            return
        with tempfile.TemporaryDirectory(prefix="cart-store-") as tmp:
            src = self.path(relpath)
            for f in self.fs.find(src):
                dest = Path(tmp) / f[len(src):].lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(f, str(dest))
            yield Path(tmp)

    def listdir(self, relpath: str) -> list[str]:
        p = self.path(relpath)
        if not self.fs.exists(p):
            return []
        return sorted(x.rsplit("/", 1)[-1] for x in self.fs.ls(p, detail=False))

    def remove(self, relpath: str) -> None:
        p = self.path(relpath)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def last_write(self, relpath: str) -> float | None:
        """Seconds since the epoch of the newest file under `relpath` (None: no file there): how a
        folder no version names yet tells a job still writing it from one that died."""
        p = self.path(relpath)
        self._invalidate(p)
        if not self.fs.exists(p):
            return None
        newest = None
        for info in self.fs.find(p, detail=True).values():
            stamp = info.get("mtime", info.get("LastModified", info.get("last_modified")))
            if hasattr(stamp, "timestamp"):
                stamp = stamp.timestamp()
            if stamp is not None:
                newest = float(stamp) if newest is None else max(newest, float(stamp))
        return newest


# ---- table schemas (DESIGN.md §3) ----------------------------------------------------------
def features_table(item_ids, embeddings, modality, uris=None, content_hashes=None) -> pa.Table:
    """item_id, modality, uri, content_hash, embedding (fixed_size_list<float32, D>)."""
    import numpy as np

    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = emb.shape
    modality = [modality] * n if isinstance(modality, str) else list(modality)
    return pa.table({
        "item_id": pa.array([str(i) for i in item_ids], pa.string()),
        "modality": pa.array(modality, pa.string()),
        "uri": pa.array(list(uris) if uris is not None else [None] * n, pa.string()),
        "content_hash": pa.array(list(content_hashes) if content_hashes is not None else [None] * n, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
    })


def queries_table(item_ids, texts, source: str | list[str]) -> pa.Table:
    """item_id, text, source (human | pseudo): training queries."""
    n = len(texts)
    source = [source] * n if isinstance(source, str) else list(source)
    return pa.table({
        "item_id": pa.array([str(i) for i in item_ids], pa.string()),
        "text": pa.array(list(texts), pa.string()),
        "source": pa.array(source, pa.string()),
    })


def errors_table(item_ids, uris, stage: str, reasons) -> pa.Table:
    """item_id, uri, stage, reason: inputs a job could not process (the job goes on)."""
    n = len(reasons)
    return pa.table({
        "item_id": pa.array([None if i is None else str(i) for i in item_ids], pa.string()),
        "uri": pa.array(list(uris), pa.string()),
        "stage": pa.array([stage] * n, pa.string()),
        "reason": pa.array(list(reasons), pa.string()),
    })
