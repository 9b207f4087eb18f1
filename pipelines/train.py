"""`cart train`: fit the generator on (query -> identifier) pairs with Ray Train.

A `TorchTrainer` runs one training process per worker (CPU here, GPUs by config). Each worker
takes its shard of the pairs from Ray Data, caches its frozen-encoder states once, and runs the
same number of steps per epoch; gradients are averaged with an all-reduce after every backward.
Rank 0 writes a resumable checkpoint (safetensors + JSON) to `generator/<run>/checkpoints/` in
the store every `jobs.checkpoint_every` epochs; `--resume` continues the unfinished run from its
last checkpoint. Only a finished run is committed to the manifest.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cart_core.config import CartConfig, config_dict, config_from_dict
from cart_core.errors import BadInput, first_line
from cart_core.index_version import IndexVersion, deletes_since, is_servable
from cart_core.text import check_encoder_settings
from cart_core.store import FALLBACK_KEYS, CommitConflict, Manifest, Store, StoreError
from cart_core.hybrid import holdout_mask
from cart_core.training import steady_epoch_s
from pipelines.leases import hold
from pipelines.runtime import JobSummary, init_ray, log, ray_started_here
from pipelines.verify import copy_verifier, fit_verifier

PENDING = "jobs/train-pending.json"


@dataclass
class Finetune:
    """Teach an existing generator new items: start from `init_from` (a generator folder in the
    store), train on the pairs of `items` plus a seeded sample of `rehearsal` old pairs per new
    pair (so old items do not regress), for `epochs` epochs."""

    items: list[str]
    init_from: str
    rehearsal: float = 1.0
    epochs: int = 5


def training_pairs(store: Store, cfg: CartConfig, finetune: Finetune | None = None,
                   version: IndexVersion | None = None) -> tuple[pa.Table, dict]:
    """text, codes, weight for every training query whose item has a live identifier (of the
    current version unless `version` is given)."""
    version = version or IndexVersion.current(store)
    manifest = version.manifest
    table, _ = version.ids()
    store.require(manifest, "queries", "cart import --captions` or `cart caption")
    queries = version.queries(["item_id", "text", "source"]).to_pandas()
    ids = pd.DataFrame({"item_id": table.item_ids.astype(str), "row": np.arange(len(table.item_ids))})
    ids = ids[table.live]
    pairs = queries.merge(ids, on="item_id", how="inner")
    counts = {"queries": int(len(queries)), "pairs": int(len(pairs)),
              "queries_without_identifier": int(len(queries) - len(pairs)),
              "pseudo_pairs": int((pairs["source"] == "pseudo").sum())}
    if finetune is not None:
        is_new = pairs["item_id"].isin(set(finetune.items)).to_numpy()
        old_rows = np.flatnonzero(~is_new)
        n_old = min(len(old_rows), int(round(finetune.rehearsal * is_new.sum())))
        keep = np.random.default_rng(cfg.train.seed).choice(old_rows, n_old, replace=False)
        pairs = pairs.iloc[np.sort(np.concatenate([np.flatnonzero(is_new), keep]))]
        counts.update(new_item_pairs=int(is_new.sum()), rehearsal_pairs=int(n_old), pairs=int(len(pairs)))
    if pairs.empty:
        raise StoreError(f"{store.url}: no training query names an item with an identifier")
    weight = np.where(pairs["source"].to_numpy() == "pseudo", cfg.jobs.pseudo_query_weight, 1.0)
    codes = table.codes[pairs["row"].to_numpy()].astype(np.int32)
    # a fine-tune distils the old generator on the replayed pairs only (new items are to be learned)
    distill = (~pairs["item_id"].isin(set(finetune.items))).to_numpy() if finetune else np.zeros(len(pairs), bool)
    out = pa.table({"text": pa.array(pairs["text"].astype(str).tolist()),
                    "row": pa.array(pairs["row"].to_numpy().astype(np.int64)),
                    "codes": pa.array(list(codes), pa.list_(pa.int32())),
                    "weight": pa.array(weight.astype(np.float32)),
                    "distill": pa.array(distill.astype(np.float32))})
    return out, {"counts": counts, "vocab_sizes": table.vocab_sizes, "ids": manifest.ids, "base": manifest}


def training_fingerprint(pairs: pa.Table, cfg: CartConfig, finetune: Finetune | None) -> str:
    """What a generator was trained on: the pairs, the model and training config, the start point.
    The same fingerprint again means a rerun of `cart train` would only repeat the work."""
    import hashlib

    digest = hashlib.sha256()
    _hash_pairs(digest, pairs)
    _hash_settings(digest, cfg, finetune)
    return digest.hexdigest()[:32]


def resume_digests(pairs: pa.Table, cfg: CartConfig, finetune: Finetune | None) -> dict[str, str]:
    """The two halves of the fingerprint, kept apart in the pending file: `cart train --resume`
    goes on with an unfinished run only under the settings it started with, and on its pairs (or
    those pairs less deleted items' ones)."""
    import hashlib

    pairs_digest, settings_digest = hashlib.sha256(), hashlib.sha256()
    _hash_pairs(pairs_digest, pairs)
    _hash_settings(settings_digest, cfg, finetune, resume=True)
    return {"pairs": pairs_digest.hexdigest()[:32], "settings": settings_digest.hexdigest()[:32]}


def _hash_pairs(digest, pairs: pa.Table) -> None:
    for column in ("text", "codes", "weight", "distill"):
        for chunk in pairs.column(column).chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    digest.update(buf)


def _hash_settings(digest, cfg: CartConfig, finetune: Finetune | None, resume: bool = False) -> None:
    """The fingerprint hashes every setting the committed generator and verifier depend on; a
    resume (`resume`), only those its checkpoints depend on: the model, the training (its epochs
    included: the learning-rate schedule spans them) and the slice kept from it for the fusion fit
    (the verifier itself is fitted after the training, under the settings of the run that ends)."""
    import json

    settings = config_dict(cfg)
    if resume:
        settings = {"generator": settings["generator"], "train": settings["train"],
                    "verify": {"holdout": settings["verify"]["holdout"]}}
    else:
        settings = {k: settings[k] for k in ("generator", "train", "verify")}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(json.dumps(None if finetune is None else [finetune.init_from, finetune.rehearsal]).encode())


def latest_checkpoint(store: Store, run: str) -> str | None:
    """The run's newest complete checkpoint: its `state.json` (written last) is there and reads. A
    damaged one (a disk error, a store written before copies were atomic) is passed over, saying
    so, for the epoch before it: a resume or a Ray Train restart costs epochs, not the run."""
    epochs = sorted((d for d in store.listdir(f"generator/{run}/checkpoints") if d.startswith("epoch-")), reverse=True)
    for epoch in epochs:
        state = f"generator/{run}/checkpoints/{epoch}/state.json"
        if not store.exists(state):
            continue
        try:
            store.read_json(state)
        except (ValueError, UnicodeDecodeError) as exc:
            log("train", f"{store.uri(state)} does not read ({first_line(exc)}): resuming from an earlier checkpoint")
            continue
        return f"generator/{run}/checkpoints/{epoch}"
    return None


def _collect_shard(shard) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    texts, codes, weights, distill = [], [], [], []
    for batch in shard.iter_batches(batch_size=4096, batch_format="numpy"):
        texts += [str(t) for t in batch["text"]]
        codes.append(np.stack(list(batch["codes"])).astype(np.int64))
        weights.append(np.asarray(batch["weight"], dtype=np.float32))
        distill.append(np.asarray(batch["distill"], dtype=np.float32))
    return texts, np.concatenate(codes), np.concatenate(weights), np.concatenate(distill)


def average_grads_across_workers(world: int):
    """The DataParallel hook: all-reduce every gradient and divide by the world size."""
    import torch
    import torch.distributed as dist

    def sync(params: list[torch.Tensor]) -> None:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world

    return sync


def train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker process."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from cart_core.checkpoint import load_checkpoint, save_checkpoint
    from cart_core.generator import Generator
    from cart_core.training import DataParallel, train_generator

    # one thread per reserved CPU, never more than the node has (a 4-CPU logical node on 2 cores)
    torch.set_num_threads(max(1, min(int(config.get("threads") or 1), os.cpu_count() or 1)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = config_from_dict(config["cfg"])
    store = Store(config["store"])
    texts, codes, weights, distill = _collect_shard(ray.train.get_dataset_shard("train"))
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)
    resume = None
    # Ray Train restarts this loop after a lost worker or node (jobs.train_max_failures): the
    # run's newest complete checkpoint in the store is then where it left off, so a restart costs
    # at most `jobs.checkpoint_every` epochs
    resume_from = latest_checkpoint(store, config["run"]) or config["resume_from"]
    if resume_from:
        if rank == 0 and resume_from != config["resume_from"]:
            print(f"[cart train] restarted: resuming from {resume_from}", flush=True)
        with store.local_dir(resume_from) as folder:
            generator, resume = load_checkpoint(folder)
    elif config.get("init_from"):
        with store.local_dir(config["init_from"]) as folder:
            generator = Generator.load(folder)
        generator.grow_last_vocab(config["vocab_sizes"][-1])
    else:
        generator = Generator(replace(cfg.generator, vocab_sizes=config["vocab_sizes"]))
    generator.to(device)
    teacher = None
    if config.get("init_from") and cfg.reindex.distill > 0:  # the generator before this fine-tune
        with store.local_dir(config["init_from"]) as folder:
            teacher = Generator.load(folder, text_encoder=generator.text_encoder).to(device)
    steps = math.ceil(len(codes) / cfg.train.batch_size)
    sync = None
    if world > 1:
        t = torch.tensor([steps], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        steps = int(t.item())
        sync = average_grads_across_workers(world)

    run, every, epochs = config["run"], max(1, cfg.jobs.checkpoint_every), cfg.train.epochs

    def checkpoint(epoch: int, history: dict, optimizer, scheduler) -> None:
        if rank == 0 and ((epoch + 1) % every == 0 or epoch + 1 == epochs):
            with tempfile.TemporaryDirectory(prefix="cart-ckpt-") as tmp:
                save_checkpoint(tmp, generator, epoch, history, optimizer, scheduler)
                dest = f"generator/{run}/checkpoints/epoch-{epoch + 1:04d}"
                store.put_dir(Path(tmp) / "model", f"{dest}/model")
                store.put_file(Path(tmp) / "state.safetensors", f"{dest}/state.safetensors")
                store.put_file(Path(tmp) / "state.json", f"{dest}/state.json")  # last: marks it complete
        ray.train.report({"epoch": epoch + 1, "loss": history["loss"][-1], "nll": history["nll"][-1],
                          "kl": history["kl"][-1], "rank_pairs": len(codes)})
        if config.get("crash_after_epoch") == epoch + 1:  # fault injection for the resume tests
            raise RuntimeError(f"injected crash after epoch {epoch + 1}")

    train_generator(generator, texts, codes, cfg.train, progress=rank == 0, weights=weights,
                    parallel=DataParallel(steps_per_epoch=steps, sync_grads=sync), resume=resume,
                    checkpoint=checkpoint, teacher=teacher, distill=distill, distill_weight=cfg.reindex.distill)


@dataclass(frozen=True)
class TrainScaling:
    """How many Ray Train workers, the CPUs each reserves and the torch threads each runs."""

    workers: int
    cpus_per_worker: float
    chosen: str     # "config" | "auto: ..." (what Ray reported), for the log and the job summary

    @property
    def threads(self) -> int:
        """torch threads per worker: one per whole reserved CPU."""
        return max(1, int(self.cpus_per_worker))


def train_scaling(cfg: CartConfig, workers: int | None = None) -> TrainScaling:
    """`jobs.train_workers` / `jobs.cpus_per_worker` as given, or (0 = auto) sized from the nodes
    Ray reports alive: on CPUs one worker per CPU-only node (all nodes when none is CPU-only),
    each taking every CPU of the smallest such node (one process with all cores beats several
    with one each for a model this size); on GPUs one worker per GPU. torch runs one thread per
    reserved CPU. With no matching node up yet (an autoscaling cluster whose workers start at
    zero), 1 CPU per worker and one worker unless given: the request itself makes the autoscaler
    start nodes."""
    import ray

    jobs = cfg.jobs
    n, cpus = workers or jobs.train_workers, jobs.cpus_per_worker
    if n and cpus:
        return TrainScaling(n, cpus, "config")
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive") and node["Resources"].get("CPU", 0) >= 1]
    if jobs.use_gpu:
        nodes = [r for r in nodes if r.get("GPU", 0) >= 1]
    else:
        nodes = [r for r in nodes if not r.get("GPU")] or nodes
    if not nodes:
        return TrainScaling(n or 1, cpus or 1.0,
                            f"auto: no node with a CPU{' and a GPU' if jobs.use_gpu else ''} is up yet; "
                            "asking for what the autoscaler can start")
    if jobs.use_gpu:
        n = n or int(sum(r["GPU"] for r in nodes))
    else:
        n = n or len(nodes)
    if not cpus:
        share = min(r["CPU"] for r in nodes) / -(-n // len(nodes))   # CPUs a worker gets on the smallest node
        cpus = float(int(share)) if share >= 1 else share
    how = f"auto: {len(nodes)} node(s) with {sorted({r['CPU'] for r in nodes})} CPUs"
    return TrainScaling(n, cpus, how)


def worker_slots(nodes: list[dict], cpus_per_worker: float, gpu: bool) -> int:
    """How many workers of `cpus_per_worker` CPUs (and one GPU each with `gpu`) the nodes'
    resources hold, each worker on one node. Counted in Ray's fixed point (1e-4 of a resource):
    2 CPUs hold five 0.4-CPU workers, where 2 // 0.4 in floats says four."""
    def units(x: float) -> int:
        return int(round(x * 10_000))

    total = 0
    for r in nodes:
        cpu = units(r.get("CPU", 0)) // units(cpus_per_worker) if units(cpus_per_worker) else 1 << 30
        total += min(cpu, int(r.get("GPU", 0)) if gpu else cpu)
    return total


def read_pending(store: Store) -> dict:
    """jobs/train-pending.json, or a StoreError saying what to do with a damaged one (`cart check`
    does not judge it: a training may be writing it)."""
    try:
        pending = store.read_json(PENDING)
        if not isinstance(pending, dict):
            raise ValueError(f"a JSON {type(pending).__name__}, not an object")
    except ValueError as exc:
        raise StoreError(f"{store.uri(PENDING)}: unreadable ({first_line(exc)}); remove it if no `cart train` is "
                         "running, then train afresh") from None
    return pending


def check_text_encoder(cfg: CartConfig) -> None:
    """The generator's text encoder checked before Ray starts (cart_core/text.check_encoder_settings),
    not by a Ray Train worker building the model."""
    gen = cfg.generator
    if gen.query == "text":
        check_encoder_settings(gen.text_encoder, gen.max_query_tokens, gen.finetune_layers)


def check_placement(scaling: TrainScaling, cfg: CartConfig) -> None:
    """Workers that the nodes up now cannot hold (each on one node) would leave Ray Train retrying
    its start for ever, without a word: refused on a Ray this process started (nothing can add
    nodes to it); on a cluster, said, and the start (60 s) tried again `jobs.train_start_tries`
    times while an autoscaler may add nodes."""
    import ray

    gpu = cfg.jobs.use_gpu
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    slots = worker_slots(nodes, scaling.cpus_per_worker, gpu)
    if slots >= scaling.workers:
        return
    need = f"{scaling.workers} worker(s) x {scaling.cpus_per_worker:g} CPU{' + 1 GPU' if gpu else ''}"
    have = f"{len(nodes)} node(s) with {sorted(r.get('CPU', 0) for r in nodes)} CPUs" + (
        f" and {sorted(r.get('GPU', 0) for r in nodes)} GPUs" if gpu else "")
    if ray_started_here():
        raise BadInput(f"{need} cannot be placed on this machine's Ray ({have}, room for {slots}); lower --workers "
                       "(jobs.train_workers) or jobs.cpus_per_worker, or pass --address of a larger cluster")
    tries = cfg.jobs.train_start_tries
    log("train", f"{need} do not fit the nodes up now ({have}, room for {slots}): waiting for more nodes "
                 f"(an autoscaler's); Ray Train's start times out every 60 s and is tried again "
                 f"{'without limit' if tries < 0 else f'{tries} times'} (jobs.train_start_tries)")


TRAINED_FOR = {"ids", "extra.ids_chain", "extra.tombstones"}  # what a generator was trained for
PAIRS_FROM = {"queries"}  # besides the identifiers, what its training pairs are read from
TRAIN_WRITES = {"generator", "extra.generator_ids", "extra.generator_fingerprint",
                *(f"extra.{key}" for key in FALLBACK_KEYS)}


def held_out(store: Store, cfg: CartConfig, pairs: pa.Table, started: int, base_version: int) -> np.ndarray:
    """The pairs kept from the generator for the fusion fit: a seeded slice of the pairs of the
    version the run started on, so a run resumed across deletes keeps the slice it started with
    (its checkpoints learned none of it) instead of a slice shifted by the removed pairs."""
    if started == base_version:
        return holdout_mask(len(pairs), cfg.verify.holdout, cfg.train.seed)
    try:
        first, _ = training_pairs(store, cfg, version=IndexVersion(store, store.version(started)))
    except (StoreError, OSError) as exc:  # its history compacted away (or its files, as they were read)
        log("train", f"the pairs of version {started}, where this run started, cannot be read ({exc}); the fusion "
                     "slice is drawn afresh and may hold pairs the generator learned before the resume")
        return holdout_mask(len(pairs), cfg.verify.holdout, cfg.train.seed)
    mask = holdout_mask(len(first), cfg.verify.holdout, cfg.train.seed)
    held = pair_keys(first).filter(pa.array(mask))
    return pc.is_in(pair_keys(pairs), value_set=held).to_numpy(zero_copy_only=False)


def pair_keys(pairs: pa.Table) -> pa.Array:
    """One string per (identifier row, text) pair: rows stay the same across deletes."""
    return pc.binary_join_element_wise(pairs.column("row").cast(pa.string()), pairs.column("text"),
                                       "\x00").combine_chunks()


def commit_generator(store: Store, base: Manifest, generator: str, fingerprint: str,
                     finish: Callable[[Manifest], Manifest] | None, message: str) -> Manifest:
    """Commit the generator trained for `base`'s identifiers. A commit that changed them since is
    refused, unless it only deleted items: the training (a full one or a reindex fine-tune, whose
    `finish` names the pending runs it taught, which a delete keeps) then commits over the
    deletes, which stay in force. A takedown landing between that check and the commit is checked
    again (up to three times) rather than failing a finished training."""
    for attempt in range(3):
        manifest = deletes_since(store, base, TRAINED_FOR, TRAIN_WRITES)
        if manifest.version != base.version:
            log("train", f"items were deleted while this run trained (versions {base.version + 1}.."
                         f"{manifest.version}): it commits over the deletes, which stay in force")
        trained = manifest.with_generator(generator, manifest.ids, fingerprint)
        # a full training has learned every item: no dense fallback left; a fine-tune says what it taught
        try:
            return store.commit(finish(trained) if finish else trained.without_fallback(), message,
                                base=manifest, reads=TRAINED_FOR)
        except CommitConflict:
            if attempt == 2 or deletes_since(store, base, TRAINED_FOR, TRAIN_WRITES).version == base.version:
                raise
    raise AssertionError("unreachable")


def resumed_from(store: Store, started_for: str | None, base: Manifest) -> Manifest | None:
    """The version an unfinished run started for the identifiers `started_for` went on from, when
    it can go on for `base`: one with the same identifiers, or older with only items deleted since
    (a takedown while the run was down, or while this one starts); None when it cannot."""
    if started_for == base.ids:
        return base
    started = [m for m in store.versions() if m.ids == started_for and m.version < base.version]
    if started and deletes_since(store, started[-1], TRAINED_FOR, TRAIN_WRITES).version >= base.version:
        return started[-1]
    return None


def why_not_resumed(store: Store, pending: dict, base: Manifest, cfg: CartConfig, finetune: Finetune | None,
                    digests: dict[str, str]) -> str | None:
    """Why the unfinished run in `pending` cannot go on for `base` with these pairs and settings,
    or None when it can. Its checkpoint holds what it learned under the settings and from the
    pairs it started with: going on under others would commit a generator that neither set of
    settings, nor the fingerprint recorded with it, describes. Pairs may differ only by deletes
    since: every commit since the run's version only deleted items, and that version's pairs, read
    with this config, are the ones it started on."""
    if resumed_from(store, pending.get("ids"), base) is None:
        return "the unfinished run was for other identifiers"
    if pending.get("settings") not in (None, digests["settings"]):  # pending files before 2026-12-07 lack it
        return "the unfinished run was started with other generator / train settings (or verify.holdout)"
    if pending.get("pairs") in (None, digests["pairs"]):
        return None
    started = pending.get("started")
    changed = (f"its training pairs changed since it started on version {started} (captions imported, identifiers "
               "or `jobs.pseudo_query_weight` changed: not only items deleted)")
    try:
        first = IndexVersion(store, store.version(int(started)))
        went_on = deletes_since(store, first.manifest, TRAINED_FOR | PAIRS_FROM, TRAIN_WRITES)
        if went_on.version == first.version or went_on.version < base.version:
            return changed
        then, _ = training_pairs(store, cfg, finetune, version=first)
    except (StoreError, OSError, ValueError, TypeError):  # its history compacted away, or unreadable
        return f"{changed[:changed.index(' (')]}, and version {started} cannot be read to tell"
    return None if resume_digests(then, cfg, finetune)["pairs"] == pending["pairs"] else changed


def run_train(store: Store, cfg: CartConfig, workers: int | None = None, resume: bool = False,
              address: str | None = None, finetune: Finetune | None = None,
              finish: Callable[[Manifest], Manifest] | None = None, before_commit=None) -> dict:
    import ray.data
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    summary = JobSummary("train", store.url)
    t0 = time.perf_counter()
    check_text_encoder(cfg)
    if finetune is not None:
        cfg = replace(cfg, train=replace(cfg.train, epochs=finetune.epochs))
    pairs, info = training_pairs(store, cfg, finetune)
    summary.counts.update(info["counts"])
    fingerprint, digests = training_fingerprint(pairs, cfg, finetune), resume_digests(pairs, cfg, finetune)
    base = info["base"]
    if is_servable(base) and base.extra.get("generator_fingerprint") == fingerprint:
        log("train", f"version {base.version}'s generator was trained on these pairs with this config; nothing to do")
        summary.extra.update(version=base.version, up_to_date=True)
        return summary.write(store)
    # the verifier is fitted on the base version's files after the training: a `cart compact`
    # meanwhile keeps them (a quantize --refit or a rollback since may have left no other version naming them)
    with hold(store, base, "train"):
        init_ray(address)
        scaling = train_scaling(cfg, workers)
        workers = scaling.workers
        log("train", f"{workers} worker(s) x {scaling.cpus_per_worker:g} CPU, {scaling.threads} torch thread(s) each "
                     f"({scaling.chosen})")
        check_placement(scaling, cfg)  # before anything is written
        run, resume_from, started = summary.run, None, base.version
        if resume and store.exists(PENDING):
            pending = read_pending(store)
            why_not = why_not_resumed(store, pending, info["base"], cfg, finetune, digests)
            if why_not is None:
                went_on = resumed_from(store, pending.get("ids"), info["base"])
                run, resume_from = pending["run"], latest_checkpoint(store, pending["run"])
                started = pending.get("started", went_on.version)  # pending files before 2026-12-07 lack it
                digests = {k: pending.get(k, v) for k, v in digests.items()}  # what it started with
                log("train", f"resuming {run} from {resume_from or 'the start (no checkpoint yet)'}")
            else:
                log("train", f"not resuming {pending.get('run', '?')}: {why_not}; starting afresh")
        elif resume:
            log("train", "nothing to resume; starting afresh")
        store.write_json(PENDING, {"run": run, "ids": info["ids"], "started": started, **digests})
        summary.run = run
        # a full training keeps a seeded slice of the captions from the generator: the hybrid
        # retriever's fusion is fitted on them (pipelines/verify.py); a fine-tune keeps its verifier
        holdout = held_out(store, cfg, pairs, started, base.version) if finetune is None else np.zeros(len(pairs), bool)
        summary.counts.update(generator_pairs=int((~holdout).sum()), fusion_pairs=int(holdout.sum()))
        # Ray Train's controller polls its workers every 2 s unless told otherwise, and a worker's
        # report (one per epoch) blocks until the poll has taken the previous one: short epochs (a
        # reindex fine-tune, a small catalog) would wait on the controller, not train
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": config_dict(cfg), "store": store.url, "run": run, "resume_from": resume_from,
                               "vocab_sizes": info["vocab_sizes"],
                               "init_from": f"{finetune.init_from}/model" if finetune else None,
                               "crash_after_epoch": int(os.environ.get("CART_CRASH_AFTER_EPOCH", "0")) or None,
                               "threads": scaling.threads},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.jobs.use_gpu,
                                         resources_per_worker={"CPU": scaling.cpus_per_worker}),
            datasets={"train": ray.data.from_arrow(pairs.filter(pa.array(~holdout)))},
            # a start that times out (60 s: no node can hold the workers) is retried this many times, not for ever
            run_config=RunConfig(name=run, failure_config=FailureConfig(
                max_failures=cfg.jobs.train_max_failures, controller_failure_limit=cfg.jobs.train_start_tries)),
        )
        summary.time("prepare_s", t0)
        t0 = time.perf_counter()
        result = trainer.fit()
        if result.error:
            raise RuntimeError(f"training failed: {result.error}")
        summary.time("train_s", t0)
        final = latest_checkpoint(store, run)
        if final is None or not final.endswith(f"epoch-{cfg.train.epochs:04d}"):  # a damaged last one: not committed
            raise StoreError(f"{store.uri('generator', run)}: training finished without a readable checkpoint of "
                             f"its last epoch ({cfg.train.epochs}); `cart train --resume` trains it again")
        with store.local_dir(f"{final}/model") as folder:
            store.put_dir(folder, f"generator/{run}/model")
        t0 = time.perf_counter()
        if finetune is not None:
            copy_verifier(store, finetune.init_from, f"generator/{run}")
        elif cfg.verify.mode == "hybrid":
            report = fit_verifier(store, IndexVersion(store, info["base"]), f"generator/{run}", cfg,
                                  pairs.column("text").to_pylist(), pairs.column("row").to_numpy(), holdout)
            summary.extra.update(fusion=report)
        summary.time("verify_s", t0)
        if before_commit is not None:
            before_commit()
        new = commit_generator(store, info["base"], f"generator/{run}", fingerprint, finish,
                               message=f"train {run}: {len(pairs)} pairs, {workers} worker(s)")
    store.remove(PENDING)
    history = store.read_json(f"{final}/state.json")["history"]
    metrics = {key: history[key][-1] for key in ("loss", "nll", "kl")} | {"epochs": len(history["loss"])}
    epoch_s = history.get("epoch_s", [])
    steps = math.ceil(summary.counts["generator_pairs"] / workers / cfg.train.batch_size)
    summary.extra.update(epoch_s=epoch_s, steps_per_epoch=steps,
                         steps_per_s=round(steps / steady_epoch_s(epoch_s), 2) if epoch_s else None)
    summary.extra.update(version=new.version, workers=workers, cpus_per_worker=scaling.cpus_per_worker,
                         torch_threads=scaling.threads, scaling=scaling.chosen, final_metrics=metrics,
                         pairs_per_s=len(pairs) * cfg.train.epochs / max(summary.timings["train_s"], 1e-9))
    log("train", f"committed version {new.version}: generator/{run} (loss {metrics.get('loss', float('nan')):.3f})")
    return summary.write(store)
