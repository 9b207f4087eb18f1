"""`cart import`: bring your own features (+ captions) into the store, validated.

Items and captions in the shape of `../shared/data/*` (items.parquet: item_id, embedding
[, modality]; captions.parquet: item_id, caption [, caption_index]). Captions become training
queries (`source = human`); with `--holdout-caption-index I` the captions numbered I are held
out as an evaluation query table instead. Importing the same items again is a no-op.
"""
from __future__ import annotations

import hashlib
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa

from cart_core.corpus import CorpusError, load_corpus_files
from cart_core.store import Manifest, Store, StoreError, features_table, queries_table
from pipelines.runtime import JobSummary, log

PART_ROWS = 200_000  # rows per Parquet part: parallel reads without tiny files


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


def committed_hashes(store: Store, manifest: Manifest) -> dict[str, str]:
    if not manifest.features:
        return {}
    t = store.read_table(manifest.features, columns=["item_id", "content_hash"])
    return dict(zip(t.column("item_id").to_pylist(), t.column("content_hash").to_pylist()))


def write_parts(store: Store, table: pa.Table, folder: str) -> None:
    for i, start in enumerate(range(0, max(table.num_rows, 1), PART_ROWS)):
        store.write_table(table.slice(start, PART_ROWS), f"{folder}/part-{i:05d}.parquet")


def run_import(store: Store, items: str, captions: str | None = None, *,
               holdout_caption_index: int | None = None) -> dict:
    summary = JobSummary("import", store.url)
    t0 = time.perf_counter()
    with local_copy(items) as items_path, local_copy(captions) as captions_path:
        corpus = load_corpus_files(items_path, captions_path)
    summary.time("validate_s", t0)
    manifest = store.manifest()
    if manifest.dim is not None and manifest.dim != corpus.dim:
        raise StoreError(f"{items}: embeddings have dimension {corpus.dim}, the store holds {manifest.dim}")
    hashes = embedding_hashes(corpus.embeddings)
    known = committed_hashes(store, manifest)
    changed = [i for i, (item, h) in enumerate(zip(corpus.item_ids, hashes)) if item in known and known[item] != h]
    if changed:
        r = changed[0]
        raise CorpusError(items, r, f"item_id {corpus.item_ids[r]!r} is already in the store with other "
                                    "features; use `cart reindex --update` to replace it")
    new_rows = np.array([i for i, item in enumerate(corpus.item_ids) if item not in known], dtype=np.int64)
    summary.counts.update(items=len(corpus), new_items=int(len(new_rows)), already_present=len(corpus) - len(new_rows),
                          captions=len(corpus.caption_text))
    run = summary.run
    t0 = time.perf_counter()
    update = {}
    if len(new_rows):
        feats = features_table(corpus.item_ids[new_rows], corpus.embeddings[new_rows], corpus.modality[new_rows],
                               uris=[str(items)] * len(new_rows), content_hashes=[hashes[i] for i in new_rows])
        write_parts(store, feats, f"features/{run}")
        update["features"] = manifest.features + [f"features/{run}"]
    new_item = np.zeros(len(corpus), dtype=bool)
    new_item[new_rows] = True
    caption_rows = np.flatnonzero(new_item[corpus.caption_item]) if len(corpus.caption_text) else np.zeros(0, int)
    is_holdout = (corpus.caption_index[caption_rows] == holdout_caption_index) if holdout_caption_index is not None \
        else np.zeros(len(caption_rows), dtype=bool)
    train_rows, eval_rows = caption_rows[~is_holdout], caption_rows[is_holdout]
    texts = corpus.caption_text
    if len(train_rows):
        q = queries_table(corpus.item_ids[corpus.caption_item[train_rows]], [texts[i] for i in train_rows], "human")
        write_parts(store, q, f"queries/{run}")
        update["queries"] = manifest.queries + [f"queries/{run}"]
    if len(eval_rows):
        owners = corpus.item_ids[corpus.caption_item[eval_rows]]
        qid = [f"{o}#{c}" for o, c in zip(owners, corpus.caption_index[eval_rows])]
        ev = pa.table({"query_id": qid, "text": [texts[i] for i in eval_rows], "item_id": [str(o) for o in owners]})
        store.write_table(ev, f"eval/{run}/queries.parquet")
        update["eval_queries"] = manifest.eval_queries + [f"eval/{run}"]
    summary.counts.update(training_queries=int(len(train_rows)), eval_queries=int(len(eval_rows)))
    summary.time("write_s", t0)
    if update:
        update["dim"] = corpus.dim
        new = store.commit(_with(manifest, update), f"import {run}: {len(new_rows)} items")
        summary.extra["version"] = new.version
        log("import", f"committed version {new.version}: {len(new_rows)} new items, "
                      f"{len(train_rows)} training queries, {len(eval_rows)} held-out queries")
    else:
        log("import", "nothing new: every item is already in the store")
        summary.extra["version"] = manifest.version
    return summary.write(store)


def _with(manifest: Manifest, update: dict) -> Manifest:
    from dataclasses import replace

    return replace(manifest, **update)
