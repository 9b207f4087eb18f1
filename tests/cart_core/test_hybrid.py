"""Generate, then verify: candidate expansion, the query aligner, learned fusion, the retriever."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from cart_core.alignment import AlignConfig, QueryAligner, fit_aligner
from cart_core.candidates import expand_beam
from cart_core.decoding import beam_search_with_prefixes, constrained_beam_search
from cart_core.errors import ConfigError
from cart_core.fusion import Fusion, equal_weights, fit_fusion
from cart_core.generator import Generator, GeneratorConfig
from cart_core.hybrid import VerifiedRetriever, VerifyConfig, fit_verification
from cart_core.identifiers import build_identifiers
from cart_core.metrics import retrieval_metrics
from cart_core.retrieval import GenerativeRetriever
from cart_core.training import TrainConfig, train_generator
from cart_core.trie import DecodingTrie
from cart_core.verify import ItemVectors, candidate_signals, mask_captions, mask_captions_repeated

from tests.cart_core.test_decoding import random_catalog, table_step_fn


def beam_over(table, beam=4, batch=3, seed=0, live=None):
    trie = DecodingTrie(table.codes, table.vocab_sizes, live)
    torch.manual_seed(seed)
    logp = [torch.randn(batch, v).log_softmax(-1) for v in table.vocab_sizes]
    return trie, beam_search_with_prefixes(table_step_fn(logp, batch), trie, batch, beam, beam)


def test_beam_with_prefixes_returns_the_same_items():
    table = random_catalog()
    trie, result = beam_over(table, beam=6)
    torch.manual_seed(0)
    logp = [torch.randn(3, v).log_softmax(-1) for v in table.vocab_sizes]
    items, scores = constrained_beam_search(table_step_fn(logp, 3), trie, 3, 6, 6)
    assert torch.equal(items, result.items) and torch.allclose(scores, result.scores)
    assert len(result.level_nodes) == table.length


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_expansion_adds_the_items_under_the_beam_prefixes(depth):
    table = random_catalog(n=300, k=6, v=5)  # codes (k, v1, v2, u): L = 4
    trie, beam = beam_over(table, beam=4)
    cands = expand_beam(beam, trie, cap=60, min_depth=depth)
    items = beam.items.numpy()
    for q in range(3):
        rows = cands.rows[q][cands.rows[q] >= 0]
        assert len(rows) == len(set(rows.tolist())) <= 60
        assert list(rows[:4]) == list(items[q][items[q] >= 0])            # the beam first, in its order
        assert (cands.depth[q][:4] == table.length).all()
        for j, r in enumerate(rows[4:], start=4):  # reached through a prefix the beam kept, depth >= min_depth
            d = int(cands.depth[q][j])
            assert depth <= d < table.length
            assert trie.node_of_row[d][r] in beam.level_nodes[d][q].tolist()
        assert np.all(np.diff(cands.depth[q][:len(rows)]) <= 0)           # deepest prefixes first
        assert np.isfinite(cands.logp[q, :len(rows), 0]).all()           # every candidate's cluster was kept


def test_expansion_respects_the_cap_tombstones_and_the_no_expansion_ablation():
    table = random_catalog(n=300, k=3, v=2)
    live = np.ones(300, bool)
    live[::2] = False
    trie, beam = beam_over(table, beam=4, live=live)
    cands = expand_beam(beam, trie, cap=25, min_depth=1)
    assert (cands.valid.sum(1) == 25).all()
    assert live[cands.rows[cands.valid]].all()
    only_beam = expand_beam(beam, trie, cap=25, min_depth=table.length)
    assert (only_beam.valid.sum(1) == 4).all()
    with pytest.raises(ValueError, match="expansion depth"):
        expand_beam(beam, trie, cap=25, min_depth=0)


def test_aligner_beats_chance_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 16)).astype(np.float32)
    mix = rng.normal(size=(16, 24)).astype(np.float32)
    rows = np.repeat(np.arange(200), 3)
    queries = feats[rows] @ mix + 0.3 * rng.normal(size=(600, 24)).astype(np.float32)
    aligner = fit_aligner(queries, rows, feats, AlignConfig(epochs=40))
    scores = aligner.map(queries[::3]) @ (feats / np.linalg.norm(feats, axis=1, keepdims=True)).T
    assert retrieval_metrics(np.argsort(-scores, 1)[:, :10], np.arange(200))["R@1"] > 60  # chance: 0.5
    sampled = fit_aligner(queries, rows, feats, AlignConfig(epochs=40, negatives=64))  # sampled negatives
    scores = sampled.map(queries[::3]) @ (feats / np.linalg.norm(feats, axis=1, keepdims=True)).T
    assert retrieval_metrics(np.argsort(-scores, 1)[:, :10], np.arange(200))["R@1"] > 40
    aligner.save(tmp_path)
    assert np.allclose(QueryAligner.load(tmp_path).map(queries[:5]), aligner.map(queries[:5]), atol=1e-6)
    with pytest.raises(ValueError, match="item rows"):
        fit_aligner(queries, rows[:5], feats)


def test_fusion_weights_what_ranks_first_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    b, c = 800, 20
    target = rng.integers(0, c, b)
    good = rng.normal(size=(b, c)).astype(np.float32)
    good[np.arange(b), target] += 2.5
    signals = {"caption_cos": good, "no_caption": np.zeros((b, c), np.float32),
               "gen_item_logp": rng.normal(size=(b, c)).astype(np.float32)}
    valid = np.ones((b, c), bool)
    fusion = fit_fusion(signals, valid, target, ["caption_cos", "gen_item_logp"])
    assert fusion.names == ["caption_cos", "no_caption", "gen_item_logp"]
    assert fusion.weights[0] > 1 and abs(fusion.weights[2]) < 0.3 * fusion.weights[0]  # noise gets little weight
    assert fusion.report["held_out_R@1"] > 60
    with pytest.raises(ValueError, match="no verification signal"):
        fit_fusion(signals, valid, target, ["feature_cos"])
    fusion.save(tmp_path / "fusion.json")
    again = Fusion.load(tmp_path / "fusion.json")
    assert np.array_equal(again.score(signals, valid), fusion.score(signals, valid))
    assert equal_weights(["caption_cos", "no_caption"]).weights == [1.0, 0.0]
    masked = mask_captions(signals, 0.5)
    assert masked["no_caption"].mean() == pytest.approx(0.5, abs=0.05)
    assert np.all(masked["caption_cos"][masked["no_caption"] == 1] == 0)


def vector_index(n=80, dim=8, seed=0):
    """Items with features; identifiers from coarse features so siblings are alike."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    ids = np.array([f"v{i}" for i in range(n)], dtype=object)
    coarse = (feats[:, 0] > 0).astype(int) * 2 + (feats[:, 1] > 0)
    table = build_identifiers(ids, coarse, (feats[:, 2:3] > 0).astype(int), n_clusters=4, codebook_size=2)
    cfg = GeneratorConfig(vocab_sizes=table.vocab_sizes, query="vector", query_dim=dim, d_model=32, n_heads=2,
                          ff_dim=64, vector_hidden=32, dropout=0.0)
    gen = Generator(cfg)
    train_generator(gen, feats, table.codes, TrainConfig(epochs=30, batch_size=16, lr=3e-3, rdrop_weight=0),
                    progress=False)
    return feats, table, gen


def test_verified_retriever_finds_what_the_generator_misses_and_never_a_deleted_item():
    feats, table, gen = vector_index()
    queries = feats + 0.05 * np.random.default_rng(1).normal(size=feats.shape).astype(np.float32)
    items = ItemVectors.build(None, feats)
    fusion = Fusion(["feature_cos"], [20.0])
    hybrid = VerifiedRetriever(gen, table, items, None, fusion, VerifyConfig(candidates=40))
    rows, scores = hybrid.search(queries, k=5, beam_size=5)
    generative = VerifiedRetriever(gen, table, items, None, fusion, VerifyConfig(mode="generative"))
    gen_rows, _ = generative.search(queries, k=5, beam_size=5)
    assert retrieval_metrics(rows, np.arange(80))["R@1"] == 100.0
    assert retrieval_metrics(rows, np.arange(80))["R@1"] >= retrieval_metrics(gen_rows, np.arange(80))["R@1"]
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    table.live[:10] = False
    deleted = VerifiedRetriever(gen, table, items, None, fusion, VerifyConfig(candidates=40))
    rows, _ = deleted.search(queries, k=10, beam_size=5)
    assert not np.isin(rows, np.arange(10)).any()
    with pytest.raises(ValueError, match="item feature vectors"):
        VerifiedRetriever(gen, table, ItemVectors.build(None, feats[:5]), None, fusion)


def test_a_takedown_applied_to_a_loaded_retriever_answers_as_one_built_without_the_items():
    """answering_only (what `cart serve` applies at a delete, before reloading): the copy never
    answers the dead rows and answers like a retriever built with them dead, neighbour lists
    included (those a load of that version builds); the original, which in-flight batches may
    still hold, is unchanged."""
    from cart_core.hybrid import item_neighbors

    feats, table, gen = vector_index()
    queries = feats + 0.05 * np.random.default_rng(1).normal(size=feats.shape).astype(np.float32)
    items, fusion = ItemVectors.build(None, feats), Fusion(["feature_cos"], [20.0])
    cfg = VerifyConfig(candidates=20, neighbor_seeds=2, neighbors=4)
    lists = item_neighbors(items, table, cfg)
    hybrid = VerifiedRetriever(gen, table, items, None, fusion, cfg, neighbors=lists)
    before = hybrid.search(queries, k=10, beam_size=10)
    live = table.live.copy()
    live[:10] = False
    for loaded, built in (
            (hybrid, VerifiedRetriever(gen, replace(table, live=live), items, None, fusion, cfg,
                                       neighbors=item_neighbors(items, replace(table, live=live), cfg))),
            (GenerativeRetriever(gen, table), GenerativeRetriever(gen, replace(table, live=live)))):
        original = loaded.search(queries, k=10, beam_size=10)
        taken = loaded.answering_only(live)
        rows, scores = taken.search(queries, k=10, beam_size=10)
        assert not np.isin(rows, np.arange(10)).any() and not taken.table.live[:10].any()
        want_rows, want_scores = built.search(queries, k=10, beam_size=10)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
        again = loaded.search(queries, k=10, beam_size=10)
        np.testing.assert_array_equal(again[0], original[0])
        assert np.isin(np.arange(10), original[0]).all()  # every one of them was answered before
        assert loaded.table.live.all()
    # a row is only ever taken away: a copy asked to answer everything again still answers none of them
    np.testing.assert_array_equal(hybrid.answering_only(live).answering_only(np.ones(80, bool)).table.live, live)
    np.testing.assert_array_equal(hybrid.search(queries, k=10, beam_size=10)[0], before[0])


def test_fusion_without_any_asked_signal_says_what_was_asked():
    with pytest.raises(ValueError, match=r"asked for \['feature_cos'\], have \['caption_cos'\]"):
        fit_fusion({"caption_cos": np.zeros((2, 3), np.float32)}, np.ones((2, 3), bool), np.array([0, 1]),
                   ["feature_cos"])


def test_no_query_or_no_live_item_answers_nothing_instead_of_failing():
    """An empty batch, and an index whose every item was deleted (load_verified then has no item
    features, so the fusion's feature_cos is never scored), return -1 rows, not an exception."""
    feats, table, gen = vector_index()
    fusion = Fusion(["caption_cos", "no_caption", "feature_cos"], [5.0, -1.0, 10.0])
    captions = np.random.default_rng(0).normal(size=(80, 8)).astype(np.float32)
    hybrid = VerifiedRetriever(gen, table, ItemVectors.build(captions, feats), None, fusion, VerifyConfig(candidates=40))
    for search in (hybrid.search, hybrid.search_batch):
        rows, scores = search(np.zeros((0, 8), np.float32), k=5, beam_size=5)
        assert rows.shape == scores.shape == (0, 5)
    generative = GenerativeRetriever(gen, table)
    assert generative.search(np.zeros((0, 8), np.float32), k=5, beam_size=5)[0].shape == (0, 5)
    table.live[:] = False
    gone = VerifiedRetriever(gen, table, ItemVectors.build(np.zeros_like(captions), None), None, fusion,
                             VerifyConfig(candidates=40))
    rows, scores = gone.search(feats[:3], k=5, beam_size=5)
    assert (rows == -1).all() and np.isneginf(scores).all()


def test_fit_verification_on_held_out_queries_learns_positive_weights():
    feats, table, gen = vector_index(seed=2)
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 80, 200)
    held = feats[rows] + 0.3 * rng.normal(size=(200, 8)).astype(np.float32)
    hybrid = VerifiedRetriever(gen, table, ItemVectors.build(None, feats), None, Fusion([], []),
                               VerifyConfig(candidates=40))
    fusion = fit_verification(hybrid, held, rows, None, beam_size=5)
    assert "feature_cos" in fusion.names and fusion.weights[fusion.names.index("feature_cos")] > 0
    assert fusion.report["held_out_queries"] == 200


def test_signals_handle_items_without_captions():
    table = random_catalog(n=50, k=3, v=3)
    trie, beam = beam_over(table, beam=4)
    cands = expand_beam(beam, trie, cap=30, min_depth=1)
    captions = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    captions[::3] = 0
    sig = candidate_signals(np.ones((3, 6), np.float32) / 6 ** 0.5, cands, ItemVectors.build(captions, None))
    rows = cands.rows.clip(0)
    no_cap = (rows % 3 == 0) & cands.valid
    assert np.array_equal(sig["no_caption"] == 1, no_cap)
    assert np.all(sig["caption_cos"][no_cap] == 0) and "feature_cos" not in sig


def test_fit_hybrid_weights_items_without_captions():
    from cart_core.hybrid import fit_hybrid, holdout_mask

    feats, table, gen = vector_index(seed=4)
    rng = np.random.default_rng(5)
    rows = np.repeat(np.arange(80), 4)
    vectors = feats[rows] + 0.3 * rng.normal(size=(len(rows), 8)).astype(np.float32)
    holdout = holdout_mask(len(rows), 0.25)
    cfg = VerifyConfig(candidates=40, clusters=4, align=AlignConfig(epochs=5))
    hybrid = fit_hybrid(gen, table, list(vectors), rows, vectors, holdout, feats, cfg, beam_size=5)
    assert hybrid.fusion.names == ["caption_cos", "no_caption", "feature_cos", "feature_cos_uncaptioned"]
    assert hybrid.fusion.weights[3] > 0  # items without captions lean on their feature
    captions = hybrid.items.captions.copy()
    captions[:10] = 0  # ten items lose their captions: found by their feature alone
    hybrid.items = ItemVectors(captions, hybrid.items.features)
    found, _ = hybrid.search(feats[:10], k=10, beam_size=5)
    assert np.mean([r in f for r, f in zip(range(10), found)]) >= 0.8


def test_bm25_signal_scores_candidates_and_takes_the_gold_leave_one_out_value():
    from cart_core.lexical import ItemTerms, TermIndex

    table = random_catalog(n=50, k=3, v=3)
    trie, beam = beam_over(table, beam=4)
    cands = expand_beam(beam, trie, cap=30, min_depth=1)
    rows = np.repeat(np.arange(50), 2)
    texts = [f"word{r} {'red car' if i == 0 else 'street'}" for r, i in zip(rows, np.tile([0, 1], 50))]
    terms = TermIndex(ItemTerms.from_captions(rows, texts, 50))
    items = ItemVectors.build(np.ones((50, 6), np.float32), None, terms)
    target = cands.rows.clip(0)[:, 0]
    queries = [f"word{t} red car" for t in target]
    q = terms.queries(queries)
    sig = candidate_signals(np.ones((3, 6), np.float32) / 6 ** 0.5, cands, items, query_terms=q)
    assert np.allclose(sig["caption_bm25"], np.where(cands.valid, terms.score(q, cands.rows.clip(0)), 0))
    assert (sig["caption_bm25"].argmax(1) == 0).all()  # the word only item t has decides
    loo = np.array([0.5, 0.25, 0.125], np.float32)
    gold = (target, np.ones((3, 6), np.float32))
    sig = candidate_signals(np.ones((3, 6), np.float32) / 6 ** 0.5, cands, items, gold_captions=gold,
                            query_terms=q, gold_terms=loo)
    own = cands.rows == target[:, None]
    assert np.allclose(sig["caption_bm25"][own], np.repeat(loo, own.sum(1)))
    masked = mask_captions(sig, 0.5)
    assert np.all(masked["caption_bm25"][masked["no_caption"] == 1] == 0)
    with pytest.raises(ValueError, match="term rows"):
        ItemVectors.build(np.ones((49, 6), np.float32), None, terms)


def test_a_heavy_tailed_signal_is_rescaled_to_the_held_out_top1():
    from cart_core.fusion import top1, tune_for_top1

    rng = np.random.default_rng(2)
    b, c = 600, 20
    target = rng.integers(0, c, b)
    cos = rng.normal(size=(b, c)).astype(np.float32)
    cos[np.arange(b), target] += 2.0
    bm25 = rng.exponential(3.0, size=(b, c)).astype(np.float32)  # no information, large values
    signals = {"caption_cos": cos, "caption_bm25": bm25}
    valid = np.ones((b, c), bool)
    fitted = Fusion(["caption_cos", "caption_bm25"], [3.0, 1.0])
    tuned = tune_for_top1(signals, fitted, valid, target, "caption_bm25")
    report = tuned.report["tuned_for_top1"]["caption_bm25"]
    assert tuned.weights[0] == 3.0 and tuned.weights[1] == pytest.approx(report["scale"], abs=1e-4)
    assert report["scale"] < 0.1  # noise: the smallest weights rank best
    assert 100 * top1(tuned.score(signals, valid), target) == pytest.approx(report["slice_R@1_tuned_in_sample"])
    assert report["slice_R@1_tuned_in_sample"] > report["slice_R@1_fitted_in_sample"]
    assert tune_for_top1({"caption_cos": cos}, fitted, valid, target, "caption_bm25") is fitted


def _captionless_slice(seed: int = 3, b: int = 800, c: int = 20):
    """A held-out slice where 20 % of candidates have no captions: their own feature score is
    weaker evidence than a caption score, so where the offset sits decides who wins."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, c, b)
    no_caption = (rng.random((b, c)) < 0.2).astype(np.float32)
    gold = np.zeros((b, c), bool)
    gold[np.arange(b), target] = True
    caption = np.where(no_caption > 0, 0.0, rng.normal(size=(b, c)) + 2.0 * gold).astype(np.float32)
    feature = np.where(no_caption > 0, rng.normal(size=(b, c)) + 1.5 * gold, 0.0).astype(np.float32)
    signals = {"caption_cos": caption, "no_caption": no_caption, "feature_cos_uncaptioned": feature}
    return signals, np.ones((b, c), bool), target


def test_captionless_weights_are_tuned_together_and_trade_as_configured():
    from cart_core.fusion import top1, tune_pair_for_top1
    from cart_core.hybrid import captionless_query_weights

    signals, valid, target = _captionless_slice()
    captionless = signals["no_caption"][np.arange(len(target)), target] > 0
    fitted = Fusion(["caption_cos", "no_caption", "feature_cos_uncaptioned"], [1.0, 0.3, 0.3])
    pair = ("no_caption", "feature_cos_uncaptioned")
    weight = captionless_query_weights(signals, target, 0.5)
    assert weight.sum() == pytest.approx(1.0) and weight[captionless].sum() == pytest.approx(0.5)
    assert captionless_query_weights(signals, target, None) is None
    unreachable = target.copy()
    unreachable[:10] = -1  # the item is not among the query's candidates: no weight can rank it
    weight = captionless_query_weights(signals, unreachable, 0.5)
    assert (weight[:10] == 0).all() and weight.sum() == pytest.approx(1.0)
    flat = {**signals, "no_caption": np.zeros_like(signals["no_caption"]),
            "feature_cos_uncaptioned": np.zeros_like(signals["no_caption"])}
    assert tune_pair_for_top1(flat, fitted, valid, target, ("no_caption", "feature_cos_uncaptioned")).weights \
        == fitted.weights  # nothing to gain: the fitted weights stay

    def recall(fusion, rows):
        return top1(fusion.score(signals, valid)[rows], target[rows])

    by_share = {}
    for share in (None, 0.5, 0.8):
        tuned = tune_pair_for_top1(signals, fitted, valid, target, pair,
                                   captionless_query_weights(signals, target, share))
        report = tuned.report["tuned_for_top1"]["no_caption+feature_cos_uncaptioned"]
        assert tuned.weights[0] == 1.0  # the captioned weight is left as fitted
        assert report["slice_R@1_tuned_in_sample"] >= report["slice_R@1_fitted_in_sample"]
        by_share[share] = (recall(tuned, captionless), recall(tuned, ~captionless))
    assert by_share[None][0] > recall(fitted, captionless)  # the misfit offset hid captionless items
    # asking more often for captionless items finds them more often, captioned ones less often
    assert by_share[0.8][0] >= by_share[0.5][0] >= by_share[None][0]
    assert by_share[0.8][1] <= by_share[0.5][1] <= by_share[None][1]
    assert by_share[0.8][0] > by_share[None][0]


@pytest.mark.parametrize("value", ["1.5", "-0.1", "often"])
def test_captionless_query_share_is_a_share_or_null(value):
    from cart_core.config import load_config

    assert load_config(None, ["verify.captionless_query_share=null"]).verify.captionless_query_share is None
    assert load_config(None, ["verify.captionless_query_share=0.3"]).verify.captionless_query_share == 0.3
    with pytest.raises(ConfigError, match="verify.captionless_query_share"):
        load_config(None, [f"verify.captionless_query_share={value}"])


def test_repeated_masks_stack_distinct_seeded_copies():
    rng = np.random.default_rng(0)
    signals = {"caption_cos": rng.random((5, 7)).astype(np.float32), "no_caption": np.zeros((5, 7), np.float32),
               "feature_cos": rng.random((5, 7)).astype(np.float32)}
    stacked = mask_captions_repeated(signals, 0.3, 3, seed=4)
    assert set(stacked) == set(mask_captions(signals, 0.3, seed=4))
    for r in range(3):
        one = mask_captions(signals, 0.3, seed=4 + r)
        for name, value in one.items():
            assert np.array_equal(stacked[name][5 * r:5 * (r + 1)], value)
    assert not np.array_equal(stacked["no_caption"][:5], stacked["no_caption"][5:10])
    assert np.array_equal(stacked["feature_cos_uncaptioned"], stacked["feature_cos"] * stacked["no_caption"])
    with pytest.raises(ValueError, match="at least 1"):
        mask_captions_repeated(signals, 0.3, 0)


def test_mask_repeats_is_a_count():
    from cart_core.config import load_config

    assert load_config(None, []).verify.mask_repeats == 4
    with pytest.raises(ConfigError, match="verify.mask_repeats"):
        load_config(None, ["verify.mask_repeats=0"])


def test_the_captionless_share_is_the_largest_within_the_captioned_budget():
    from cart_core.fusion import top1
    from cart_core.hybrid import choose_captionless_share

    signals, valid, target = _captionless_slice()
    captionless = signals["no_caption"][np.arange(len(target)), target] > 0
    fitted = Fusion(["caption_cos", "no_caption", "feature_cos_uncaptioned"], [1.0, 0.3, 0.3])
    by_budget = {}
    for cost in (0.0, 2.0, 100.0):
        tuned = choose_captionless_share(signals, fitted, valid, target, cost)
        report = tuned.report["captionless_share"]
        tried = report["slice_captioned_R@1_by_share"]
        assert list(tried) == ["None", "0.2", "0.3", "0.4", "0.5", "0.6"] and report["captioned_cost"] == cost
        within = [s for s, r1 in tried.items() if r1 >= tried["None"] - cost]
        assert str(report["chosen"]) == within[-1]  # the largest share within the budget
        captioned_r1 = 100 * top1(tuned.score(signals, valid)[~captionless], target[~captionless])
        assert captioned_r1 == pytest.approx(tried[str(report["chosen"])], abs=1e-3)
        by_budget[cost] = (top1(tuned.score(signals, valid)[captionless], target[captionless]), captioned_r1)
    assert by_budget[100.0][1] <= by_budget[0.0][1] and by_budget[100.0][0] >= by_budget[0.0][0]
    assert by_budget[100.0][0] > by_budget[0.0][0]  # a larger budget makes captionless items findable


def test_the_share_report_carries_the_captioned_r1_had_no_candidate_been_hidden():
    from cart_core.fusion import top1
    from cart_core.hybrid import choose_captionless_share

    signals, valid, target = _captionless_slice()
    captionless = signals["no_caption"][np.arange(len(target)), target] > 0
    rng = np.random.default_rng(5)
    gold = np.zeros_like(signals["caption_cos"], bool)
    gold[np.arange(len(target)), target] = True
    # the same slice had every candidate kept its captions: nothing is scored as captionless
    unmasked = {"caption_cos": np.where(signals["no_caption"] > 0, rng.normal(size=gold.shape) + 2.0 * gold,
                                        signals["caption_cos"]).astype(np.float32),
                "no_caption": np.zeros_like(signals["no_caption"]),
                "feature_cos_uncaptioned": np.zeros_like(signals["feature_cos_uncaptioned"])}
    fitted = Fusion(["caption_cos", "no_caption", "feature_cos_uncaptioned"], [1.0, 0.3, 0.3])
    tuned = choose_captionless_share(signals, fitted, valid, target, 1.0, unmasked=unmasked)
    report = tuned.report["captionless_share"]
    reference = report["slice_captioned_R@1_unmasked_by_share"]
    assert list(reference) == list(report["slice_captioned_R@1_by_share"])
    want = 100 * top1(tuned.score(unmasked, valid)[~captionless], target[~captionless])
    assert reference[str(report["chosen"])] == pytest.approx(want, abs=1e-3)
    assert len(set(reference.values())) == 1  # no candidate is captionless: the captionless weights do not matter
    # hidden captions take strong rivals away from captioned queries at the slice's own share
    assert report["slice_captioned_R@1_by_share"]["None"] > reference["None"]
    # stacked masked copies (mask_captions_repeated) are compared with the one unmasked slice
    stacked = {k: np.concatenate([v, v]) for k, v in signals.items()}
    twice = choose_captionless_share(stacked, fitted, np.tile(valid, (2, 1)), np.tile(target, 2), 1.0,
                                     unmasked=unmasked).report["captionless_share"]
    assert twice["slice_captioned_R@1_unmasked_by_share"] == pytest.approx(reference, abs=1e-3)
    without = choose_captionless_share(signals, fitted, valid, target, 1.0).report["captionless_share"]
    assert without["slice_captioned_R@1_unmasked_by_share"] == {}  # nothing to compare with
