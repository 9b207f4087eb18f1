"""How fast a delete reaches a live `cart serve` at N items: withdrawn from the loaded version
against a full load of the version the delete commits.

Builds (or, with --reuse, rolls back) a store of N synthetic items (512-d, clustered on the
sphere, 2,000 with captions; configs/default.yaml with identifiers from features, 256 clusters,
one training epoch: the corpus of benchmarks/reindex.py --part scale), loads the newest version
the way a `cart serve` replica does (pipelines/serve.Snapshot), deletes the item that answers a
probe first with `cart reindex --delete`, then times

  withdraw     Snapshot.as_of_commit: what the serve watcher does within a poll of the commit
  full load    Snapshot of the new version: what the loader thread does next (and all a replica
               did before: the deleted item was answered until it finished)

for the default query settings and with neighbour lists followed (`verify.neighbor_seeds=5`,
what large catalogs use: the lists are built at load). Also reports how many of 200 probe
queries the withdrawn snapshot answers exactly as the full load does (top 10), and the
process's resident memory at each step. Writes DIR/serve_takedown.json.

    python benchmarks/serve_takedown.py --out DIR [--n 1000000] [--reuse DIR_OF_AN_EARLIER_RUN]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cart_core.config import load_config  # noqa: E402
from cart_core.store import Store  # noqa: E402

from reindex import SCALE_OVERRIDES as SCALE_CONFIG  # noqa: E402  the 1M store of the reindex benchmark
WORDS = ["red", "blue", "dog", "car", "tree", "river", "city", "beach", "child", "horse"]


def rss_mib() -> float:
    """This process's resident memory now (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build(folder: Path, n: int, cfg) -> Store:
    """The store of benchmarks/reindex.py --part scale: import, quantize, train (Ray jobs)."""
    from pipelines.importer import run_import
    from pipelines.quantize import run_quantize
    from pipelines.train import run_train
    from reindex import synthetic_items

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(1024, 512)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    items = synthetic_items(n, 512, 1, "b", centers)
    pq.write_table(items, folder / "items.parquet")
    ids = items.column("item_id").to_pylist()[:2000]
    texts = [" ".join(WORDS[int(d)] for d in f"{i:04d}"[-4:]) for i in range(len(ids))]
    pq.write_table(pa.table({"item_id": ids, "caption": texts}), folder / "captions.parquet")
    store = Store(folder / "store")
    run_import(store, str(folder / "items.parquet"), str(folder / "captions.parquet"))
    run_quantize(store, cfg)
    run_train(store, cfg)
    return store


def top10(snapshot, queries: list[str]) -> np.ndarray:
    rows, _ = snapshot.retriever.search(queries, k=10, beam_size=20)
    return snapshot.table.item_ids[rows.clip(0)].astype(str)


def measure(store: Store, cfg, query: dict, probes: list[str], folder: Path, label: str) -> dict:
    """One delete against one query setting; the store is rolled back to where it was after."""
    from cart_core.index_version import IndexVersion
    from pipelines.reindex import run_reindex
    from pipelines.maintenance import run_rollback
    from pipelines.serve import Snapshot

    base = store.manifest().version
    out: dict = {"rss_mib_start": rss_mib()}
    t = time.perf_counter()
    loaded = Snapshot(IndexVersion.newest_servable(store), "cpu", query)
    out["first_load_s"] = time.perf_counter() - t
    out["rss_mib_one_version"] = rss_mib()
    before = top10(loaded, probes)
    target = str(before[0, 0])
    (folder / f"delete-{label}.txt").write_text(target + "\n")
    t = time.perf_counter()
    run_reindex(store, cfg, delete=str(folder / f"delete-{label}.txt"))
    out["delete_commit_s"] = time.perf_counter() - t
    committed = store.manifest()
    t = time.perf_counter()
    withdrawn = loaded.as_of_commit(store, committed)
    out["withdraw_s"] = time.perf_counter() - t
    out["rss_mib_after_withdraw"] = rss_mib()
    interim = top10(withdrawn, probes)
    t = time.perf_counter()
    fresh = Snapshot(IndexVersion.newest_servable(store), "cpu", query)
    out["full_load_s"] = time.perf_counter() - t
    out["rss_mib_two_versions"] = rss_mib()
    exact = top10(fresh, probes)
    out["target_answered"] = {"before": bool((before == target).any()), "withdrawn": bool((interim == target).any()),
                              "full_load": bool((exact == target).any())}
    out["probes_same_top10_as_full_load"] = int((interim == exact).all(1).sum())
    out["probes"] = len(probes)
    out["versions"] = {"loaded": loaded.version, "delete": committed.version, "full_load": fresh.version}
    run_rollback(store, base)
    print(label, json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--reuse", type=Path, help="the folder of an earlier run (its store is reused)")
    args = parser.parse_args()
    import torch

    from pipelines.runtime import init_ray
    from pipelines.verify import query_time

    init_ray(None)
    cfg = load_config(REPO / "configs" / "default.yaml", SCALE_CONFIG)
    folder = args.reuse or Path(tempfile.mkdtemp(prefix="cart-takedown-"))
    t = time.perf_counter()
    store = Store(folder / "store") if args.reuse else build(folder, args.n, cfg)
    build_s = None if args.reuse else time.perf_counter() - t
    n = pq.read_metadata(folder / "items.parquet").num_rows
    texts = pq.read_table(folder / "captions.parquet").column("caption").to_pylist()
    probes = texts[:200]
    results = {}
    for label, overrides in (("default", []), ("neighbor_lists", ["verify.neighbor_seeds=5"])):
        query = query_time(load_config(REPO / "configs" / "default.yaml", SCALE_CONFIG + overrides))
        results[label] = measure(store, cfg, query, probes, folder, label)
    record = {"n": n, "build_s": build_s, "store": str(folder), "results": results,
              "meta": {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                       "command": " ".join(sys.argv)}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_takedown.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
