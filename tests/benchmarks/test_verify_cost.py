"""benchmarks/verify_cost.py at a tiny size: alternating passes, medians, the split of the hybrid."""
from pathlib import Path

from cart_core.config import load_config
from cart_core.corpus import synthetic_corpus
from tests.benchmarks.scripts import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "verify_cost.py"


def test_measure_times_alternating_passes_and_splits_the_hybrid():
    verify_cost = load_script(SCRIPT, "verify_cost_bench")
    corpus = synthetic_corpus(n_items=120, dim=16, n_captions=4, n_topics=6, seed=3)
    cfg = load_config(None, [
        "identifiers.n_clusters=8", "identifiers.rqvae.codebook_size=8", "identifiers.rqvae.epochs=2",
        "generator.d_model=32", "generator.n_layers=1", "generator.ff_dim=64", "train.epochs=1",
        "eval.query_caption_index=3", "eval.beam_size=10", "verify.align.epochs=1", "verify.candidates=40",
    ])
    row = verify_cost.measure(corpus, cfg, repeats=3, progress=False)
    assert set(row["seconds"]) == {"beam_only", "hybrid", "hybrid_generation"}
    assert all(len(s) == 3 and min(s) > 0 for s in row["seconds"].values())
    assert row["queries"] == 120 and row["candidates"] == 40 and row["train_epochs"] == 1
    ratio = row["latency_ratio_hybrid_to_beam_only"]
    assert ratio > 0 and row["met"] == (ratio <= verify_cost.TARGET)
    assert len(row["per_pass_ratios"]) == 3 and row["verification_s_per_1k_queries"] >= 0
