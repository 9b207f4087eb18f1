"""`cart demo` as a user runs it: the real console script, real files, real model."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cart_core.corpus import synthetic_corpus, write_corpus

CART = [sys.executable, "-m", "pipelines.cli"]
FAST = ["--quick", "--set", "train.epochs=2", "--set", "identifiers.n_clusters=8",
        "--set", "identifiers.rqvae.codebook_size=8", "--set", "identifiers.rqvae.epochs=2"]
RECORD_KEYS = {"method", "protocol", "R@1", "R@5", "R@10", "MdR", "MRR@10", "queries_per_s"}


def run_cart(*args, env=None):
    return subprocess.run([*CART, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(synthetic_corpus(n_items=120, dim=32, n_captions=5, n_topics=6, seed=3), folder)
    return folder


def test_demo_writes_table_metrics_and_plot(corpus_dir, tmp_path):
    result = run_cart("demo", "--data", str(corpus_dir), "--out", str(tmp_path), *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((tmp_path / "metrics.json").read_text())
    methods = [r["method"] for r in records]
    assert methods[:4] == ["hybrid (generate + verify)", "generative", "caption_centroid", "faiss_flat_ridge"]
    assert len(methods) == 5 and methods[4].startswith("dense: caption_cos")  # the hybrid's signals, all items
    assert records[0]["signals"][:2] == ["caption_cos", "no_caption"] and records[0]["fusion"]["held_out_queries"] > 0
    for rec in records:
        assert RECORD_KEYS <= set(rec) and rec["protocol"] == "transductive"
        assert 0 <= rec["R@1"] <= rec["R@5"] <= rec["R@10"] <= 100 and rec["queries_per_s"] > 0
    assert (tmp_path / "recall.png").stat().st_size > 10_000
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["identifiers"]["collisions"]["items"] == 120
    assert "R@1" in result.stdout and "generative" in result.stdout and "caption_centroid" in result.stdout
    assert "hybrid (generate + verify)" in result.stdout and run["fusion"]["held_out_queries"] > 0


@pytest.mark.slow  # a whole demo in its own process (~25 s): `make test-slow`
def test_demo_without_shared_data_says_so(tmp_path):
    result = run_cart("demo", "--out", str(tmp_path), *FAST, "--set", "train.epochs=1",
                      env={"CART_SHARED_DATA": str(tmp_path / "nowhere")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "GENERATED synthetic corpus" in result.stdout
    records = json.loads((tmp_path / "metrics.json").read_text())
    assert all(r["dataset"] == "synthetic (generated)" for r in records)


def test_demo_rejects_bad_items_with_file_row_reason(corpus_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    table = pq.read_table(corpus_dir / "items.parquet")
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    emb[7, 2] = np.nan
    table = table.set_column(table.schema.get_field_index("embedding"), "embedding",
                             pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1]))
    pq.write_table(table, bad / "items.parquet")
    (bad / "captions.parquet").write_bytes((corpus_dir / "captions.parquet").read_bytes())
    result = run_cart("demo", "--data", str(bad), "--out", str(tmp_path / "out"), *FAST)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "items.parquet" in line and "row 7" in line and "NaN" in line


def test_demo_rejects_corpus_smaller_than_cluster_count(corpus_dir, tmp_path):
    result = run_cart("demo", "--data", str(corpus_dir), "--out", str(tmp_path), *FAST,
                      "--set", "identifiers.n_clusters=500")
    assert result.returncode == 2
    assert "fewer than identifiers.n_clusters=500" in result.stderr


def test_unknown_config_key_is_refused(corpus_dir, tmp_path):
    result = run_cart("demo", "--data", str(corpus_dir), "--out", str(tmp_path), "--set", "train.epochz=3")
    assert result.returncode == 2 and "unknown config key" in result.stderr
