"""Cost as the corpus grows: generative retrieval vs faiss flat and IVF on synthetic clustered corpora.

For every corpus size N a fresh worker process builds, on the same seeded corpus and the same query
batch: the generative index (K-Means + RQ-VAE fitted on a seeded sample of <= 65,536 items with
cart_core.indexing.fit_codebooks, every item encoded in batches, identifiers (k, v1, v2, u) -- what
pipelines/quantize.py does at scale -- plus a `query: vector` generator trained briefly on noisy
item features -> identifier), the hybrid (the same beam, its candidates verified by the exact
cosine to each candidate's fp16 feature, then the 24-item neighbour lists of its best 5 verified candidates
followed and verified too: cart_core/neighbors.py, lists built once per corpus and timed), faiss IndexFlatIP
(exact; its top-10 is the ground truth) and faiss IndexIVFFlat (nlist ~ 4 sqrt(N), nprobe raised
from 1 until recall@10 against flat >= 0.95 on a separate tuning batch). Search is then timed batch
by batch, the three methods interleaved, so all see the same machine state. On a shared machine
every step first waits (up to --quiet-wait s) until other processes use <= 25 % of the CPUs, the
timing is redone (up to --timing-attempts) if they used more meanwhile, and the share they used
during each build and the timing is recorded with the results.

Corpus: a mixture of Gaussians on the unit sphere (seeded): `components` random centres; each item
= centre + a Gaussian offset in the component's own `rank`-dimensional subspace + one in a
`shared_rank`-dimensional subspace common to all components (attributes that recur across
clusters) + small isotropic noise, L2-normalised. Queries: a random item + isotropic noise, normalised, so each query has a true
source item and exact nearest neighbours to recall.

    python benchmarks/scale.py --out DIR [--sizes 10000,100000,1000000]

writes DIR/scale.json ({"meta", "records", "targets"}; one record per method and N with
queries_per_s, p50/p95 ms per batch, recall@10 against exact search, build_s, peak_rss_mib ...)
and DIR/scale.png (log-log queries/s vs N). Exits non-zero if a worker fails or a measurement is
zero / not finite; missed targets are reported in the JSON and on stdout (`--strict` makes them fatal).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

METHODS = ("generative", "hybrid", "faiss_flat", "faiss_ivf")
TARGET_HYBRID_RECALL = 0.95  # hybrid recall@10 against exact search at the largest N
TARGET_FLAT_RATIO = 0.8     # generative q/s at the largest N >= 0.8 x at the smallest N
TARGET_PEAK_MIB = 4096      # peak RSS while indexing 1M items
IVF_TARGET_RECALL = 0.95
QUIET_OTHER_CPU = 0.10     # timings taken while other processes used more CPU than this are redone
QUIET_START_CPU = 0.25     # a step waits to start while other processes use more than this
ENCODE_BATCH = 65536        # items encoded per call once the codebooks are fitted


@dataclass
class Settings:
    dim: int = 512
    components: int = 256        # mixture components
    rank: int = 8                # dimension of each component's own subspace
    spread: float = 0.6          # norm of the offset in the component's own subspace
    shared_rank: int = 16        # dimension of a subspace shared by all components ("attributes")
    shared_spread: float = 0.6   # norm of the offset in the shared subspace
    isotropic: float = 0.2       # norm of the isotropic item noise
    query_noise: float = 0.3     # norm of the isotropic noise added to an item to make a query
    queries: int = 640           # timed query batch (a multiple of batch)
    tune_queries: int = 256      # separate batch for IVF nprobe tuning
    batch: int = 64
    beam: int = 10
    k: int = 10
    hybrid_candidates: int = 100  # verified per query: beam items, then items under its (k, v1) / (k, v1, v2) prefixes
    hybrid_depth: int = 2         # shallowest prefix expanded: 2 = (k, v1)
    hybrid_seeds: int = 5         # then the neighbour lists of the best verified 5 (cart_core/neighbors.py; 0 = off)
    hybrid_neighbors: int = 24    # neighbour list length per item (100 + 5 x 24: chosen on 1M dev runs, docs/benchmarks.md)
    n_clusters: int = 256        # identifier (k, v1, v2, u): vocab [256, 64, 64, u]
    codebook: int = 64
    levels: int = 2
    fit_sample: int = 65536      # K-Means + RQ-VAE are fitted on a seeded sample of this many items
    rq_steps: int = 1000         # RQ-VAE optimiser steps (epochs = steps * 1024 / sample, clipped to [1, 50])
    train_items: int = 50000     # generator: items sampled for training pairs
    train_copies: int = 2        # noisy copies per sampled item
    gen_epochs: int = 3
    repeats: int = 3             # timed passes over the query batch
    timing_attempts: int = 3     # re-time while other processes used > 10 % of the CPUs during timing
    quiet_wait: float = 900.0    # before each step, wait up to this many s for other processes to quieten
    seed: int = 0


# ---------------------------------------------------------------- data

def l2n(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32, copy=False)


def make_corpus(n: int, s: Settings) -> tuple[np.ndarray, np.ndarray]:
    """Items float32 [n, dim] (unit norm) and their mixture component [n]. Component c has a random
    unit centre and its own random `rank`-dimensional subspace; the mixture depends on the seed only,
    so every N samples the same distribution."""
    rng = np.random.default_rng(s.seed)
    centres = l2n(rng.standard_normal((s.components, s.dim), dtype=np.float32))
    rng = np.random.default_rng([s.seed, n])
    component = rng.integers(0, s.components, n)
    order = np.argsort(component, kind="stable")
    bounds = np.searchsorted(component[order], np.arange(s.components + 1))
    items = np.empty((n, s.dim), dtype=np.float32)
    basis_rng = np.random.default_rng([s.seed, 1])
    shared = np.linalg.qr(basis_rng.standard_normal((s.dim, s.shared_rank)))[0].astype(np.float32)
    for c in range(s.components):  # one small matmul per component: no [n, dim, rank] temporary
        basis = np.linalg.qr(basis_rng.standard_normal((s.dim, s.rank)))[0].astype(np.float32)
        rows = order[bounds[c]:bounds[c + 1]]
        z = rng.standard_normal((len(rows), s.rank), dtype=np.float32) * (s.spread / math.sqrt(s.rank))
        g = rng.standard_normal((len(rows), s.dim), dtype=np.float32) * (s.isotropic / math.sqrt(s.dim))
        w = rng.standard_normal((len(rows), s.shared_rank), dtype=np.float32) * (s.shared_spread / math.sqrt(s.shared_rank))
        items[rows] = l2n(centres[c] + z @ basis.T + w @ shared.T + g)
    return items, component


def near_items(items: np.ndarray, rows: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    g = rng.standard_normal((len(rows), items.shape[1]), dtype=np.float32) * (noise / math.sqrt(items.shape[1]))
    return l2n(items[rows] + g)


# ---------------------------------------------------------------- measurement helpers

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


class PeakRSS:
    """Peak resident memory of this process over a block. Linux lets a process reset its high-water
    mark (write 5 to /proc/self/clear_refs), so one worker can measure several steps; where that is
    not allowed the peak is the process peak so far (flagged with reset=False)."""

    def __enter__(self) -> "PeakRSS":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.before_mib = rss_mib()
        return self

    def __exit__(self, *exc) -> None:
        self.peak_mib = max(_status_kib("VmHWM"), _status_kib("VmRSS")) / 1024


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found ∩ truth| / k over queries (-1 rows in found never match)."""
    hits = [len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth)]
    return float(np.mean(hits) / truth.shape[1])


def source_hit(found: np.ndarray, source: np.ndarray) -> float:
    return float(np.mean([src in row for row, src in zip(found, source)]))


# ---------------------------------------------------------------- methods

def build_generative(items: np.ndarray, s: Settings, log) -> tuple[object, dict]:
    import torch

    from cart_core.config import IdentifierConfig
    from cart_core.generator import Generator, GeneratorConfig
    from cart_core.indexing import encode, fit_codebooks, identifiers_from_codes
    from cart_core.retrieval import GenerativeRetriever
    from cart_core.rqvae import RQVAEConfig
    from cart_core.training import TrainConfig, train_generator

    n = len(items)
    fit_n = min(n, s.fit_sample)
    epochs = int(min(50, max(1, round(s.rq_steps * 1024 / fit_n))))
    cfg = IdentifierConfig(
        n_clusters=s.n_clusters, kmeans_sample=fit_n, seed=s.seed,
        rqvae=RQVAEConfig(levels=s.levels, codebook_size=s.codebook, epochs=epochs, seed=s.seed),
    )
    item_ids = np.array([f"i{i:07d}" for i in range(n)], dtype=object)
    fit_rows = np.sort(np.random.default_rng([s.seed, n, 4]).choice(n, fit_n, replace=False))
    # warm-up on a few rows: one-time imports and allocator start-up are not build cost
    fit_codebooks(items[:max(s.n_clusters, s.codebook) * 2],
                  IdentifierConfig(n_clusters=s.n_clusters, rqvae=RQVAEConfig(levels=s.levels, codebook_size=s.codebook,
                                                                             epochs=1)), progress=False)
    # as pipelines/quantize.py does at scale: fit K-Means + RQ-VAE on a seeded sample, then encode
    # every item batch by batch and number the collisions
    wait_for_quiet(s.quiet_wait, log, "the generative index build")
    with PeakRSS() as mem, OtherLoad() as load:
        t0 = time.perf_counter()
        codebooks, report = fit_codebooks(items[fit_rows], cfg, progress=False)
        fit_s = time.perf_counter() - t0
        coarse, fine = [], []
        for start in range(0, n, ENCODE_BATCH):
            codes = encode(codebooks, items[start:start + ENCODE_BATCH])
            coarse.append(codes["coarse"])
            fine.append(codes["fine"])
        encode_s = time.perf_counter() - t0 - fit_s
        table = identifiers_from_codes(item_ids, np.concatenate(coarse), np.concatenate(fine), cfg)
        build_s = time.perf_counter() - t0
    log(f"  generative index: {build_s:.1f} s (fit {fit_s:.1f} s on {fit_n}, encode {encode_s:.1f} s), "
        f"peak {mem.peak_mib:.0f} MiB, vocab {table.vocab_sizes}, other processes {100 * load.frac:.0f} % CPU")

    rng = np.random.default_rng([s.seed, n, 1])
    sample = rng.choice(n, min(n, s.train_items), replace=False)
    rows = np.repeat(sample, s.train_copies)
    queries = near_items(items, rows, s.query_noise, rng)
    torch.manual_seed(s.seed)
    gen_cfg = GeneratorConfig(vocab_sizes=list(table.vocab_sizes), query="vector", query_dim=items.shape[1])
    generator = Generator(gen_cfg)
    wait_for_quiet(s.quiet_wait, log, "generator training")
    with PeakRSS() as train_mem, OtherLoad() as train_load:
        history = train_generator(
            generator, queries, table.codes[rows],
            TrainConfig(epochs=s.gen_epochs, batch_size=256, lr=2e-3, rdrop_weight=0.0, seed=s.seed), progress=False,
        )
    log(f"  generator: {len(rows)} pairs x {s.gen_epochs} epochs, {history['train_s']:.1f} s, "
        f"final nll {history['nll'][-1]:.3f}")
    retriever = GenerativeRetriever(generator, table)

    def search(q: np.ndarray) -> np.ndarray:
        return retriever.search_batch(q, k=s.k, beam_size=s.beam)[0]

    from cart_core.fusion import Fusion
    from cart_core.hybrid import VerifiedRetriever, VerifyConfig, item_neighbors
    from cart_core.verify import ItemVectors

    # vector queries live in the feature space: verification is the exact cosine to each
    # candidate's stored fp16 feature (one signal, so no weights to fit)
    vectors = ItemVectors.build(None, items)
    verify_cfg = VerifyConfig(candidates=s.hybrid_candidates, expand_depth=s.hybrid_depth,
                              neighbor_seeds=s.hybrid_seeds, neighbors=s.hybrid_neighbors)
    wait_for_quiet(s.quiet_wait, log, "the neighbour lists")
    with PeakRSS() as nb_mem, OtherLoad() as nb_load:
        t0 = time.perf_counter()
        neighbors = item_neighbors(vectors, table, verify_cfg)
        neighbors_s = time.perf_counter() - t0
    if neighbors is not None:
        log(f"  neighbour lists: {neighbors.shape[1]} per item in {neighbors_s:.1f} s, peak {nb_mem.peak_mib:.0f} MiB")
    hybrid = VerifiedRetriever(generator, table, vectors, None, Fusion(["feature_cos"], [1.0]), verify_cfg,
                               neighbors=neighbors)

    def search_hybrid(q: np.ndarray) -> np.ndarray:
        return hybrid.search_batch(q, k=s.k, beam_size=s.beam)[0]

    info = {
        "build_s": build_s, "peak_rss_mib": mem.peak_mib, "rss_before_mib": mem.before_mib,
        "peak_reset": mem.reset, "build_other_cpu_frac": load.frac, "train_other_cpu_frac": train_load.frac,
        "train_s": history["train_s"], "train_pairs": len(rows),
        "train_peak_rss_mib": train_mem.peak_mib, "train_final_nll": history["nll"][-1],
        "beam_size": s.beam, "vocab_sizes": list(table.vocab_sizes), "identifier_length": table.length,
        "fit_s": fit_s, "encode_s": encode_s, "fit_sample": fit_n,
        "kmeans_s": report["timings"]["kmeans_s"], "rqvae_s": report["timings"]["fine_s"],
        "rqvae_epochs": epochs, "rqvae_perplexity": report["rqvae"]["perplexity"],
        "kmeans_imbalance": report["kmeans"]["imbalance"], "collisions": table.collision_stats(),
    }
    hybrid_info = {**info, "candidates": s.hybrid_candidates, "expand_depth": s.hybrid_depth,
                   "neighbor_seeds": s.hybrid_seeds, "neighbors_per_item": s.hybrid_neighbors,
                   "neighbors_s": neighbors_s, "neighbors_peak_rss_mib": nb_mem.peak_mib,
                   "neighbors_other_cpu_frac": nb_load.frac,
                   "verify_bytes_per_item": hybrid.items.bytes_per_item()
                   + (0 if neighbors is None else neighbors.shape[1] * neighbors.itemsize)}
    return search, info, search_hybrid, hybrid_info


def build_flat(items: np.ndarray, s: Settings):
    import faiss

    with PeakRSS() as mem:
        t0 = time.perf_counter()
        index = faiss.IndexFlatIP(items.shape[1])
        index.add(items)
        build_s = time.perf_counter() - t0
    info = {"build_s": build_s, "peak_rss_mib": mem.peak_mib, "rss_before_mib": mem.before_mib, "peak_reset": mem.reset}
    return index, info


def build_ivf(items: np.ndarray, s: Settings, tune_q: np.ndarray, tune_truth: np.ndarray, log):
    import faiss

    n = len(items)
    nlist = max(1, round(4 * math.sqrt(n)))
    wait_for_quiet(s.quiet_wait, log, "the IVF build")
    with PeakRSS() as mem, OtherLoad() as load:
        t0 = time.perf_counter()
        quantizer = faiss.IndexFlatIP(items.shape[1])
        index = faiss.IndexIVFFlat(quantizer, items.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng([s.seed, n, 2])
        train_n = min(n, 40 * nlist)  # faiss asks for >= 39 points per centroid
        index.train(items[np.sort(rng.choice(n, train_n, replace=False))])
        index.add(items)
        build_s = time.perf_counter() - t0
    nprobe, tuned = 1, []
    while True:
        index.nprobe = nprobe
        r = recall_at_k(index.search(tune_q, s.k)[1], tune_truth)
        tuned.append({"nprobe": nprobe, "recall@10": r})
        if r >= IVF_TARGET_RECALL or nprobe >= nlist:
            break
        nprobe = min(nlist, nprobe * 2)
    log(f"  ivf: nlist {nlist}, build {build_s:.1f} s, nprobe {nprobe} (tuning recall {r:.3f})")
    info = {"build_s": build_s, "peak_rss_mib": mem.peak_mib, "rss_before_mib": mem.before_mib,
            "peak_reset": mem.reset, "build_other_cpu_frac": load.frac, "nlist": nlist, "nprobe": nprobe, "train_points": train_n, "nprobe_tuning": tuned}
    return index, info


class OtherLoad:
    """Share of the machine's CPU time used by *other* processes over a block (from /proc/stat
    minus this process's own CPU time): timings taken with other work running say so."""

    @staticmethod
    def _busy_s() -> float:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> "OtherLoad":
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy_s(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        other = (self._busy_s() - self.busy0) - (time.process_time() - self.own0)
        self.frac = max(0.0, other) / max(wall * (os.cpu_count() or 1), 1e-9)


def wait_for_quiet(max_wait_s: float, log, what: str) -> float:
    """On a shared machine: wait (at most max_wait_s) until other processes use at most
    QUIET_START_CPU of the CPUs over 10 s, then let `what` start. Returns the seconds waited."""
    if max_wait_s <= 0:
        return 0.0
    t0 = time.perf_counter()
    while True:
        with OtherLoad() as load:
            time.sleep(10)
        waited = time.perf_counter() - t0
        if load.frac <= QUIET_START_CPU:
            if waited > 15:
                log(f"  waited {waited:.0f} s for a quiet machine before {what}")
            return waited
        if waited >= max_wait_s:
            log(f"  machine still busy ({100 * load.frac:.0f} % CPU used by others) after {waited:.0f} s: {what} anyway")
            return waited


def time_interleaved(searchers: dict, batches: list[np.ndarray], repeats: int) -> tuple[dict, dict]:
    """Per-batch latencies (s) for every method, methods interleaved batch by batch; also the
    results of the first pass."""
    latencies = {name: [] for name in searchers}
    results = {name: [] for name in searchers}
    for fn in searchers.values():  # warm-up
        fn(batches[0])
    for rep in range(repeats):
        for batch in batches:
            for name, fn in searchers.items():
                t0 = time.perf_counter()
                rows = fn(batch)
                latencies[name].append(time.perf_counter() - t0)
                if rep == 0:
                    results[name].append(rows)
    return latencies, {name: np.concatenate(r) for name, r in results.items()}


def run_worker(n: int, s: Settings) -> list[dict]:
    import faiss
    import torch

    def log(msg: str) -> None:
        print(f"[n={n}] {msg}", file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    items, _ = make_corpus(n, s)
    rng = np.random.default_rng([s.seed, n, 3])
    source = rng.choice(n, s.queries + s.tune_queries, replace=False)
    all_q = near_items(items, source, s.query_noise, rng)
    test_q, tune_q = all_q[: s.queries], all_q[s.queries:]
    test_src = source[: s.queries]
    corpus_mib = rss_mib()
    log(f"corpus {items.shape} in {time.perf_counter() - t_start:.1f} s, RSS {corpus_mib:.0f} MiB")

    # generative first: its build peak is then measured with only the corpus resident
    gen_search, gen_info, hybrid_search, hybrid_info = build_generative(items, s, log)
    wait_for_quiet(s.quiet_wait, log, "the flat build")
    flat, flat_info = build_flat(items, s)
    truth = flat.search(test_q, s.k)[1]
    tune_truth = flat.search(tune_q, s.k)[1]
    ivf, ivf_info = build_ivf(items, s, tune_q, tune_truth, log)

    searchers = {
        "generative": gen_search,
        "hybrid": hybrid_search,
        "faiss_flat": lambda q: flat.search(q, s.k)[1],
        "faiss_ivf": lambda q: ivf.search(q, s.k)[1],
    }
    batches = [test_q[i:i + s.batch] for i in range(0, len(test_q), s.batch)]
    best = None
    for attempt in range(1, s.timing_attempts + 1):
        wait_for_quiet(s.quiet_wait, log, f"timing pass {attempt}")
        with OtherLoad() as load:
            latencies, found = time_interleaved(searchers, batches, s.repeats)
        log(f"  timing pass {attempt}: other processes used {100 * load.frac:.0f} % of the CPUs")
        if best is None or load.frac < best[0].frac:
            best = (load, latencies, found, attempt)
        if load.frac <= QUIET_OTHER_CPU:
            break
    load, latencies, found, attempt = best
    infos = {"generative": gen_info, "hybrid": hybrid_info, "faiss_flat": flat_info, "faiss_ivf": ivf_info}
    records = []
    for name in METHODS:
        lat = np.asarray(latencies[name])
        rec = {
            "method": name, "n": n, "dim": s.dim, "batch": s.batch,
            "queries_per_s": float(len(lat) * s.batch / lat.sum()),
            "p50_ms": float(np.percentile(lat, 50) * 1e3), "p95_ms": float(np.percentile(lat, 95) * 1e3),
            "recall@10": recall_at_k(found[name], truth),
            "source_hit@10": source_hit(found[name], test_src),
            "timed_batches": len(lat),
            **infos[name],
        }
        records.append(rec)
        log(f"  {name:>10}: {rec['queries_per_s']:8.1f} q/s  p50 {rec['p50_ms']:7.1f} ms  "
            f"recall@10 {rec['recall@10']:.3f}  build {rec['build_s']:.1f} s  peak {rec['peak_rss_mib']:.0f} MiB")
    for rec in records:
        rec.update(corpus_rss_mib=corpus_mib, timing_other_cpu_frac=load.frac, timing_pass=attempt, loadavg_1m=os.getloadavg()[0], worker_wall_s=time.perf_counter() - t_start,
                   worker_max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   torch_threads=torch.get_num_threads(), faiss_threads=faiss.omp_get_max_threads())
    return records


# ---------------------------------------------------------------- driver

def validate(records: list[dict], sizes: list[int]) -> list[str]:
    """Problems that make the run unusable (zeros, NaNs, missing rows)."""
    problems = []
    for n in sizes:
        for m in METHODS:
            if not any(r["method"] == m and r["n"] == n for r in records):
                problems.append(f"no record for {m} at n={n}")
    for r in records:
        for key in ("queries_per_s", "p50_ms", "p95_ms", "build_s", "peak_rss_mib"):
            v = r.get(key)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                problems.append(f"{r['method']} n={r['n']}: {key}={v!r}")
        rc = r.get("recall@10")
        if not isinstance(rc, float) or not 0.0 <= rc <= 1.0:
            problems.append(f"{r['method']} n={r['n']}: recall@10={rc!r}")
    flat = [r for r in records if r["method"] == "faiss_flat"]
    if any(r["recall@10"] < 0.999 for r in flat):
        problems.append("faiss flat does not reproduce its own exact top-10")
    return problems


def evaluate_targets(records: list[dict]) -> list[dict]:
    by = {(r["method"], r["n"]): r for r in records}
    sizes = sorted({r["n"] for r in records})
    lo, hi = sizes[0], sizes[-1]
    targets = []
    if hi > lo:
        ratio = by["generative", hi]["queries_per_s"] / by["generative", lo]["queries_per_s"]
        targets.append({"target": f"generative q/s at N={hi} >= {TARGET_FLAT_RATIO} x q/s at N={lo}",
                        "value": ratio, "met": ratio >= TARGET_FLAT_RATIO})
    ratio = by["generative", hi]["queries_per_s"] / by["faiss_flat", hi]["queries_per_s"]
    targets.append({"target": f"generative q/s >= faiss flat q/s at N={hi}", "value": ratio, "met": ratio >= 1.0})
    if ("hybrid", hi) in by:
        h = by["hybrid", hi]
        targets.append({"target": f"hybrid recall@10 against exact >= {TARGET_HYBRID_RECALL} at N={hi}",
                        "value": h["recall@10"], "met": h["recall@10"] >= TARGET_HYBRID_RECALL})
        if hi > lo:
            ratio = h["queries_per_s"] / by["hybrid", lo]["queries_per_s"]
            targets.append({"target": f"hybrid q/s at N={hi} >= {TARGET_FLAT_RATIO} x q/s at N={lo}",
                            "value": ratio, "met": ratio >= TARGET_FLAT_RATIO})
        ratio = h["queries_per_s"] / by["faiss_flat", hi]["queries_per_s"]
        targets.append({"target": f"hybrid q/s >= faiss flat q/s at N={hi}", "value": ratio, "met": ratio >= 1.0})
        ratio = by["generative", hi]["queries_per_s"] / h["queries_per_s"]
        targets.append({"target": f"hybrid latency <= 1.3 x beam search alone at N={hi}", "value": ratio,
                        "met": ratio <= 1.3})
    peak = by["generative", hi]["peak_rss_mib"]
    targets.append({"target": f"peak RSS while indexing N={hi} <= {TARGET_PEAK_MIB} MiB", "value": peak,
                    "met": peak <= TARGET_PEAK_MIB,
                    "note": f"includes the corpus itself ({by['generative', hi]['rss_before_mib']:.0f} MiB resident before)"})
    return targets


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    labels = {"generative": "generative (beam {beam})", "hybrid": "hybrid: beam {beam} + verify + neighbour lists", "faiss_flat": "faiss IndexFlatIP",
              "faiss_ivf": "faiss IndexIVFFlat (recall@10 ≥ 0.95)"}
    for m, marker in zip(METHODS, "oDs^"):
        rows = sorted((r for r in records if r["method"] == m), key=lambda r: r["n"])
        label = labels[m].format(beam=rows[0].get("beam_size"))
        ax.plot([r["n"] for r in rows], [r["queries_per_s"] for r in rows], marker=marker, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("corpus size N (items)")
    ax.set_ylabel("queries / s (batch 64)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": model, "cpus": os.cpu_count(), "memory_gib": round(mem_gib, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(part)) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(n <= 0 for n in sizes):
        raise argparse.ArgumentTypeError(f"--sizes must be positive integers, got {text!r}")
    return sorted(set(sizes))


def settings_args(parser: argparse.ArgumentParser) -> None:
    for f in Settings.__dataclass_fields__.values():
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output folder (scale.json, scale.png)")
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("10000,100000,1000000"))
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    settings_args(parser)
    args = parser.parse_args(argv)
    s = Settings(**{k: getattr(args, k) for k in Settings.__dataclass_fields__})
    if args.worker is not None:
        Path(args.worker_out).write_text(json.dumps(run_worker(args.worker, s)))
        return 0
    if not args.out:
        parser.error("--out is required")
    if s.queries % s.batch or s.queries <= 0 or s.batch <= 0:
        parser.error("--queries must be a positive multiple of --batch")
    if s.k > s.beam:
        parser.error("--k cannot exceed --beam")
    too_small = [n for n in args.sizes if n < max(s.n_clusters, s.codebook, s.queries + s.tune_queries)]
    if too_small:
        parser.error(f"sizes {too_small} are smaller than the identifier clusters / query batches")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, records = time.perf_counter(), []
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(s).items()]
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "records.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), f"--worker={n}", f"--worker-out={result}", *passthrough]
            rc = subprocess.run(cmd, check=False).returncode
            if rc != 0 or not result.exists():
                print(f"scale: worker for n={n} failed (exit {rc}); no results written", file=sys.stderr)
                return 2
            records += json.loads(result.read_text())
    problems = validate(records, args.sizes)
    if problems:
        print("scale: invalid measurements, refusing to report:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 3
    import faiss
    import torch

    targets = evaluate_targets(records)
    meta = {"machine": machine(), "torch": torch.__version__, "torch_threads": records[0]["torch_threads"],
            "faiss": faiss.__version__, "faiss_threads": records[0]["faiss_threads"],
            "settings": asdict(s), "sizes": args.sizes, "wall_s": time.perf_counter() - started,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]] if argv is None else argv)}
    (out / "scale.json").write_text(json.dumps({"meta": meta, "records": records, "targets": targets}, indent=2))
    plot(records, out / "scale.png", f"{meta['machine']['cpus']} CPU, {meta['machine']['cpu']}; d={s.dim}")
    print(f"\n{'method':>12} {'N':>9} {'q/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'R@10':>6} {'build s':>8} {'peak MiB':>9}")
    for r in records:
        print(f"{r['method']:>12} {r['n']:>9} {r['queries_per_s']:9.1f} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} "
              f"{r['recall@10']:6.3f} {r['build_s']:8.1f} {r['peak_rss_mib']:9.0f}")
    for t in targets:
        print(f"{'MET   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']:.3g}")
    if args.strict and not all(t["met"] for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
