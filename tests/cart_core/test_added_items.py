"""Calibrated verification vectors for items added after the verifier was fitted."""
import numpy as np
import pytest

from cart_core.added_items import blend_added_features, held_out_feature_cos
from cart_core.alignment import AlignConfig, fit_aligner
from cart_core.kmeans import l2_normalize


@pytest.fixture(scope="module")
def world():
    """An aligner trained on 150 items' captions; 50 more items it never saw, 3 captions each."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 16)).astype(np.float32)
    mix = rng.normal(size=(16, 24)).astype(np.float32)
    rows = np.repeat(np.arange(200), 4)
    captions = feats[rows] @ mix + 1.0 * rng.normal(size=(800, 24)).astype(np.float32)
    seen = rows < 150
    aligner = fit_aligner(captions[seen & (np.arange(800) % 4 != 3)], rows[seen & (np.arange(800) % 4 != 3)],
                          feats[:150], AlignConfig(epochs=40))
    return {"feats": feats, "rows": rows, "captions": captions, "seen": seen, "aligner": aligner}


def left_out_score(aligner, vectors, caps, rows):
    mapped = aligner.map(caps)
    return float(np.mean(np.sum(mapped * vectors[rows], axis=1)))


def test_added_items_are_lifted_to_the_target_score(world):
    """alpha is fitted so that a caption left out of its item's vector scores it at the target on
    average; the target here is set above what the raw feature reaches (the handicap an aligner
    trained on other items leaves on real data, docs/benchmarks.md)."""
    a, feats, rows, caps = world["aligner"], world["feats"], world["rows"], world["captions"]
    held = world["seen"] & (np.arange(800) % 4 == 3)
    assert -1.0 < held_out_feature_cos(a, caps[held], feats[rows[held]]) < 1.0
    new = ~world["seen"]
    raw = l2_normalize(feats[150:])
    mapped = a.map(caps[new])
    raw_score = float(np.mean(np.sum(mapped * raw[rows[new] - 150], axis=1)))
    target = raw_score + 0.1
    vectors, alpha = blend_added_features(a, feats[150:], caps[new], rows[new] - 150, target)
    assert 0.0 < alpha < 1.0
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sums = np.zeros_like(raw)
    np.add.at(sums, rows[new] - 150, mapped)
    left_out = l2_normalize(alpha * raw[rows[new] - 150] + (1 - alpha) * l2_normalize(sums[rows[new] - 150] - mapped))
    assert np.mean(np.sum(mapped * left_out, axis=1)) == pytest.approx(target, abs=1e-3)
    # the stored vector uses every caption of the item
    assert np.allclose(vectors, l2_normalize(alpha * raw + (1 - alpha) * l2_normalize(sums)), atol=1e-5)
    higher, higher_alpha = blend_added_features(a, feats[150:], caps[new], rows[new] - 150, target + 0.1)
    assert higher_alpha < alpha   # a higher target leans more on the captions


def test_items_without_captions_or_without_a_target_keep_their_feature(world):
    a, feats, caps = world["aligner"], world["feats"], world["captions"]
    # items 0 and 2 have captions, item 1 none
    vectors, alpha = blend_added_features(a, feats[150:153], caps[[600, 601, 608]], np.array([0, 0, 2]), 0.9)
    assert np.allclose(vectors[1], l2_normalize(feats[151:152])[0], atol=1e-6)
    assert not np.allclose(vectors[0], l2_normalize(feats[150:151])[0], atol=1e-3)
    for target in (float("nan"), -1.0):   # nothing to fit, or the raw feature already scores high enough
        same, alpha = blend_added_features(a, feats[150:153], caps[[600, 601]], np.array([0, 0]), target)
        assert alpha == 1.0 and np.allclose(same, l2_normalize(feats[150:153]), atol=1e-6)
    none, alpha = blend_added_features(a, feats[150:153], np.zeros((0, 24), np.float32), np.zeros(0, np.int64), 0.5)
    assert alpha == 1.0 and np.allclose(none, l2_normalize(feats[150:153]), atol=1e-6)
