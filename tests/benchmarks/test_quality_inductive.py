"""benchmarks/quality.py: inductive protocol rows, paper rows, merging into an existing quality.json."""
import subprocess
import sys
from pathlib import Path

import numpy as np

from cart_core.config import load_config
from cart_core.corpus import synthetic_corpus
from tests.benchmarks.scripts import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "quality.py"


def load_quality():
    return load_script(SCRIPT, "quality_bench")


def test_holdout_is_seeded_and_sized():
    quality = load_quality()
    a = quality.holdout_items(976, 0.1, seed=0)
    assert a.sum() == 98
    assert np.array_equal(a, quality.holdout_items(976, 0.1, seed=0))
    assert not np.array_equal(a, quality.holdout_items(976, 0.1, seed=1))


def test_paper_rows_are_marked_and_merge_replaces_by_key():
    quality = load_quality()
    rows = quality.paper_rows()
    assert {(r["dataset"], r["R@1"], r["R@5"], r["R@10"]) for r in rows} == {
        ("msr-vtt", 52.6, 75.4, 84.2), ("flickr30k", 81.8, 96.1, 98.4)}
    assert all(r["reported"] is True and r["data"] == "other" for r in rows)
    old = [{"dataset": "d", "method": "generative", "protocol": "transductive", "R@1": 1.0}, *rows]
    new = [{"dataset": "d", "method": "generative", "protocol": "inductive", "catalog": "x", "R@1": 2.0}, *rows]
    merged = quality.merge(old, new)
    assert len(merged) == 4  # transductive kept, inductive added, paper rows not duplicated


def test_inductive_rows_never_train_on_held_out_items(monkeypatch, tmp_path):
    quality = load_quality()
    corpus = synthetic_corpus(n_items=150, dim=16, n_captions=4, n_topics=6, seed=2)
    cfg = load_config(None, [
        "identifiers.n_clusters=8", "identifiers.rqvae.codebook_size=8", "identifiers.rqvae.epochs=2",
        "generator.d_model=32", "generator.n_layers=1", "generator.ff_dim=64", "train.epochs=1",
        "eval.query_caption_index=3", "eval.beam_size=10",
    ])
    unseen = quality.holdout_items(len(corpus), 0.2, seed=0)
    seen_training = []
    real_train = quality.train_generator

    def spy(generator, queries, codes, train_cfg, **kwargs):
        seen_training.extend(queries)
        return real_train(generator, queries, codes, train_cfg, **kwargs)

    monkeypatch.setattr(quality, "train_generator", spy)
    records = quality.inductive_rows(corpus, cfg, unseen, progress=False, captionless_shares=(0.5,))
    tradeoff = [r for r in records if "captionless_query_share" in r]
    records = [r for r in records if "captionless_query_share" not in r]
    # the fusion refitted to favour items without captions: scored on both query sets, whole catalog
    assert sorted(r["catalog"] for r in tradeoff) == ["seen items (caption #3), whole catalog",
                                                      "unseen items, whole catalog"]
    assert all(r["method"] == "hybrid, captionless_query_share=0.5" for r in tradeoff)
    assert quality.plot_tradeoff(tradeoff + records, tmp_path / "tradeoff.png", "t").stat().st_size > 0
    # the non-query captions of seen items, less the slice kept to fit the hybrid's fusion (texts
    # repeat across items here, so compare rows)
    expected = np.flatnonzero(~unseen[corpus.caption_item] & (corpus.caption_index != 3))
    kept = quality.holdout_mask(len(expected), cfg.verify.holdout, cfg.train.seed)
    assert 0 < kept.sum() < len(expected)
    assert seen_training == [corpus.caption_text[i] for i in expected[~kept]]
    assert not unseen[corpus.caption_item[expected]].any()
    methods = ("generative", "faiss_flat_ridge", "hybrid (generate + verify)", "dense: hybrid's signals and weights, all items")
    assert {(r["method"], r["protocol"]) for r in records} == {
        (m, p) for m in methods for p in ("inductive", "transductive")}
    assert len(records) == 12
    unseen_only = [r for r in records if r["catalog"] == "unseen items, unseen-only catalog"]
    assert all(r["catalog_items"] == unseen.sum() and r["queries"] == 4 * unseen.sum() for r in unseen_only)
    for r in records:
        assert 0.0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 100.0 and r["queries_per_s"] > 0
        assert r["identifiers_source"] == "features"


def test_invalid_protocol_exits_non_zero(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--protocols", "sideways"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0 and "--protocols" in result.stderr
