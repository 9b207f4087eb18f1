"""Where a job writes its results, checked before any work: a wrong `--out` costs seconds, not a
cluster start-up and a whole evaluation lost at its last write.

`cart retrieve` writes one Parquet file (local or s3://) and its `<out>.parts/` folder beside it,
`cart scan` one Parquet file;
`cart evaluate` and `cart demo` write a report folder on the local disk (metrics.json, recall.png,
run.json). Neither may write inside an index store: a store holds only what its jobs commit (an
`--out` of `<store>/manifest.json` would replace the store's pointer with Parquet).

Results files are written whole (a temp beside them, renamed when complete, removed on failure);
a SIGKILLed writer's temp, named with its pid, is removed by the next run writing the same file.
Folders are listed, never globbed: an `--out` holding `[`, `*` or `?` names only itself.
"""
from __future__ import annotations

import fnmatch
import glob
import os
import posixpath
import uuid
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from cart_core.errors import BadInput
from pipelines.runtime import log


def check_output_file(out: str, inputs: tuple[str, ...] = (), store_url: str | None = None) -> None:
    """Refuse a results file that cannot be written: a folder, an input file, a path inside the
    store, or (local) a place whose nearest existing folder is a file or not writable."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(out)
    if fs.isdir(path):
        raise BadInput(f"{out}: is a folder; give the Parquet file to write")
    for given in inputs:
        if given and _same_place(*fsspec.core.url_to_fs(given)) == _same_place(fs, path):
            raise BadInput(f"{out}: is also an input; write the results elsewhere")
    _not_in_store(out, fs, path, store_url)
    if "file" in fs.protocol:
        _creatable(out, path)


def check_output_folder(out: str, store_url: str | None = None,
                        holds: str = "metrics.json, recall.png and run.json") -> str:
    """The local folder to write a report in (`file://` taken off), or BadInput when it cannot be
    written: not a local path, an existing file, a path inside the store, or one whose nearest
    existing folder is a file or not writable."""
    import fsspec

    if "://" in out and not out.startswith("file://"):
        raise BadInput(f"{out}: the report ({holds}) is written to a local folder; give a local path")
    fs, path = fsspec.core.url_to_fs(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise BadInput(f"{out}: is a file; give the folder to write {holds} in")
    _not_in_store(out, fs, path, store_url)
    _creatable(out, path)
    return path


def _not_in_store(out: str, fs, path: str, store_url: str | None) -> None:
    if store_url is None:
        return
    import fsspec

    store_fs, root = fsspec.core.url_to_fs(store_url)
    path, root = _same_place(fs, path), _same_place(store_fs, root).rstrip("/")
    if set(fs.protocol) & set(store_fs.protocol) and (path == root or path.startswith(root + "/")):
        raise BadInput(f"{out}: is inside the store {store_url}; write results elsewhere (a store holds only "
                       "what its jobs commit)")


def _same_place(fs, path: str) -> str:
    """A path as the file system resolves it: `..` and symbolic links followed locally, `..`
    folded elsewhere, so `store/../report` is beside the store and `x/../store/m` inside it."""
    return os.path.realpath(path) if "file" in fs.protocol else posixpath.normpath(path)


def _creatable(out: str, path: str) -> None:
    """A local path can be made (or written in, when it is an existing folder) when it, or else its
    nearest existing ancestor, is a folder we may write in."""
    path = os.path.abspath(path)
    parent = path if os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise BadInput(f"{out}: cannot be written: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{out}: cannot be written: no permission to write in {parent}")


# ---- writing: whole files only (temp + rename); a killed writer's temp removed by the next ----

def temp_name(path: str) -> str:
    """A sibling temp file carrying this process's id, so a rerun can tell a dead job's leftover."""
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def listed(fs, folder: str) -> list[str]:
    """The paths in `folder` (none when it does not exist), read afresh: listed, never globbed, so
    an --out whose name holds glob characters (`results[k=5].parquet`) names only itself."""
    fs.invalidate_cache(folder)  # s3fs caches listings: files written since must show
    try:
        return fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []


def remove_dead_temps(fs, path: str, name_pattern: str | None = None) -> list[str]:
    """Temp files of `path` (or, with `name_pattern`, of the files of its folder whose names match
    that fnmatch pattern) left by a killed job on this machine (their process is gone)."""
    folder, name = path.rsplit("/", 1)
    pattern = f"{name_pattern or glob.escape(name)}.tmp-*"
    removed = []
    for name in listed(fs, folder):
        if not fnmatch.fnmatchcase(name.rsplit("/", 1)[-1], pattern):
            continue
        pid = name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            fs.rm(name)
            removed.append(name)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_tables(tables: Iterable[pa.Table], out: str, schema: pa.Schema, job: str = "retrieve") -> int:
    """Stream tables of `schema` into one Parquet file: written to a temp beside it, renamed when
    whole, and the temp removed when the job fails (SIGTERM and Ctrl-C included: the CLI raises on
    both)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(out)
    if "file" in fs.protocol:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for name in remove_dead_temps(fs, path):
        log(job, f"removed {name}, left by a killed run")
    target, rows = temp_name(path), 0
    try:
        with fs.open(target, "wb") as f, pq.ParquetWriter(f, schema) as writer:
            for batch in tables:
                writer.write_table(batch.select(schema.names).cast(schema))
                rows += batch.num_rows
        fs.mv(target, path)
    except BaseException:
        if fs.exists(target):
            fs.rm(target)
        raise
    return rows
