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
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class StoreError(RuntimeError):
    """The store is missing something a job needs; the message says what and which command makes it."""


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

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{where}: not valid JSON ({exc})") from exc
        if data.get("format") != FORMAT_VERSION:
            raise StoreError(f"{where}: unsupported store format {data.get('format')!r}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


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
    def manifest(self) -> Manifest:
        """The committed manifest, or an empty version-0 one for a new store."""
        p = self.path(MANIFEST)
        if not self.fs.exists(p):
            return Manifest()
        return Manifest.from_json(self.fs.cat_file(p).decode(), self.uri(MANIFEST))

    def require(self, manifest: Manifest, what: str, hint: str) -> str | list[str]:
        value = getattr(manifest, what)
        if not value:
            raise StoreError(f"{self.url}: the committed index has no {what} yet; run `{hint}` first")
        return value

    def commit(self, manifest: Manifest, message: str) -> Manifest:
        """Write `manifest` as the next version and make it the committed one, atomically.

        The history copy goes first, then the live manifest is replaced with a single rename
        (local) or a single PUT (object stores, where a PUT is atomic). Readers see the old
        manifest or the new one, never a partial file."""
        current = self.manifest()
        new = replace(manifest, version=current.version + 1, committed_at=time.time(), message=message)
        text = new.to_json().encode()
        self._write_bytes(self.path("manifests", f"v{new.version:06d}.json"), text)
        self._write_bytes(self.path(MANIFEST), text)
        return new

    def versions(self) -> list[Manifest]:
        folder = self.path("manifests")
        if not self.fs.exists(folder):
            return []
        out = []
        for p in sorted(self.fs.ls(folder, detail=False)):
            if p.endswith(".json"):
                out.append(Manifest.from_json(self.fs.cat_file(p).decode(), p))
        return out

    def _write_bytes(self, path: str, data: bytes) -> None:
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if self.is_local:
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    # ---- files -----------------------------------------------------------------------------
    def write_json(self, relpath: str, data: dict) -> None:
        self._write_bytes(self.path(relpath), json.dumps(data, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, relpath: str) -> dict:
        return json.loads(self.fs.cat_file(self.path(relpath)).decode())

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
        dest = self.path(relpath)
        self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
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
