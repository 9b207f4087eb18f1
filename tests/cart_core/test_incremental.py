"""Building blocks of incremental re-indexing: appended identifiers, a widened counter vocabulary,
and the dense fallback merged by reciprocal-rank fusion."""
import numpy as np
import torch

from cart_core.fallback import DenseFallback, reciprocal_rank_fusion
from cart_core.generator import Generator, GeneratorConfig
from cart_core.identifiers import build_identifiers, extend_identifiers
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
