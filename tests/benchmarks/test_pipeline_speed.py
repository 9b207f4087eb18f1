"""benchmarks/pipeline_speed.py end to end at a tiny size (real local Ray in the arms' subprocesses),
and its refusals."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.scripts import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "pipeline_speed.py"
TINY = ["--n", "3000", "--dim", "64", "--components", "32", "--queries", "512", "--tiny-queries", "8",
        "--retrieve-items", "200", "--direct-threads", "none",
        "--set", "identifiers.n_clusters=16", "--set", "identifiers.rqvae.codebook_size=8",
        "--set", "identifiers.rqvae.epochs=1", "--set", "identifiers.rqvae.hidden_dim=32",
        "--set", "identifiers.rqvae.latent_dim=16", "--set", "jobs.quantize_batch_size=1024"]


def run(*args, timeout=420):
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.run([sys.executable, str(SCRIPT), *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=str(REPO))


def load_module():
    return load_script(SCRIPT, "pipeline_speed_bench")


@pytest.mark.slow  # four arms, each its own process and Ray instance: ~110 s, `make test-slow`
def test_tiny_run_writes_records_and_plot(tmp_path):
    result = run("--out", str(tmp_path), *TINY)
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads((tmp_path / "pipeline_speed.json").read_text())
    assert {"machine", "ray", "torch", "torch_threads", "git_commit"} <= set(data["meta"])
    assert data["meta"]["machine"]["cpus"] >= 1
    by = {(r["stage"], r["arm"]): r for r in data["records"]}
    assert set(by) == {("quantize", "ray"), ("quantize", "single"), ("retrieve", "ray"), ("retrieve", "direct")}
    for arm in ("ray", "single"):
        r = by["quantize", arm]
        assert r["n"] == 3000 and r["identifiers"] == 3000
        assert r["vocab_sizes"][:3] == [16, 8, 8]
        for key in ("wall_s", "items_per_s", "driver_peak_rss_mib"):
            assert r[key] > 0 and math.isfinite(r[key]), (arm, key)
        assert set(r["phases_s"]) >= {"read_s", "fit_s", "encode_s", "ids_s"}
    ray_q = by["quantize", "ray"]
    assert ray_q["ray_init_s"] > 0 and ray_q["fit_sample"] > 0
    assert ray_q["processes"]["workers"]["processes"] > 0          # the sampler saw Ray's worker processes
    assert ray_q["processes"]["workers"]["max_process_peak_rss_mib"] > 0
    assert ray_q["processes"]["ray_system"]["processes"] > 0      # gcs_server, raylet, ...
    assert by["quantize", "single"]["processes"]["workers"]["processes"] == 0
    for arm in ("ray", "direct"):
        r = by["retrieve", arm]
        assert r["queries"] == 512 and r["calls"]["full"]["result_rows"] == 512 * 10
        assert r["calls"]["tiny"]["queries"] == 8
        assert r["queries_per_s"] > 0 and r["steady_queries_per_s"] > 0
        assert math.isfinite(r["per_call_fixed_s"]) and r["process_startup_s"] > 0
    comp = data["comparisons"]
    assert comp["quantize"]["ray_overhead_ratio"] == pytest.approx(
        by["quantize", "ray"]["wall_s"] / by["quantize", "single"]["wall_s"], rel=1e-2)
    assert comp["retrieve"]["ray_over_direct_qps"] > 0
    assert [t["met"] in (True, False) for t in data["targets"]] == [True, True]
    assert (tmp_path / "pipeline_speed.png").stat().st_size > 0


@pytest.mark.parametrize("args", [
    [],                                             # --out missing
    ["--n", "0"],
    ["--n", "abc"],
    ["--n", "100"],                                 # fewer items than the 256 identifier clusters
    ["--queries", "8", "--tiny-queries", "8"],      # the full call must be larger than the tiny one
    ["--set", "identifiers.n_clusters=many"],       # not an int
    ["--set", "identifiers.nonsense=1"],            # unknown key
    ["--retrieve-set", "eval.beam_size=5"],         # beam < k
    ["--direct-threads", "0"],
    ["--retries", "-1"],
    ["--max-others", "0"],
    ["--skip", "quantize", "--skip", "retrieve"],
])
def test_invalid_arguments_exit_non_zero(tmp_path, args):
    out = [] if not args else ["--out", str(tmp_path)]
    result = run(*out, *args, timeout=60)
    assert result.returncode != 0
    assert not (tmp_path / "pipeline_speed.json").exists()


def test_failed_arm_fails_loudly(tmp_path):
    # identifiers from captions pass the config checks (they do not know the store), and the quantize
    # job refuses them once Ray has started: the benchmark's store holds no captions
    result = run("--out", str(tmp_path), "--skip", "retrieve", "--n", "500", "--dim", "32", "--components", "8",
                 "--set", "identifiers.n_clusters=8", "--set", "identifiers.source=captions", timeout=120)
    assert result.returncode != 0
    assert "arm quantize_ray failed" in result.stderr
    assert "the committed index has no queries yet" in result.stderr
    assert not (tmp_path / "pipeline_speed.json").exists()


def test_fit_line_recovers_fixed_cost_and_rate():
    bench = load_module()
    fixed, rate = bench.fit_line(10, 2.0 + 10 / 50, 1010, 2.0 + 1010 / 50)
    assert fixed == pytest.approx(2.0) and rate == pytest.approx(50.0)
    assert all(math.isnan(v) for v in bench.fit_line(10, 5.0, 1010, 4.0))


def test_tree_sampler_sees_a_child_process():
    bench = load_module()
    sampler = bench.TreeSampler(interval=0.05)
    # sampled under a shell of its own, so processes an earlier test left (a Ray cluster) do not count
    shell = subprocess.Popen(["sh", "-c", f"'{sys.executable}' -c "
                                          f"'import time; x = bytearray(64 << 20); time.sleep(0.6)'; true"])
    sampler.root = shell.pid
    sampler.start()
    shell.wait()
    procs = sampler.stop()
    assert procs["ray_system"]["processes"] == 1   # a non-Ray child counts with the system processes
    assert procs["ray_system"]["max_process_peak_rss_mib"] >= 64
    assert procs["tree_cpu_s"] >= 0 and 0 <= procs["others_cpu_share"] <= 1
