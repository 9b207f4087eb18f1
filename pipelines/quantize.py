"""`cart quantize`: identifiers for every committed item, as a Ray job.

1. Ray Data reads the committed feature tables (local or S3).
2. A seeded sample is pulled to the driver; K-Means (faiss) and the RQ-VAE are fitted on it.
3. The codebooks are written to `codebooks/<run>/` and shipped to an actor pool that assigns
   every item (nearest centroid, residual, RQ-VAE codes) with `map_batches`.
4. The driver adds the global uniqueness counter (needs all prefixes: a sort of small ints),
   writes `ids/<run>/ids.parquet`, and commits a manifest naming both.

The driver holds the sample and the integer codes, never the full feature matrix, so it stays
small at millions of items. Identifiers built from captions ("captions" / "both") also need
each item's mean MiniLM caption embedding, computed by a second actor pool over the queries.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cart_core.config import CartConfig, config_dict
from cart_core.indexing import encode, fit_codebooks, identifier_inputs, identifiers_from_codes, load_codebooks, \
    save_codebooks
from cart_core.kmeans import cluster_imbalance
from cart_core.identifiers import IdentifierTable
from cart_core.index_version import IndexVersion, deletes_since, drop_retired_captions, save_ids, withdraw, \
    withdrawn_since
from cart_core.store import CommitConflict, Manifest, Store, StoreError
from pipelines.runtime import JobSummary, init_ray, log
from pipelines.stages import Resources, Stage, run_stage, stack_column


def read_features(version: IndexVersion, columns=("item_id", "embedding")):
    """Ray dataset of the version's live feature rows: rows that deletes and updates retired
    (`IndexVersion.dead_feature_keys`) are dropped as they stream past."""
    import ray

    store = version.store
    store.require(version.manifest, "features", "cart import` or `cart extract")
    dead = version.dead_feature_keys()
    ds = ray.data.read_parquet(version.feature_files(), filesystem=store.pyarrow_filesystem(),
                               include_paths=bool(dead))
    if dead:
        ds = ds.map_batches(drop_dead_rows, fn_args=(dead,), batch_format="numpy")
    return ds.select_columns(list(columns))


def drop_dead_rows(batch: dict, dead: set) -> dict:
    """Keeps the rows whose (file, item_id) is not in `dead`."""
    keep = np.array([(str(p), str(i)) not in dead for p, i in zip(batch["path"], batch["item_id"])], bool)
    return {k: v[keep] for k, v in batch.items()}


@dataclass
class CaptionEmbedStage(Stage):
    """MiniLM sentence embeddings of training queries (the encoder loaded once per actor)."""

    name = "caption_embed"
    inputs = ("item_id", "text")
    outputs = ("item_id", "vector")
    batch_format = "numpy"

    resources: Resources
    text_encoder: str
    max_tokens: int

    def setup(self) -> None:
        from cart_core.text import TextEncoder

        self.encoder = TextEncoder(self.text_encoder, self.max_tokens)

    def process_batch(self, batch: dict) -> dict:
        texts = [str(t) for t in batch["text"]]
        return {"item_id": batch["item_id"], "vector": list(self.encoder.sentence_embeddings(texts))}


def quantize_resources(cfg: CartConfig, batch_size: int) -> Resources:
    """Both quantize stages share the `jobs.quantize_*` pool settings."""
    return Resources(cfg.jobs.quantize_actors, cfg.jobs.quantize_num_cpus, 0.0, batch_size, "jobs.quantize_")


def caption_centroids(store: Store, manifest: Manifest, cfg: CartConfig) -> tuple[np.ndarray, np.ndarray]:
    """(item_ids, mean caption embedding per item) over human + pseudo training queries."""
    import ray

    files = store.parquet_files(store.require(manifest, "queries", "cart import --captions` or `cart caption"))
    folder_of, retired = IndexVersion(store, manifest).retired_caption_files()  # captions of deleted items
    ds = ray.data.read_parquet(files, filesystem=store.pyarrow_filesystem(), include_paths=bool(retired))
    if retired:
        ds = ds.map_batches(drop_retired_captions, fn_args=(folder_of, retired), batch_format="numpy")
    ds = ds.select_columns(["item_id", "text"])
    ds = run_stage(CaptionEmbedStage(quantize_resources(cfg, 256), cfg.generator.text_encoder,
                                     cfg.generator.max_query_tokens), ds)
    ids, vecs = [], []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=4096):
        ids.append(np.asarray(batch["item_id"], dtype=object))
        vecs.append(stack_column(batch["vector"]))
    ids, vecs = np.concatenate(ids), np.concatenate(vecs)
    uniq, inverse = np.unique(ids.astype(str), return_inverse=True)
    sums = np.zeros((len(uniq), vecs.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, vecs)
    counts = np.bincount(inverse, minlength=len(uniq))[:, None]
    return uniq.astype(object), (sums / counts).astype(np.float32)


class CentroidLookup:
    """item_id -> caption centroid (zeros for items without any training query)."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray):
        self.index = {str(i): r for r, i in enumerate(ids)}
        self.vectors = vectors

    def __call__(self, item_ids) -> np.ndarray:
        out = np.zeros((len(item_ids), self.vectors.shape[1]), dtype=np.float32)
        for r, i in enumerate(item_ids):
            row = self.index.get(str(i))
            if row is not None:
                out[r] = self.vectors[row]
        return out


def batch_vectors(batch: dict, source: str, lookup: CentroidLookup | None) -> np.ndarray:
    features = stack_column(batch["embedding"])
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():  # K-Means / the codebooks would fail naming no item, or give it garbage codes
        item = str(batch["item_id"][int(np.flatnonzero(bad)[0])])
        raise StoreError(f"item {item[:60]!r}: its stored features are not finite (NaN or inf; `cart extract` kept "
                         f"such rows before 2026-12-07, {int(bad.sum())} in this batch): `cart reindex --delete` it or "
                         "`--update` it with good features, then rerun")
    captions = lookup(batch["item_id"]) if lookup is not None else None
    return identifier_inputs(source, features, captions)


@dataclass
class AssignCodesStage(Stage):
    """Encodes a batch with the fitted codebooks (read once per actor from the store)."""

    name = "assign_codes"
    inputs = ("item_id", "embedding")
    outputs = ("item_id", "coarse", "fine", "assign_sq_distance", "recon_error")
    batch_format = "numpy"

    resources: Resources
    store_url: str
    codebooks: str
    source: str
    centroids: object = None   # a Ray object ref of (item_ids, caption centroids), for caption sources

    def setup(self) -> None:
        import ray

        with Store(self.store_url).local_dir(self.codebooks) as folder:
            self.fitted, _ = load_codebooks(folder)
        centroids = ray.get(self.centroids) if isinstance(self.centroids, ray.ObjectRef) else self.centroids
        self.lookup = CentroidLookup(*centroids) if centroids is not None else None

    def process_batch(self, batch: dict) -> dict:
        codes = encode(self.fitted, batch_vectors(batch, self.source, self.lookup))
        return {"item_id": batch["item_id"], "coarse": codes["coarse"], "fine": list(codes["fine"]),
                "assign_sq_distance": codes["assign_sq_distance"], "recon_error": codes["recon_error"]}


def fit_sample(ds, n_items: int, cfg: CartConfig, lookup: CentroidLookup | None) -> np.ndarray:
    """The identifier vectors of a seeded random sample of at most kmeans_sample items."""
    fraction = min(1.0, cfg.identifiers.kmeans_sample / max(n_items, 1))
    while True:  # a Bernoulli sample can come out short: drawn again, larger, when under n_clusters rows
        sample = ds if fraction >= 1.0 else ds.random_sample(fraction, seed=cfg.identifiers.seed)
        parts = [batch_vectors(b, cfg.identifiers.source, lookup)
                 for b in sample.iter_batches(batch_format="numpy", batch_size=8192)]
        vectors = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        if fraction >= 1.0 or len(vectors) >= cfg.identifiers.n_clusters:
            return vectors
        fraction = min(1.0, 2 * fraction)


def up_to_date(version: IndexVersion, cfg: CartConfig) -> bool:
    """The version's identifiers cover exactly its live items and were built with this config."""
    if not version.manifest.ids:
        return False
    table, meta = version.ids()
    if meta.get("config") != config_dict(cfg)["identifiers"]:
        return False
    rows = version.feature_rows()
    live_items = set(rows.filter(rows.column("live")).column("item_id").to_pylist())
    return live_items == {str(i) for i in table.item_ids[table.live]}


def run_quantize(store: Store, cfg: CartConfig, address: str | None = None, refit: bool = False,
                 before_commit: Callable[[], None] | None = None) -> dict:
    """Identifiers for every live item. Without `refit`, a version whose identifiers already cover
    exactly its live items with this config is left as it is (a rerun commits nothing); `refit`
    fits new codebooks anyway (what a drift report's REFIT DUE asks for)."""
    import ray

    version = IndexVersion.current(store)
    manifest = version.manifest
    store.require(manifest, "features", "cart import` or `cart extract")  # fail before starting Ray
    summary = JobSummary("quantize", store.url)
    if not refit and up_to_date(version, cfg):
        log("quantize", f"identifiers of version {manifest.version} already cover every live item with this "
                        "config; nothing to do (`cart quantize --refit` fits new codebooks anyway)")
        summary.extra.update(version=manifest.version, up_to_date=True)
        return summary.write(store)
    if cfg.identifiers.source != "features":  # the caption stage's encoder, checked before Ray starts
        from cart_core.text import check_encoder_settings

        check_encoder_settings(cfg.generator.text_encoder, cfg.generator.max_query_tokens)
    init_ray(address)
    run = summary.run
    t0 = time.perf_counter()
    ds = read_features(version)
    rows = version.feature_rows()  # read_features has read them: counting here spares a pass of Ray Data
    n_items = int(pc.sum(rows.column("live").cast(pa.int64())).as_py() or 0)
    if n_items < cfg.identifiers.n_clusters:
        raise StoreError(f"{store.url}: {n_items} items, fewer than identifiers.n_clusters="
                         f"{cfg.identifiers.n_clusters}")
    lookup, centroids_ref = None, None
    if cfg.identifiers.source != "features":
        ids, vecs = caption_centroids(store, manifest, cfg)
        lookup, centroids_ref = CentroidLookup(ids, vecs), ray.put((ids, vecs))
        summary.counts["items_with_captions"] = int(len(ids))
    summary.time("read_s", t0)
    t0 = time.perf_counter()
    sample = fit_sample(ds, n_items, cfg, lookup)
    codebooks, report = fit_codebooks(sample, cfg.identifiers, progress=True)
    summary.counts["fit_sample"] = int(len(sample))
    del sample
    with tempfile.TemporaryDirectory(prefix="cart-codebooks-") as tmp:
        save_codebooks(codebooks, cfg.identifiers, tmp)
        store.put_dir(tmp, f"codebooks/{run}")
    summary.time("fit_s", t0)
    log("quantize", f"codebooks fitted on {summary.counts['fit_sample']} of {n_items} items; encoding all")
    t0 = time.perf_counter()
    coded = run_stage(AssignCodesStage(quantize_resources(cfg, cfg.jobs.quantize_batch_size), store.url,
                                       f"codebooks/{run}", cfg.identifiers.source, centroids_ref), ds)
    cols = {"item_id": [], "coarse": [], "fine": [], "assign_sq_distance": [], "recon_error": []}
    for batch in coded.iter_batches(batch_format="numpy", batch_size=65536):
        for key in cols:
            cols[key].append(batch[key] if key != "fine" else np.asarray(stack_column(batch["fine"]), np.int64))
    cols = {k: np.concatenate(v) for k, v in cols.items()}
    if len(cols["item_id"]) != n_items:  # never on a store the jobs wrote: files edited by hand?
        raise StoreError(f"{store.url}: version {manifest.version} has {n_items} live feature rows, but "
                         f"{len(cols['item_id'])} rows streamed from its feature files; run `cart check`")
    summary.time("encode_s", t0)
    t0 = time.perf_counter()
    table = identifiers_from_codes(cols["item_id"].astype(object), cols["coarse"], cols["fine"], cfg.identifiers)
    drift = fitted_state(cols, cfg)
    report.update(collisions=table.collision_stats(), vocab_sizes=table.vocab_sizes, fitted_state=drift)
    if before_commit is not None:
        before_commit()
    reads = {"extra.tombstones", "dim"} | ({"queries"} if cfg.identifiers.source != "features" else set())
    meta = {"codebooks": f"codebooks/{run}", "report": report, "config": config_dict(cfg)["identifiers"]}
    for attempt in range(3):  # a takedown between the check and the commit is checked again
        on, marked = over_deletes(store, manifest, table, reads)
        save_ids(store, marked, f"ids/{run}", meta)
        try:
            new = store.commit(replace(on, codebooks=f"codebooks/{run}", ids=f"ids/{run}", generator=None,
                                       extra={**on.extra, "identifier_source": cfg.identifiers.source, "ids_chain": [],
                                              "vocab_sizes": marked.vocab_sizes}),
                               f"quantize {run}: {len(marked.item_ids)} identifiers", base=on, reads=reads)
            break
        except CommitConflict:
            if attempt == 2 or deletes_since(store, manifest, reads, QUANTIZE_WRITES).version == manifest.version:
                raise
    summary.time("ids_s", t0)
    summary.counts.update(items=int(n_items), identifiers=int(len(table.item_ids)))
    summary.extra.update(version=new.version, report=report, items_per_s=n_items / max(sum(
        summary.timings.get(k, 0) for k in ("read_s", "fit_s", "encode_s", "ids_s")), 1e-9))
    log("quantize", f"committed version {new.version}: vocab {table.vocab_sizes}, "
                    f"{report['collisions']['collision_rate']:.1%} of items need u > 0")
    return summary.write(store)


QUANTIZE_WRITES = {"codebooks", "ids", "generator", "extra.identifier_source", "extra.ids_chain",
                   "extra.vocab_sizes"}


def over_deletes(store: Store, base: Manifest, table: IdentifierTable,
                 reads: set[str]) -> tuple[Manifest, IdentifierTable]:
    """The version this quantize commits on and its table: where items were only deleted since it
    read `base` (a takedown during a refit), the newest version, with their rows marked dead."""
    newest = deletes_since(store, base, reads, QUANTIZE_WRITES)
    if newest.version == base.version:
        return base, table
    # deleted since, and any of them imported again meanwhile: their identifiers here were built
    # from the content taken down, so they wait for the next quantize or `reindex --add`
    gone = withdrawn_since(table, IndexVersion(store, base), IndexVersion(store, newest))
    log("quantize", f"{len(gone)} items were deleted while this run fitted (versions {base.version + 1}.."
                    f"{newest.version}): their identifiers are committed dead")
    return newest, withdraw(table, gone)


def fitted_state(cols: dict, cfg: CartConfig) -> dict:
    """Reference statistics of the fitted codebooks; reindex compares new items against them."""
    k = cfg.identifiers.n_clusters if cfg.identifiers.coarse else 1
    return {**cluster_imbalance(cols["coarse"], k),
            "mean_assign_sq_distance": float(cols["assign_sq_distance"].mean()),
            "p95_assign_sq_distance": float(np.percentile(cols["assign_sq_distance"], 95)),
            "mean_recon_error": float(cols["recon_error"].mean()),
            "p95_recon_error": float(np.percentile(cols["recon_error"], 95))}
