"""The learned caption metric: what it scores, what it learns, how it is stored and used."""
import numpy as np
import pytest
import torch

from cart_core.candidates import expand_beam
from cart_core.caption_metric import CaptionMetric, CaptionMetricConfig, fit_caption_metric
from cart_core.kmeans import l2_normalize
from cart_core.verify import ItemVectors, candidate_signals, dense_scores, mask_captions

from tests.cart_core.test_decoding import random_catalog
from tests.cart_core.test_hybrid import beam_over


def noisy_captions(n_items=60, per_item=5, seed=0):
    """Captions whose item shows only in dims 0-7 (weakly); dims 8-23 are loud noise that every
    caption has: the plain cosine is swamped by it, a metric can learn to look past it."""
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(n_items, 8)).astype(np.float32)

    def draw(rows):
        signal = 0.6 * items[rows]
        noise = 2.0 * rng.normal(size=(len(rows), 16))
        return l2_normalize(np.hstack([signal, noise]).astype(np.float32))

    rows = np.repeat(np.arange(n_items), per_item)
    queries = np.arange(n_items)
    return draw(rows), rows, draw(queries), queries


def metric_top1(metric, vectors, rows, queries, gold, n_items):
    sums = np.zeros((n_items, vectors.shape[1]), np.float32)
    np.add.at(sums, rows, vectors)
    cent = l2_normalize(sums)
    score = (metric.query_side(queries) @ cent.T) / metric.item_norms(cent)[None, :]
    return float(np.mean(score.argmax(1) == gold))


def test_the_untrained_metric_is_the_plain_cosine():
    rng = np.random.default_rng(0)
    q, c = l2_normalize(rng.normal(size=(4, 12)).astype(np.float32)), l2_normalize(rng.normal(size=(4, 12)).astype(np.float32))
    metric = CaptionMetric(12)
    np.testing.assert_allclose(metric.cosine(q, c), (q * c).sum(1), atol=1e-6)
    np.testing.assert_allclose(metric.item_norms(c), 1.0, atol=1e-6)


def test_the_factored_score_equals_the_cosine_of_the_mapped_vectors():
    rng = np.random.default_rng(1)
    metric = CaptionMetric(12)
    metric.proj.weight.data = metric.proj.weight.data + 0.5 * torch.randn(12, 12)
    q, c = rng.normal(size=(5, 12)).astype(np.float32), l2_normalize(rng.normal(size=(5, 12)).astype(np.float32))
    factored = np.einsum("bd,bd->b", metric.query_side(q), c) / metric.item_norms(c)
    np.testing.assert_allclose(factored, metric.cosine(q, c), atol=1e-5)
    assert metric.item_norms(np.zeros((2, 12), np.float16)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("negatives", [16384, 20])  # every item scored per step, or a sample of them
def test_fitting_learns_what_tells_items_apart(negatives):
    vectors, rows, queries, gold = noisy_captions()
    plain = metric_top1(CaptionMetric(24), vectors, rows, queries, gold, 60)
    learned = fit_caption_metric(vectors, rows, 60, CaptionMetricConfig(epochs=40, batch_size=64, lr=3e-3,
                                                                        negatives=negatives))
    fitted = metric_top1(learned, vectors, rows, queries, gold, 60)
    assert fitted >= plain + 0.3, (plain, fitted)


def test_items_with_one_caption_are_skipped_and_none_leaves_the_identity():
    vectors, rows, _, _ = noisy_captions(n_items=10, per_item=1)
    metric = fit_caption_metric(vectors, rows, 10, CaptionMetricConfig(epochs=2))
    np.testing.assert_array_equal(metric.proj.weight.detach().numpy(), np.eye(24, dtype=np.float32))
    with pytest.raises(ValueError, match="3 caption vectors but 2 item rows"):
        fit_caption_metric(vectors[:3], rows[:2], 10)


def test_round_trips_and_refuses_a_mismatched_file(tmp_path):
    vectors, rows, queries, _ = noisy_captions(n_items=20)
    metric = fit_caption_metric(vectors, rows, 20, CaptionMetricConfig(epochs=3))
    metric.save(tmp_path)
    assert CaptionMetric.exists(tmp_path)
    loaded = CaptionMetric.load(tmp_path)
    np.testing.assert_allclose(loaded.query_side(queries), metric.query_side(queries), atol=1e-6)
    (tmp_path / "caption_metric.json").write_text('{"dim": 12}')
    with pytest.raises(ValueError, match=r"caption_metric.safetensors: weight \(24, 24\), expected \(12, 12\)"):
        CaptionMetric.load(tmp_path)
    with pytest.raises(ValueError, match="caption metric of 24 dims for 12-dim"):
        ItemVectors.build(np.ones((3, 12), np.float32), None, metric=metric)


def test_candidate_signal_matches_the_dense_score_and_handles_missing_captions():
    table = random_catalog(n=50, k=3, v=3)
    trie, beam = beam_over(table, beam=4)
    cands = expand_beam(beam, trie, cap=30, min_depth=1)
    rng = np.random.default_rng(2)
    captions = rng.normal(size=(50, 6)).astype(np.float32)
    captions[::3] = 0
    metric = CaptionMetric(6)
    metric.proj.weight.data = metric.proj.weight.data + 0.3 * torch.randn(6, 6)
    items = ItemVectors.build(captions, None, metric=metric)
    q = rng.normal(size=(3, 6)).astype(np.float32)
    sig = candidate_signals(q, cands, items)
    rows, valid = cands.rows.clip(0), cands.valid
    dense = dense_scores(q, items, None, ["caption_metric_cos"], [1.0])
    np.testing.assert_allclose(sig["caption_metric_cos"][valid], np.take_along_axis(dense, rows, 1)[valid], atol=2e-3)
    no_cap = (rows % 3 == 0) & valid
    assert np.all(sig["caption_metric_cos"][no_cap] == 0) and np.any(sig["caption_metric_cos"][valid & ~no_cap] != 0)
    # fitting: the gold item is scored by its leave-one-out centroid; a zero one counts as no caption
    gold = cands.rows[:, 0]
    loo = rng.normal(size=(3, 6)).astype(np.float32)
    loo[2] = 0
    fit_sig = candidate_signals(q, cands, items, gold_captions=(gold, loo))
    np.testing.assert_allclose(fit_sig["caption_metric_cos"][:2, 0], metric.cosine(q[:2], loo[:2]), atol=2e-3)
    assert fit_sig["caption_metric_cos"][2, 0] == 0
    masked = mask_captions(sig, 1.0)
    assert np.all(masked["caption_metric_cos"] == 0)
    assert items.bytes_per_item() == 6 * 2 + 4
