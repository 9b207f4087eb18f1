"""A worker node lost in the middle of a job, on a real multi-node Ray cluster on this machine.

`ray start` runs a head and two worker nodes (their own ports, 2 logical CPUs each, token auth on); the
store is on the local S3 server. The real `cart` CLI runs as a driver on the head. In the middle of
`cart quantize` and of `cart train`, every process of the worker node doing the work is killed by
PID (SIGKILL: a machine lost, no goodbye). Ray Data retries the lost tasks and restarts the lost
actors elsewhere; Ray Train restarts its worker on the surviving node (`jobs.train_max_failures`),
and the training loop resumes from the run's newest checkpoint in the store. Either job may also
fail with a clear message, and then a rerun must finish. Versions committed before the job stay
byte-for-byte the same. Every process the test starts is stopped by PID.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # its own 3-node cluster: `make test-slow`

from pipelines.data_paths import REPO_ROOT
from tests.pipelines.conftest import ray_node_ports

BIN = Path(sys.executable).parent
AGENTS = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")  # a node's own processes, not the job's
SMALL = str(REPO_ROOT / "configs" / "small.yaml")
HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
              "node-manager-port", "object-manager-port")
WORKER_PORTS = ("node-manager-port", "object-manager-port", "runtime-env-agent-port", "metrics-export-port",
                "dashboard-agent-listen-port", "dashboard-agent-grpc-port")


def descendants(pid: int) -> list[int]:
    """pid and every process below it, from /proc (no psutil here)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_tree(pid: int) -> None:
    for p in reversed(descendants(pid)):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Node:
    def __init__(self, name: str, proc: subprocess.Popen):
        self.name, self.proc = name, proc

    def runs(self, marker: str = "") -> bool:
        """Whether a process of this node runs a task or actor (Ray's proc title `ray::<name>`, not
        `ray::IDLE`) with `marker` in its name."""
        titles = [cmdline(p) for p in descendants(self.proc.pid)[1:]]
        return any(t.startswith("ray::") and not t.startswith(AGENTS) and marker in t for t in titles)

    def kill(self) -> None:
        kill_tree(self.proc.pid)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head with no CPU (the drivers attach to it; work goes to the workers) and worker nodes of
    2 logical CPUs each (one node must hold an actor and a retried 1-CPU task alone after the other
    is lost), token auth on; `add_worker` joins one more, as an autoscaler would replace a node."""
    temp_dir = tempfile.mkdtemp(prefix="rayNF", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    nodes: list[Node] = []
    try:
        ports, worker = ray_node_ports(HEAD_PORTS, start=20000)
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "0",
             "--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir, "--min-worker-port", str(worker),
             "--max-worker-port", str(worker + 200), *[f"--{k}={v}" for k, v in ports.items()]],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        nodes.append(Node("head", head))
        gcs = f"127.0.0.1:{ports['port']}"
        wait_for_nodes(gcs, env, 1, nodes)

        def add_worker(name: str) -> Node:
            wports, wstart = ray_node_ports(WORKER_PORTS, start=21000 + 2500 * (len(nodes) % 4))
            proc = subprocess.Popen(
                [str(BIN / "ray"), "start", "--address", gcs, "--block", "--node-ip-address", "127.0.0.1",
                 "--num-cpus", "2", "--temp-dir", temp_dir, "--min-worker-port", str(wstart),
                 "--max-worker-port", str(wstart + 200), *[f"--{k}={v}" for k, v in wports.items()]],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            nodes.append(Node(name, proc))
            wait_for_nodes(gcs, env, sum(n.proc.poll() is None for n in nodes), nodes)
            return nodes[-1]

        add_worker("a")
        add_worker("b")
        yield {"gcs": gcs, "env": env, "nodes": nodes, "add_worker": add_worker}
    finally:
        for node in nodes:
            kill_tree(node.proc.pid)
            try:
                node.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_nodes(gcs: str, env: dict, n: int, nodes: list[Node], timeout: float = 120) -> None:
    code = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if nodes[-1].proc.poll() is not None:
            raise RuntimeError(f"ray node {nodes[-1].name} exited at start-up")
        out = subprocess.run([sys.executable, "-c", code, gcs], env=env, capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise RuntimeError(f"{n} ray nodes did not come up in {timeout} s")


def cart(cluster: dict, *args: str) -> subprocess.Popen:
    """A `cart` verb as a driver of the cluster (`import` reads and writes the store only: no Ray)."""
    ray_args = [] if args[0] == "import" else ["--config", SMALL, "--address", cluster["gcs"]]
    return subprocess.Popen([str(BIN / "cart"), *args, *ray_args],
                            env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        return -9, out
    return proc.returncode, out


def committed(store_url: str) -> dict[str, bytes]:
    """Every committed manifest of the store, as bytes."""
    from cart_core.store import Store

    store = Store(store_url)
    return {path: store.fs.cat_file(path) for path in store.history_files()}


def kill_when(node_of: callable, proc: subprocess.Popen, timeout: float = 300) -> tuple[str, float]:
    """Poll until `node_of()` names a worker node to kill; kill it. (name, seconds into the job)."""
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        node = node_of()
        if node is not None:
            node.kill()
            return node.name, time.time() - t0
        time.sleep(0.2)
    raise AssertionError(f"the job ended (exit {proc.poll()}) before a node could be killed mid-run")


RAY_LOG_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|pid=|autoscaler|gcs_server|monitor)")


def own_lines(out: str) -> list[str]:
    """The job's output without the log lines Ray forwards to the driver whenever they arrive (a
    killed node's raylet can report after the job's last line)."""
    return [line for line in out.strip().splitlines() if not RAY_LOG_LINE.match(line)]


def run_and_kill(cluster: dict, store_url: str, verb: str, pick, *args: str, rerun: tuple[str, ...] = ()) -> dict:
    before = committed(store_url)
    proc = cart(cluster, verb, "--store", store_url, *args)
    t0 = time.time()
    killed, at = kill_when(pick, proc)
    code, out = finish(proc)
    result = {"killed": killed, "killed_at_s": at, "exit": code, "output": out, "reran": False,
              "finished_s": time.time() - t0}
    if code != 0:  # a clear one-line message, then a rerun finishes
        last = own_lines(out)[-1]
        assert last.startswith(f"cart {verb}: failed: "), last
        code, out = finish(cart(cluster, verb, "--store", store_url, *args, *rerun))
        result.update(exit=code, output=out, reran=True, finished_s=time.time() - t0)
    assert result["exit"] == 0, result["output"][-3000:]
    after = committed(store_url)
    assert {p: after[p] for p in before} == before, "a committed version changed"
    assert len(after) == len(before) + 1
    return result


def test_lost_node_during_quantize_then_train(cluster, tmp_path):
    import fsspec

    from cart_core.corpus import synthetic_corpus, write_corpus
    from cart_core.store import Store

    write_corpus(synthetic_corpus(n_items=400, dim=32, n_captions=5, seed=21), tmp_path)
    fs = fsspec.filesystem("s3")
    for name in ("items.parquet", "captions.parquet"):
        fs.put_file(str(tmp_path / name), f"cart-test/node-faults/input/{name}")
    store_url = "s3://cart-test/node-faults/store"
    code, out = finish(cart(cluster, "import", "--store", store_url,
                            "--items", "s3://cart-test/node-faults/input/items.parquet",
                            "--captions", "s3://cart-test/node-faults/input/captions.parquet",
                            "--holdout-caption-index", "4"))
    assert code == 0, out[-3000:]
    workers = lambda: [n for n in cluster["nodes"][1:] if n.proc.poll() is None]  # noqa: E731

    def busy_worker():  # the first worker node running a task or actor of the job
        return next((n for n in workers() if n.runs()), None)

    q = run_and_kill(cluster, store_url, "quantize", busy_worker)
    cluster["add_worker"]("c")  # the replacement node an autoscaler would start
    store = Store(store_url)

    def train_worker():  # the training worker's node, once epoch 1 is checkpointed
        runs = store.listdir("generator")
        if not any(store.exists(f"generator/{r}/checkpoints/epoch-0001/state.json") for r in runs):
            return None
        return next((n for n in workers() if n.runs("RayTrainWorker")), None)

    t = run_and_kill(cluster, store_url, "train", train_worker, "--workers", "2",
                     "--set", "train.epochs=8", "--set", "jobs.cpus_per_worker=0.5", rerun=("--resume",))
    assert store.manifest().generator and store.manifest().ids
    for verb, r in (("quantize", q), ("train", t)):
        print(f"{verb}: node {r['killed']} killed {r['killed_at_s']:.1f} s in; finished {r['finished_s']:.1f} s "
              f"after the start, rerun needed: {r['reran']}")
    if not t["reran"]:
        assert "restarted: resuming from" in t["output"]
