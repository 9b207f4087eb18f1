"""Building blocks of incremental re-indexing: appended identifiers, a widened counter vocabulary,
and the dense fallback merged by reciprocal-rank fusion."""
import numpy as np
import pytest
import torch

from cart_core.fallback import DenseFallback, HybridRetriever, accept_first, acceptance_threshold, reciprocal_rank_fusion
from cart_core.generator import Generator, GeneratorConfig
from cart_core.identifiers import IdentifierTable, appended_rows, apply_delta, build_identifiers, extend_identifiers
from cart_core.trie import DecodingTrie


def test_extend_keeps_old_codes_and_never_reuses_a_tombstoned_counter():
    table = build_identifiers(np.array(["a", "b", "c"], dtype=object), np.array([0, 0, 1]),
                              np.array([[1], [1], [0]]), n_clusters=2, codebook_size=2)
    table.live[1] = False  # "b" deleted: its identifier (0, 1, 1) must not be handed out again
    grown = extend_identifiers(table, np.array(["e", "d"], dtype=object), np.array([[1, 1], [0, 1]]))
    np.testing.assert_array_equal(grown.codes[:3], table.codes)
    assert grown.codes[3].tolist() == [1, 1, 0] and grown.codes[4].tolist() == [0, 1, 2]
    assert grown.vocab_sizes == [2, 2, 3] and grown.live.tolist() == [True, False, True, True, True]
    DecodingTrie(grown.codes, grown.vocab_sizes, grown.live)  # counters stay 0..n-1 per prefix


def test_extend_orders_counters_by_item_id_and_is_independent_of_input_order():
    table = build_identifiers(np.array(["a"], dtype=object), np.array([0]), np.array([[0]]), n_clusters=1,
                              codebook_size=1)
    one = extend_identifiers(table, np.array(["z", "m"], dtype=object), np.array([[0, 0], [0, 0]]))
    two = extend_identifiers(table, np.array(["m", "z"], dtype=object), np.array([[0, 0], [0, 0]]))
    assert dict(zip(one.item_ids, one.codes[:, -1])) == dict(zip(two.item_ids, two.codes[:, -1])) == \
        {"a": 0, "m": 1, "z": 2}


@pytest.mark.parametrize("added", [0, 2])
def test_a_saved_delta_rebuilds_the_grown_table(tmp_path, added):
    base = build_identifiers(np.array(["a", "b", "c"], dtype=object), np.array([0, 0, 1]),
                             np.array([[1], [1], [0]]), n_clusters=2, codebook_size=2)
    grown = extend_identifiers(base, np.array(["e", "d"][:added], dtype=object), np.array([[0, 1], [0, 1]][:added]))
    grown = IdentifierTable(grown.item_ids, grown.codes, grown.vocab_sizes, grown.live.copy())
    grown.live[1] = False  # "b" tombstoned by the same reindex
    appended_rows(grown, 3).save(tmp_path / "append.parquet")  # the delta: appended rows + dead rows
    rebuilt = apply_delta(base, IdentifierTable.load(tmp_path / "append.parquet"), np.flatnonzero(~grown.live[:3]))
    assert rebuilt.item_ids.tolist() == grown.item_ids.tolist() and rebuilt.vocab_sizes == grown.vocab_sizes
    np.testing.assert_array_equal(rebuilt.codes, grown.codes)
    np.testing.assert_array_equal(rebuilt.live, grown.live)
    assert base.live.all()  # applying a delta leaves the table it extends untouched
    for wrong in (-1, 3):  # -1 would mark the last row dead without a word
        with pytest.raises(ValueError, match=f"dead row {wrong} is outside the table it marks \\(3 rows\\)"):
            apply_delta(base, IdentifierTable.load(tmp_path / "append.parquet"), np.array([wrong]))


def test_growing_the_counter_vocabulary_keeps_every_existing_logit():
    torch.manual_seed(0)
    gen = Generator(GeneratorConfig(query="vector", query_dim=8, vocab_sizes=[4, 3, 2], d_model=16, n_layers=1,
                                    ff_dim=32)).eval()
    states, mask = gen.encode_queries(torch.randn(5, 8))
    memory = gen.decoder.prepare_memory(states, mask)
    prefix = torch.tensor([[1, 2]] * 5)
    before = gen.decoder(memory, prefix)
    gen.grow_last_vocab(5)
    after = gen.decoder(memory, prefix)
    assert after.shape[-1] == 12 and gen.cfg.vocab_sizes == [4, 3, 5]
    torch.testing.assert_close(after[..., :9], before)


def test_reciprocal_rank_fusion_interleaves_and_dedupes():
    gen = np.array([[5, 6, 7, -1]])
    dense = np.array([[9, 5]])
    rows, scores = reciprocal_rank_fusion([gen, dense], k=4)
    assert rows[0, 0] == 5  # found by both lists
    assert set(rows[0].tolist()) == {5, 6, 7, 9} and np.all(np.diff(scores[0]) <= 0)


def test_dense_fallback_returns_catalog_rows():
    fb = DenseFallback(np.array([10, 20, 30]), np.eye(3, 4, dtype=np.float32))
    rows, _ = fb.search(np.array([[0, 1, 0, 0]], dtype=np.float32), k=2)
    assert rows[0, 0] == 20
    empty = DenseFallback(np.zeros(0, np.int64), np.zeros((0, 4), np.float32))
    assert empty.search(np.ones((2, 4), np.float32), 3)[0].shape == (2, 0)


def test_acceptance_threshold_lets_through_the_calibrated_share_of_impostors():
    rng = np.random.default_rng(0)
    pending = rng.normal(size=(20, 16))
    impostors = rng.normal(size=(1000, 16))
    tau = acceptance_threshold(impostors, pending, fpr=0.05)
    best = (impostors / np.linalg.norm(impostors, axis=1, keepdims=True)) @ \
        (pending / np.linalg.norm(pending, axis=1, keepdims=True)).T
    assert abs(np.mean(best.max(axis=1) >= tau) - 0.05) < 0.01
    assert acceptance_threshold(impostors[:0], pending, 0.05) == float("inf")
    with pytest.raises(ValueError, match="fpr"):
        acceptance_threshold(impostors, pending, 0.0)


def test_accept_first_puts_confident_dense_hits_ahead_of_the_fused_ranking():
    fused = np.array([[5, 6, 7, -1], [5, 6, 7, -1]])
    dense_rows = np.array([[9, 6], [9, 6]])
    dense_scores = np.array([[0.9, 0.8], [0.4, 0.3]])
    ranked = accept_first(fused, dense_rows, dense_scores, threshold=0.5, k=4)
    assert ranked.tolist() == [[9, 6, 5, 7], [5, 6, 7, -1]]


def test_max_fusion_interleaves_without_rewarding_rows_found_twice():
    generative = np.array([[1, 2, 7]])
    dense = np.array([[7, 8, -1]])
    summed, _ = reciprocal_rank_fusion([generative, dense], 4)
    best, _ = reciprocal_rank_fusion([generative, dense], 4, combine="max")
    assert summed[0, 0] == 7  # in both lists: ahead of the generator's own first answer
    assert best[0].tolist() == [1, 7, 2, 8]


class FixedRanking:
    """A retriever that always answers rows 0, 1, 2, 3 (the generative side of a hybrid)."""

    def __init__(self, n: int):
        self.table = IdentifierTable(np.array([str(i) for i in range(n)], dtype=object), np.zeros((n, 2), np.int64),
                                     [1, n], np.ones(n, dtype=bool))

    def search_batch(self, queries, k, beam_size):
        return np.tile(np.arange(4), (len(queries), 1))[:, :k], np.zeros((len(queries), k), np.float32)


@pytest.mark.parametrize("interleave, expected", [(None, [0, 8, 1, 9, 2, 3]), (1, [0, 8, 1, 2, 3, -1])])
def test_hybrid_merges_at_most_interleave_dense_hits_below_the_threshold(interleave, expected):
    pending = np.array([[1.0, 0.0], [0.8, 0.6]])
    hybrid = HybridRetriever(FixedRanking(10), DenseFallback(np.array([8, 9]), pending),
                             lambda texts: np.array([[1.0, 0.0]] * len(texts)), threshold=1.5, interleave=interleave)
    rows, _ = hybrid.search_batch(["q"], k=6)
    assert rows[0].tolist() == expected
    hybrid.threshold = 0.9  # row 8 (cosine 1.0) now clears the threshold and goes first
    assert hybrid.search_batch(["q"], k=3)[0][0].tolist() == [8, 0, 1]
