"""The caption side predicted from item features: fitting, cross-fitting, the stored form, and
how items without captions are scored and weighted with it."""
import numpy as np
import pytest

from cart_core.caption_predictor import CaptionPredictor, PredictorConfig, fit_caption_predictor
from cart_core.candidates import Candidates
from cart_core.fusion import Fusion, top1
from cart_core.hybrid import tune_captionless
from cart_core.kmeans import l2_normalize
from cart_core.verify import (ItemVectors, candidate_signals, dense_scores, gathered_dot, mask_captions,
                              predicted_caption_cos)


def catalog(n=300, df=24, dt=16, seed=0, uncaptioned=0.3):
    """Features, true caption centroids linear in them plus noise, and the centroids an index
    keeps (zero rows for the items without captions)."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, df)).astype(np.float32)
    truth = l2_normalize(features @ rng.normal(size=(df, dt)).astype(np.float32)
                         + 0.3 * rng.normal(size=(n, dt)).astype(np.float32))
    has = rng.random(n) >= uncaptioned
    return features, truth, np.where(has[:, None], truth, 0.0).astype(np.float32), has


def test_prediction_finds_items_without_captions_and_crossfit_is_out_of_fold():
    features, truth, kept, has = catalog()
    predictor, crossfit = fit_caption_predictor(features, kept)
    assert predictor.alpha in PredictorConfig().alphas and predictor.report["items"] == has.sum()
    full = predictor.predict(features)
    assert np.allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
    new = np.flatnonzero(~has)
    # a caption like the item's own finds it among the items without captions, far above chance
    own_first = np.mean(np.argmax(truth[new] @ full[new].T, axis=1) == np.arange(len(new)))
    assert own_first > 0.5 > 10 / len(new)
    assert np.allclose(crossfit[new], full[new], atol=1e-6)  # nothing to leave out for them
    # captioned items: predicted without their own centroid, so less close to it than the full fit
    assert not np.allclose(crossfit[has], full[has])
    assert np.mean(np.sum(crossfit[has] * truth[has], 1)) < np.mean(np.sum(full[has] * truth[has], 1))
    assert fit_caption_predictor(features[:6], kept[:6]) == (None, None)
    with pytest.raises(ValueError, match="caption centroids"):
        fit_caption_predictor(features, kept[:10])


def test_stored_form_scores_like_the_prediction(tmp_path):
    features, truth, kept, _ = catalog()
    predictor, _ = fit_caption_predictor(features, kept)
    stored = l2_normalize(features).astype(np.float16)
    queries = truth[:5]
    mapped, offset = predictor.query_side(queries)
    fast = (mapped @ stored.astype(np.float32).T + offset[:, None]) / predictor.item_norms(stored)[None, :]
    assert np.allclose(fast, queries @ predictor.predict(stored.astype(np.float32)).T, atol=1e-4)
    predictor.save(tmp_path)
    assert CaptionPredictor.exists(tmp_path)
    again = CaptionPredictor.load(tmp_path)
    assert np.array_equal(again.weight, predictor.weight) and again.alpha == predictor.alpha
    (tmp_path / "caption_predictor.json").write_text('{"feature_dim": 3, "text_dim": 16, "alpha": 1.0}')
    with pytest.raises(ValueError, match="caption_predictor.safetensors"):
        CaptionPredictor.load(tmp_path)


def test_only_items_without_captions_get_the_predicted_cosine():
    features, truth, kept, has = catalog(n=60)
    predictor, _ = fit_caption_predictor(features, kept)
    items = ItemVectors.build(kept, features, predictor=predictor)
    rows = np.tile(np.arange(60), (4, 1))
    cands = Candidates(rows=rows, logp=np.zeros(rows.shape + (1,), np.float32), depth=np.ones(rows.shape, np.int8),
                       rank=np.zeros(rows.shape, np.int32))
    queries = truth[:4]
    sig = candidate_signals(queries, cands, items, names=["caption_cos", "no_caption", "predicted_caption_cos"])
    expected = queries @ predictor.predict(l2_normalize(features).astype(np.float16).astype(np.float32)).T
    assert np.all(sig["predicted_caption_cos"][:, has] == 0)
    only = np.tile(~has, (4, 1))
    assert np.array_equal(gathered_dot(queries, items.caption_tensor, rows, only),
                          np.where(only, gathered_dot(queries, items.caption_tensor, rows), 0.0))
    assert np.allclose(sig["predicted_caption_cos"][:, ~has], expected[:, ~has], atol=2e-3)
    # candidates that all have captions: the signal is 0 and its query-side product is never run
    captioned = np.tile(np.flatnonzero(has)[:10], (4, 1))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predictor, "query_side", None)  # would raise if called
        assert not predicted_caption_cos(queries, captioned, items, np.zeros(captioned.shape, bool)).any()
    # the dense look-up over every item scores the same fused values
    names, weights = ["caption_cos", "no_caption", "predicted_caption_cos"], [2.0, -0.5, 1.5]
    fused = Fusion(names, weights).score(sig, cands.valid)
    assert np.allclose(dense_scores(queries, items, None, names, weights), fused, atol=5e-3)
    # vector queries (feature space) have no sentence vector to compare: no predicted cosine
    fq = features[:4]
    vector_items = ItemVectors.build(None, features, predictor=predictor)
    assert "predicted_caption_cos" not in candidate_signals(fq, cands, vector_items, feature_queries=fq,
                                                            names=["feature_cos", "predicted_caption_cos"])
    with pytest.raises(ValueError, match="feature dims"):
        ItemVectors.build(kept, features[:, :5], predictor=predictor)


def test_masked_items_take_the_cross_fitted_cosine():
    rng = np.random.default_rng(0)
    shape = (50, 8)
    signals = {"caption_cos": rng.random(shape).astype(np.float32), "no_caption": np.zeros(shape, np.float32),
               "predicted_caption_cos_fit": rng.random(shape).astype(np.float32)}
    masked = mask_captions(signals, 0.3)
    assert np.array_equal(masked["predicted_caption_cos"], signals["predicted_caption_cos_fit"] * masked["no_caption"])
    assert 0 < masked["no_caption"].mean() < 1


def test_captionless_evidence_is_scaled_as_one_with_its_offset():
    rng = np.random.default_rng(3)
    b, c = 800, 20
    target = rng.integers(0, c, b)
    gold = np.zeros((b, c), bool)
    gold[np.arange(b), target] = True
    no_caption = (rng.random((b, c)) < 0.2).astype(np.float32)
    caption = np.where(no_caption > 0, 0.0, rng.normal(size=(b, c)) + 2.0 * gold).astype(np.float32)
    feature = (np.where(no_caption > 0, rng.normal(size=(b, c)) + 1.0 * gold, 0.0)).astype(np.float32)
    predicted = (np.where(no_caption > 0, rng.normal(size=(b, c)) + 1.5 * gold, 0.0)).astype(np.float32)
    signals = {"caption_cos": caption, "no_caption": no_caption, "feature_cos_uncaptioned": feature,
               "predicted_caption_cos": predicted}
    valid = np.ones((b, c), bool)
    fitted = Fusion(["caption_cos", "no_caption", "feature_cos_uncaptioned", "predicted_caption_cos"],
                    [1.0, -3.0, 0.2, 0.4])
    tuned = tune_captionless(signals, fitted, valid, target, None)
    assert tuned.weights[0] == 1.0  # captioned weight as fitted
    assert tuned.weights[3] / tuned.weights[2] == pytest.approx(2.0, rel=1e-4)  # the fitted mix is kept
    assert top1(tuned.score(signals, valid), target) > top1(fitted.score(signals, valid), target)
    alone = Fusion(["caption_cos", "no_caption", "feature_cos_uncaptioned"], [1.0, -3.0, 0.2])
    assert tune_captionless(signals, alone, valid, target, None).names == alone.names  # the pair as before
