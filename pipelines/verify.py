"""The verification half of the hybrid retriever in the store: fitted by `cart train` beside the
generator, loaded by every job that answers queries (retrieve, evaluate, serve).

`generator/<run>/verify/` holds
  * aligner.safetensors + aligner.json: the query -> item-feature map (cart_core/alignment.py);
  * fusion.json: the chosen signals and their weights, with the held-out report;
  * captions.parquet: item_id, centroid (mean MiniLM vector of the item's training captions),
    content_hash (of the feature the aligner saw: a reindex tells an item updated since);
  * terms.parquet: item_id, term_ids, term_counts (the words of its training captions, hashed,
    for the BM25 signal, cart_core/lexical.py);
  * verify.json: the VerifyConfig it was fitted with;
  * fitted.json: the caption retirements (deletes) already applied when it was fitted.
Item features are not copied: they are the live feature rows of the version being served; with
`verify.neighbor_seeds` > 0 the item neighbour lists are built from them at load. Items
added later by `cart reindex` take their caption centroid, and their calibrated verification
vector (cart_core/added_items.py), from the pending table, so they are verified like any other
item, with no flat index over them.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cart_core.config import CartConfig
from cart_core.identifiers import IdentifierTable
from cart_core.index_version import IndexVersion
from cart_core.store import Store
from pipelines.runtime import log


def item_features(version: IndexVersion, table: IdentifierTable) -> np.ndarray | None:
    """Live feature of each identifier row (zero rows where an item has none); None when the
    version has no live feature. Placed file by file: the rows read are never held twice."""
    from pipelines.stages import column_rows

    out = None
    for part in version.live_feature_parts(["item_id", "embedding"]):
        if part.num_rows == 0:
            continue
        vectors = column_rows(part.column("embedding"))
        if out is None:
            out = np.zeros((len(table.item_ids), vectors.shape[1]), np.float32)
        _scatter(out, table, part.column("item_id"), vectors)
    return out


def retired_since_fit(version: IndexVersion) -> set[str]:
    """Items whose captions a delete retired after the version's verifier was fitted: its centroids
    and words for them describe what was deleted, so an item added again under the same id is
    verified only with what it was given since (its pending row)."""
    store, folder = version.store, f"{version.manifest.generator}/verify"
    now = version.manifest.extra.get("retired_captions") or []
    if not now:
        return set()
    fitted = store.read_json(f"{folder}/fitted.json") if store.exists(f"{folder}/fitted.json") else {}
    later = [f for f in now if f not in set(fitted.get("retired_captions") or [])]
    return set(store.read_table(later, columns=["item_id"]).column("item_id").to_pylist()) if later else set()


def fitted_items(version: IndexVersion) -> set[str]:
    """The items the version's verifier was fitted with that still have the feature it saw (the
    content hash its captions table records; a verifier fitted before it recorded them: every item
    in that table). An item updated since, or indexed without captions then, is not among them."""
    import pyarrow.parquet as pq

    store, path = version.store, f"{version.manifest.generator}/verify/captions.parquet"
    with store.fs.open(store.path(path), "rb") as fh:
        recorded = "content_hash" in pq.read_schema(fh).names
    t = store.read_table(path, columns=["item_id", "content_hash"] if recorded else ["item_id"])
    items = t.column("item_id").to_pylist()
    if not recorded:
        return set(items)
    now = version.live_item_hashes(items)
    return {i for i, h in zip(items, t.column("content_hash").to_pylist()) if i in now and now[i][1] == h}


def _scatter(out: np.ndarray, table: IdentifierTable, item_ids, vectors: np.ndarray) -> None:
    """out[live row of item] = vector, for the items the table holds live (item_ids: a list or an
    Arrow string column)."""
    from cart_core.identifiers import live_row_index

    rows = live_row_index(table, item_ids)
    known = rows >= 0
    if not known.any():
        return
    if not known.all():
        rows, vectors = rows[known], vectors[known]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(rows) != 1) + 1])
    if len(starts) <= max(1, len(rows) // 256):  # long runs in table order (a store's usual case): block copies
        for start, end in zip(starts.tolist(), [*starts[1:].tolist(), len(rows)]):
            out[rows[start]:rows[start] + end - start] = vectors[start:end]
    else:
        out[rows] = vectors


def fit_verifier(store: Store, version: IndexVersion, generator_dir: str, cfg: CartConfig, texts: list[str],
                 rows: np.ndarray, holdout: np.ndarray) -> dict:
    """Aligner on the generator's pairs, fusion on the held-out ones; written to <generator>/verify."""
    from cart_core.generator import Generator
    from cart_core.hybrid import fit_hybrid

    table, _ = version.ids()
    with store.local_dir(f"{generator_dir}/model") as folder:
        generator = Generator.load(folder)
    if generator.text_encoder is None:
        log("train", "vector-query generator: no caption side to verify with; hybrid retrieval skipped")
        return {}
    if not holdout.any():
        log("train", "verify.holdout left no training caption to fit the fusion on: generative ranking only")
        return {}
    vectors = generator.text_encoder.sentence_embeddings(texts)
    features = item_features(version, table)
    retriever = fit_hybrid(generator, table, texts, rows, vectors, holdout, features, cfg.verify,
                           cfg.eval.beam_size, cfg.eval.batch_size, progress=True)
    aligner, fusion, captions = retriever.aligner, retriever.fusion, retriever.items.captions.astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="cart-verify-") as tmp:
        tmp = Path(tmp)
        if aligner is not None:
            aligner.save(tmp)
        if retriever.items.metric is not None:
            retriever.items.metric.save(tmp)
        if retriever.items.predictor is not None:
            retriever.items.predictor.save(tmp)
        fusion.save(tmp / "fusion.json")
        has = np.abs(captions).sum(1) > 0
        centroids = captions[has]
        fitted = table.item_ids[has].astype(str).tolist()
        hashes = version.live_item_hashes(fitted)  # which feature of each item the aligner saw
        store.write_table(pa.table({
            "item_id": pa.array(fitted),
            "centroid": pa.FixedSizeListArray.from_arrays(pa.array(centroids.reshape(-1)), vectors.shape[1]),
            "content_hash": pa.array([hashes[i][1] if i in hashes else None for i in fitted], pa.string()),
        }), f"{generator_dir}/verify/captions.parquet")
        if retriever.items.terms is not None:
            store.write_table(terms_table(table.item_ids, retriever.items.terms.items),
                              f"{generator_dir}/verify/terms.parquet")
        (tmp / "verify.json").write_text(json.dumps(dataclasses.asdict(cfg.verify), indent=2))
        # the deletes whose captions were already gone when it was fitted (retired_since_fit)
        (tmp / "fitted.json").write_text(json.dumps(
            {"retired_captions": list(version.manifest.extra.get("retired_captions") or [])}, indent=2))
        store.put_dir(tmp, f"{generator_dir}/verify")
    log("train", f"verification: {', '.join(f'{n} {w:+.2f}' for n, w in zip(fusion.names, fusion.weights))} "
                 f"(held-out R@1 {fusion.report['held_out_R@1']} on {int(holdout.sum())} captions)")
    return fusion.report


def has_verifier(version: IndexVersion) -> bool:
    """Whether the version's generator was fitted with a verifier: its retriever is then generate,
    then verify, and pending items are ranked by it, never by the dense fallback."""
    generator = version.manifest.generator
    return bool(generator) and version.store.exists(f"{generator}/verify/fusion.json")


def copy_verifier(store: Store, source_dir: str, generator_dir: str) -> bool:
    """A fine-tune keeps the verifier it started from (the aligner and fusion do not depend on the
    generator's weights; new items' centroids come from the pending table)."""
    if not store.exists(f"{source_dir}/verify/fusion.json"):
        return False
    with store.local_dir(f"{source_dir}/verify") as folder:
        store.put_dir(folder, f"{generator_dir}/verify")
    return True


# what a job chooses when it loads a version, not when it trains: how many candidates a query
# verifies and where they come from are query cost, traded per job; the item neighbour lists are
# built at load; mode picks the ranking (hybrid, or the beam's own for ablations)
QUERY_TIME_KEYS = ("mode", "candidates", "clusters", "expand_depth", "neighbor_seeds", "neighbors", "neighbor_probe")


def query_time(cfg: CartConfig) -> dict:
    """The verify settings of the job's config that replace the fitted ones at load (QUERY_TIME_KEYS):
    retrieve, evaluate and serve all take them from the config they run with."""
    return {key: getattr(cfg.verify, key) for key in QUERY_TIME_KEYS}


def verify_settings(version: IndexVersion, mode: str | None = None, query: dict | None = None):
    """The VerifyConfig a version's retriever runs with: what its verifier was fitted with
    (verify.json), the `query` settings and `mode` where given; None without a verifier. Settings
    that differ from the fitted ones are logged (the fusion weights were fitted on candidates drawn
    the fitted way)."""
    from cart_core.hybrid import VerifyConfig

    if not has_verifier(version):
        return None
    fitted = version.store.read_json(f"{version.manifest.generator}/verify/verify.json")
    cfg = VerifyConfig(**fitted)
    unknown = set(query or {}) - set(QUERY_TIME_KEYS)
    if unknown:
        raise ValueError(f"not query-time verify settings: {sorted(unknown)}")
    chosen = dict(query or {}, **({"mode": mode} if mode is not None else {}))
    cfg = dataclasses.replace(cfg, **chosen)
    changed = {k: (v, fitted.get(k)) for k, v in chosen.items() if k in fitted and fitted[k] != v}
    if changed:
        log("retrieve", "verify settings of this job, not the fitted ones: "
                        + ", ".join(f"{k} {v} (fitted with {was})" for k, (v, was) in sorted(changed.items())))
    return cfg


def load_verifier_files(version: IndexVersion) -> tuple:
    """(fusion, aligner, caption metric, caption predictor) of a version's verifier, the last three
    None where it has none; files that exist but do not load are a StoreError naming the folder."""
    from cart_core.alignment import QueryAligner
    from cart_core.caption_metric import CaptionMetric
    from cart_core.caption_predictor import CaptionPredictor
    from cart_core.fusion import Fusion
    from cart_core.store import StoreError, unloadable

    store, folder = version.store, f"{version.manifest.generator}/verify"
    try:
        with store.local_dir(folder) as local:
            return (Fusion.load(local / "fusion.json"),
                    QueryAligner.load(local) if (local / "aligner.json").exists() else None,
                    CaptionMetric.load(local) if CaptionMetric.exists(local) else None,
                    CaptionPredictor.load(local) if CaptionPredictor.exists(local) else None)
    except (StoreError, MemoryError):
        raise
    except Exception as exc:  # reading files only: a truncated or foreign file
        raise unloadable(store, folder, "the verifier", exc) from exc


def load_verified(version: IndexVersion, generator, table: IdentifierTable, device: str = "cpu",
                  mode: str | None = None, query: dict | None = None):
    """The VerifiedRetriever of a version whose generator has a verifier, else None. mode and the
    `query_time` settings, where given, replace what the verifier was fitted with (verify_settings)."""
    from cart_core.hybrid import VerifiedRetriever
    from cart_core.verify import ItemVectors
    from pipelines.stages import column_rows

    store, manifest = version.store, version.manifest
    folder = f"{manifest.generator}/verify"
    cfg = verify_settings(version, mode, query)
    if cfg is None:
        return None
    fusion, aligner, metric, predictor = load_verifier_files(version)
    if cfg.mode != "hybrid":
        return VerifiedRetriever(generator, table, ItemVectors(None, None), None, fusion, cfg, device)
    cap = store.read_table(f"{folder}/captions.parquet")
    stale = retired_since_fit(version)
    if stale:
        cap = cap.filter(pc.invert(pc.is_in(cap.column("item_id"), value_set=pa.array(sorted(stale), pa.string()))))
    # every fitted item may have been deleted since: the width then comes from the schema
    vectors = column_rows(cap.column("centroid"), width=cap.schema.field("centroid").type.list_size)
    captions = np.zeros((len(table.item_ids), vectors.shape[1]), np.float32)
    _scatter(captions, table, cap.column("item_id"), vectors)
    pending = version.pending()
    if pending is not None and pending.num_rows:
        pvec = column_rows(pending.column("vector"))
        has = np.abs(pvec).sum(1) > 0  # pending items added without captions keep no centroid
        _scatter(captions, table, [i for i, h in zip(pending.column("item_id").to_pylist(), has) if h], pvec[has])
    features = item_features(version, table) if aligner is not None or predictor is not None else None
    if features is not None and pending is not None and "feature" in pending.column_names:
        pfeat = column_rows(pending.column("feature"))
        has = np.abs(pfeat).sum(1) > 0  # zero: added without captions, or before the verifier existed
        _scatter(features, table, [i for i, h in zip(pending.column("item_id").to_pylist(), has) if h], pfeat[has])
    items = ItemVectors.build(captions, features, item_terms(store, folder, table, pending, stale), metric, predictor)
    return VerifiedRetriever(generator, table, items, aligner, fusion, cfg, device, neighbors=_neighbors(items, table, cfg))


def terms_table(item_ids: np.ndarray, terms) -> pa.Table:
    """The rows of an ItemTerms that have words, as Parquet list columns (no Python lists: 1M
    items' words go straight from the CSR arrays)."""
    sizes = np.diff(terms.indptr)
    rows = np.flatnonzero(sizes > 0)
    offsets = pa.array(np.concatenate([[0], np.cumsum(sizes[rows])]).astype(np.int64))  # rows without words add none
    return pa.table({"item_id": pa.array(np.asarray(item_ids)[rows].astype(str).tolist()),
                     "term_ids": pa.LargeListArray.from_arrays(offsets, pa.array(terms.terms, pa.int64())),
                     "term_counts": pa.LargeListArray.from_arrays(offsets, pa.array(terms.counts, pa.int32()))})


def item_terms(store: Store, folder: str, table: IdentifierTable, pending: pa.Table | None,
               stale: set[str] = frozenset()):
    """The BM25 index of every live item's caption words: the verifier's trained items (but the
    `stale` ones, retired_since_fit), then the items reindexes added (their pending rows win);
    None for a verifier fitted without the signal."""
    from cart_core.identifiers import live_rows
    from cart_core.lexical import ItemTerms, TermIndex

    if not store.exists(f"{folder}/terms.parquet"):
        return None
    sources = [(store.read_table(f"{folder}/terms.parquet"), stale)]
    if pending is not None and "term_ids" in pending.column_names:
        sources.append((pending, frozenset()))
    rows, starts, lengths, flat_terms, flat_counts, base = [], [], [], [], [], 0
    for source, skip in sources:
        ids = [str(i) for i in source.column("item_id").to_pylist()]
        row_of = live_rows(table, ids)
        term_ids, term_counts = (source.column(c).combine_chunks() for c in ("term_ids", "term_counts"))
        offsets = term_ids.offsets.to_numpy().astype(np.int64)
        if not np.array_equal(offsets, term_counts.offsets.to_numpy()):
            raise ValueError(f"{folder}: term_ids and term_counts of different lengths in a row")
        rows.append(np.array([-1 if i in skip else row_of.get(i, -1) for i in ids], np.int64))
        starts.append(offsets[:-1] + base)
        lengths.append(np.diff(offsets))
        flat_terms.append(term_ids.values.to_numpy())
        flat_counts.append(term_counts.values.to_numpy())
        base += len(flat_terms[-1])
    return TermIndex(ItemTerms.from_segments(len(table.item_ids), *(np.concatenate(x) for x in (
        rows, starts, lengths, flat_terms, flat_counts))), keep_items=False)


def _neighbors(items, table: IdentifierTable, cfg) -> np.ndarray | None:
    """Neighbour lists (cart_core/neighbors.py) when the verifier follows them (verify.neighbor_seeds
    > 0), built from the version's own vectors at load, so they always match what it serves."""
    from cart_core.hybrid import item_neighbors

    if cfg.neighbor_seeds <= 0:
        return None
    t0 = time.perf_counter()
    neighbors = item_neighbors(items, table, cfg, progress=True)
    if neighbors is None:
        log("retrieve", "verify.neighbor_seeds is set but the version has no item vectors: no neighbour lists")
    else:
        log("retrieve", f"neighbour lists: {neighbors.shape[1]} per item for {len(neighbors)} items in "
                        f"{time.perf_counter() - t0:.1f} s")
    return neighbors


def added_features(version: IndexVersion, features: np.ndarray, caption_vectors: np.ndarray,
                   caption_rows: np.ndarray) -> tuple[np.ndarray | None, dict]:
    """Calibrated verification vectors for items a reindex adds (cart_core/added_items.py), from the
    version's aligner: (vectors [n, Df] or None when the version has no aligner or the items no
    captions, what was fitted)."""
    from cart_core.added_items import blend_added_features
    from cart_core.alignment import QueryAligner

    store, manifest = version.store, version.manifest
    folder = f"{manifest.generator}/verify" if manifest.generator else None
    if folder is None or len(caption_rows) == 0 or not store.exists(f"{folder}/aligner.json"):
        return None, {}
    target = store.read_json(f"{folder}/fusion.json").get("report", {}).get("held_out_feature_cos")
    if target is None:
        log("reindex", "the verifier predates added-item calibration: added items are verified by their raw "
                       "feature until the next `cart train`")
        return None, {}
    with store.local_dir(folder) as local:
        aligner = QueryAligner.load(local)
    vectors, alpha = blend_added_features(aligner, features, caption_vectors, caption_rows, float(target))
    fitted_on = int((np.bincount(caption_rows) >= 2).sum())  # leave-one-out needs a second caption
    log("reindex", f"added items' verification vectors: feature weight {alpha:.3f} (target cosine {target:.3f}, "
                   f"fitted on {fitted_on} items with 2+ captions"
                   + ("; none: raw features kept)" if fitted_on == 0 else ")"))
    return vectors, {"alpha": round(alpha, 4), "target_cos": round(float(target), 4),
                     "captioned_items": int(len(np.unique(caption_rows))), "fitted_on_items": fitted_on}
