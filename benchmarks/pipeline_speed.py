"""What running the pipeline as Ray jobs costs on this machine, against the same work done by
cart_core in one plain process.

1. `cart quantize` on N synthetic 512-d features (a seeded mixture of Gaussians on the unit sphere,
   written once to a local store as Parquet parts with features_table / write_parts; writing the
   input is not timed):
     ray     run_quantize on a local Ray (Ray Data read, seeded sample to the driver, K-Means +
             RQ-VAE fitted there, actor pool encodes every item, ids written, manifest committed)
     single  one process: read the same Parquet with pyarrow, fit_codebooks on a sample of the same
             size, encode every item in 65,536-row chunks, identifiers_from_codes, ids.parquet
   Both use the same CartConfig (configs/default.yaml + overrides: identifiers.source=features,
   256 clusters, RQ-VAE 2 levels x 64 codes, kmeans_sample 65,536, 10 RQ-VAE epochs).
2. `cart retrieve` on Q text queries against a small trained store (configs/small.yaml on a
   synthetic corpus: run_import + run_quantize + run_train, 1 epoch; quality is not the point):
     ray     run_retrieve (queries Parquet in, results Parquet out, actor pool)
     direct  GenerativeRetriever.search in one process on the same texts, same k / beam / batch,
             also reading the queries Parquet and writing the results Parquet
   Each arm runs a warm-up call, a tiny call (--tiny-queries) and the full call; the fixed
   start-up cost is the intercept of wall = fixed + Q / rate through the tiny and full calls.

Every arm is its own subprocess, so peaks are separate: the driver's peak RSS is its ru_maxrss;
a sampler thread walks the driver's descendants in /proc every 0.2 s (Ray's gcs_server / raylet /
agents and the worker processes) and records each process's VmHWM, the concurrent sums of VmRSS
and RssAnon (RSS also counts pages of Ray's shared-memory object store, RssAnon does not), CPU
seconds per process class, and the share of the machine's CPU used by processes outside the tree
(other work on the box while timing).

    python benchmarks/pipeline_speed.py --out DIR [--n 1000000] [--queries 2000] \
        [--wait-quiet 600 --retries 2 --max-others 0.10]

On a shared box the timings are only as good as the quiet: every arm records `others_cpu_share`;
--wait-quiet waits for the CPUs to be idle before an arm, --retries reruns an arm that others
disturbed (> --max-others) and keeps the least disturbed attempt (all attempts are listed).
docs/results/pipeline_speed.json was made with `--out DIR --wait-quiet 600 --retries 2`.

writes DIR/pipeline_speed.json ({"meta", "records", "comparisons", "targets"}) and
DIR/pipeline_speed.png. Exits non-zero on bad arguments or when any arm fails (nothing written
then); missed targets are reported (`--strict` makes them fatal).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_OVERHEAD = 2.0          # Ray quantize wall <= 2 x the single-process wall
TARGET_DRIVER_MIB = 4096.0     # driver peak RSS <= 4 GiB (at 1M items)
SINGLE_CHUNK = 65536           # rows encoded per call in the single-process arm

QUANTIZE_DEFAULTS = [
    "identifiers.source=features", "identifiers.coarse=true", "identifiers.fine=rqvae",
    "identifiers.n_clusters=256", "identifiers.kmeans_sample=65536",
    "identifiers.rqvae.levels=2", "identifiers.rqvae.codebook_size=64", "identifiers.rqvae.epochs=10",
    # a 2-core box: actors must not take every CPU or Ray Data's read tasks never get one
    "jobs.quantize_num_cpus=0.5", "jobs.cpus_per_worker=0.5", "jobs.quantize_actors=2",
]
RETRIEVE_DEFAULTS = [
    "identifiers.source=features", "train.epochs=1",
    "jobs.retrieve_num_cpus=0.5", "jobs.cpus_per_worker=0.5", "jobs.retrieve_actors=2", "jobs.train_workers=1",
]


# ------------------------------------------------------------------ process-tree sampling (/proc)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def _stat(pid: int) -> tuple[int, float] | None:
    """(ppid, cpu seconds) from /proc/<pid>/stat (comm may hold spaces: parse after the last ')')."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def _status_kib(pid: int) -> dict[str, int]:
    text = _read(f"/proc/{pid}/status") or ""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssShmem"):
            out[key] = int(rest.split()[0])
    return out


def process_class(cmdline: str) -> tuple[str, str]:
    """('worker' | 'system', short name) for a process under the driver."""
    cmd = cmdline.replace("\0", " ").strip()
    if cmd.startswith("ray::"):
        return "worker", cmd.split()[0][:60]
    if "default_worker.py" in cmd:
        return "worker", "default_worker"
    for name in ("gcs_server", "raylet", "dashboard", "runtime_env", "log_monitor", "monitor.py"):
        if name in cmd:
            return "system", name
    return "system", (cmd.split()[0].rsplit("/", 1)[-1] if cmd else "?")[:60]


def mib(kib: float) -> float:
    return round(kib / 1024, 1)


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat: all but idle + iowait)."""
    fields = [int(x) for x in (_read("/proc/stat") or "cpu 0").splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / CLK_TCK


class TreeSampler(threading.Thread):
    """Samples this process's descendants every `interval` s until stopped."""

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True)
        self.interval = interval
        self.root = os.getpid()
        self.procs: dict[int, dict] = {}          # pid -> {class, name, hwm_kib, anon_kib, cpu_s}
        self.peak_sum_rss = {"worker": 0, "system": 0, "all": 0}
        self.peak_sum_anon = {"worker": 0, "system": 0, "all": 0}
        self.peak_shmem_kib = 0
        self._halt = threading.Event()
        self._t0, self._busy0, self._self_cpu0 = time.perf_counter(), machine_busy_s(), self._own_cpu()

    @staticmethod
    def _own_cpu() -> float:
        t = os.times()
        return t.user + t.system

    def descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                st = _stat(int(entry))
                if st:
                    children.setdefault(st[0], []).append(int(entry))
        out, todo = [], [self.root]
        while todo:
            for child in children.get(todo.pop(), []):
                out.append(child)
                todo.append(child)
        return out

    def sample(self) -> None:
        sums_rss = {"worker": 0, "system": 0}
        sums_anon = {"worker": 0, "system": 0}
        for pid in self.descendants():
            st, status = _stat(pid), _status_kib(pid)
            if not st or "VmRSS" not in status:
                continue
            cls, name = process_class(_read(f"/proc/{pid}/cmdline") or "")
            rec = self.procs.setdefault(pid, {"class": cls, "name": name, "hwm_kib": 0, "anon_kib": 0, "cpu_s": 0.0})
            if name not in ("ray::IDLE", "default_worker") or rec["name"] in ("ray::IDLE", "default_worker"):
                rec["name"], rec["class"] = name, cls  # keep the most specific title (actor > IDLE)
            rec["hwm_kib"] = max(rec["hwm_kib"], status.get("VmHWM", 0))
            rec["anon_kib"] = max(rec["anon_kib"], status.get("RssAnon", 0))
            rec["cpu_s"] = max(rec["cpu_s"], st[1])
            sums_rss[rec["class"]] += status["VmRSS"]
            sums_anon[rec["class"]] += status.get("RssAnon", 0)
            self.peak_shmem_kib = max(self.peak_shmem_kib, status.get("RssShmem", 0))
        for cls in ("worker", "system"):
            self.peak_sum_rss[cls] = max(self.peak_sum_rss[cls], sums_rss[cls])
            self.peak_sum_anon[cls] = max(self.peak_sum_anon[cls], sums_anon[cls])
        self.peak_sum_rss["all"] = max(self.peak_sum_rss["all"], sum(sums_rss.values()))
        self.peak_sum_anon["all"] = max(self.peak_sum_anon["all"], sum(sums_anon.values()))

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.sample()
            except (OSError, ValueError, IndexError) as exc:  # never take the measured job down
                print(f"[pipeline_speed] sampler: {exc!r}", file=sys.stderr)
            self._halt.wait(self.interval)

    def stop(self) -> dict:
        self.sample()
        self._halt.set()
        self.join(timeout=5)
        wall = time.perf_counter() - self._t0
        tree_cpu = sum(p["cpu_s"] for p in self.procs.values()) + self._own_cpu() - self._self_cpu0
        busy = machine_busy_s() - self._busy0
        ncpu = os.cpu_count() or 1
        by_class = {}
        for cls in ("worker", "system"):
            procs = [p for p in self.procs.values() if p["class"] == cls]
            by_class[cls] = {
                "processes": len(procs),
                "max_process_peak_rss_mib": mib(max((p["hwm_kib"] for p in procs), default=0)),
                "peak_sum_rss_mib": mib(self.peak_sum_rss[cls]),
                "peak_sum_anon_mib": mib(self.peak_sum_anon[cls]),
                "cpu_s": round(sum(p["cpu_s"] for p in procs), 2),
            }
        top = sorted(self.procs.values(), key=lambda p: -p["hwm_kib"])[:6]
        busiest = sorted(self.procs.values(), key=lambda p: -p["cpu_s"])[:10]
        return {
            "workers": by_class["worker"], "ray_system": by_class["system"],
            "tree_peak_sum_rss_mib": mib(self.peak_sum_rss["all"]),
            "tree_peak_sum_anon_mib": mib(self.peak_sum_anon["all"]),
            "peak_shmem_mib": mib(self.peak_shmem_kib),
            "largest_processes": [{"name": p["name"], "peak_rss_mib": mib(p["hwm_kib"]),
                                   "peak_anon_mib": mib(p["anon_kib"]), "cpu_s": round(p["cpu_s"], 2)} for p in top],
            "busiest_processes": [{"name": p["name"], "cpu_s": round(p["cpu_s"], 2)} for p in busiest if p["cpu_s"] >= 0.5],
            "driver_cpu_s": round(self._own_cpu() - self._self_cpu0, 2),
            "tree_cpu_s": round(tree_cpu, 2),
            "tree_cores_used": round(tree_cpu / max(wall, 1e-9), 2),
            "others_cpu_share": round(min(1.0, max(0.0, (busy - tree_cpu) / max(wall * ncpu, 1e-9))), 3),
        }


def driver_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ data

def l2n(x):
    import numpy as np

    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32, copy=False)


def mixture_features(n: int, dim: int, components: int, seed: int, chunk: int = 100_000):
    """float32 [n, dim], unit norm: a random centre per component + a Gaussian offset in the
    component's own 8-d subspace + one in a 16-d subspace shared by all + isotropic noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = l2n(rng.standard_normal((components, dim), dtype=np.float32))
    own_rank, shared_rank = min(8, dim), min(16, dim)
    own = np.stack([np.linalg.qr(rng.standard_normal((dim, own_rank)))[0] for _ in range(components)]).astype(np.float32)
    shared = np.linalg.qr(rng.standard_normal((dim, shared_rank)))[0].astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        comp = rng.integers(0, components, m)
        x = centres[comp]
        x += rng.standard_normal((m, dim), dtype=np.float32) * np.float32(0.2 / math.sqrt(dim))
        x += (rng.standard_normal((m, shared_rank), dtype=np.float32) * np.float32(0.6 / math.sqrt(shared_rank))) @ shared.T
        z = rng.standard_normal((m, own_rank), dtype=np.float32) * np.float32(0.6 / math.sqrt(own_rank))
        for c in np.unique(comp):  # one small matmul per component present
            rows = np.flatnonzero(comp == c)
            x[rows] += z[rows] @ own[c].T
        out[start:start + m] = l2n(x)
    return out


# ------------------------------------------------------------------ stages (each runs in its own subprocess)

def cfg_from(p: dict, key: str):
    from cart_core.config import load_config

    return load_config(p[key]["config"], p[key]["overrides"])


def stage_prepare_features(p: dict) -> dict:
    import numpy as np

    from cart_core.store import Manifest, Store, features_table
    from pipelines.parts import write_parts

    t0 = time.perf_counter()
    emb = mixture_features(p["n"], p["dim"], p["components"], p["seed"])
    ids = np.array([f"item-{i:08d}" for i in range(p["n"])], dtype=object)
    store = Store(p["quantize_store"])
    write_parts(store, features_table(ids, emb, "image"), "features/bench")
    store.commit(Manifest(features=["features/bench"], dim=p["dim"]), f"pipeline_speed: {p['n']} synthetic items")
    files = store.parquet_files(["features/bench"])
    return {"prepare_s": round(time.perf_counter() - t0, 2), "parts": len(files),
            "bytes": int(sum(os.path.getsize(f) for f in files))}


def stage_quantize_ray(p: dict) -> dict:
    sampler = TreeSampler()
    sampler.start()
    t0 = time.perf_counter()
    import ray

    from cart_core.store import Store
    from cart_core.index_version import load_ids
    from pipelines.quantize import run_quantize
    from pipelines.runtime import init_ray

    cfg = cfg_from(p, "quantize")
    t_import = time.perf_counter()
    init_ray(None)
    t_init = time.perf_counter()
    store = Store(p["quantize_store"])
    summary = run_quantize(store, cfg)
    t_job = time.perf_counter()
    wall = t_job - t0
    table, meta = load_ids(store, store.manifest())
    n_ids = len(table.item_ids)
    procs = sampler.stop()
    cluster = ray.cluster_resources()
    ray.shutdown()
    return {"wall_s": round(wall, 3), "import_s": round(t_import - t0, 3), "ray_init_s": round(t_init - t_import, 3),
            "job_s": round(t_job - t_init, 3), "phases_s": summary["timings"],
            "driver_peak_rss_mib": round(driver_peak_mib(), 1),
            "job_summary_driver_peak_rss_mib": summary["driver_peak_rss_mib"],
            "fit_sample": summary["counts"]["fit_sample"], "identifiers": n_ids,
            "vocab_sizes": table.vocab_sizes, "collision_rate": meta["report"]["collisions"]["collision_rate"],
            "ray_cluster_cpus": cluster.get("CPU"), "processes": procs}


def stage_quantize_single(p: dict) -> dict:
    sampler = TreeSampler()
    sampler.start()
    t0 = time.perf_counter()
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from cart_core.indexing import (
        encode,
        fit_codebooks,
        identifier_inputs,
        identifiers_from_codes,
        save_codebooks,
    )
    from cart_core.kmeans import cluster_imbalance
    from cart_core.store import Store

    cfg = cfg_from(p, "quantize")
    icfg = cfg.identifiers
    t_import = time.perf_counter()
    store = Store(p["quantize_store"])
    manifest = store.manifest()
    files = store.parquet_files(manifest.features)
    n = sum(pq.read_metadata(f).num_rows for f in files)
    item_ids, feats, row = np.empty(n, dtype=object), None, 0
    for f in files:  # one part at a time into preallocated arrays: peak = features + one part
        t = pq.read_table(f, columns=["item_id", "embedding"])
        col = t.column("embedding").combine_chunks()
        if feats is None:
            feats = np.empty((n, col.type.list_size), dtype=np.float32)
        feats[row:row + len(col)] = col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        item_ids[row:row + len(col)] = t.column("item_id").to_pylist()
        row += len(col)
        del t, col
    t_read = time.perf_counter()
    rng = np.random.default_rng(icfg.seed)
    rows = np.sort(rng.choice(n, icfg.kmeans_sample, replace=False)) if n > icfg.kmeans_sample else np.arange(n)
    sample = identifier_inputs(icfg.source, feats[rows], None)
    codebooks, report = fit_codebooks(sample, icfg, progress=False)
    with tempfile.TemporaryDirectory(prefix="bench-codebooks-") as tmp:
        save_codebooks(codebooks, icfg, tmp)
    t_fit = time.perf_counter()
    parts = [encode(codebooks, identifier_inputs(icfg.source, feats[s:s + SINGLE_CHUNK], None))
             for s in range(0, n, SINGLE_CHUNK)]
    codes = {k: np.concatenate([c[k] for c in parts]) for k in parts[0]}
    del parts
    t_encode = time.perf_counter()
    table = identifiers_from_codes(item_ids, codes["coarse"], codes["fine"], icfg)
    k = icfg.n_clusters if icfg.coarse else 1
    report.update(collisions=table.collision_stats(), vocab_sizes=table.vocab_sizes,
                  fitted_state={**cluster_imbalance(codes["coarse"], k),
                                "mean_assign_sq_distance": float(codes["assign_sq_distance"].mean()),
                                "mean_recon_error": float(codes["recon_error"].mean())})
    out = Path(p["work"]) / "single-ids"
    out.mkdir(parents=True, exist_ok=True)
    table.save(out / "ids.parquet")
    (out / "meta.json").write_text(json.dumps(report, default=str))
    t_ids = time.perf_counter()
    procs = sampler.stop()
    return {"wall_s": round(t_ids - t0, 3), "import_s": round(t_import - t0, 3),
            "phases_s": {"read_s": round(t_read - t_import, 3), "fit_s": round(t_fit - t_read, 3),
                         "encode_s": round(t_encode - t_fit, 3), "ids_s": round(t_ids - t_encode, 3)},
            "driver_peak_rss_mib": round(driver_peak_mib(), 1), "fit_sample": len(rows),
            "identifiers": len(table.item_ids), "vocab_sizes": table.vocab_sizes,
            "collision_rate": report["collisions"]["collision_rate"], "torch_threads": torch.get_num_threads(),
            "processes": procs}


def stage_prepare_retrieve(p: dict) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cart_core.corpus import synthetic_corpus, write_corpus
    from cart_core.store import Store
    from pipelines.importer import run_import
    from pipelines.quantize import run_quantize
    from pipelines.runtime import init_ray
    from pipelines.train import run_train

    t0 = time.perf_counter()
    cfg = cfg_from(p, "retrieve")
    corpus_dir = Path(p["work"]) / "retrieve-corpus"
    corpus = synthetic_corpus(n_items=p["retrieve_items"], dim=p["retrieve_dim"], n_captions=5, seed=p["seed"])
    write_corpus(corpus, corpus_dir)
    init_ray(None)
    store = Store(p["retrieve_store"])
    run_import(store, str(corpus_dir / "items.parquet"), str(corpus_dir / "captions.parquet"), holdout_caption_index=4)
    run_quantize(store, cfg)
    train = run_train(store, cfg)
    held = pq.read_table(corpus_dir / "captions.parquet").to_pandas()
    held = held[held["caption_index"] == 4]
    texts, owners = held["caption"].astype(str).tolist(), held["item_id"].astype(str).tolist()
    files = {}
    for name in ("warm", "tiny", "full"):
        q = p["queries"] if name == "full" else p["tiny_queries"]
        pick = [(i * 7919 + {"warm": 1, "tiny": 2, "full": 3}[name]) % len(texts) for i in range(q)]
        path = Path(p["work"]) / f"queries-{name}.parquet"
        pq.write_table(pa.table({"query_id": [f"{name}-{i}" for i in range(q)], "text": [texts[j] for j in pick],
                                 "item_id": [owners[j] for j in pick]}), path)
        files[name] = str(path)
    import ray

    ray.shutdown()
    return {"prepare_s": round(time.perf_counter() - t0, 2), "queries_files": files,
            "train_loss": train["final_metrics"]["loss"], "items": p["retrieve_items"]}


def fit_line(tiny_q: int, tiny_s: float, full_q: int, full_s: float) -> tuple[float, float]:
    """(fixed seconds, queries/s) of wall = fixed + q / rate through the tiny and the full call."""
    if full_q <= tiny_q or full_s <= tiny_s:
        return float("nan"), float("nan")
    rate = (full_q - tiny_q) / (full_s - tiny_s)
    return tiny_s - tiny_q / rate, rate


def stage_retrieve_ray(p: dict) -> dict:
    sampler = TreeSampler()
    sampler.start()
    t0 = time.perf_counter()
    import pyarrow.parquet as pq
    import ray

    from cart_core.store import Store
    from pipelines.retrieve import run_retrieve
    from pipelines.runtime import init_ray

    cfg = cfg_from(p, "retrieve")
    t_import = time.perf_counter()
    init_ray(None)
    t_init = time.perf_counter()
    store = Store(p["retrieve_store"])
    calls = {}
    for name in ("warm", "tiny", "full"):
        out = Path(p["work"]) / f"results-ray-{name}.parquet"
        s = time.perf_counter()
        summary = run_retrieve(store, p["queries_files"][name], str(out), cfg, k=p["k"])
        calls[name] = {"wall_s": round(time.perf_counter() - s, 3), "queries": summary["counts"]["queries"],
                       "result_rows": pq.read_metadata(out).num_rows, "job_retrieve_s": summary["timings"]["retrieve_s"]}
    procs = sampler.stop()
    ray.shutdown()
    return {"import_s": round(t_import - t0, 3), "ray_init_s": round(t_init - t_import, 3), "calls": calls,
            "driver_peak_rss_mib": round(driver_peak_mib(), 1), "processes": procs}


def stage_retrieve_direct(p: dict) -> dict:
    sampler = TreeSampler()
    sampler.start()
    t0 = time.perf_counter()
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from cart_core.index_version import IndexVersion
    from cart_core.store import Store
    from pipelines.retrieve import RESULT_SCHEMA
    from pipelines.search import load_retriever, ranked_rows

    if p.get("threads"):
        torch.set_num_threads(p["threads"])
    cfg = cfg_from(p, "retrieve")
    t_import = time.perf_counter()
    store = Store(p["retrieve_store"])
    retriever, table = load_retriever(IndexVersion.newest_servable(store))
    t_load = time.perf_counter()
    calls = {}
    for name in ("warm", "tiny", "full"):
        out = Path(p["work"]) / f"results-direct-{name}.parquet"
        s = time.perf_counter()
        q = pq.read_table(p["queries_files"][name], columns=["query_id", "text"])
        texts = [str(t) for t in q.column("text").to_pylist()]
        rows, scores = retriever.search(texts, k=p["k"], beam_size=cfg.eval.beam_size,
                                        batch_size=cfg.jobs.retrieve_batch_size)
        res = ranked_rows(q.column("query_id").to_pylist(), rows, scores, table.item_ids)
        pq.write_table(pa.table(res).select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA), out)
        calls[name] = {"wall_s": round(time.perf_counter() - s, 3), "queries": len(texts),
                       "result_rows": len(res["rank"])}
    procs = sampler.stop()
    return {"import_s": round(t_import - t0, 3), "load_s": round(t_load - t_import, 3), "calls": calls,
            "torch_threads": torch.get_num_threads(), "driver_peak_rss_mib": round(driver_peak_mib(), 1),
            "processes": procs}


STAGES = {"prepare_features": stage_prepare_features, "quantize_ray": stage_quantize_ray,
          "quantize_single": stage_quantize_single, "prepare_retrieve": stage_prepare_retrieve,
          "retrieve_ray": stage_retrieve_ray, "retrieve_direct": stage_retrieve_direct}


# ------------------------------------------------------------------ driver

def log(msg: str) -> None:
    print(f"[pipeline_speed] {msg}", file=sys.stderr, flush=True)


def stage_env() -> dict:
    env = dict(os.environ)
    env.update(RAY_ADDRESS="", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    env.pop("CART_PROGRESS", None)
    return env


def machine_busy_share(seconds: float = 3.0) -> float:
    """Share of all CPUs busy over the next `seconds` (this driver sleeps meanwhile)."""
    b0, t0 = machine_busy_s(), time.perf_counter()
    time.sleep(seconds)
    return (machine_busy_s() - b0) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))


QUIET = {"max_wait_s": 0.0, "threshold": 0.15, "retries": 0, "max_others": 0.10}


def wait_quiet() -> dict:
    """With --wait-quiet S: wait (up to S seconds) until other processes use < 15% of the machine,
    so an arm is not timed while another job shares the CPUs. Returns what was seen."""
    if QUIET["max_wait_s"] <= 0:
        return {}
    t0 = time.perf_counter()
    share = machine_busy_share()
    while share > QUIET["threshold"] and time.perf_counter() - t0 < QUIET["max_wait_s"]:
        log(f"machine {share:.0%} busy with other work; waiting")
        time.sleep(10)
        share = machine_busy_share()
    return {"waited_s": round(time.perf_counter() - t0, 1), "busy_share_before": round(share, 3)}


def run_stage(name: str, params: dict, work: Path, timeout: float, extra: dict | None = None) -> dict:
    """Run one stage in a fresh interpreter (stdout/stderr to work/logs/<tag>.log). A timed arm is
    rerun (up to QUIET["retries"] times) when other processes took more than QUIET["max_others"]
    of the CPUs while it ran; the attempt least disturbed is kept and every attempt is listed."""
    p = {**params, **(extra or {})}
    tag = p.get("tag", name)
    timed = not name.startswith("prepare")
    attempts = []
    for attempt in range(1 + (QUIET["retries"] if timed else 0)):
        quiet = wait_quiet() if timed else {}
        result = _run_once(name, p, f"{tag}-{attempt}" if attempt else tag, work, timeout)
        if not timed:
            return result
        result["quiet_wait"] = quiet
        share = result["processes"]["others_cpu_share"]
        attempts.append(result)
        if share <= QUIET["max_others"]:
            break
        log(f"{tag}: other processes took {share:.0%} of the CPUs while it ran; "
            + ("running it again" if attempt < QUIET["retries"] else "keeping the least disturbed attempt"))
    best = min(attempts, key=lambda r: r["processes"]["others_cpu_share"])
    best["attempts"] = [{"others_cpu_share": r["processes"]["others_cpu_share"],
                         "wall_s": r.get("wall_s", r.get("calls", {}).get("full", {}).get("wall_s"))} for r in attempts]
    return best


def _run_once(name: str, p: dict, tag: str, work: Path, timeout: float) -> dict:
    (work / "logs").mkdir(exist_ok=True)
    pfile, rfile, lfile = work / f"{tag}.params.json", work / f"{tag}.result.json", work / "logs" / f"{tag}.log"
    pfile.write_text(json.dumps(p))
    log(f"{tag} ...")
    t0 = time.perf_counter()
    with open(lfile, "w") as lf:
        try:
            proc = subprocess.run([sys.executable, __file__, "--stage", name, "--params", str(pfile),
                                   "--result", str(rfile)], check=False, stdout=lf, stderr=subprocess.STDOUT,
                                  env=stage_env(), cwd=str(REPO), timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0 or not rfile.exists():
        tail = lfile.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"arm {tag} failed (exit {rc}); last lines of {lfile}:\n{tail}")
    log(f"{tag} done in {time.perf_counter() - t0:.1f}s")
    return json.loads(rfile.read_text())


def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return n


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for pipeline_speed.json / .png")
    ap.add_argument("--n", type=positive, default=1_000_000, help="items quantized")
    ap.add_argument("--dim", type=positive, default=512)
    ap.add_argument("--components", type=positive, default=256, help="mixture components of the features")
    ap.add_argument("--queries", type=positive, default=2000, help="queries in the full retrieve call")
    ap.add_argument("--tiny-queries", type=positive, default=32, help="queries in the warm-up and tiny calls")
    ap.add_argument("--k", type=positive, default=10)
    ap.add_argument("--config", default=str(REPO / "configs" / "default.yaml"), help="quantize config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="quantize config override (after the benchmark's own)")
    ap.add_argument("--retrieve-config", default=str(REPO / "configs" / "small.yaml"))
    ap.add_argument("--retrieve-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--retrieve-items", type=positive, default=2000, help="items of the retrieve store's corpus")
    ap.add_argument("--retrieve-dim", type=positive, default=64)
    ap.add_argument("--direct-threads", default="auto",
                    help="extra direct-retrieve arms with these torch thread counts (comma list; "
                         "'auto' = 1 when torch uses more; 'none')")
    ap.add_argument("--skip", choices=["quantize", "retrieve"], action="append", default=[])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage-timeout", type=float, default=3600)
    ap.add_argument("--work", help="working folder (default: a temporary one, removed after)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each timed arm wait up to S seconds for other processes to use < 15%% of the CPUs")
    ap.add_argument("--retries", type=int, default=0, metavar="R",
                    help="rerun a timed arm up to R times when other processes took > --max-others of the CPUs")
    ap.add_argument("--max-others", type=float, default=0.10, metavar="SHARE")
    ap.add_argument("--strict", action="store_true", help="exit non-zero when a target is missed")
    ap.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:
        return args
    if not args.out:
        ap.error("--out is required")
    if args.retries < 0 or args.wait_quiet < 0 or not 0 < args.max_others <= 1:
        ap.error("--retries and --wait-quiet must be >= 0 and --max-others in (0, 1]")
    if args.queries <= args.tiny_queries:
        ap.error(f"--queries ({args.queries}) must exceed --tiny-queries ({args.tiny_queries})")
    if set(args.skip) == {"quantize", "retrieve"}:
        ap.error("nothing left to measure")
    from cart_core.config import load_config

    try:
        qcfg = load_config(args.config, QUANTIZE_DEFAULTS + args.set)
        rcfg = load_config(args.retrieve_config, RETRIEVE_DEFAULTS + args.retrieve_set)
    except (ValueError, FileNotFoundError) as exc:
        ap.error(str(exc))
    if "quantize" not in args.skip and args.n < qcfg.identifiers.n_clusters:
        ap.error(f"--n ({args.n}) is smaller than identifiers.n_clusters ({qcfg.identifiers.n_clusters})")
    if "retrieve" not in args.skip and args.retrieve_items < rcfg.identifiers.n_clusters:
        ap.error(f"--retrieve-items ({args.retrieve_items}) is smaller than the retrieve config's n_clusters")
    if rcfg.eval.beam_size < args.k:
        ap.error(f"beam size ({rcfg.eval.beam_size}) must be >= k ({args.k})")
    args.direct_threads_list = parse_threads(args.direct_threads, ap)
    args.qcfg, args.rcfg = qcfg, rcfg
    return args


def parse_threads(text: str, ap) -> list[int] | str:
    if text in ("auto", "none"):
        return text
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--direct-threads: {text!r} is not a comma list of integers")
    if not values or min(values) < 1:
        ap.error(f"--direct-threads: {text!r} needs integers >= 1")
    return values


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = (_read("/proc/meminfo") or "MemTotal: 0 kB").splitlines()[0].split()[1]
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_gib": round(int(mem) / 2**20, 1),
            "python": platform.python_version(), "platform": platform.platform(), "load_avg_at_start": os.getloadavg()}


def versions() -> dict:
    code = ("import json, ray, torch, pyarrow, numpy; from cart_core._faiss import import_faiss; "
            "print(json.dumps({'ray': ray.__version__, 'torch': torch.__version__, 'torch_threads': torch.get_num_threads(), "
            "'pyarrow': pyarrow.__version__, 'numpy': numpy.__version__, 'faiss': import_faiss().__version__}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=stage_env(), cwd=str(REPO),
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=str(REPO),
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def quantize_records(args, params, work) -> list[dict]:
    prep = run_stage("prepare_features", params, work, args.stage_timeout)
    log(f"features: {args.n} x {args.dim} in {prep['parts']} parts, {prep['bytes'] / 2**20:.0f} MiB "
        f"(written in {prep['prepare_s']}s, not timed)")
    ray_r = run_stage("quantize_ray", params, work, args.stage_timeout)
    single = run_stage("quantize_single", params, work, args.stage_timeout)
    records = []
    for arm, r in (("ray", ray_r), ("single", single)):
        rec = {"stage": "quantize", "arm": arm, "n": args.n, "dim": args.dim, "wall_s": r["wall_s"],
               "items_per_s": round(args.n / r["wall_s"], 1), **{k: v for k, v in r.items() if k != "wall_s"},
               "input_parquet_mib": round(prep["bytes"] / 2**20, 1)}
        if rec["identifiers"] != args.n:
            raise RuntimeError(f"quantize {arm}: {rec['identifiers']} identifiers for {args.n} items")
        records.append(rec)
    return records


def retrieve_records(args, params, work) -> list[dict]:
    prep = run_stage("prepare_retrieve", params, work, args.stage_timeout)
    params = {**params, "queries_files": prep["queries_files"]}
    arms = [("ray", run_stage("retrieve_ray", params, work, args.stage_timeout)),
            ("direct", run_stage("retrieve_direct", params, work, args.stage_timeout))]
    extra = args.direct_threads_list
    if extra == "auto":
        extra = [1] if arms[1][1]["torch_threads"] > 1 else []
    elif extra == "none":
        extra = []
    for t in extra:
        arms.append((f"direct_{t}thread", run_stage("retrieve_direct", params, work, args.stage_timeout,
                                                    {"threads": t, "tag": f"retrieve_direct_{t}thread"})))
    records = []
    for arm, r in arms:
        calls = r["calls"]
        for name, call in calls.items():
            expected = args.queries if name == "full" else args.tiny_queries
            if call["queries"] != expected or call["result_rows"] < expected:
                raise RuntimeError(f"retrieve {arm}/{name}: {call['queries']} queries, {call['result_rows']} rows")
        fixed, rate = fit_line(args.tiny_queries, calls["tiny"]["wall_s"], args.queries, calls["full"]["wall_s"])
        startup = r.get("ray_init_s", 0.0) + r.get("load_s", 0.0) + r["import_s"]
        rec = {"stage": "retrieve", "arm": arm, "queries": args.queries, "tiny_queries": args.tiny_queries,
               "k": args.k, "beam_size": args.rcfg.eval.beam_size, "batch_size": args.rcfg.jobs.retrieve_batch_size,
               "wall_s": calls["full"]["wall_s"], "queries_per_s": round(args.queries / calls["full"]["wall_s"], 2),
               "steady_queries_per_s": round(rate, 2), "per_call_fixed_s": round(fixed, 3),
               "process_startup_s": round(startup, 3), "first_call_s": calls["warm"]["wall_s"],
               **{k: v for k, v in r.items()}, "retrieve_items": prep["items"]}
        records.append(rec)
    return records


def comparisons_and_targets(records: list[dict], args) -> tuple[dict, list[dict]]:
    by = {(r["stage"], r["arm"]): r for r in records}
    comp, targets = {}, []
    if ("quantize", "ray") in by:
        ray_r, single = by["quantize", "ray"], by["quantize", "single"]
        ratio = ray_r["wall_s"] / single["wall_s"]
        comp["quantize"] = {
            "ray_overhead_ratio": round(ratio, 3),
            "ray_job_only_ratio": round(ray_r["job_s"] / (single["wall_s"] - single["import_s"]), 3),
            "phase_ratios": {k: round(ray_r["phases_s"].get(k, 0) / max(single["phases_s"][k], 1e-9), 2)
                             for k in single["phases_s"]},
        }
        targets.append({"name": f"quantize Ray overhead <= {TARGET_OVERHEAD:g}x single process", "n": args.n,
                        "value": round(ratio, 3), "met": bool(ratio <= TARGET_OVERHEAD)})
        targets.append({"name": f"quantize driver peak RSS <= {TARGET_DRIVER_MIB / 1024:g} GiB", "n": args.n,
                        "value": ray_r["driver_peak_rss_mib"],
                        "met": bool(ray_r["driver_peak_rss_mib"] <= TARGET_DRIVER_MIB),
                        **({"note": "the target is stated at 1M items"} if args.n < 1_000_000 else {})})
    if ("retrieve", "ray") in by:
        ray_r, direct = by["retrieve", "ray"], by["retrieve", "direct"]
        comp["retrieve"] = {
            "ray_over_direct_qps": round(ray_r["queries_per_s"] / direct["queries_per_s"], 3),
            "ray_over_direct_steady_qps": round(ray_r["steady_queries_per_s"] / direct["steady_queries_per_s"], 3),
            "ray_fixed_per_call_s": ray_r["per_call_fixed_s"], "direct_fixed_per_call_s": direct["per_call_fixed_s"],
            "ray_process_startup_s": ray_r["process_startup_s"], "direct_process_startup_s": direct["process_startup_s"],
        }
    return comp, targets


def validate(records: list[dict]) -> list[str]:
    problems = []
    keys = {"quantize": ("wall_s", "items_per_s", "driver_peak_rss_mib"),
            "retrieve": ("wall_s", "queries_per_s", "steady_queries_per_s", "driver_peak_rss_mib")}
    for r in records:
        for key in keys[r["stage"]]:
            v = r.get(key)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                problems.append(f"{r['stage']}/{r['arm']}: {key}={v}")
    return problems


def plot(records: list[dict], comp: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quant = [r for r in records if r["stage"] == "quantize"]
    retr = [r for r in records if r["stage"] == "retrieve"]
    panels = (2 if quant else 0) + (1 if retr else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    if quant:
        ax = axes.pop(0)
        phases = ["read_s", "fit_s", "encode_s", "ids_s"]
        colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8c8c8c"]
        for i, r in enumerate(quant):
            bottom = 0.0
            start = r.get("import_s", 0) + r.get("ray_init_s", 0)
            for label, val, c in [("import + ray.init", start, colors[4])] + [
                    (ph[:-2], r["phases_s"].get(ph, 0), colors[j]) for j, ph in enumerate(phases)]:
                ax.bar(i, val, bottom=bottom, color=c, label=label if i == 0 else None)
                bottom += val
            rest = r["wall_s"] - bottom
            if rest > 0.05 * r["wall_s"]:
                ax.bar(i, rest, bottom=bottom, color="#dddddd", label="other (commit, count)" if i == 0 else None)
            ax.text(i, r["wall_s"], f"{r['wall_s']:.0f}s\n{r['items_per_s'] / 1000:.1f}k items/s", ha="center",
                    va="bottom", fontsize=8)
        ax.set_xticks(range(len(quant)), [r["arm"] for r in quant])
        ax.set_ylabel("wall seconds")
        ratio = comp.get("quantize", {}).get("ray_overhead_ratio")
        ax.set_title(f"quantize, N={quant[0]['n']:,} (Ray/single = {ratio}x)", fontsize=9)
        ax.set_ylim(0, max(r["wall_s"] for r in quant) * 1.45)
        ax.legend(fontsize=7, ncol=3, loc="upper center")
        ax = axes.pop(0)
        labels = ["driver peak", "Ray workers\n(max process)", "Ray workers\n(peak sum, anon)", "Ray system\n(peak sum, anon)"]
        for j, r in enumerate(quant):
            pr = r["processes"]
            vals = [r["driver_peak_rss_mib"], pr["workers"]["max_process_peak_rss_mib"],
                    pr["workers"]["peak_sum_anon_mib"], pr["ray_system"]["peak_sum_anon_mib"]]
            xs = [x + (j - 0.5) * 0.4 for x in range(len(labels))]
            ax.bar(xs, vals, width=0.4, label=r["arm"])
        ax.axhline(TARGET_DRIVER_MIB, color="k", ls="--", lw=0.8, label="4 GiB driver target")
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylabel("MiB")
        ax.set_title("quantize peak memory", fontsize=9)
        ax.legend(fontsize=7)
    if retr:
        ax = axes.pop(0)
        xs = range(len(retr))
        ax.bar([x - 0.2 for x in xs], [r["queries_per_s"] for r in retr], width=0.4, label="full call")
        ax.bar([x + 0.2 for x in xs], [r["steady_queries_per_s"] for r in retr], width=0.4, label="steady (slope)")
        for x, r in zip(xs, retr):
            ax.text(x, max(r["queries_per_s"], r["steady_queries_per_s"]),
                    f"fixed {r['per_call_fixed_s']:.1f}s/call\n+{r['process_startup_s']:.1f}s start", ha="center",
                    va="bottom", fontsize=7)
        ax.set_xticks(list(xs), [r["arm"] for r in retr], fontsize=8)
        ax.set_ylabel("queries/s")
        ax.set_title(f"retrieve, Q={retr[0]['queries']}, beam {retr[0]['beam_size']}, batch {retr[0]['batch_size']}",
                     fontsize=9)
        ax.margins(y=0.25)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage:
        if not args.params or not args.result:
            raise SystemExit("--stage needs --params and --result")
        result = STAGES[args.stage](json.loads(Path(args.params).read_text()))
        Path(args.result).write_text(json.dumps(result, default=str))
        return 0
    QUIET.update(max_wait_s=args.wait_quiet, retries=args.retries, max_others=args.max_others)
    out = Path(args.out)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pipeline-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    params = {"n": args.n, "dim": args.dim, "components": args.components, "seed": args.seed, "k": args.k,
              "queries": args.queries, "tiny_queries": args.tiny_queries, "work": str(work),
              "retrieve_items": args.retrieve_items, "retrieve_dim": args.retrieve_dim,
              "quantize_store": str(work / "quantize-store"), "retrieve_store": str(work / "retrieve-store"),
              "quantize": {"config": args.config, "overrides": QUANTIZE_DEFAULTS + args.set},
              "retrieve": {"config": args.retrieve_config, "overrides": RETRIEVE_DEFAULTS + args.retrieve_set}}
    meta = {"machine": machine(), **versions(), "git_commit": git_commit(), "argv": sys.argv[1:],
            "quantize_config": params["quantize"], "retrieve_config": params["retrieve"],
            "settings": {k: params[k] for k in ("n", "dim", "components", "seed", "queries", "tiny_queries", "k",
                                                "retrieve_items", "retrieve_dim")}}
    t0 = time.perf_counter()
    try:
        records = []
        if "quantize" not in args.skip:
            records += quantize_records(args, params, work)
        if "retrieve" not in args.skip:
            records += retrieve_records(args, params, work)
    except RuntimeError as exc:
        log(str(exc))
        return 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    problems = validate(records)
    if problems:
        log("invalid measurements: " + "; ".join(problems))
        return 1
    comp, targets = comparisons_and_targets(records, args)
    meta["total_s"] = round(time.perf_counter() - t0, 1)
    meta["load_avg_at_end"] = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "records": records, "comparisons": comp, "targets": targets}
    (out / "pipeline_speed.json").write_text(json.dumps(data, indent=2, default=str))
    plot(records, comp, out / "pipeline_speed.png",
         f"{meta['machine']['cpus']} CPU ({meta['machine']['cpu']}), ray {meta['ray']}, torch {meta['torch']}")
    for r in records:
        if r["stage"] == "quantize":
            pr = r["processes"]
            log(f"quantize {r['arm']:>6}: {r['wall_s']:.1f}s, {r['items_per_s']:.0f} items/s, driver peak "
                f"{r['driver_peak_rss_mib']:.0f} MiB, workers max {pr['workers']['max_process_peak_rss_mib']:.0f} MiB "
                f"(peak sum anon {pr['workers']['peak_sum_anon_mib']:.0f} MiB), phases {r['phases_s']}, "
                f"others' CPU share {pr['others_cpu_share']:.0%}")
        else:
            log(f"retrieve {r['arm']:>6}: {r['queries_per_s']:.1f} q/s (steady {r['steady_queries_per_s']:.1f}), "
                f"fixed {r['per_call_fixed_s']:.2f}s/call, process start-up {r['process_startup_s']:.1f}s, "
                f"others' CPU share {r['processes']['others_cpu_share']:.0%}")
    log(f"comparisons: {json.dumps(comp)}")
    for t in targets:
        log(f"target {'met' if t['met'] else 'MISSED'}: {t['name']} (value {t['value']})")
    log(f"wrote {out / 'pipeline_speed.json'} and {out / 'pipeline_speed.png'} in {meta['total_s']}s")
    if args.strict and not all(t["met"] for t in targets):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
