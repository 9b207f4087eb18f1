"""A learned map from the query's sentence vector into the item feature space (CLIP / CLAP /
VideoMAE), trained contrastively on the (caption, item) training pairs.

This is the cross-modal side of verification: it scores an item by its own feature, so items
without any caption (indexed from media alone, or just added) are still findable. The baseline it
replaces is the closed-form ridge (cart_core/dense.py), which regresses onto the feature and so
spends its capacity on directions no query can predict; InfoNCE only asks the right item to score
above the others (Flickr8k-976: ridge R@1 37.3, this map 63.2 over the whole catalog; docs/benchmarks.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cart_core.settings import AlignConfig  # noqa: F401  (re-exported)


class QueryAligner(torch.nn.Module):
    """Linear map, query sentence vector [Dq] -> unit vector in the item feature space [Df]."""

    def __init__(self, query_dim: int, feature_dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(query_dim, feature_dim)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(queries), dim=-1)

    @torch.no_grad()
    def map(self, queries: np.ndarray) -> np.ndarray:
        device = self.proj.weight.device
        return self(torch.as_tensor(np.asarray(queries, np.float32), device=device)).cpu().numpy()

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in self.state_dict().items()}, folder / "aligner.safetensors")
        (folder / "aligner.json").write_text(json.dumps({"query_dim": self.proj.in_features,
                                                         "feature_dim": self.proj.out_features}))

    @classmethod
    def load(cls, folder: str | Path) -> "QueryAligner":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "aligner.json").read_text())
        model = cls(meta["query_dim"], meta["feature_dim"])
        model.load_state_dict(load_file(folder / "aligner.safetensors"))
        return model.eval()


def fit_aligner(query_vectors: np.ndarray, query_rows: np.ndarray, features: np.ndarray,
                cfg: AlignConfig | None = None, progress: bool = False) -> QueryAligner:
    """InfoNCE: each training query against its item's (L2-normalised) feature, the other items
    as negatives (all of them when there are at most cfg.negatives, else a fresh sample per step
    that always holds the batch's own items)."""
    cfg = cfg or AlignConfig()
    if len(query_vectors) != len(query_rows):
        raise ValueError(f"{len(query_vectors)} query vectors but {len(query_rows)} item rows")
    if len(query_vectors) == 0:
        raise ValueError("no training pairs to fit the query aligner on")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    x = torch.as_tensor(np.asarray(query_vectors, np.float32))
    rows = torch.as_tensor(np.asarray(query_rows, np.int64))
    items = F.normalize(torch.as_tensor(np.asarray(features, np.float32)), dim=-1)
    model = QueryAligner(x.shape[1], items.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sample = len(items) > cfg.negatives
    for _ in tqdm(range(cfg.epochs), desc="align queries", disable=not progress, leave=False):
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), cfg.batch_size):
            batch = perm[start:start + cfg.batch_size]
            if sample:
                own = rows[batch]
                extra = torch.randint(len(items), (max(0, cfg.negatives - len(batch)),), generator=gen)
                pool, target = torch.unique(torch.cat([own, extra]), return_inverse=True)
                target = target[:len(batch)]
                logits = model(x[batch]) @ items[pool].T
            else:
                target = rows[batch]
                logits = model(x[batch]) @ items.T
            loss = F.cross_entropy(logits / cfg.temperature, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
