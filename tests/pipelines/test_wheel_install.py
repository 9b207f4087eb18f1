"""The package as a cluster image gets it: a wheel built with `pip wheel`, installed into a fresh venv,
`cart` run from a directory outside the checkout. The default config must come from the wheel
(configs/ ships as `cart_configs`), and import -> quantize -> train -> retrieve must work.

The fresh venv reaches the heavy dependencies (torch, Ray, ...) through a .pth line naming the
development venv's site-packages, a plain path entry: that venv's editable-install hook is not
run, so `cart_core`, `pipelines` and `cart_configs` can only come from the wheel.
"""
from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cart_core.corpus import synthetic_corpus, write_corpus
from pipelines.data_paths import REPO_ROOT

pytestmark = pytest.mark.slow  # builds a wheel and a venv: `make test-slow`


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh venv holding only the built wheel (dependencies by path)."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(root / "dist")], check=True, timeout=300)
    (wheel,) = (root / "dist").glob("cart_ray-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=120)
    purelib = subprocess.run([str(root / "venv" / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "dev-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, timeout=300)
    return root / "venv" / "bin"


def run(bin_dir: Path, cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "CART_SHARED_DATA")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0", **extra)
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_wheel_installs_and_runs_outside_the_checkout(installed, tmp_path):
    where = run(installed, tmp_path, "python", "-c",
                "import cart_core, pipelines.data_paths as d; print(cart_core.__file__); print(d.packaged_config())")
    assert where.returncode == 0, where.stderr[-2000:]
    module, config = where.stdout.split()
    venv = str(installed.parent)
    assert module.startswith(venv) and config.startswith(venv), "code and configs come from the wheel"
    shown = run(installed, tmp_path, "cart", "config", "show")
    assert shown.returncode == 0 and "identifiers:" in shown.stdout and "serve:" in shown.stdout

    write_corpus(synthetic_corpus(n_items=120, dim=32, n_captions=5, seed=4), tmp_path / "corpus")
    caps = pq.read_table(tmp_path / "corpus" / "captions.parquet")
    pq.write_table(pa.table({"query_id": ["q0", "q1"], "text": caps.column("caption").to_pylist()[:2]}),
                   tmp_path / "queries.parquet")
    small = config.replace("default.yaml", "small.yaml")
    store = str(tmp_path / "store")
    steps = [
        ("cart", "import", "--store", store, "--items", "corpus/items.parquet", "--captions", "corpus/captions.parquet"),
        ("cart", "quantize", "--store", store, "--config", small),
        ("cart", "train", "--store", store, "--config", small, "--set", "train.epochs=1"),
        ("cart", "retrieve", "--store", store, "--config", small, "--queries", "queries.parquet", "--out", "out.parquet",
         "--k", "3"),
    ]
    for step in steps:
        result = run(installed, tmp_path, *step)
        assert result.returncode == 0, f"{' '.join(step[:2])}: {result.stderr[-3000:]}"
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.num_rows == 6 and sorted(set(out.column("query_id").to_pylist())) == ["q0", "q1"]


def test_wheel_demo_quick_finds_the_shared_data(installed, tmp_path):
    """`cart demo --quick` from the wheel, outside the checkout, on the data CART_SHARED_DATA names
    (the real ../shared/data when it is there, else a generated corpus in the same layout)."""
    from pipelines.data_paths import shared_data_dir

    shared = shared_data_dir()
    if not (shared / "flickr8k-clip-vitb32" / "items.parquet").exists():
        shared = tmp_path / "shared"
        write_corpus(synthetic_corpus(n_items=600, dim=64, n_captions=5, seed=5), shared / "flickr8k-clip-vitb32")
    env_data = {"CART_SHARED_DATA": str(shared)}
    result = run(installed, tmp_path, "cart", "demo", "--quick", "--out", "demo-out", env=env_data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "corpus: flickr8k-clip-vitb32:" in result.stdout and "GENERATED" not in result.stdout
    records = json.loads((tmp_path / "demo-out" / "metrics.json").read_text())
    assert records[0]["method"].startswith("hybrid") and records[0]["dataset"] == "flickr8k-clip-vitb32"
