"""Every shell command in README.md, run as written (so a README command that fails is a failing test).

Each ```bash block is split into command lines (backslash continuations joined) and run by bash in a
prepared folder, with `cart` on PATH, `.venv` linking to this interpreter's venv and the inputs
the README names present (photos/, items.parquet, q.parquet, new.parquet, gone.txt, DIR/, ...).
What differs from a user's machine, and why:

- `CART_CONFIG` points every job at configs/small.yaml with tiny, randomly initialised CLIP / CLAP /
  BLIP models built from configs (no weights can be downloaded here); `CART_SHARED_DATA` at a
  generated corpus in the Flickr8k layout (600 items), so `cart demo` takes a minute, not 15;
- `cart serve` runs in the background until its block ends, on a free port in place of 8000;
- the install lines (`make ...`) are not run: CI runs `make test` itself, and the GPU install
  needs a CUDA machine.

The media block runs in one folder; the features block and the reindex block (which continues
from the index the features block built) in another.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cart_core.corpus import synthetic_corpus, write_corpus
from pipelines.data_paths import REPO_ROOT
from tests.pipelines import media_fixtures as mf
from tests.pipelines.conftest import free_port

pytestmark = pytest.mark.slow  # ~10 minutes of real jobs: `make test-slow`

README = REPO_ROOT / "README.md"
NOT_RUN = {
    "make demo": "CI's own install; the demo itself is run below from its README line",
    "make test": "CI runs it; this test is part of it",
    "make install TORCH_SPEC=torch FAISS_EXTRA=gpu": "needs a CUDA machine and CUDA wheels",
}
DIM = 32


def bash_blocks(text: str) -> list[list[str]]:
    """The ```bash blocks of a markdown text, each as its command lines."""
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", body)
        lines = [line.strip() for line in joined.splitlines()]
        blocks.append([line for line in lines if line and not line.startswith("#")])
    return blocks


def command_of(line: str) -> str:
    """The line without its trailing comment (for matching; bash runs the whole line)."""
    return re.split(r"\s+#\s", line, maxsplit=1)[0].strip()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("readme")
    models = root / "models"
    tiny = {"extract.image_model": mf.tiny_clip(models / "clip", dim=DIM),
            "extract.audio_model": mf.tiny_clap(models / "clap", dim=DIM),
            "caption.model": mf.tiny_captioner(models / "blip")}
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "small.yaml").read_text())
    for key, value in {**tiny, "identifiers.n_clusters": 4, "identifiers.rqvae.codebook_size": 4,
                       "caption.frames": 2, "caption.max_new_tokens": 6, "extract.batch_size": 8,
                       "extract.max_audio_s": 2.0, "reindex.keep_versions": 20}.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    (root / "readme-config.yaml").write_text(yaml.safe_dump(cfg))
    shared = root / "shared"
    write_corpus(synthetic_corpus(n_items=600, dim=64, n_captions=5, seed=1), shared / "flickr8k-clip-vitb32")
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", CART_CONFIG=str(root / "readme-config.yaml"),
               CART_SHARED_DATA=str(shared), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_USAGE_STATS_ENABLED="0")
    return {"root": root, "env": env, "venv": bin_dir.parent}


def folder(prepared: dict, name: str) -> Path:
    """A working folder as a user would have it: .venv, token.txt and the block's inputs."""
    cwd = prepared["root"] / name
    if cwd.exists():
        return cwd
    cwd.mkdir()
    (cwd / ".venv").symlink_to(prepared["venv"])
    (cwd / "token.txt").write_text("readme-test-token\n")
    write_corpus(synthetic_corpus(n_items=600, dim=32, n_captions=5, seed=2), cwd / "DIR")  # > demo n_clusters
    mf.write_media_corpus(cwd / "photos", n_videos=2, n_images=8, n_audio=2, bad=False)
    (cwd / "photos" / "media.parquet").unlink()  # `cart scan` writes the media table
    corpus = synthetic_corpus(n_items=200, dim=DIM, n_captions=5, seed=3)
    write_corpus(corpus, cwd / "corpus")
    for name in ("items", "captions"):
        (cwd / f"{name}.parquet").write_bytes((cwd / "corpus" / f"{name}.parquet").read_bytes())
    captions = pq.read_table(cwd / "captions.parquet")
    held = captions.filter(pa.compute.equal(captions.column("caption_index"), 4)).slice(0, 40)
    pq.write_table(pa.table({"query_id": [f"q{i}" for i in range(held.num_rows)], "text": held.column("caption")}),
                   cwd / "q.parquet")
    new = synthetic_corpus(n_items=20, dim=DIM, n_captions=3, seed=4)
    rng = np.random.default_rng(5)
    new_ids = [f"new-{i}" for i in range(20)]
    pq.write_table(pa.table({"item_id": new_ids, "embedding": list(new.embeddings)}), cwd / "new.parquet")
    pq.write_table(pa.table({"item_id": [new_ids[i % 20] for i in range(40)],
                             "caption": [new.caption_text[i] for i in range(40)]}), cwd / "new_captions.parquet")
    old_ids = [str(i) for i in corpus.item_ids]
    (cwd / "gone.txt").write_text("\n".join(old_ids[:3]) + "\n")
    changed = rng.standard_normal((3, DIM)).astype(np.float32)
    changed /= np.linalg.norm(changed, axis=1, keepdims=True)
    pq.write_table(pa.table({"item_id": old_ids[10:13], "embedding": list(changed)}), cwd / "changed.parquet")
    return cwd


def where_block_runs(block: list[str]) -> str:
    text = "\n".join(block)
    if "cart scan" in text:
        return "media"
    if "cart import" in text or "cart reindex" in text:
        return "features"
    return "base"


def run_block(block: list[str], cwd: Path, env: dict) -> list[dict]:
    """Runs the block's lines in order; `cart serve` in the background until the block ends."""
    done, servers = [], []
    port = free_port()
    try:
        for line in block:
            command = command_of(line)
            if command in NOT_RUN:
                done.append({"line": line, "skipped": NOT_RUN[command]})
                continue
            runnable = line.replace("8000", str(port))
            if command.startswith("cart serve"):
                servers.append(subprocess.Popen(["bash", "-c", runnable], cwd=cwd, env=env, start_new_session=True,
                                                stdout=subprocess.DEVNULL, stderr=open(cwd / "serve.log", "w")))
                wait_healthy(port, servers[-1], cwd / "serve.log")
                done.append({"line": line, "background": True})
                continue
            t0 = time.perf_counter()
            result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", runnable], cwd=cwd, env=env,
                                    capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, f"README line failed (exit {result.returncode}): {line}\n" \
                                           f"{result.stderr[-3000:]}\n{result.stdout[-1000:]}"
            done.append({"line": line, "seconds": round(time.perf_counter() - t0, 1), "stdout": result.stdout})
    finally:
        for proc in servers:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return done


def wait_healthy(port: int, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        assert proc.poll() is None, f"cart serve exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"cart serve not healthy after {timeout}s: {log.read_text()[-3000:]}")


def test_readme_has_the_blocks_this_test_expects():
    blocks = bash_blocks(README.read_text())
    assert len(blocks) >= 6
    commands = [command_of(line) for block in blocks for line in block]
    for verb in ("demo", "scan", "extract", "caption", "quantize", "train", "serve", "import", "retrieve",
                 "evaluate", "versions", "config show", "reindex", "rollback", "compact", "check"):
        assert any(c.startswith(f"cart {verb}") or c.startswith(f".venv/bin/cart {verb}") for c in commands), verb
    assert any(c.startswith("curl") for c in commands)


def test_every_readme_command_runs(prepared):
    env, ran = prepared["env"], []
    for block in bash_blocks(README.read_text()):
        cwd = folder(prepared, where_block_runs(block))
        for step in run_block(block, cwd, env):
            ran.append(step)
            if command_of(step["line"]).startswith("curl"):
                answer = json.loads(step["stdout"])
                assert len(answer["results"][0]["items"]) == 5, answer
    features = prepared["root"] / "features"
    assert pq.read_table(features / "results.parquet").num_rows == 40 * 10
    assert (features / "report" / "metrics.json").exists()
    assert (prepared["root"] / "base" / "out" / "demo" / "metrics.json").exists()
    print(json.dumps([{k: v for k, v in s.items() if k != "stdout"} for s in ran], indent=1))
