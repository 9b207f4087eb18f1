"""Item neighbour lists and the verification step that follows them."""
import numpy as np
import pytest

from cart_core.candidates import expand_beam, rows_as_candidates
from cart_core.fusion import Fusion
from cart_core.hybrid import VerifiedRetriever, VerifyConfig, item_neighbors
from cart_core.neighbors import build_neighbors, follow_neighbors, without_rows
from cart_core.verify import ItemVectors

from tests.cart_core.test_decoding import random_catalog
from tests.cart_core.test_hybrid import beam_over, vector_index


def exact_neighbors(x: np.ndarray, m: int) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :m]


def test_one_cluster_gives_the_exact_neighbours():
    x = np.random.default_rng(0).normal(size=(200, 12)).astype(np.float32)
    nb = build_neighbors(x, np.zeros(200), m=7, row_block=64)
    assert nb.dtype == np.int32 and nb.shape == (200, 7)
    assert np.array_equal(nb, exact_neighbors(x, 7))


@pytest.mark.parametrize("probe", [1, 2, 4])
def test_lists_are_searched_in_the_item_cluster_and_the_nearest_ones(probe):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16)) * 5
    clusters = rng.integers(0, 4, 400)
    x = (centres[clusters] + rng.normal(size=(400, 16))).astype(np.float32)
    nb = build_neighbors(x, clusters, m=5, probe=probe)
    cent = np.stack([(x[clusters == c] / np.linalg.norm(x[clusters == c], axis=1, keepdims=True)).mean(0) for c in range(4)])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    allowed = np.argsort(-(cent @ cent.T), axis=1)[:, :probe]
    for r in range(400):
        assert set(clusters[nb[r]].tolist()) <= set(allowed[clusters[r]].tolist())
        assert r not in nb[r]
    if probe == 4:  # every cluster probed: exact
        assert np.array_equal(nb, exact_neighbors(x, 5))


def test_items_without_vectors_neither_get_nor_are_neighbours_and_small_clusters_pad():
    x = np.random.default_rng(2).normal(size=(30, 4)).astype(np.float32)
    x[[3, 7]] = 0
    clusters = np.zeros(30, int)
    clusters[-3:] = 1  # a cluster of 3: two neighbours each, then -1
    nb = build_neighbors(x, clusters, m=4)
    assert (nb[[3, 7]] == -1).all() and not np.isin(nb, [3, 7]).any()
    assert (nb[-3:, :2] >= 27).all() and (nb[-3:, 2:] == -1).all()
    with pytest.raises(ValueError, match="3 cluster ids"):
        build_neighbors(x, clusters[:3])


@pytest.mark.parametrize("seed", range(4))
def test_lists_without_taken_rows_are_those_a_build_without_them_gives(seed):
    """A takedown rebuilds only the lists of the taken rows' clusters (probe 1), and gets what a
    full build without those rows gives; the lists it started from are left as they were."""
    rng = np.random.default_rng(seed)
    clusters = rng.integers(0, 6, 300)
    x = (rng.normal(size=(6, 8))[clusters] * 3 + rng.normal(size=(300, 8))).astype(np.float16)
    x[rng.choice(300, 5, replace=False)] = 0  # items without vectors stay out
    live = rng.random(300) > 0.1                # rows already dead before the takedown
    lists = build_neighbors(x, clusters, m=5, live=live)
    kept = lists.copy()
    gone = np.concatenate([rng.choice(np.flatnonzero(live), 8, replace=False),
                           np.flatnonzero(clusters == 2)])  # one cluster emptied whole
    after = live.copy()
    after[gone] = False
    rebuilt = without_rows(lists, x, clusters, after, gone)
    np.testing.assert_array_equal(rebuilt, build_neighbors(x, clusters, m=5, live=after))
    assert not np.isin(rebuilt, gone).any() and (rebuilt[clusters == 2] == -1).all()
    np.testing.assert_array_equal(lists, kept)
    assert without_rows(lists, x, clusters, after, gone, probe=2) is None  # centroids move: a full build
    assert without_rows(lists, x, clusters, live, np.zeros(0, int)) is lists


def test_follow_takes_live_new_rows_once_in_seed_order():
    neighbors = np.array([[1, 2, 3], [0, 2, 4], [5, 6, 7], [0, 1, 2], [1, 0, 8],
                          [0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2]], np.int32)
    live = np.ones(9, bool)
    live[6] = False
    seeds = np.array([[0, 1], [2, -1], [-1, -1]])
    exclude = np.array([[0, 1], [2, -1], [-1, -1]])
    out = follow_neighbors(neighbors, seeds, exclude, live)
    assert out.shape == (3, 6)
    assert out[0].tolist() == [2, 3, 4, -1, -1, -1]     # 0 and 1 are candidates already; 2 once
    assert out[1].tolist() == [5, 7, -1, -1, -1, -1]    # 6 was deleted
    assert (out[2] == -1).all()
    assert follow_neighbors(neighbors, seeds, exclude, live, cap=2)[0].tolist() == [2, 3]


def test_rows_found_elsewhere_get_the_beam_log_probabilities_of_their_prefixes():
    table = random_catalog(n=300, k=6, v=5)
    trie, beam = beam_over(table, beam=4)
    cands = expand_beam(beam, trie, cap=60, min_depth=1)
    again = rows_as_candidates(beam, trie, cands.rows, first_rank=60)
    valid = cands.valid
    assert np.array_equal(again.logp[valid], cands.logp[valid])
    assert (again.depth == 0).all() and again.rank[0, 0] == 60
    joined = cands.join(again)
    assert joined.rows.shape == (3, 120) and np.array_equal(joined.rows[:, 60:], cands.rows)


def test_following_neighbours_recovers_the_exact_top_k_the_prefixes_miss():
    feats, table, gen = vector_index(n=80, seed=6)
    rng = np.random.default_rng(7)
    queries = feats[:40] + 0.3 * rng.normal(size=(40, feats.shape[1])).astype(np.float32)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    fn = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    truth = np.argsort(-(qn @ fn.T), axis=1)[:, :5]
    items = ItemVectors.build(None, feats)
    fusion = Fusion(["feature_cos"], [1.0])
    plain_cfg = VerifyConfig(candidates=2, expand_depth=table.length)  # the beam's items only
    follow_cfg = VerifyConfig(candidates=2, expand_depth=table.length, neighbor_seeds=2, neighbors=8)
    neighbors = item_neighbors(items, table, follow_cfg)
    assert item_neighbors(items, table, plain_cfg) is None
    plain = VerifiedRetriever(gen, table, items, None, fusion, plain_cfg).search(queries, k=5, beam_size=2)[0]
    follow = VerifiedRetriever(gen, table, items, None, fusion, follow_cfg, neighbors=neighbors)
    rows = follow.search(queries, k=5, beam_size=2)[0]

    def recall(found):
        return np.mean([len(set(f[f >= 0]) & set(t)) / 5 for f, t in zip(found, truth)])

    assert recall(rows) >= recall(plain) + 0.3
    table.live[truth[:, 0]] = False  # deleted items are never reached through a neighbour list
    follow = VerifiedRetriever(gen, table, items, None, fusion, follow_cfg, neighbors=neighbors)
    rows = follow.search(queries, k=5, beam_size=2)[0]
    assert not np.isin(rows, truth[:, 0]).any()
    with pytest.raises(ValueError, match="neighbour lists"):
        VerifiedRetriever(gen, table, items, None, fusion, follow_cfg, neighbors=neighbors[:5])


@pytest.mark.parametrize("seed", range(5))
def test_follow_matches_a_query_by_query_reading(seed):
    rng = np.random.default_rng(seed)
    neighbors = rng.integers(-1, 50, (50, 6)).astype(np.int32)
    seeds = rng.integers(-1, 50, (7, 4))
    exclude = rng.integers(-1, 50, (7, 10))
    live = rng.random(50) > 0.2
    cap = int(rng.integers(1, 25))
    out = follow_neighbors(neighbors, seeds, exclude, live, cap)
    for q in range(7):
        want = []
        for s in seeds[q]:
            for r in (neighbors[s] if s >= 0 else []):
                if r >= 0 and live[r] and r not in exclude[q] and r not in want:
                    want.append(int(r))
        want = want[:cap]
        assert out[q].tolist() == want + [-1] * (cap - len(want))
