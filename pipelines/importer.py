"""`cart import`: bring your own features (+ captions) into the store, validated.

Items and captions in the shape of `../shared/data/*` (items.parquet: item_id, embedding
[, modality]; captions.parquet: item_id, caption [, caption_index]). Captions become training
queries (`source = human`); with `--holdout-caption-index I` the captions numbered I are held
out as an evaluation query table instead. Importing the same items again is a no-op.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pyarrow as pa

from cart_core.corpus import CorpusError, load_corpus_files
from cart_core.index_version import IndexVersion
from cart_core.store import Store, StoreError, features_table, queries_table
from pipelines.inputs import embedding_hashes, local_copy, warn_readded
from pipelines.parts import write_parts
from pipelines.runtime import JobSummary, log

def run_import(store: Store, items: str, captions: str | None = None, *,
               holdout_caption_index: int | None = None) -> dict:
    """Items new to the live index are added; an item already live with the same features is a
    counted no-op and with other features an error pointing at `cart reindex --update`. Captions
    are added for new and existing items alike, each (item, text) once, so a rerun commits nothing."""
    summary = JobSummary("import", store.url)
    t0 = time.perf_counter()
    with local_copy(items) as items_path, local_copy(captions) as captions_path:
        corpus = load_corpus_files(items_path, captions_path)
    summary.time("validate_s", t0)
    version = IndexVersion.current(store)
    manifest = version.manifest
    if manifest.dim is not None and manifest.dim != corpus.dim:
        raise StoreError(f"{items}: embeddings have dimension {corpus.dim}, the store holds {manifest.dim}")
    hashes = embedding_hashes(corpus.embeddings)
    known = version.live_item_hashes([str(i) for i in corpus.item_ids])
    changed = [i for i, (item, h) in enumerate(zip(corpus.item_ids, hashes)) if item in known and known[item][1] != h]
    if changed:
        r = changed[0]
        raise CorpusError(items, r, f"item_id {corpus.item_ids[r]!r} is already in the store with other "
                                    "features; use `cart reindex --update` to replace it")
    new_rows = np.array([i for i, item in enumerate(corpus.item_ids) if item not in known], dtype=np.int64)
    summary.counts.update(items=len(corpus), new_items=int(len(new_rows)), already_present=len(corpus) - len(new_rows))
    warn_readded(version, [str(corpus.item_ids[r]) for r in new_rows], items, summary.counts, "import")
    run = summary.run
    t0 = time.perf_counter()
    update = {}
    if len(new_rows):
        feats = features_table(corpus.item_ids[new_rows], corpus.embeddings[new_rows], corpus.modality[new_rows],
                               uris=[str(items)] * len(new_rows), content_hashes=[hashes[i] for i in new_rows])
        write_parts(store, feats, f"features/{run}")
        update["features"] = manifest.features + [f"features/{run}"]
    caption_rows = np.arange(len(corpus.caption_text))
    is_holdout = (corpus.caption_index == holdout_caption_index) if holdout_caption_index is not None \
        else np.zeros(len(caption_rows), dtype=bool)
    owners = corpus.item_ids[corpus.caption_item] if len(caption_rows) else np.zeros(0, object)
    texts = corpus.caption_text
    train = version.new_captions([str(o) for o in owners[~is_holdout]], [texts[i] for i in caption_rows[~is_holdout]])
    if train[0]:
        write_parts(store, queries_table(train[0], train[1], "human"), f"queries/{run}")
        update["queries"] = manifest.queries + [f"queries/{run}"]
    eval_rows = caption_rows[is_holdout]
    qid = [f"{owners[i]}#{corpus.caption_index[i]}" for i in eval_rows]
    known_qid = set(version.eval_queries().column("query_id").to_pylist()) if manifest.eval_queries else set()
    fresh = [j for j, q in enumerate(qid) if q not in known_qid]
    if fresh:
        ev = pa.table({"query_id": [qid[j] for j in fresh], "text": [texts[eval_rows[j]] for j in fresh],
                       "item_id": [str(owners[eval_rows[j]]) for j in fresh]})
        store.write_table(ev, f"eval/{run}/queries.parquet")
        update["eval_queries"] = manifest.eval_queries + [f"eval/{run}"]
    summary.counts.update(captions=len(texts), training_queries=len(train[0]), eval_queries=len(fresh),
                          captions_already_present=len(texts) - len(train[0]) - len(fresh))
    summary.time("write_s", t0)
    if update:
        update["dim"] = corpus.dim
        new = store.commit(replace(manifest, **update), f"import {run}: {len(new_rows)} items", base=manifest,
                           reads={"features", "extra.tombstones", "extra.retired_captions", "queries", "eval_queries",
                                  "dim"})
        summary.extra["version"] = new.version
        log("import", f"committed version {new.version}: {len(new_rows)} new items, "
                      f"{len(train[0])} training queries, {len(fresh)} held-out queries "
                      f"({summary.counts['already_present']} items and {summary.counts['captions_already_present']} "
                      "captions already present)")
    else:
        log("import", "nothing new: every item and caption is already in the store")
        summary.extra["version"] = manifest.version
    return summary.write(store)
