"""End to end as a user runs it: a real Ray head (`ray start --head` on 127.0.0.1, token auth on),
the whole chain submitted with `ray job submit`, outputs checked with pyarrow.

Real data (a slice of Flickr8k from ../shared/data) when present, generated data otherwise.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipelines.data_paths import REPO_ROOT, default_dataset
from tests.pipelines.conftest import ray_node_ports

pytestmark = pytest.mark.slow  # its own `ray start --head`: `make test-slow`

BIN = Path(sys.executable).parent
N_ITEMS = 150


def write_inputs(folder: Path) -> str:
    """items.parquet + captions.parquet for N_ITEMS items; returns a label for the data."""
    from cart_core.corpus import synthetic_corpus, write_corpus

    source = default_dataset()
    if source is None:
        write_corpus(synthetic_corpus(n_items=N_ITEMS, dim=64, n_captions=5, seed=11), folder)
        return "synthetic"
    items = pq.read_table(source / "items.parquet").slice(0, N_ITEMS)
    captions = pq.read_table(source / "captions.parquet")
    captions = captions.filter(pc.is_in(captions["item_id"], items["item_id"]))
    pq.write_table(items, folder / "items.parquet")
    pq.write_table(captions, folder / "captions.parquet")
    return source.name


@pytest.fixture(scope="module")
def ray_head():
    """A separate Ray cluster: its own ports, temp dir and token; stopped by process group."""
    ports, worker = ray_node_ports(("port", "dashboard-port", "ray-client-server-port",
                                    "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                    "runtime-env-agent-port", "metrics-export-port",
                                    "node-manager-port", "object-manager-port"))
    temp_dir = tempfile.mkdtemp(prefix="rayE2E", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", "2",
           "--temp-dir", temp_dir, "--min-worker-port", str(worker), "--max-worker-port", str(worker + 200),
           *[f"--{k}={v}" for k, v in ports.items()]]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.time() + 120
        while True:
            check = subprocess.run([str(BIN / "ray"), "job", "list", "--address", dashboard], env=env,
                                   capture_output=True, text=True)
            if check.returncode == 0:
                break
            if proc.poll() is not None or time.time() > deadline:
                out = proc.stdout.read() if proc.poll() is not None else ""
                raise RuntimeError(f"ray head did not come up: {check.stderr[-2000:]} {out[-2000:]}")
            time.sleep(2)
        yield dashboard, env
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=20)
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_whole_chain_through_ray_job_submit(ray_head, tmp_path):
    dashboard, env = ray_head
    label = write_inputs(tmp_path)
    store, results, report = tmp_path / "store", tmp_path / "results.parquet", tmp_path / "eval"
    queries = tmp_path / "queries.parquet"
    caps = pq.read_table(tmp_path / "captions.parquet")
    caps = caps.filter(pc.equal(caps["caption_index"], 4))
    pq.write_table(pa.table({"query_id": [f"q{i}" for i in range(caps.num_rows)], "text": caps["caption"],
                             "item_id": caps["item_id"]}), queries)
    cart = f"{BIN / 'cart'}"
    common = f"--store {store} --config {REPO_ROOT / 'configs' / 'small.yaml'} --address auto"
    chain = " && ".join([
        f"{cart} import --store {store} --items {tmp_path / 'items.parquet'} --captions {tmp_path / 'captions.parquet'} "
        "--holdout-caption-index 4",
        f"{cart} quantize {common}",
        f"{cart} train {common} --workers 2 --set train.epochs=4",
        f"{cart} retrieve {common} --queries {queries} --out {results} --k 10",
        f"{cart} evaluate {common} --out {report}",
    ])
    submit = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", dashboard, "--", "bash", "-c", chain],
                            env=env, capture_output=True, text=True, timeout=1500)
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert "succeeded" in submit.stdout

    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["version"] == 3 and manifest["generator"] and manifest["extra"]["generator_ids"] == manifest["ids"]
    ids = pq.read_table(store / manifest["ids"] / "ids.parquet")
    assert ids.num_rows == N_ITEMS and ids.schema.field("tokens").type == pa.list_(pa.int32())
    assert len({tuple(t) for t in ids.column("tokens").to_pylist()}) == N_ITEMS
    out = pq.read_table(results)
    assert out.schema.names == ["query_id", "rank", "item_id", "score"]
    assert out.num_rows == N_ITEMS * 10
    assert set(out.column("item_id").to_pylist()) <= set(ids.column("item_id").to_pylist())
    metrics = json.loads((report / "metrics.json").read_text())
    assert [m["method"] for m in metrics] == ["generative", "caption_centroid", "faiss_flat_ridge"]
    assert metrics[0]["queries"] == N_ITEMS and metrics[0]["R@10"] > 100 * 10 / N_ITEMS, (label, metrics)
    jobs = sorted(p.name.split("-")[0] for p in (store / "jobs").glob("*.json"))
    assert jobs == ["evaluate", "import", "quantize", "retrieve", "train"]
