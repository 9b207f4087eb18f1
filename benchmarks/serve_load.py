"""`cart serve` under concurrent clients, with and without a misbehaving one (issue 12's targets).

Builds a Flickr8k store once (out/bench/serve-store: import with caption #4 held out, quantize,
train with configs/demo-quick.yaml; generated data when ../shared/data is absent), starts the
real `cart serve` CLI on 127.0.0.1 with a bearer token, and measures with N client threads each
sending R requests of one held-out caption (k=10):

  clean     N clients x R requests
  invalid   the same while one more client sends invalid queries (lone surrogate, blank, too long)
  big_body  the same while one more client sends 5 MB bodies (time to its 4xx, others' p99)

Writes docs/results/serve/serve_load.json and serve_load.png (latency CDF per scenario). The clients
share the 2 cores with the server here, so absolute latencies are pessimistic; the comparisons
between scenarios are what the targets are about.

    python benchmarks/serve_load.py [--clients 64] [--requests 10]
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.data_paths import default_dataset  # noqa: E402

CONFIG = REPO / "configs" / "demo-quick.yaml"


def build_store(folder: Path) -> tuple[str, list[str]]:
    """The served store (built once) and the held-out captions the clients send."""
    from cart_core.config import load_config
    from cart_core.corpus import synthetic_corpus, write_corpus
    from cart_core.store import Store

    data = default_dataset()
    if data is None:
        data = folder / "data"
        write_corpus(synthetic_corpus(n_items=1000, dim=64, n_captions=5, seed=1), data)
    store = Store(folder / "store")
    if not store.exists("manifest.json") or not store.manifest().generator:
        from pipelines.importer import run_import
        from pipelines.quantize import run_quantize
        from pipelines.runtime import init_ray
        from pipelines.train import run_train

        init_ray()
        cfg = load_config(CONFIG)
        run_import(store, str(data / "items.parquet"), str(data / "captions.parquet"), holdout_caption_index=4)
        run_quantize(store, cfg)
        run_train(store, cfg)
        import ray

        ray.shutdown()
    caps = pq.read_table(data / "captions.parquet")
    texts = [t for t, i in zip(caps.column("caption").to_pylist(), caps.column("caption_index").to_pylist()) if i == 4]
    return store.url, texts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: str, token_file: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "cart"), "serve", "--store", store, "--config",
                             str(CONFIG), "--port", str(port), "--token-file", str(token_file)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"cart serve exited with {proc.returncode}")
        time.sleep(1)
    raise RuntimeError("cart serve did not come up in 240 s")


def clients(url: str, token: str, texts: list[str], n: int, per: int, extra=None) -> dict:
    """n threads x per requests; an optional extra thread runs `extra(stop)` meanwhile."""
    auth = {"Authorization": f"Bearer {token}"}
    latencies, failures, lock = [], [], threading.Lock()

    def one(i: int) -> None:
        session = requests.Session()
        for r in range(per):
            query = texts[(i * per + r) % len(texts)]
            t0 = time.perf_counter()
            try:
                resp = session.post(f"{url}/search", json={"queries": [query], "k": 10}, headers=auth, timeout=300)
                ok = resp.status_code == 200 and len(resp.json()["results"][0]["items"]) > 0
            except requests.RequestException as exc:
                ok, resp = False, exc
            with lock:
                latencies.append(time.perf_counter() - t0)
                if not ok:
                    failures.append(getattr(resp, "status_code", repr(resp)))

    stop = threading.Event()
    side = threading.Thread(target=extra, args=(stop,)) if extra else None
    if side:
        side.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    if side:
        side.join()
    lat = np.sort(np.asarray(latencies))
    return {"requests": len(lat), "failed": len(failures), "failure_codes": sorted({str(f) for f in failures})[:5],
            "p50_s": round(float(np.percentile(lat, 50)), 3), "p99_s": round(float(np.percentile(lat, 99)), 3),
            "requests_per_s": round(len(lat) / wall, 1), "latencies": [round(float(x), 4) for x in lat]}


def invalid_sender(url: str, token: str, record: dict):
    bodies = [{"queries": ["a dog", "\ud800"], "k": 10}, {"queries": ["   "], "k": 10},
              {"queries": ["x" * 5000], "k": 10}, {"queries": ["a cat"], "k": 0}]

    def run(stop: threading.Event) -> None:
        statuses, i = [], 0
        while not stop.is_set():
            r = requests.post(f"{url}/search", json=bodies[i % len(bodies)], headers={"Authorization": f"Bearer {token}"},
                              timeout=60)
            statuses.append(r.status_code)
            i += 1
        record.update(sent=len(statuses), statuses=sorted(set(statuses)))
    return run


def big_body_sender(url: str, token: str, record: dict):
    body = json.dumps({"queries": ["a dog " * 850] * 1000, "k": 10}).encode()  # ~5 MB

    def run(stop: threading.Event) -> None:
        times, statuses = [], []
        while not stop.is_set():
            t0 = time.perf_counter()
            r = requests.post(f"{url}/search", data=body, timeout=60,
                              headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            times.append(time.perf_counter() - t0)
            statuses.append(r.status_code)
            time.sleep(0.2)
        record.update(sent=len(times), statuses=sorted(set(statuses)), body_bytes=len(body),
                      max_answer_s=round(max(times), 3), median_answer_s=round(float(np.median(times)), 3))
    return run


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results["scenarios"].items():
        lat = np.asarray(r["latencies"])
        ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=f"{name} (p99 {r['p99_s']} s, {r['failed']} failed)")
    ax.set_xlabel("request latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"cart serve: {results['clients']} clients x {results['requests_per_client']} requests")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--work", default=str(REPO / "out" / "bench" / "serve"))
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "serve"))
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    store, texts = build_store(work)
    token = secrets.token_hex(16)
    (work / "token").write_text(token)
    proc, url = start_server(store, work / "token")
    try:
        clients(url, token, texts, 4, 2)  # warm-up
        results = {"store": store, "clients": args.clients, "requests_per_client": args.requests,
                   "machine": f"{os.cpu_count()} CPU cores, clients and server on the same machine", "scenarios": {}}
        results["scenarios"]["clean"] = clients(url, token, texts, args.clients, args.requests)
        invalid: dict = {}
        results["scenarios"]["invalid"] = clients(url, token, texts, args.clients, args.requests,
                                                  invalid_sender(url, token, invalid))
        results["invalid_client"] = invalid
        big: dict = {}
        results["scenarios"]["big_body"] = clients(url, token, texts, args.clients, args.requests,
                                                   big_body_sender(url, token, big))
        results["big_body_client"] = big
        no_token = requests.post(f"{url}/search", json={"queries": ["a dog"], "k": 10}, timeout=60)
        results["without_token_status"] = no_token.status_code
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    clean, bad, big_s = (results["scenarios"][k] for k in ("clean", "invalid", "big_body"))
    results["targets"] = {
        "clean_0_failed": clean["failed"] == 0,
        "invalid_0_failed_among_valid": bad["failed"] == 0 and results["invalid_client"]["statuses"] == [400],
        "big_body_4xx_under_1s": results["big_body_client"]["statuses"] == [413]
        and results["big_body_client"]["max_answer_s"] < 1.0,
        "big_body_others_p99_not_doubled": big_s["p99_s"] <= 2 * clean["p99_s"],
        "401_without_token": results["without_token_status"] == 401,
    }
    (out / "serve_load.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "serve_load.png")
    summary = {k: {m: v for m, v in r.items() if m != "latencies"} for k, r in results["scenarios"].items()}
    print(json.dumps({"scenarios": summary, "invalid_client": invalid, "big_body_client": big,
                      "targets": results["targets"]}, indent=1))


if __name__ == "__main__":
    main()
