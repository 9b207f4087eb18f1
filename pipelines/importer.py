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
import pyarrow.compute as pc

from cart_core.corpus import CorpusError, load_corpus_files
from cart_core.errors import BadInput
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
    is_holdout = held_out_rows(corpus, captions, holdout_caption_index)  # before anything is written
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
    owners = corpus.item_ids[corpus.caption_item] if len(caption_rows) else np.zeros(0, object)
    texts = corpus.caption_text
    train = version.new_captions([str(o) for o in owners[~is_holdout]], [texts[i] for i in caption_rows[~is_holdout]])
    train, leaked = not_held_out(version, *train)
    if leaked:  # e.g. the same files imported again without --holdout-caption-index
        log("import", f"{leaked} caption(s) are held-out queries of their item already: not made training queries "
                      "(a query the generator trained on measures nothing)")
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
    trained = set(zip(*train)) | _training_pairs_of(version, {str(owners[eval_rows[j]]) for j in fresh})
    also_trained = sum((str(owners[eval_rows[j]]), texts[eval_rows[j]]) in trained for j in fresh)
    if also_trained:  # kept: the evaluation set is the user's; its figures should say so
        log("import", f"{also_trained} held-out caption(s) are also a training caption of their item (the same "
                      "text): `cart evaluate` answers those queries from training data")
    summary.counts.update(captions=len(texts), training_queries=len(train[0]), eval_queries=len(fresh),
                          captions_held_out_already=leaked, held_out_also_training=int(also_trained),
                          captions_already_present=len(texts) - len(train[0]) - len(fresh) - leaked)
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


def held_out_rows(corpus, captions: str | None, index: int | None) -> np.ndarray:
    """The caption rows `--holdout-caption-index` keeps out of training. An index that no caption
    has would hold nothing out, silently: refused, like one given without captions."""
    if index is None:
        return np.zeros(len(corpus.caption_text), dtype=bool)
    if captions is None:
        raise BadInput(f"--holdout-caption-index {index} needs --captions: there is nothing to hold out")
    rows = corpus.caption_index == index
    if not rows.any():
        found = sorted(set(corpus.caption_index.tolist()))
        raise BadInput(f"{captions}: no caption has caption_index {index} (the file has "
                       f"{', '.join(map(str, found[:10]))}{' …' if len(found) > 10 else ''}); nothing would be held out")
    # a held-out caption's query id is <item>#<index>: two of one item would share it (`cart evaluate`
    # then refuses the store's own table). Rows are the file's: the import drops no caption row.
    held = np.flatnonzero(rows)
    first: dict[int, int] = {}
    for r in held.tolist():
        item = int(corpus.caption_item[r])
        if item in first:
            raise CorpusError(captions, r, f"item_id {str(corpus.item_ids[item])[:60]!r} has caption_index {index} "
                                           f"twice (first at row {first[item]}); the held-out query id would repeat")
        first[item] = r
    return rows


def not_held_out(version: IndexVersion, item_ids: list[str], texts: list[str]) -> tuple[tuple[list[str], list[str]], int]:
    """The (item, text) training captions that are not an evaluation query of that item already,
    and how many were."""
    if not version.manifest.eval_queries or not item_ids:
        return (item_ids, texts), 0
    held = version.eval_queries(with_retired=True)
    held = set(zip(held.column("item_id").to_pylist(), held.column("text").to_pylist()))
    keep = [(i, t) for i, t in zip(item_ids, texts) if (i, t) not in held]
    return ([i for i, _ in keep], [t for _, t in keep]), len(item_ids) - len(keep)


def _training_pairs_of(version: IndexVersion, items: set[str]) -> set[tuple[str, str]]:
    """The (item, text) training queries the store holds for `items`."""
    if not version.manifest.queries or not items:
        return set()
    q = version.queries(["item_id", "text"])
    q = q.filter(pc.is_in(q.column("item_id"), value_set=pa.array(sorted(items), pa.string())))
    return set(zip(q.column("item_id").to_pylist(), q.column("text").to_pylist()))
