"""Metrics on hand-checked rankings; dense baselines on data where the answer is known."""
import numpy as np
import pytest

from cart_core.dense import FlatIndex, apply_ridge, caption_centroids, fit_ridge
from cart_core.metrics import gold_ranks, retrieval_metrics


def test_metrics_by_hand():
    ranked = np.array([[3, 1, 2], [1, 2, 3], [2, 3, 1], [5, 6, 7]])
    gold = np.array([3, 2, 1, 9])
    np.testing.assert_array_equal(gold_ranks(ranked, gold), [1, 2, 3, np.inf])
    m = retrieval_metrics(ranked, gold)
    assert m["R@1"] == 25.0 and m["R@5"] == 75.0 and m["R@10"] == 75.0
    assert m["MdR"] == 2.5
    assert m["MRR@10"] == pytest.approx((1 + 0.5 + 1 / 3) / 4)


def test_median_rank_outside_list_is_none():
    m = retrieval_metrics(np.array([[0], [0], [0]]), np.array([1, 2, 0]))
    assert m["MdR"] is None and m["R@1"] == pytest.approx(100 / 3)


def test_metrics_refuse_empty():
    with pytest.raises(ValueError):
        retrieval_metrics(np.zeros((0, 3)), np.zeros(0))


def test_flat_index_is_exact_cosine():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    rows, scores = FlatIndex(x).search(x * 3.0, 5)  # scale must not matter
    np.testing.assert_array_equal(rows[:, 0], np.arange(200))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_ridge_recovers_a_linear_map():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 8))
    w = rng.normal(size=(8, 4))
    weights = fit_ridge(x, x @ w + 2.0, alpha=1e-6)
    np.testing.assert_allclose(apply_ridge(x[:5], weights), x[:5] @ w + 2.0, atol=1e-3)


def test_caption_centroids_average_per_item():
    vec = np.array([[1, 0], [0, 1], [1, 0]], dtype=np.float32)
    cent = caption_centroids(np.array([0, 0, 2]), vec, 3)
    np.testing.assert_allclose(cent[0], [2 ** -0.5, 2 ** -0.5], atol=1e-6)
    np.testing.assert_allclose(cent[1], [0, 0])  # no captions: zero row, never NaN
    np.testing.assert_allclose(cent[2], [1, 0])
