"""`cart reindex`: add, update and delete items in a live index without rebuilding it.

Up to two commits, each a complete, servable version:

1. **Identifiers** (seconds): the codebooks stay frozen; new items get `(k, v1..vM)` from the
   fitted K-Means and RQ-VAE and a counter after every row already under their prefix, so no
   existing identifier changes and no deleted one is reused. The id table is written as a delta
   (appended rows + tombstoned rows; docs/design.md §7). Deleted items are tombstoned (the
   decoding tables mask them) and their feature rows are listed in `tombstones/`. The generator is
   unchanged and was never trained on the added ("pending") items; they are findable at once:
   on a verified index (generate, then verify) through their prefix and the verifier's scores;
   on an index trained without a verifier through a dense fallback over their caption embeddings
   with a calibrated acceptance threshold (cart_core/fallback.py), calibrated only there.
2. **Generator** (`--finetune` / `reindex.finetune`; a short Ray Train fine-tune): the pending
   items' queries plus a replayed sample of old ones, optionally distilled from the committed
   generator. The fallback stays (`reindex.keep_fallback`) until a full `cart train`.

Each commit is a manifest swap; a run killed anywhere leaves the previous version intact, and
rerunning the same command finishes the work (everything already applied is skipped, and a
version still waiting for its fine-tune gets it). Every run reports drift: how far the new items
sit from the codebooks compared with the fitted state, and whether a refit is due.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cart_core.config import CartConfig, config_from_dict
from cart_core.corpus import Corpus, CorpusError, load_corpus_files
from cart_core.errors import ConfigError, first_line
from cart_core.fallback import acceptance_threshold
from cart_core.identifiers import IdentifierTable, extend_identifiers, live_rows
from cart_core.indexing import encode, identifier_inputs, load_codebooks
from cart_core.kmeans import cluster_imbalance
from cart_core.lexical import ItemTerms
from cart_core.index_version import IndexVersion, pending_runs, save_ids
from cart_core.store import Manifest, Store, StoreError, features_table, queries_table
from pipelines.inputs import embedding_hashes, local_copy
from pipelines.parts import write_parts
from pipelines.runtime import JobSummary, crash_point, init_ray, log
from pipelines.verify import added_features, fitted_items, has_verifier

CRASH_POINTS = ("after_features", "after_ids", "before_commit", "after_training")


def read_parquet(path: str, local) -> pa.Table:
    """A user's Parquet file; pyarrow's reason comes back with the file it was about."""
    try:
        return pq.read_table(local)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(path, None, f"cannot read parquet file ({first_line(exc)})") from None


def read_delete_list(path: str) -> list[str]:
    """item_ids to delete: a text file (one per line) or a Parquet table with an item_id column."""
    with local_copy(path) as local:
        if not local.is_file():
            raise CorpusError(path, None, "file not found")
        if local.suffix == ".parquet":
            table = read_parquet(path, local)
            if "item_id" not in table.column_names:
                raise CorpusError(path, None, "missing required column item_id")
            return [str(i) for i in table.column("item_id").to_pylist() if i is not None]
        return [line.strip() for line in local.read_text().splitlines() if line.strip()]


def read_captions(path: str, known: Callable[[list[str]], set[str]],
                  deleting: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """(item_id, caption) rows, each naming an item of this reindex or a live one of the index
    (`known` returns which of the given ids are) that this reindex does not delete: a caption for
    an item it deletes is refused, as an item both deleted and added is (stored, it would come back
    with the item if the item were ever added again, and a rerun of the command would fail on it)."""
    with local_copy(path) as local:
        if not local.is_file():
            raise CorpusError(path, None, "file not found")
        table = read_parquet(path, local)
    missing = [c for c in ("item_id", "caption") if c not in table.column_names]
    if missing:
        raise CorpusError(path, None, f"missing required column(s) {', '.join(missing)}")
    ids, texts = table.column("item_id").to_pylist(), table.column("caption").to_pylist()
    items = known(sorted({str(i) for i in ids if i is not None}))
    for row, (item, text) in enumerate(zip(ids, texts)):
        if item is not None and str(item) in deleting:
            raise CorpusError(path, row, f"item_id {item!r} is deleted by this reindex (--delete); a deleted "
                                         "item keeps no captions")
        if item is None or str(item) not in items:
            raise CorpusError(path, row, f"unknown item_id {item!r}")
        if text is None or not str(text).strip():
            raise CorpusError(path, row, "caption is empty")
    return [str(i) for i in ids], [str(t) for t in texts]


def text_dim(name: str) -> int:
    """Width of a text encoder's sentence vectors, read from its config (no weights loaded), so a
    reindex without captions writes zero vectors as wide as the ones it sits beside."""
    from transformers import AutoConfig

    from cart_core.text import resolve_model_path

    path = resolve_model_path(name)
    if os.path.exists(path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return int(AutoConfig.from_pretrained(path).hidden_size)


class CaptionEncoders:
    """How a reindex embeds captions, each encoder loaded on first use (a reindex without captions
    loads none): `for_ids` in the space the identifiers' caption half was quantized in (the job's
    `generator.text_encoder`), `for_queries` in the space the served generator scores queries in
    (caption centroids, the aligner's calibration, the fallback's impostors): the same encoder
    unless the generator fine-tuned its top layers (`generator.finetune_layers`), whose weights
    then live in the generator folder. A job configured with another encoder than the index was
    trained with (names compared as resolved: `minilm` is all-MiniLM-L6-v2) is refused where
    captions count (text queries, or identifiers built from captions): its vectors would sit in
    another space, or fail on their width."""

    def __init__(self, version: IndexVersion, cfg: CartConfig, captions_in_ids: bool):
        from cart_core.text import encoder_name

        self.name, self.max_tokens = cfg.generator.text_encoder, cfg.generator.max_query_tokens
        self.store, self.generator = version.store, version.manifest.generator
        trained = self.store.read_json(f"{self.generator}/model/config.json") if self.generator else {}
        text_queries = trained.get("query", "text") == "text"
        other = encoder_name(trained.get("text_encoder", self.name)) != encoder_name(self.name)
        if (text_queries or captions_in_ids) and other:
            raise ConfigError(f"{self.store.uri(self.generator)}: the index was trained with text encoder "
                              f"{trained['text_encoder']!r}, this job's generator.text_encoder is {self.name!r}; "
                              f"run it with --set generator.text_encoder={trained['text_encoder']}")
        self.tuned = text_queries and int(trained.get("finetune_layers", 0)) > 0
        self._loaded: dict = {}
        self.dim = None

    def width(self) -> int:
        if self.dim is None:
            self.dim = text_dim(self.name)
        return self.dim

    def for_ids(self, texts: list[str]) -> np.ndarray:
        from cart_core.text import TextEncoder

        if "base" not in self._loaded:
            self._loaded["base"] = TextEncoder(self.name, self.max_tokens)
        return self._loaded["base"].sentence_embeddings(texts)

    def for_queries(self, texts: list[str]) -> np.ndarray:
        from cart_core.generator import Generator

        if not self.tuned:
            return self.for_ids(texts)
        if "tuned" not in self._loaded:
            with self.store.local_dir(f"{self.generator}/model") as folder:
                self._loaded["tuned"] = Generator.load(folder).text_encoder
        return self._loaded["tuned"].sentence_embeddings(texts)


def caption_vectors(embed: Callable[[list[str]], np.ndarray], dim: Callable[[], int], item_ids: list[str],
                    cap_ids: list[str], cap_texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean embedding of each item's captions [n_items, D], zeros for items without any; the
    vectors of the captions whose item is in item_ids [m, D]; the item row of each [m]). `embed`:
    one of CaptionEncoders' spaces; `dim`: its width, asked only when there is nothing to embed."""
    if not cap_texts:  # nothing to embed
        width = dim()
        return np.zeros((len(item_ids), width), np.float32), np.zeros((0, width), np.float32), np.zeros(0, np.int64)
    index = {item: r for r, item in enumerate(item_ids)}
    pairs = [p for p in dict.fromkeys(zip(cap_ids, cap_texts)) if p[0] in index]  # a caption given twice counts once
    if not pairs:
        return caption_vectors(embed, dim, item_ids, [], [])
    vecs = embed([t for _, t in pairs])
    rows = np.array([index[i] for i, _ in pairs], np.int64)
    out = np.zeros((len(item_ids), vecs.shape[1]), dtype=np.float32)
    np.add.at(out, rows, vecs)
    counts = np.bincount(rows, minlength=len(item_ids))
    return out / np.maximum(counts, 1)[:, None], vecs, rows


def caption_terms(item_ids: list[str], cap_ids: list[str], cap_texts: list[str]) -> ItemTerms:
    """The words of each item's captions for the BM25 signal (cart_core/lexical.py), rows as
    item_ids (empty for items without captions); a caption given twice counts once."""
    index = {item: r for r, item in enumerate(item_ids)}
    kept = [(index[i], t) for i, t in dict.fromkeys(zip(cap_ids, cap_texts)) if i in index]
    return ItemTerms.from_captions(np.array([r for r, _ in kept], np.int64), [t for _, t in kept], len(item_ids))


def drift_report(codes: dict, fitted: dict, coarse_after: np.ndarray, n_clusters: int, factor: float,
                 comparable: np.ndarray | None = None) -> dict:
    """New items vs the fitted state: assignment distance, reconstruction error, imbalance.

    comparable [n] bool: the new items whose identifier inputs are built like the fitted items'
    (None: all). With identifiers from features and captions, an item added without captions has
    an empty caption half, so it sits about twice as far from every centroid whatever the data
    (Flickr8k, 100 items added from features only: 0.81 against 0.40 fitted) and a refit would
    not change that: its distances are reported, not judged."""
    if len(codes["coarse"]) == 0:
        return {"items": 0, "refit_due": False, "reasons": []}
    judged = np.ones(len(codes["coarse"]), bool) if comparable is None else np.asarray(comparable, bool)
    report = {"items": int(len(codes["coarse"])), "items_judged": int(judged.sum()),
              "imbalance_after": cluster_imbalance(coarse_after, n_clusters)["imbalance"],
              "fitted": {k: fitted.get(k) for k in ("mean_assign_sq_distance", "mean_recon_error", "imbalance")}}
    for key, values in (("mean_assign_sq_distance", codes["assign_sq_distance"]),
                        ("mean_recon_error", codes["recon_error"])):
        report[key] = float(values[judged].mean()) if judged.any() else None
        if not judged.all():
            report[key.replace("mean_", "mean_not_judged_")] = float(values[~judged].mean())
    reasons = []
    for key in ("mean_assign_sq_distance", "mean_recon_error"):
        ref = fitted.get(key)
        if ref and report[key] is not None and report[key] > factor * ref:
            reasons.append(f"{key} {report[key]:.4f} > {factor} x fitted {ref:.4f}")
    if fitted.get("imbalance") and report["imbalance_after"] > factor * fitted["imbalance"]:
        reasons.append(f"cluster imbalance {report['imbalance_after']:.2f} > {factor} x fitted {fitted['imbalance']:.2f}")
    report.update(refit_due=bool(reasons), reasons=reasons)
    return report


def _load_items(path: str | None, dim: int | None) -> Corpus | None:
    if path is None:
        return None
    with local_copy(path) as local:
        corpus = load_corpus_files(local)
    if dim is not None and corpus.dim != dim:
        raise CorpusError(path, None, f"embeddings have dimension {corpus.dim}, the index holds {dim}")
    return corpus


def feature_runs(version: IndexVersion, items: list[str]) -> dict[str, list[str]]:
    """item_id -> the feature runs holding an untombstoned row of it, for `items`."""
    rows = version.feature_rows()
    rows = rows.filter(pc.is_in(rows.column("item_id"), value_set=pa.array(sorted(set(items)), pa.string())))
    dead = version.tombstones()
    out: dict[str, list[str]] = {}
    for item, run in zip(rows.column("item_id").to_pylist(), rows.column("run").to_pylist()):
        if (item, run) not in dead and run not in out.get(item, []):
            out.setdefault(item, []).append(run)
    return out


def plan_changes(version: IndexVersion, add: str | None, update: str | None, delete: str | None) -> dict:
    """What this reindex changes, after skipping everything already applied. Presence is decided
    by the live feature rows (an imported item without an identifier yet is present); an item
    gets a new feature row only when its features change."""
    table, _ = version.ids()
    adds, ups = _load_items(add, version.manifest.dim), _load_items(update, version.manifest.dim)
    deletes = read_delete_list(delete) if delete else []
    touched_ids = [str(i) for c in (adds, ups) if c is not None for i in c.item_ids] + deletes
    live_row = live_rows(table, touched_ids)
    owners = version.live_item_hashes(touched_ids)
    plan = {"encode_ids": [], "encode_emb": [], "encode_modality": [], "encode_hash": [], "encode_kind": [],
            "new_feature_row": [], "delete_rows": [], "tombstones": [], "deleted_items": [], "counts": dict.fromkeys(
                ("added", "updated", "deleted", "duplicate_adds", "unchanged_updates", "already_deleted"), 0)}
    counts = plan["counts"]
    touched: dict[str, str] = {}
    for kind, corpus, path in (("add", adds, add), ("update", ups, update)):
        if corpus is None:
            continue
        hashes = embedding_hashes(corpus.embeddings)
        for r, (item, h) in enumerate(zip(corpus.item_ids, hashes)):
            item = str(item)
            if item in touched:
                raise CorpusError(path, r, f"item_id {item!r} is also in the {touched[item]} list")
            touched[item] = kind
            same = owners.get(item, (None, None))[1] == h
            if kind == "add" and item in owners:
                if not same:
                    raise CorpusError(path, r, f"item_id {item!r} is already in the index with other features; "
                                               "use --update")
                if item in live_row:
                    counts["duplicate_adds"] += 1
                    continue
            if kind == "update" and item not in owners:
                raise CorpusError(path, r, f"item_id {item!r} is not in the index; use --add")
            if kind == "update" and same and item in live_row:
                counts["unchanged_updates"] += 1
                continue
            for key, value in (("encode_ids", item), ("encode_emb", corpus.embeddings[r]),
                               ("encode_modality", corpus.modality[r]), ("encode_hash", h),
                               ("encode_kind", kind if item in live_row else "add"), ("new_feature_row", not same)):
                plan[key].append(value)
            if not same and item in owners:
                plan["tombstones"].append((item, owners[item][0]))
    dead_items = {i for i, _ in version.tombstones()} if deletes else set()
    rows_of = feature_runs(version, deletes) if deletes else {}
    seen: set[str] = set()
    for r, item in enumerate(deletes):
        if item in touched:
            raise CorpusError(delete, r, f"item_id {item!r} is both deleted and {touched[item]}ed")
        if item in seen:  # listed twice: deleted once
            counts["repeated_deletes"] = counts.get("repeated_deletes", 0) + 1
            continue
        seen.add(item)
        if item not in live_row and item not in owners:
            if item in dead_items:
                counts["already_deleted"] += 1
            else:  # never added (or deleted and compacted away): said, not mistaken for a done delete
                counts["not_in_index"] = counts.get("not_in_index", 0) + 1
                log("reindex", f"{delete}: row {r}: item_id {item!r} is not in the index; nothing to delete")
            continue
        if item in live_row:
            plan["delete_rows"].append(live_row[item])
        # every untombstoned row, not only the live one: a store written before duplicate rows were
        # refused may hold an older row of the item, which would otherwise become live again
        plan["tombstones"].extend((item, run) for run in rows_of.get(item, ()))
        plan["deleted_items"].append(item)
        counts["deleted"] += 1
    plan["live_row"] = live_row
    plan["items"] = (adds, ups)
    return plan


def apply_identifiers(table: IdentifierTable, plan: dict, prefix: np.ndarray) -> tuple[IdentifierTable, list[str]]:
    """Tombstones + appended rows; returns the new table and the items the generator must learn."""
    live = table.live.copy()
    live[plan["delete_rows"]] = False
    append_ids, append_prefix = [], []
    for item, kind, p in zip(plan["encode_ids"], plan["encode_kind"], prefix):
        if kind == "update":
            row = plan["live_row"][item]
            if np.array_equal(table.codes[row, :-1], p):
                plan["counts"]["updated"] += 1
                continue  # same prefix: the identifier stays, only the features change
            live[row] = False
        plan["counts"]["added" if kind == "add" else "updated"] += 1
        append_ids.append(item)
        append_prefix.append(p)
    table = IdentifierTable(table.item_ids, table.codes, table.vocab_sizes, live)
    if append_ids:
        table = extend_identifiers(table, np.array(append_ids, dtype=object), np.array(append_prefix))
    return table, append_ids


def write_pending(version: IndexVersion, folder: str, run: str, item_ids: list[str], vectors: np.ndarray,
                  table: IdentifierTable, features: np.ndarray | None = None,
                  refreshed: dict[str, np.ndarray | None] | None = None,
                  terms: ItemTerms | None = None) -> tuple[str | None, pa.Table | None]:
    """The pending table: every item added since the last full training (carried over from earlier
    reindexes) that is still live, with the reindex run that added it (`run`: a fine-tune records
    which runs it has taught the generator, extra.pending_trained), its caption centroid (`vector`)
    and, where the version has a verifier, its calibrated verification vector (`feature`,
    cart_core/added_items.py; zeros for rows added before the verifier existed). `refreshed`: items
    whose features this run changed, with their new verification vector or None (zeros: the new
    raw feature is used), so a kept row never verifies with a vector built from old features.
    `terms`: the words of each item's captions (`term_ids`, `term_counts`: the BM25 signal)."""
    ids, vecs, runs = list(item_ids), [v for v in vectors], [run] * len(item_ids)
    words = terms.as_lists(np.arange(len(ids))) if terms is not None else ([[]] * len(ids), [[]] * len(ids))
    words = list(zip(*words)) if ids else []
    feats = [f for f in features] if features is not None else [None] * len(ids)
    old = version.pending()
    if old is not None:
        old_ids = old.column("item_id").to_pylist()
        old_runs = pending_runs(old, version.manifest.extra.get("pending"))
        live = live_rows(table, old_ids)
        replaced = set(ids)
        keep = [i for i, item in enumerate(old_ids) if item not in replaced and item in live]
        old_vecs = np.stack(old.column("vector").to_numpy(zero_copy_only=False)) if old.num_rows else None
        old_feats = np.stack(old.column("feature").to_numpy(zero_copy_only=False)) \
            if old.num_rows and "feature" in old.column_names else None
        ids = [old_ids[i] for i in keep] + ids
        vecs = [old_vecs[i] for i in keep] + vecs
        refreshed = refreshed or {}
        feats = [refreshed[old_ids[i]] if old_ids[i] in refreshed else None if old_feats is None else old_feats[i]
                 for i in keep] + feats
        runs = [old_runs[i] for i in keep] + runs
        old_words = list(zip(old.column("term_ids").to_pylist(), old.column("term_counts").to_pylist())) \
            if "term_ids" in old.column_names else [([], [])] * old.num_rows
        words = [old_words[i] for i in keep] + words
    if not ids:
        return None, None
    stacked = np.asarray(np.stack(vecs), dtype=np.float32)
    columns = {"item_id": ids, "run": runs,
               "vector": pa.FixedSizeListArray.from_arrays(pa.array(stacked.reshape(-1)), stacked.shape[1]),
               "term_ids": pa.array([list(t) for t, _ in words], pa.list_(pa.int64())),
               "term_counts": pa.array([list(c) for _, c in words], pa.list_(pa.int32()))}
    dim = next((len(f) for f in feats if f is not None), None)
    if dim is not None:
        fstack = np.stack([np.zeros(dim, np.float32) if f is None else np.asarray(f, np.float32) for f in feats])
        columns["feature"] = pa.FixedSizeListArray.from_arrays(pa.array(fstack.reshape(-1)), dim)
    pending = pa.table(columns)
    version.store.write_table(pending, f"{folder}/pending.parquet")
    return f"{folder}/pending.parquet", pending


def impostor_queries(store: Store, manifest: Manifest, cfg: CartConfig, exclude: set[str],
                     embed: Callable[[list[str]], np.ndarray] | None = None) -> np.ndarray:
    """Sentence vectors (`embed`, default the job's text encoder) of a seeded sample of training
    captions of items outside `exclude` (the items the fallback serves): what the fallback's
    acceptance threshold must not let through (only their count matters when there are none)."""
    from cart_core.text import TextEncoder

    if not manifest.queries or cfg.reindex.fallback_impostors <= 0:
        return np.zeros((0, 384), np.float32)
    t = IndexVersion(store, manifest).queries(["item_id", "text"])  # no caption a delete retired
    if exclude:
        t = t.filter(pc.invert(pc.is_in(t.column("item_id"), value_set=pa.array(sorted(exclude), pa.string()))))
    if t.num_rows == 0:
        return np.zeros((0, 384), np.float32)
    rows = np.sort(np.random.default_rng(0).choice(t.num_rows, min(t.num_rows, cfg.reindex.fallback_impostors),
                                                   replace=False))
    texts = [str(x) for x in t.column("text").take(pa.array(rows)).to_pylist()]
    if embed is None:
        embed = TextEncoder(cfg.generator.text_encoder, cfg.generator.max_query_tokens).sentence_embeddings
    return embed(texts)


def stored_captions(version: IndexVersion, owners: set[str]) -> tuple[list[str], list[str]]:
    """(item ids, texts) of the training queries already stored for `owners`."""
    if not owners or not version.manifest.queries:
        return [], []
    stored = version.queries(["item_id", "text"])
    stored = stored.filter(pc.is_in(stored.column("item_id"), value_set=pa.array(sorted(owners), pa.string())))
    return [str(i) for i in stored.column("item_id").to_pylist()], [str(t) for t in stored.column("text").to_pylist()]


@dataclass
class PendingRows:
    """Rows for the pending table: item ids, caption centroids [n, D], verification vectors
    [n, Df] or None (zeros: the item's own feature is used), caption words (term lists, counts)."""

    item_ids: list[str]
    vectors: np.ndarray
    features: np.ndarray | None
    terms: tuple[list, list]

    def then(self, more: "PendingRows") -> "PendingRows":
        dim = next((f.shape[1] for f in (self.features, more.features) if f is not None), None)

        def feats(rows: "PendingRows") -> np.ndarray:
            return rows.features if rows.features is not None else np.zeros((len(rows.item_ids), dim), np.float32)

        return PendingRows(self.item_ids + more.item_ids, np.concatenate([self.vectors, more.vectors]),
                           None if dim is None else np.concatenate([feats(self), feats(more)]),
                           (self.terms[0] + more.terms[0], self.terms[1] + more.terms[1]))


def recaptioned_pending(version: IndexVersion, items: list[str], cap_ids: list[str], cap_texts: list[str],
                        encoders: CaptionEncoders, calibrate: bool) -> PendingRows:
    """Pending rows for items already indexed that a reindex gives new captions (a verified index):
    the caption centroid and words over every caption each now has, so verification scores them
    with their captions from this commit on, as it does added items. An item the verifier was
    fitted without captions for (indexed from features only, or added since) also gets a
    calibrated verification vector (cart_core/added_items.py), and so does one added or updated
    since (in the pending table); one it was fitted with keeps its own feature, which the aligner
    was trained on. An item updated since the fit (another feature than the one the verifier
    recorded, pipelines.verify.fitted_items) is calibrated too. Their identifiers do not change.
    Like added items they are pending: a fine-tune teaches the generator their new captions, and one
    with `reindex.keep_fallback: false` retires their rows with the rest of the pending table."""
    vectors, each_vec, each_row = caption_vectors(encoders.for_queries, encoders.width, items, cap_ids, cap_texts)
    terms = caption_terms(items, cap_ids, cap_texts).as_lists(np.arange(len(items)))
    pending = version.pending()  # added or updated since the verifier was fitted: its aligner never saw them
    since = set(pending.column("item_id").to_pylist()) if pending is not None else set()
    trained = fitted_items(version) - since
    fresh = [r for r, item in enumerate(items) if item not in trained]
    features = None
    if calibrate and fresh:
        from pipelines.stages import stack_column

        rows = version.live_features(["item_id", "embedding"])
        rows = rows.filter(pc.is_in(rows.column("item_id"), value_set=pa.array([items[r] for r in fresh], pa.string())))
        by_id = dict(zip(rows.column("item_id").to_pylist(), stack_column(rows.column("embedding").to_numpy(
            zero_copy_only=False)))) if rows.num_rows else {}
        fresh = [r for r in fresh if items[r] in by_id]
        position = {r: j for j, r in enumerate(fresh)}
        keep = np.array([r in position for r in each_row], bool)
        blended, _ = added_features(version, np.stack([by_id[items[r]] for r in fresh]) if fresh else
                                    np.zeros((0, 1), np.float32), each_vec[keep],
                                    np.array([position[r] for r in each_row[keep]], np.int64))
        if blended is not None:
            features = np.zeros((len(items), blended.shape[1]), np.float32)
            features[fresh] = blended
    log("reindex", f"{len(items)} items already indexed were given new captions: verified with them from this "
                   f"commit ({len(fresh) if features is not None else 0} with a calibrated verification vector)")
    return PendingRows(list(items), vectors, features, terms)


def refuse_all_but_deletes(version: IndexVersion, add: str | None, update: str | None, captions: str | None,
                           finetune: bool | None) -> None:
    """While the newest version has no generator (`cart quantize` committed identifiers that `cart
    train` has not learned yet), a takedown cannot wait for the training: a delete commits on it (an
    older version answers, with the deleted items withdrawn, IndexVersion.withdrawn) and the
    training commits over it (IndexVersion `deletes_since`). Adds, updates and captions
    need the generator the identifiers were built for, so they wait."""
    asked = [flag for flag, value in (("--add", add), ("--update", update), ("--captions", captions),
                                      ("--finetune", finetune)) if value]
    if asked:
        m = version.manifest
        raise StoreError(f"{version.store.url}: the newest version {m.version} ({m.message!r}) has no generator "
                         f"trained for its identifiers yet, so {', '.join(asked)} must wait for `cart train`; "
                         "until then `cart reindex` runs --delete only (a takedown is answered at once)")


def run_reindex(store: Store, cfg: CartConfig, add: str | None = None, captions: str | None = None,
                delete: str | None = None, update: str | None = None, finetune: bool | None = None,
                address: str | None = None) -> dict:
    from pipelines.train import Finetune, run_train

    summary = JobSummary("reindex", store.url)
    run = summary.run
    version = IndexVersion.current(store)
    manifest = version.manifest
    if not manifest.ids:
        raise StoreError(f"{store.url}: reindex needs a trained index (run `cart quantize` and `cart train` first)")
    if not version.servable:
        refuse_all_but_deletes(version, add=add, update=update, captions=captions, finetune=finetune)
    t0 = time.perf_counter()
    table, ids_meta = version.ids()
    with store.local_dir(manifest.codebooks) as folder:
        codebooks, cb_meta = load_codebooks(folder)
    id_cfg = config_from_dict({"identifiers": cb_meta["identifiers"]}).identifiers
    summary.time("load_index_s", t0)
    t0 = time.perf_counter()
    plan = plan_changes(version, add, update, delete)
    summary.time("plan_s", t0)
    deleted = set(plan["deleted_items"])
    cap_ids, cap_texts = read_captions(captions, lambda ids: set(live_rows(table, ids)) | set(plan["encode_ids"]),
                                       deleted) if captions else ([], [])
    encoders = CaptionEncoders(version, cfg, id_cfg.source != "features")  # refuses another encoder than the index's
    if add or update or cap_ids or finetune or (finetune is None and cfg.reindex.finetune):  # not a delete alone
        from cart_core.text import check_encoder_settings

        check_encoder_settings(cfg.generator.text_encoder, cfg.generator.max_query_tokens)
    init_ray(address)  # after every input check: a wrong file costs seconds, not a cluster start
    new_caps = list(zip(*version.new_captions(cap_ids, cap_texts)))  # each (item, text) is stored once
    verified = has_verifier(version)
    # items already indexed (not added or updated now) that this run gives new captions: verified
    # with every caption they now have from this commit on (recaptioned_pending)
    recaptioned = sorted({i for i, _ in new_caps} - set(plan["encode_ids"]) - deleted)
    if recaptioned and not verified:
        log("reindex", f"captions for {len(recaptioned)} items already indexed are stored; this index has no "
                       f"verifier, so they count from the next `cart train`")
        recaptioned = []
    # every caption an item has counts: those already stored, then this run's
    stored_ids, stored_texts = stored_captions(version, set(plan["encode_ids"]) | set(recaptioned))
    cap_ids, cap_texts = stored_ids + cap_ids, stored_texts + cap_texts
    emb = np.asarray(plan["encode_emb"], dtype=np.float32).reshape(len(plan["encode_ids"]), manifest.dim or 1)
    t0 = time.perf_counter()
    cap_vec, each_vec, each_row = caption_vectors(encoders.for_ids, encoders.width, plan["encode_ids"], cap_ids,
                                                  cap_texts)
    if encoders.tuned:  # what is verified and calibrated lives in the space the generator scores queries in
        served_vec, each_vec, each_row = caption_vectors(encoders.for_queries, encoders.width, plan["encode_ids"],
                                                         cap_ids, cap_texts)
    else:
        served_vec = cap_vec
    cap_terms = caption_terms(plan["encode_ids"], cap_ids, cap_texts)
    recaptioned = recaptioned_pending(version, recaptioned, cap_ids, cap_texts, encoders,
                                      cfg.reindex.calibrate_added) if recaptioned else None
    summary.time("caption_embed_s", t0)  # for ids from captions and for the dense fallback
    t0 = time.perf_counter()
    verify_feats, calibration = added_features(version, emb, each_vec, each_row) if cfg.reindex.calibrate_added \
        else (None, {})
    summary.time("verify_calibration_s", t0)
    if calibration:
        summary.extra["added_items_calibration"] = calibration
    t0 = time.perf_counter()
    previous = version.pending()
    pending_before = set(previous.column("item_id").to_pylist()) if previous is not None else set()
    # the threshold is recalibrated whenever a fallback will exist (new captioned items or carried
    # over); a verified index ranks pending items itself and never consults it (pipelines/search.py)
    impostors = impostor_queries(store, manifest, cfg, set(plan["encode_ids"]) | pending_before, encoders.for_queries) \
        if (len(cap_ids) or pending_before) and not verified and version.servable else np.zeros((0, 0), np.float32)
    summary.time("fallback_calibration_s", t0)
    t0 = time.perf_counter()
    codes = encode(codebooks, identifier_inputs(id_cfg.source, emb, cap_vec if id_cfg.source != "features" else None)) \
        if len(emb) else {"coarse": np.zeros(0, np.int64), "fine": np.zeros((0, 0), np.int64),
                          "assign_sq_distance": np.zeros(0), "recon_error": np.zeros(0)}
    prefix = np.concatenate([codes["coarse"][:, None], codes["fine"]], 1) if id_cfg.coarse else codes["fine"]
    new_table, learn = apply_identifiers(table, plan, prefix)
    summary.time("encode_s", t0)
    n_clusters = id_cfg.n_clusters if id_cfg.coarse else 1
    summary.extra["drift"] = drift = drift_report(codes, ids_meta["report"].get("fitted_state", {}),
                                                  new_table.codes[new_table.live, 0], n_clusters,
                                                  cfg.reindex.drift_factor,
                                                  None if id_cfg.source == "features" else np.abs(cap_vec).sum(1) > 0)
    if drift["refit_due"]:
        log("reindex", "REFIT DUE: " + "; ".join(drift["reasons"]) + " — run `cart quantize --refit` then `cart train`")
    changed = bool(learn or plan["delete_rows"] or plan["tombstones"] or new_caps
                   or plan["counts"]["updated"])
    summary.counts.update(plan["counts"], identifiers_added=len(learn), captions=len(new_caps))
    if changed:
        t0 = time.perf_counter()
        commit_identifiers(version, run, plan, new_table, learn, served_vec, cap_terms, verify_feats, new_caps, ids_meta,
                           drift, recaptioned,
                           base_rows=len(table.item_ids), id_deltas=cfg.reindex.id_deltas,
                           impostors=impostors, fallback_fpr=cfg.reindex.fallback_fpr,
                           fallback_interleave=cfg.reindex.fallback_interleave)
        manifest = store.manifest()
        summary.time("write_commit_s", t0)
    else:
        log("reindex", "nothing to change: every add, update and delete is already applied")
    summary.extra.update(version=manifest.version, pending_threshold=manifest.extra.get("pending_threshold"))
    finetune = cfg.reindex.finetune if finetune is None else finetune
    after = IndexVersion(store, manifest)
    pending, items = after.pending(), after.untrained_pending()
    if finetune and items and after.servable:
        # the text encoder stays as the full training left it (encoder_lr 0 where the generator tuned
        # its top layers): the verifier, the pending rows and every later reindex embed captions with
        # it, so a fine-tune that moved it would leave them all in another space
        cfg = replace(cfg, train=replace(cfg.train, lr=cfg.reindex.finetune_lr, encoder_lr=0.0))
        result = run_train(store, cfg, finetune=Finetune(items, manifest.generator, cfg.reindex.rehearsal,
                                                         cfg.reindex.finetune_epochs),
                           finish=lambda m: (m.with_fallback_taught(pending_runs(pending, manifest.extra["pending"]))
                                             if cfg.reindex.keep_fallback else m.without_fallback()),
                           before_commit=lambda: crash_point("after_training"),
                           address=address)
        summary.extra.update(finetune={k: result[k] for k in ("run", "counts", "timings")},
                             version=result["version"])
    return summary.write(store)


def commit_identifiers(version: IndexVersion, run: str, plan: dict, table: IdentifierTable,
                       learn: list[str], cap_vec: np.ndarray, cap_terms: ItemTerms, verify_feats: np.ndarray | None,
                       new_caps: list,
                       ids_meta: dict, drift: dict, recaptioned: "PendingRows | None",
                       base_rows: int, id_deltas: int, impostors: np.ndarray, fallback_fpr: float,
                       fallback_interleave: int) -> None:
    store, manifest = version.store, version.manifest
    update = {}
    rows = [r for r, new in enumerate(plan["new_feature_row"]) if new]  # unchanged features keep their row
    if rows:
        feats = features_table([plan["encode_ids"][r] for r in rows],
                               np.asarray(plan["encode_emb"], dtype=np.float32)[rows],
                               [plan["encode_modality"][r] for r in rows], uris=["reindex"] * len(rows),
                               content_hashes=[plan["encode_hash"][r] for r in rows])
        write_parts(store, feats, f"features/{run}")
        update["features"] = manifest.features + [f"features/{run}"]
    if new_caps:
        write_parts(store, queries_table([i for i, _ in new_caps], [t for _, t in new_caps], "human"), f"queries/{run}")
        update["queries"] = manifest.queries + [f"queries/{run}"]
    extra = dict(manifest.extra)
    if plan["tombstones"]:
        store.write_table(pa.table({"item_id": [i for i, _ in plan["tombstones"]],
                                    "feature_run": [r for _, r in plan["tombstones"]]}),
                          f"tombstones/{run}/tombstones.parquet")
        extra["tombstones"] = (extra.get("tombstones") or []) + [f"tombstones/{run}"]
    if plan["deleted_items"]:  # their captions go with them (IndexVersion.retired_captions)
        gone = plan["deleted_items"]
        store.write_table(pa.table({"item_id": pa.array(gone, pa.string()),
                                    "queries_before": pa.array([len(manifest.queries)] * len(gone), pa.int32()),
                                    "eval_before": pa.array([len(manifest.eval_queries)] * len(gone), pa.int32())}),
                          f"tombstones/{run}-captions/retired.parquet")
        extra["retired_captions"] = (extra.get("retired_captions") or []) + [f"tombstones/{run}-captions"]
    crash_point("after_features")
    position = {item: r for r, item in enumerate(plan["encode_ids"])}
    learn_rows = [position[i] for i in learn]
    has_caption = [r for r in learn_rows if np.linalg.norm(cap_vec[r]) > 0]
    if has_verifier(version):  # updated in place (same prefix) and given captions now: verified with them too
        captioned_now, learned = {i for i, _ in new_caps}, set(learn_rows)
        has_caption += [r for r, item in enumerate(plan["encode_ids"])
                        if r not in learned and item in captioned_now and np.linalg.norm(cap_vec[r]) > 0]
    meta = {**ids_meta, "reindex": {"run": run, "counts": plan["counts"], "drift": drift}}
    chain = list(extra.get("ids_chain") or [])
    if len(chain) < id_deltas:  # a delta over the committed table: only what this run changed
        save_ids(store, table, f"ids/{run}", meta, base_rows=base_rows)
        extra["ids_chain"] = chain + [manifest.ids]
    else:  # the chain is long enough: write the whole table again
        save_ids(store, table, f"ids/{run}", meta)
        extra["ids_chain"] = []
    refreshed = {plan["encode_ids"][r]: (verify_feats[r] if verify_feats is not None and np.linalg.norm(cap_vec[r]) > 0
                                         else None)
                 for r, new in enumerate(plan["new_feature_row"]) if new}
    if version.servable:
        rows = PendingRows([plan["encode_ids"][r] for r in has_caption], cap_vec[has_caption],
                           None if verify_feats is None else verify_feats[has_caption],
                           cap_terms.as_lists(np.array(has_caption, np.int64)))
        if recaptioned is not None:
            rows = rows.then(recaptioned)
        pending, pending_table = write_pending(version, f"ids/{run}", run, rows.item_ids, rows.vectors, table,
                                               rows.features, refreshed, ItemTerms.from_lists(*rows.terms))
        threshold = None
        if pending and len(impostors):
            vectors = np.stack(pending_table.column("vector").to_numpy(zero_copy_only=False))
            threshold = acceptance_threshold(impostors, vectors, fallback_fpr)
        # the generator stays valid: no existing identifier changed (new counter tokens are grown at load)
        extra.update(generator_ids=f"ids/{run}", pending=pending, pending_threshold=threshold,
                     pending_interleave=fallback_interleave, vocab_sizes=table.vocab_sizes)
    # else a delete while `cart train` learns these identifiers (refuse_all_but_deletes): the rows
    # are marked dead and the training commits over them; nothing is pending, nothing is served yet
    crash_point("after_ids")
    crash_point("before_commit")
    new = store.commit(replace(manifest, ids=f"ids/{run}", extra=extra, **update),
                       f"reindex {run}: +{len(learn)} identifiers, -{len(plan['delete_rows'])} items",
                       base=manifest, reads={"features", "queries", "codebooks", "extra.tombstones",
                                             "extra.retired_captions", "extra.pending", "extra.pending_trained",
                                             "generator", "extra.generator_ids"}
                       | ({"eval_queries"} if plan["deleted_items"] else set()))  # eval_before counts them
    if not version.servable:
        log("reindex", f"committed version {new.version}: {plan['counts']}; an older version answers until "
                       "`cart train` commits, and never with the deleted items")
        return
    log("reindex", f"committed version {new.version}: {plan['counts']}; "
                   f"{len(has_caption)} new captioned items found by "
                   f"{'verification' if has_verifier(version) else 'the dense fallback'} until a fine-tune")
