"""The user's input files, local or remote (s3://...): a local path to read them through, and
the content hash of imported feature vectors (what import and reindex compare)."""
from __future__ import annotations

import hashlib
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import fsspec
import numpy as np

from cart_core.corpus import CorpusError
from cart_core.index_version import IndexVersion
from pipelines.runtime import log


@contextmanager
def local_copy(uri: str | None) -> Iterator[Path | None]:
    """A local path for a local or remote (s3://…) input file."""
    if uri is None or "://" not in uri:
        yield None if uri is None else Path(uri)
        return
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise CorpusError(uri, None, "file not found")
    with tempfile.TemporaryDirectory(prefix="cart-import-") as tmp:
        dest = Path(tmp) / Path(path).name
        fs.get_file(path, str(dest))
        yield dest


def embedding_hashes(embeddings: np.ndarray) -> list[str]:
    """content_hash for imported features: sha256 of the float32 vector bytes."""
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    return [hashlib.sha256(row.tobytes()).hexdigest()[:32] for row in emb]


def warn_readded(version: IndexVersion, new_items: list[str], source: str, counts: dict, verb: str) -> None:
    """Count and say which new items a delete had retired: rerunning the import that first added
    them brings back what `cart reindex --delete` took down (the captions it retired stay retired)."""
    again = version.deleted_items(new_items)
    counts["readded_after_delete"] = len(again)
    if again:
        log(verb, f"warning: {source}: {len(again)} item(s) deleted earlier "
                  f"({', '.join(map(repr, again[:3]))}{', ...' if len(again) > 3 else ''}) are in the input "
                  "and are added back; leave them out of it to keep them deleted")
