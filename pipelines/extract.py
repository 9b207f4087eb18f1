"""`cart extract`: media files (video, image, audio; local or s3://) -> feature table, as a Ray job.

1. The driver reads and validates the media table (item_id, uri[, modality]), resolves each
   row's modality, and joins the committed content hashes so unchanged files can be skipped.
2. Ray Data sends row blocks to an autoscaling pool of actors; each loads CLIP's image tower
   and/or CLAP's audio tower once, then reads, hashes, decodes and embeds its rows. A file that
   cannot be used becomes an error row: the job goes on.
3. The driver streams the results into `features/<run>/` and `errors/<run>/` Parquet parts and
   commits a manifest naming them. Nothing is committed before every part is written, so a
   killed run leaves the previous version as it was.
"""
from __future__ import annotations

import os
import posixpath
import time
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cart_core.errors import BadInput, ConfigError, InputNotFound, LocatedError, model_setting
from cart_core.config import CartConfig
from cart_core.media import MODALITIES, MediaError, content_hash, decode_audio, decode_image, \
    decode_video_frames, infer_modality, read_bytes, resolve_uri, shrink
from cart_core.index_version import IndexVersion
from cart_core.store import Store, StoreError, features_table
from pipelines.inputs import warn_readded
from pipelines.parts import ErrorLog, PartWriter
from pipelines.runtime import JobSummary, init_ray, log
from pipelines.stages import Resources, Stage, run_stage, stream

VISUAL = ("image", "video")
CHANGED = "item_id is already in the store with other content; use `cart reindex --update` to replace it"

RESULT_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("modality", pa.string()), ("uri", pa.string()), ("content_hash", pa.string()),
    ("embedding", pa.list_(pa.float32())), ("status", pa.string()), ("reason", pa.string()),
])


# ---- the media table -------------------------------------------------------------------------
def read_media_table(media: str) -> pa.Table:
    """item_id (unique), uri, modality (image | video | audio | null) as strings; relative URIs
    resolved against the table's folder. Raises BadInput naming file, row and reason."""
    import fsspec
    import pyarrow.parquet as pq

    try:
        with fsspec.open(media, "rb") as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        raise InputNotFound(f"{media}: media table not found") from None
    except (pa.ArrowException, OSError) as exc:
        raise BadInput(f"{media}: not a readable Parquet table ({exc})") from None
    missing = [c for c in ("item_id", "uri") if c not in table.column_names]
    if missing:
        raise BadInput(f"{media}: missing required column(s) {missing}; have {table.column_names}")
    if table.num_rows == 0:
        raise BadInput(f"{media}: the media table is empty")
    ids, uris = table.column("item_id").to_pylist(), table.column("uri").to_pylist()
    modality = table.column("modality").to_pylist() if "modality" in table.column_names else [None] * len(ids)
    seen: dict[str, int] = {}
    for row, (item, uri) in enumerate(zip(ids, uris)):
        if item is None or str(item).strip() == "":
            raise LocatedError(media, row, "item_id is empty")
        if uri is None or str(uri).strip() == "":
            raise LocatedError(media, row, f"uri is empty (item_id {item!r})")
        if str(item) in seen:
            raise LocatedError(media, row, f"duplicate item_id {item!r} (first at row {seen[str(item)]})")
        seen[str(item)] = row
    base = posixpath.dirname(media) if "://" in media else os.path.dirname(os.path.abspath(media))
    return pa.table({
        "item_id": pa.array([str(i) for i in ids], pa.string()),
        "uri": pa.array([resolve_uri(str(u).strip(), base) for u in uris], pa.string()),
        "modality": pa.array([None if m is None or str(m).strip() == "" else str(m).strip().lower()
                              for m in modality], pa.string()),
    })


def resolve_modalities(table: pa.Table) -> tuple[pa.Table, list[tuple[str, str, str]]]:
    """Fill in modality from the extension; rows with no usable modality come back as
    (item_id, uri, reason) errors instead of going to the actors."""
    keep, out_mod, bad = [], [], []
    for i, (item, uri, mod) in enumerate(zip(*(table.column(c).to_pylist() for c in ("item_id", "uri", "modality")))):
        if mod is None:
            mod = infer_modality(uri)
            if mod is None:
                ext = posixpath.splitext(uri)[1] or "(no extension)"
                bad.append((item, uri, f"unsupported file type {ext!r}; give a modality column or use one of "
                                       f"the known extensions"))
                continue
        elif mod not in MODALITIES:
            bad.append((item, uri, f"unknown modality {mod!r}; expected one of {list(MODALITIES)}"))
            continue
        keep.append(i)
        out_mod.append(mod)
    kept = table.take(pa.array(keep, pa.int64())) if keep else table.slice(0, 0)
    return kept.set_column(kept.schema.get_field_index("modality"), "modality", pa.array(out_mod, pa.string())), bad


# ---- the actor -------------------------------------------------------------------------------
@dataclass
class ExtractStage(Stage):
    """Loads the embedding models once per actor; turns a block of media rows into result rows."""

    name = "extract"
    inputs = ("item_id", "modality", "uri", "known_hash")
    outputs = tuple(RESULT_SCHEMA.names)

    resources: Resources
    image_model: str | None
    audio_model: str | None
    frames: int
    sample_rate: int
    max_audio_s: float

    def setup(self) -> None:
        from cart_core.embedders import AudioEmbedder, ImageEmbedder

        device, batch = self.resources.device, max(self.resources.batch_size, 1)
        self.image = ImageEmbedder(self.image_model, device, batch_size=batch * 4) if self.image_model else None
        self.audio = AudioEmbedder(self.audio_model, self.sample_rate, device, batch_size=batch) \
            if self.audio_model else None
        self.max_side = 2 * int(self.image.model.config.image_size) if self.image else None

    def _decode(self, modality: str, data: bytes):
        if modality == "image":
            return [shrink(decode_image(data), self.max_side)]
        if modality == "video":
            return [shrink(f, self.max_side) for f in decode_video_frames(data, self.frames)]
        return decode_audio(data, self.sample_rate, self.max_audio_s)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out = [{"item_id": r["item_id"], "modality": r["modality"], "uri": r["uri"], "content_hash": None,
                "embedding": None, "status": "ok", "reason": None} for r in rows]
        decoded: dict[int, object] = {}
        for i, r in enumerate(rows):
            try:
                data = read_bytes(r["uri"])   # other storage errors (credentials, network) stop the job
            except MediaError as exc:
                out[i]["status"], out[i]["reason"] = "error", str(exc)
                continue
            out[i]["content_hash"] = h = content_hash(data)
            if r["known_hash"] is not None:
                same = h == r["known_hash"]
                out[i]["status"], out[i]["reason"] = ("skipped", None) if same else ("error", CHANGED)
                continue
            try:
                decoded[i] = self._decode(r["modality"], data)
            except MediaError as exc:
                out[i]["status"], out[i]["reason"] = "error", str(exc)
            except Exception as exc:  # a decoder bug on one odd file must not stop the job
                out[i]["status"], out[i]["reason"] = "error", f"{type(exc).__name__}: {exc}"
        visual = [i for i in decoded if rows[i]["modality"] in VISUAL]
        audio = [i for i in decoded if rows[i]["modality"] == "audio"]
        self._embed(visual, lambda idx: self.image.embed_groups([decoded[i] for i in idx]), out)
        self._embed(audio, lambda idx: self.audio.embed([decoded[i] for i in idx]), out)
        return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)

    @staticmethod
    def _embed(index: list[int], embed, out: list[dict]) -> None:
        """Embed rows together; if the batch fails, item by item, so one bad input costs one row."""
        if not index:
            return
        try:
            vectors = list(embed(index))
        except Exception:
            vectors = []
            for i in index:
                try:
                    vectors.append(embed([i])[0])
                except Exception as exc:
                    vectors.append(None)
                    out[i]["status"], out[i]["reason"] = "error", f"embedding failed: {type(exc).__name__}: {exc}"
        for i, v in zip(index, vectors):
            if v is None:
                continue
            v = np.asarray(v, np.float32)
            if not np.isfinite(v).all() or not v.any():  # e.g. a float WAV holding a NaN sample
                out[i]["status"], out[i]["reason"] = "error", (
                    "the model gave an embedding that is not finite (NaN or inf)" if not np.isfinite(v).all()
                    else "embedding is all zeros")
                continue
            out[i]["embedding"] = v.tolist()


# ---- the driver ------------------------------------------------------------------------------
def model_dims(cfg: CartConfig, modalities: set[str]) -> dict[str, int]:
    """Embedding size per modality group present, read from the model configs (no weights), and
    the audio model's sampling rate checked against extract.sample_rate: a wrong model or rate is
    refused here, naming its key, not in every actor after Ray started."""
    from cart_core.embedders import audio_sampling_rate, projection_dim

    dims = {}
    if modalities & set(VISUAL):
        with model_setting("extract.image_model", cfg.extract.image_model):
            dims["image/video"] = projection_dim(cfg.extract.image_model, "vision")
    if "audio" in modalities:
        with model_setting("extract.audio_model", cfg.extract.audio_model):
            dims["audio"] = projection_dim(cfg.extract.audio_model, "audio")
            rate = audio_sampling_rate(cfg.extract.audio_model)
        if rate != cfg.extract.sample_rate:
            raise ConfigError(f"extract.sample_rate={cfg.extract.sample_rate} but the CLAP feature extractor of "
                              f"{cfg.extract.audio_model} expects {rate} Hz; set extract.sample_rate to {rate}")
    return dims


def check_dims(dims: dict[str, int], store_dim: int | None, cfg: CartConfig) -> int | None:
    if len(set(dims.values())) > 1:
        raise ConfigError(f"image/video features from {cfg.extract.image_model} have {dims['image/video']} dims but "
                         f"audio features from {cfg.extract.audio_model} have {dims['audio']}; one store holds one "
                         f"embedding size: pick models with equal projection dims or extract the modalities into "
                         f"separate stores")
    dim = next(iter(dims.values()), None)
    if dim is not None and store_dim is not None and dim != store_dim:
        raise StoreError(f"the store holds {store_dim}-dim features but {sorted(dims)} models give {dim}; "
                         f"use the models the store was built with, or a new store")
    return dim


def _result_tables(batch: pa.Table) -> dict[str, pa.Table]:
    status = batch.column("status")
    return {s: batch.filter(pc.equal(status, s)) for s in ("ok", "error", "skipped")}


def run_extract(store: Store, media: str, cfg: CartConfig, address: str | None = None) -> dict:
    """Extract features for the media table `media` into `store`; returns the job summary."""
    summary = JobSummary("extract", store.url)
    run, t0 = summary.run, time.perf_counter()
    table = read_media_table(media)
    table, unusable = resolve_modalities(table)
    version = IndexVersion.current(store)
    manifest = version.manifest
    dim = check_dims(model_dims(cfg, set(table.column("modality").to_pylist())), manifest.dim, cfg)
    known = {item: h for item, (_, h) in version.live_item_hashes(table.column("item_id").to_pylist()).items()}
    table = table.append_column("known_hash", pa.array([known.get(i) for i in table.column("item_id").to_pylist()],
                                                       pa.string()))
    summary.time("prepare_s", t0)
    n_items = table.num_rows + len(unusable)
    readded: dict = {}
    warn_readded(version, [i for i in table.column("item_id").to_pylist() if i not in known], media, readded, "extract")
    log("extract", f"{n_items} items from {media} ({table.num_rows} decodable types, {len(unusable)} unsupported); "
                   f"{sum(v is not None for v in table.column('known_hash').to_pylist())} already in the store")

    features = PartWriter(store, f"features/{run}")
    errors = ErrorLog(store, manifest, run, "extract")
    if unusable:
        errors.add(*map(list, zip(*unusable)))
    counts = {"items": n_items, "extracted": 0, "errors": len(unusable), "skipped": 0, **readded,
              **{m: 0 for m in MODALITIES}}
    t0 = time.perf_counter()
    if table.num_rows:
        init_ray(address)
        for batch in stream(run_stage(extract_stage(cfg, table), table), table.num_rows, "extract"):
            parts = _result_tables(batch)
            ok = parts["ok"]
            if ok.num_rows:
                emb = np.stack([np.asarray(v, np.float32) for v in ok.column("embedding").to_pylist()])
                if dim is not None and emb.shape[1] != dim:
                    raise StoreError(f"{ok.column('uri')[0]}: the model gave {emb.shape[1]}-dim features, "
                                     f"expected {dim}; nothing was committed")
                features.add(features_table(ok.column("item_id").to_pylist(), emb, ok.column("modality").to_pylist(),
                                            ok.column("uri").to_pylist(), ok.column("content_hash").to_pylist()))
                for m in ok.column("modality").to_pylist():
                    counts[m] += 1
            errors.add_rows(parts["error"])
            counts["extracted"] += ok.num_rows
            counts["errors"] += parts["error"].num_rows
            counts["skipped"] += parts["skipped"].num_rows
    features.flush()
    summary.errors = errors.close()
    extract_s = summary.time("extract_s", t0)
    summary.counts.update(counts)
    summary.counts["new_errors"] = errors.new
    summary.extra.update(items_per_s=round((counts["extracted"] + counts["skipped"]) / max(extract_s, 1e-9), 2),
                         dim=dim, media=media)
    t0 = time.perf_counter()
    _commit(store, manifest, summary, features.total, errors.new, dim)
    summary.time("commit_s", t0)
    return summary.write(store)


def extract_stage(cfg: CartConfig, table: pa.Table) -> ExtractStage:
    """The stage for these rows: only the towers their modalities need are loaded."""
    ex = cfg.extract
    mods = set(table.column("modality").to_pylist())
    return ExtractStage(Resources(ex.actors, ex.num_cpus, ex.num_gpus, ex.batch_size, "extract."),
                        image_model=ex.image_model if mods & set(VISUAL) else None,
                        audio_model=ex.audio_model if "audio" in mods else None,
                        frames=ex.frames, sample_rate=ex.sample_rate, max_audio_s=ex.max_audio_s)


def _commit(store: Store, manifest, summary: JobSummary, n_features: int, n_errors: int, dim: int | None) -> None:
    """Commit on top of `manifest`, the version whose content hashes this run skipped against."""
    run = summary.run
    if not n_features and not n_errors:
        summary.extra["version"] = manifest.version
        log("extract", f"nothing new: {summary.counts['skipped']} items unchanged, {summary.counts['errors']} "
                       f"errors already recorded; version {manifest.version} stays")
        return
    if n_features and manifest.dim is not None and manifest.dim != dim:
        raise StoreError(f"{store.url}: the store now holds {manifest.dim}-dim features, this run made {dim}; "
                         f"nothing was committed")
    update = {}
    if n_features:
        update.update(features=manifest.features + [f"features/{run}"], dim=dim)
    if n_errors:
        update["errors"] = manifest.errors + [f"errors/{run}"]
    new = store.commit(replace(manifest, **update), f"extract {run}: {n_features} items, {n_errors} errors",
                       base=manifest, reads={"features", "extra.tombstones", "dim"})
    summary.extra["version"] = new.version
    log("extract", f"committed version {new.version}: {n_features} items extracted, {n_errors} errors, "
                   f"{summary.counts['skipped']} unchanged")
