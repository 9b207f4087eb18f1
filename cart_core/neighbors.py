"""Item neighbour lists: each item's m nearest items by the cosine of their vectors, so verification
can grow the candidate set from its best candidates at a cost that does not depend on N.

Why: the generator finds the query's region (at 1M synthetic items the source item is in the
hybrid's top 10 for 98.6 % of vector queries), but the exact nearest neighbours of a query are
spread over many fine codes of its cluster, and the items under the beam's prefixes cover few of
them (recall@10 against exact search 0.40 at 1M). The query's exact neighbours are mostly the
neighbours of its best verified candidates, so following the stored lists of the best T adds what
the prefixes miss: at most T * m rows per query, whatever the catalog size (docs/benchmarks.md §0).

Built exactly, blocked by the identifier's coarse cluster k: an item's neighbours are searched
among the items of its own cluster and of the probe-1 clusters whose centroids are nearest, one
matrix product per block of rows. Work is O(N * N / K * probe), so it grows faster than N at a
fixed K: 38 s for 1M items in K = 256 clusters on 2 vCPUs (docs/benchmarks.md §0); memory is m
int32 per item (96 bytes at m = 24), and the rows are converted to float32 one block at a time.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from cart_core.kmeans import l2_normalize


def build_neighbors(vectors: np.ndarray, clusters: np.ndarray, m: int = 16, probe: int = 1,
                    row_block: int = 1024, progress: bool = False, live: np.ndarray | None = None) -> np.ndarray:
    """int32 [N, m]: each row's m most similar other rows (best first), -1 padding. Rows whose vector
    is zero (an item without features) or, given `live`, that are not live (a deleted item) neither
    get nor are neighbours."""
    vectors = np.asarray(vectors)
    clusters = np.asarray(clusters, np.int64)
    if len(vectors) != len(clusters):
        raise ValueError(f"{len(vectors)} vectors for {len(clusters)} cluster ids")
    if m < 1 or probe < 1:
        raise ValueError(f"neighbours per item and probe must be >= 1, got m={m}, probe={probe}")
    out = np.full((len(vectors), m), -1, np.int32)
    present = np.concatenate([np.abs(vectors[i:i + 65536]).sum(1) > 0 for i in range(0, len(vectors), 65536)]) \
        if len(vectors) else np.zeros(0, bool)                      # in blocks: no [N, D] temporary
    if live is not None:
        present &= np.asarray(live, bool)
    ids = np.unique(clusters[present])
    if len(ids) == 0:
        return out
    order = np.argsort(clusters, kind="stable")
    bounds = np.searchsorted(clusters[order], np.stack([ids, ids + 1]))
    members = {int(c): order[lo:hi][present[order[lo:hi]]] for c, lo, hi in zip(ids, *bounds)}
    centroids = l2_normalize(np.stack([_unit(vectors, members[int(c)]).mean(0).numpy() for c in ids]))
    similarity = centroids @ centroids.T
    np.fill_diagonal(similarity, np.inf)  # its own cluster first, even beside a twin centroid
    nearest = np.argsort(-similarity, axis=1)[:, :probe]
    for i, c in enumerate(tqdm(ids, desc="neighbour lists", disable=not progress, leave=False)):
        pool = np.concatenate([members[int(ids[j])] for j in nearest[i]])
        _fill_lists(out, vectors, members[int(c)], pool, row_block)
    return out


def without_rows(neighbors: np.ndarray, vectors: np.ndarray, clusters: np.ndarray, live: np.ndarray,
                 gone: np.ndarray, probe: int = 1, row_block: int = 1024) -> np.ndarray | None:
    """The lists build_neighbors(..., live=live) gives once the rows `gone` are no longer live,
    from the lists built before (a copy; the original is left as it is), or None where that takes a
    full build. With probe 1 a list is searched in its own cluster only, so only the clusters of
    `gone` change: a takedown rebuilds a few thousand lists at 1M items, not a million. With more
    probes a cluster's centroid, and so which clusters every list searches, moves with its members:
    None."""
    gone = np.asarray(gone, np.int64)
    if len(gone) == 0:
        return neighbors
    if probe != 1:
        return None
    clusters = np.asarray(clusters, np.int64)
    out = neighbors.copy()
    live = np.asarray(live, bool)
    changed = np.unique(clusters[gone])
    affected = np.flatnonzero(np.isin(clusters, changed))  # one pass over the rows
    for c in changed:
        rows = affected[clusters[affected] == c]
        out[rows] = -1
        members = rows[live[rows] & (np.abs(np.asarray(vectors[rows], np.float32)).sum(1) > 0)]
        if len(members):
            _fill_lists(out, vectors, members, members, row_block)
    return out


def _unit(vectors: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """rows of `vectors` as unit float32, converted one block at a time: no [N, D] copy."""
    return torch.from_numpy(l2_normalize(np.asarray(vectors[rows], np.float32)))


def _fill_lists(out: np.ndarray, vectors: np.ndarray, rows: np.ndarray, pool: np.ndarray, row_block: int) -> None:
    """out[rows]: each row's most similar rows of `pool` (itself excluded), best first."""
    m = out.shape[1]
    pool_t, pool_x = torch.from_numpy(pool), _unit(vectors, pool)
    keep = min(m + 1, len(pool))
    for start in range(0, len(rows), row_block):
        block = rows[start:start + row_block]
        sims = _unit(vectors, block) @ pool_x.T
        sims[torch.from_numpy(block)[:, None] == pool_t[None, :]] = -np.inf  # never its own neighbour
        top = sims.topk(keep, dim=1)
        found = np.where(np.isfinite(top.values.numpy()), pool[top.indices.numpy()], -1)[:, :m]
        out[block, :found.shape[1]] = found


def follow_neighbors(neighbors: np.ndarray, seeds: np.ndarray, exclude: np.ndarray, live: np.ndarray | None = None,
                     cap: int | None = None) -> np.ndarray:
    """int64 [B, E] (-1 padding): the live neighbours of each query's seed rows ([B, T], -1 = none),
    seed by seed and best first, each once and none already in `exclude` ([B, C], -1 ignored), at
    most `cap` per query (default T * m)."""
    seeds = np.asarray(seeds, np.int64)
    b, t = seeds.shape
    cap = t * neighbors.shape[1] if cap is None else cap
    found = neighbors[seeds.clip(0)].reshape(b, -1).astype(np.int64)         # [B, T*m]
    found[np.repeat(seeds < 0, neighbors.shape[1], axis=1)] = -1
    if live is not None:
        found[(found >= 0) & ~np.asarray(live)[found.clip(0)]] = -1
    # the whole batch at once (a Python loop per query cost more than the verification itself):
    # (query, row) pairs as one key each, new ones kept at their first position, then packed left
    n = len(neighbors)
    query_of = np.arange(b)[:, None]
    keys = np.where(found >= 0, query_of * n + found, -1).ravel()
    taken = np.asarray(exclude, np.int64)
    taken_keys = (query_of * n + taken)[taken >= 0]
    fresh = (keys >= 0) & ~np.isin(keys, taken_keys)
    _, first = np.unique(keys[fresh], return_index=True)
    positions = np.sort(np.flatnonzero(fresh)[first])     # first occurrence of each new pair, in order
    query = positions // found.shape[1]
    slot = np.arange(len(positions)) - np.searchsorted(query, query)  # rank within its query
    keep = slot < cap
    out = np.full((b, cap), -1, np.int64)
    out[query[keep], slot[keep]] = found.ravel()[positions[keep]]
    return out
