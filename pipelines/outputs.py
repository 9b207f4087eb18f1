"""Where a job writes its results, checked before any work: a wrong `--out` costs seconds, not a
cluster start-up and a whole evaluation lost at its last write.

`cart retrieve` writes one Parquet file (local or s3://) and its `<out>.parts/` folder beside it;
`cart evaluate` and `cart demo` write a report folder on the local disk (metrics.json, recall.png,
run.json). Neither may write inside an index store: a store holds only what its jobs commit (an
`--out` of `<store>/manifest.json` would replace the store's pointer with Parquet).
"""
from __future__ import annotations

import os

from cart_core.errors import BadInput


def check_output_file(out: str, inputs: tuple[str, ...] = (), store_url: str | None = None) -> None:
    """Refuse a results file that cannot be written: a folder, an input file, a path inside the
    store, or (local) a place whose nearest existing folder is a file or not writable."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(out)
    if fs.isdir(path):
        raise BadInput(f"{out}: is a folder; give the Parquet file to write")
    for given in inputs:
        if given and fsspec.core.url_to_fs(given)[1] == path:
            raise BadInput(f"{out}: is also an input; write the results elsewhere")
    _not_in_store(out, fs, path, store_url)
    if "file" in fs.protocol:
        _creatable(out, path)


def check_output_folder(out: str, store_url: str | None = None,
                        holds: str = "metrics.json, recall.png and run.json") -> None:
    """Refuse a report folder that cannot be written: not a local path, an existing file, a path
    inside the store, or one whose nearest existing folder is a file or not writable."""
    import fsspec

    if "://" in out and not out.startswith("file://"):
        raise BadInput(f"{out}: the report ({holds}) is written to a local folder; give a local path")
    fs, path = fsspec.core.url_to_fs(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise BadInput(f"{out}: is a file; give the folder to write {holds} in")
    _not_in_store(out, fs, path, store_url)
    _creatable(out, path)


def _not_in_store(out: str, fs, path: str, store_url: str | None) -> None:
    if store_url is None:
        return
    import fsspec

    store_fs, root = fsspec.core.url_to_fs(store_url)
    root = root.rstrip("/")
    if set(fs.protocol) & set(store_fs.protocol) and (path == root or path.startswith(root + "/")):
        raise BadInput(f"{out}: is inside the store {store_url}; write results elsewhere (a store holds only "
                       "what its jobs commit)")


def _creatable(out: str, path: str) -> None:
    """A local path can be made when its nearest existing ancestor is a folder we may write in."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise BadInput(f"{out}: cannot be written: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{out}: cannot be written: no permission to write in {parent}")
