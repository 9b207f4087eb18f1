"""A learned metric for the text side of verification: queries and caption centroids compared
after one linear map W, learned so that a caption lands nearer its own item's other captions
than other items' captions.

Why: the caption centroid compares a query with an item's captions in MiniLM's general-purpose
space, where the words that tell two items of one catalog apart (the third person in a photo,
the instrument in a video) weigh no more than the words every caption shares. An InfoNCE over
the training captions, each against the leave-one-out centroid of its own item's other captions,
learns which directions separate this catalog's items. Measured (docs/benchmarks.md §0, as a
fourth signal of the hybrid): VATEX 82.0 -> 82.8 R@1 and Flickr8k 73.8 -> 73.4 in one run (Flickr8k
has four captions an item, three to learn from, and more epochs lose more there: 73.3 after 3,
73.0 after 6, in development runs).

Cost: W is Dt x Dt (384 x 384, 590 KB in fp32). The score normalize(W q) . normalize(W c) is
computed as (W^T normalize(W q)) . c / |W c| on the stored centroid c, so the index keeps one
extra float per item (|W c|, computed at load), not a second centroid table.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cart_core.settings import CaptionMetricConfig  # noqa: F401  (re-exported)


class CaptionMetric(torch.nn.Module):
    """Linear map W [Dt, Dt] (no bias, initialised to the identity: the plain centroid cosine)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(dim))

    @property
    def dim(self) -> int:
        return self.proj.in_features

    @torch.no_grad()
    def query_side(self, queries: np.ndarray) -> np.ndarray:
        """W^T normalize(W q) [B, Dt]: dot it with a raw centroid c, divide by item_norms(c)."""
        w = self.proj.weight.float()
        q = torch.as_tensor(np.asarray(queries, np.float32))
        return (F.normalize(q @ w.T, dim=-1) @ w).numpy()

    @torch.no_grad()
    def item_norms(self, centroids: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """|W c| [N] float32 for stored centroids (fp16 allowed); 0 for a zero row (no caption)."""
        w = self.proj.weight.float()
        out = np.empty(len(centroids), np.float32)
        for start in range(0, len(centroids), chunk):
            c = torch.as_tensor(np.asarray(centroids[start:start + chunk], np.float32))
            out[start:start + chunk] = torch.linalg.vector_norm(c @ w.T, dim=-1).numpy()
        return out

    @torch.no_grad()
    def cosine(self, queries: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        """normalize(W q_b) . normalize(W c_b) [B], row by row (leave-one-out centroids)."""
        w = self.proj.weight.float()
        q = F.normalize(torch.as_tensor(np.asarray(queries, np.float32)) @ w.T, dim=-1)
        c = F.normalize(torch.as_tensor(np.asarray(centroids, np.float32)) @ w.T, dim=-1)
        return (q * c).sum(-1).numpy()

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.proj.weight.detach().contiguous().cpu()}, folder / "caption_metric.safetensors")
        (folder / "caption_metric.json").write_text(json.dumps({"dim": self.dim}))

    @classmethod
    def load(cls, folder: str | Path) -> "CaptionMetric":
        from safetensors.torch import load_file

        folder = Path(folder)
        dim = int(json.loads((folder / "caption_metric.json").read_text())["dim"])
        weight = load_file(folder / "caption_metric.safetensors")["weight"]
        if tuple(weight.shape) != (dim, dim):
            raise ValueError(f"{folder}/caption_metric.safetensors: weight {tuple(weight.shape)}, expected ({dim}, {dim})")
        model = cls(dim)
        with torch.no_grad():
            model.proj.weight.copy_(weight)
        return model.eval()

    @staticmethod
    def exists(folder: str | Path) -> bool:
        return (Path(folder) / "caption_metric.json").exists()


def fit_caption_metric(vectors: np.ndarray, rows: np.ndarray, n_items: int,
                       cfg: CaptionMetricConfig | None = None, progress: bool = False) -> CaptionMetric:
    """InfoNCE over training captions (sentence vectors [P, Dt], item rows [P]): each caption against
    its item's leave-one-out centroid, the other items' centroids as negatives (all of them up to
    cfg.negatives, else a fresh sample per step that holds the batch's own items). Captions whose
    item has no other caption have no positive and are skipped. W is linear, so an item's mapped
    centroid is W times its raw caption sum, computed only for the items a step scores."""
    cfg = cfg or CaptionMetricConfig()
    if len(vectors) != len(rows):
        raise ValueError(f"{len(vectors)} caption vectors but {len(rows)} item rows")
    x = torch.as_tensor(np.asarray(vectors, np.float32))
    rows_t = torch.as_tensor(np.asarray(rows, np.int64))
    sums = torch.zeros(n_items, x.shape[1]).index_add_(0, rows_t, x)
    counts = torch.bincount(rows_t, minlength=n_items)
    usable = torch.nonzero(counts[rows_t] >= 2).squeeze(1)
    model = CaptionMetric(x.shape[1])
    if len(usable) == 0:
        return model.eval()  # no item with two captions: the identity, i.e. the plain centroid cosine
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    has = torch.nonzero(counts > 0).squeeze(1)
    sample = len(has) > cfg.negatives
    for _ in tqdm(range(cfg.epochs), desc="caption metric", disable=not progress, leave=False):
        perm = usable[torch.randperm(len(usable), generator=gen)]
        for start in range(0, len(perm), cfg.batch_size):
            batch = perm[start:start + cfg.batch_size]
            own = rows_t[batch]
            pool = has if not sample else torch.unique(torch.cat([own, has[torch.randint(
                len(has), (max(0, cfg.negatives - len(batch)),), generator=gen)]]))
            target = torch.searchsorted(pool, own)
            w = model.proj.weight
            q = F.normalize(x[batch] @ w.T, dim=-1)
            items = F.normalize(sums[pool] @ w.T, dim=-1)
            loo = F.normalize((sums[own] - x[batch]) @ w.T, dim=-1)
            logits = q @ items.T
            logits[torch.arange(len(batch)), target] = (q * loo).sum(-1)
            loss = F.cross_entropy(logits / cfg.temperature, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
