"""`cart caption`: pseudo-queries (captions of the items' own frames) for training, as a Ray job.

Candidates are the committed feature rows with an image or video file behind them (their `uri`).
An actor pool loads the image-to-text model once per actor and captions each image once and
each video on `caption.frames` uniformly sampled frames (one caption each, exact repeats
dropped). The captions go to `queries/<run>/` with source = "pseudo" and a new manifest names
them; items that already have pseudo-queries are skipped, so a rerun only captions new items.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc

from cart_core.config import CartConfig
from cart_core.errors import model_setting
from cart_core.media import MediaError, content_hash, decode_image, decode_video_frames, read_bytes, shrink
from cart_core.index_version import IndexVersion
from cart_core.store import Store, queries_table
from pipelines.parts import ErrorLog, PartWriter
from pipelines.runtime import JobSummary, init_ray, log
from pipelines.stages import Resources, Stage, run_stage, stream

RESULT_SCHEMA = pa.schema([("item_id", pa.string()), ("uri", pa.string()), ("text", pa.string()),
                           ("status", pa.string()), ("reason", pa.string())])
CHANGED = ("the file changed since `cart extract` (the features are of other content): replace the item with "
           "`cart reindex --update` (its captions with `--captions`), or restore the file")
MAX_SIDE = 768   # frames are shrunk to this shorter side before the processor (memory, not quality)


@dataclass
class CaptionStage(Stage):
    """Loads the captioner once per actor; turns a block of (item_id, modality, uri, content_hash)
    rows into captions, of the content the features were extracted from."""

    name = "caption"
    inputs = ("item_id", "modality", "uri", "content_hash")
    outputs = tuple(RESULT_SCHEMA.names)

    resources: Resources
    model: str
    max_new_tokens: int
    frames: int

    def setup(self) -> None:
        from cart_core.captioner import Captioner

        self.captioner = Captioner(self.model, self.max_new_tokens, self.resources.device,
                                   batch_size=self.resources.batch_size)

    def _frames(self, modality: str, data: bytes) -> list:
        if modality == "video":
            return [shrink(f, MAX_SIDE) for f in decode_video_frames(data, self.frames)]
        return [shrink(decode_image(data), MAX_SIDE)]

    def process_batch(self, batch: pa.Table) -> pa.Table:
        out, owners, images = [], [], []
        for r in batch.to_pylist():
            try:
                data = read_bytes(r["uri"])   # other storage errors (credentials, network) stop the job
            except MediaError as exc:
                out.append({**_row(r), "status": "error", "reason": str(exc)})
                continue
            if r["content_hash"] and content_hash(data) != r["content_hash"]:  # captions of other content
                out.append({**_row(r), "status": "error", "reason": CHANGED})
                continue
            try:
                frames = self._frames(r["modality"], data)
            except MediaError as exc:
                out.append({**_row(r), "status": "error", "reason": str(exc)})
                continue
            except Exception as exc:  # one odd file must not stop the job
                out.append({**_row(r), "status": "error", "reason": f"{type(exc).__name__}: {exc}"})
                continue
            owners += [r] * len(frames)
            images += frames
        texts: dict[str, list[str]] = {}
        for r, text in zip(owners, self.captioner.caption(images) if images else []):
            bucket = texts.setdefault(r["item_id"], [])
            if text and text not in bucket:
                bucket.append(text)
        for r in {r["item_id"]: r for r in owners}.values():
            got = texts.get(r["item_id"], [])
            if not got:
                out.append({**_row(r), "status": "error", "reason": "the captioner produced only empty captions"})
            out += [{**_row(r), "text": t, "status": "ok"} for t in got]
        return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)


def _items(batch: pa.Table) -> int:
    """Items in a result batch (an item has one row per caption): what the progress bar counts."""
    return len(set(batch.column("item_id").to_pylist()))


def _row(r: dict) -> dict:
    return {"item_id": r["item_id"], "uri": r["uri"], "text": None, "reason": None}


def candidates(version: IndexVersion) -> tuple[pa.Table, dict[str, int]]:
    """Live image / video items with a media file, not yet captioned; plus skip counts."""
    manifest = version.manifest
    version.store.require(manifest, "features", "cart extract")
    rows = version.live_features(["item_id", "modality", "uri", "content_hash"]).to_pylist()
    done: set[str] = set()
    if manifest.queries:
        q = version.queries(["item_id", "source"])
        done = set(q.filter(pc.equal(q.column("source"), "pseudo")).column("item_id").to_pylist())
    counts = {"items": len(rows), "skipped_audio": 0, "skipped_no_media": 0, "skipped_captioned": 0}
    keep = []
    for r in rows:
        if r["modality"] not in ("image", "video"):
            counts["skipped_audio" if r["modality"] == "audio" else "skipped_no_media"] += 1
        elif not r["uri"] or r["uri"].lower().endswith(".parquet"):  # imported features: no file to look at
            counts["skipped_no_media"] += 1
        elif r["item_id"] in done:
            counts["skipped_captioned"] += 1
        else:
            keep.append(r)
    schema = pa.schema([("item_id", pa.string()), ("modality", pa.string()), ("uri", pa.string()),
                        ("content_hash", pa.string())])
    return pa.Table.from_pylist(keep, schema=schema), counts


def caption_stage(cfg: CartConfig) -> CaptionStage:
    cap = cfg.caption
    return CaptionStage(Resources(cap.actors, cap.num_cpus, cap.num_gpus, cap.batch_size, "caption."), model=cap.model,
                        max_new_tokens=cap.max_new_tokens, frames=cap.frames)


def run_caption(store: Store, cfg: CartConfig, address: str | None = None) -> dict:
    """Caption every committed image / video item that has no pseudo-queries yet; returns the summary."""
    summary = JobSummary("caption", store.url)
    run, t0 = summary.run, time.perf_counter()
    version = IndexVersion.current(store)
    manifest = version.manifest
    table, counts = candidates(version)
    summary.time("prepare_s", t0)
    log("caption", f"{table.num_rows} items to caption with {cfg.caption.model} ({counts['skipped_audio']} audio, "
                   f"{counts['skipped_no_media']} without a media file, {counts['skipped_captioned']} already done)")
    queries, errors = PartWriter(store, f"queries/{run}"), ErrorLog(store, manifest, run, "caption")
    captioned: set[str] = set()
    t0 = time.perf_counter()
    if table.num_rows:
        from transformers import AutoConfig

        with model_setting("caption.model", cfg.caption.model):  # here, not in every actor after Ray started
            AutoConfig.from_pretrained(cfg.caption.model)
        init_ray(address)
        for batch in stream(run_stage(caption_stage(cfg), table), table.num_rows, "caption", count=_items):
            ok = batch.filter(pc.equal(batch.column("status"), "ok"))
            if ok.num_rows:
                queries.add(queries_table(ok.column("item_id").to_pylist(), ok.column("text").to_pylist(), "pseudo"))
                captioned.update(ok.column("item_id").to_pylist())
            errors.add_rows(batch.filter(pc.equal(batch.column("status"), "error")))
    queries.flush()
    summary.errors = errors.close()
    caption_s = summary.time("caption_s", t0)
    counts.update(captioned=len(captioned), queries=queries.total, errors=errors.count, new_errors=errors.new)
    summary.counts.update(counts)
    summary.extra.update(items_per_s=round(len(captioned) / max(caption_s, 1e-9), 2), model=cfg.caption.model)
    update = {}
    if queries.total:
        update["queries"] = manifest.queries + [f"queries/{run}"]
    if errors.new:
        update["errors"] = manifest.errors + [f"errors/{run}"]
    if update:  # replayed on whatever was committed meanwhile, unless that captioned the same items
        new = store.commit(replace(manifest, **update), f"caption {run}: {queries.total} pseudo-queries",
                           base=manifest, reads={"extra.tombstones"})
        summary.extra["version"] = new.version
        log("caption", f"committed version {new.version}: {queries.total} pseudo-queries for {len(captioned)} items, "
                       f"{errors.count} errors")
    else:
        summary.extra["version"] = manifest.version
        log("caption", f"nothing new to caption; version {manifest.version} stays")
    return summary.write(store)
