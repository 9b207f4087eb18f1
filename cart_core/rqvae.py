"""RQ-VAE: the fine identifier tokens (v1 ... vM) are residual codes of what K-Means left over.

encoder MLP -> M residual codebooks of K codes -> decoder MLP, trained with reconstruction +
commitment loss. Codebooks start from k-means on the encoded residuals (so no code starts dead)
and codes left unused in an epoch are reset to random live residuals.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cart_core._faiss import import_faiss
from cart_core.settings import RQVAEConfig  # noqa: F401  (re-exported)


class RQVAE(nn.Module):
    def __init__(self, in_dim: int, cfg: RQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.in_dim = in_dim
        self.encoder = nn.Sequential(
            nn.Linear(in_dim, cfg.hidden_dim), nn.GELU(), nn.Linear(cfg.hidden_dim, cfg.latent_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(cfg.latent_dim, cfg.hidden_dim), nn.GELU(), nn.Linear(cfg.hidden_dim, in_dim)
        )
        self.codebooks = nn.Parameter(torch.randn(cfg.levels, cfg.codebook_size, cfg.latent_dim) * 0.1)
        # inputs are rescaled so the MSE is on a unit scale whatever the feature norm
        self.register_buffer("input_scale", torch.ones(()))

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual quantization: returns (quantized z, codes [B, M], codebook+commitment loss)."""
        residual = z
        quantized = torch.zeros_like(z)
        codes, loss = [], z.new_zeros(())
        for level in range(self.cfg.levels):
            book = self.codebooks[level]
            idx = torch.cdist(residual.detach(), book.detach()).argmin(dim=1)
            chosen = book[idx]
            loss = loss + ((residual.detach() - chosen) ** 2).mean()
            loss = loss + self.cfg.beta * ((residual - chosen.detach()) ** 2).mean()
            quantized = quantized + chosen
            residual = residual - chosen.detach()
            codes.append(idx)
        quantized_st = z + (quantized - z).detach()  # straight-through gradient to the encoder
        return quantized_st, torch.stack(codes, dim=1), loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder(x / self.input_scale)
        q, codes, vq_loss = self.quantize(z)
        x_hat = self.decoder(q) * self.input_scale
        return x_hat, codes, vq_loss

    @torch.no_grad()
    def _map_batches(self, x: np.ndarray, fn, batch_size: int, empty: np.ndarray) -> np.ndarray:
        """Apply fn to float32 tensor batches of x in eval mode; concatenate the numpy results."""
        self.eval()
        out = [
            fn(torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size], dtype=np.float32))).numpy()
            for start in range(0, len(x), batch_size)
        ]
        return np.concatenate(out) if out else empty

    def encode(self, x: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """Codes int64 [N, M] for residual vectors x, in batches."""
        return self._map_batches(
            x, lambda xb: self.quantize(self.encoder(xb / self.input_scale))[1], batch_size,
            np.zeros((0, self.cfg.levels), dtype=np.int64),
        )

    def reconstruction_error(self, x: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """Per-row squared reconstruction error (drift signal for incremental adds). Absolute, not
        per-row relative: a residual can be ~0 (an item alone in its cluster)."""
        return self._map_batches(x, lambda xb: ((self(xb)[0] - xb) ** 2).sum(1), batch_size,
                                 np.zeros(0, dtype=np.float32))

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "rqvae.safetensors")
        (folder / "rqvae.json").write_text(json.dumps({"in_dim": self.in_dim, **asdict(self.cfg)}, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "RQVAE":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "rqvae.json").read_text())
        model = cls(meta.pop("in_dim"), RQVAEConfig(**meta))
        model.load_state_dict(load_file(folder / "rqvae.safetensors"))
        return model.eval()


def _kmeans_init(model: RQVAE, x: torch.Tensor, seed: int) -> None:
    """Initialise each codebook with k-means on the residual left by the previous levels."""
    faiss = import_faiss()
    k = model.cfg.codebook_size
    with torch.no_grad():
        residual = model.encoder(x / model.input_scale).numpy().astype(np.float32)
        for level in range(model.cfg.levels):
            n_clusters = min(k, len(residual))
            km = faiss.Kmeans(residual.shape[1], n_clusters, niter=20, seed=seed + level, verbose=False,
                               min_points_per_centroid=1)
            km.train(np.ascontiguousarray(residual))
            book = np.asarray(km.centroids, dtype=np.float32)
            if n_clusters < k:  # tiny inputs: pad with jittered copies
                extra = book[np.arange(k - n_clusters) % n_clusters] + 1e-3
                book = np.concatenate([book, extra])
            model.codebooks.data[level] = torch.from_numpy(book)
            _, idx = km.index.search(np.ascontiguousarray(residual), 1)
            residual = residual - book[idx[:, 0]]


def _reset_dead_codes(model: RQVAE, x: torch.Tensor, usage: torch.Tensor, gen: torch.Generator,
                      opt: torch.optim.Optimizer) -> int:
    """Move codes unused during the last epoch onto random residuals at their level, and clear
    their optimiser moments so the stale ones do not drag them back."""
    n_reset = 0
    state = opt.state.get(model.codebooks, {})
    with torch.no_grad():
        residual = model.encoder(x / model.input_scale)
        for level in range(model.cfg.levels):
            book = model.codebooks.data[level]
            chosen = book[torch.cdist(residual, book).argmin(dim=1)]  # before the reset
            dead = torch.nonzero(usage[level] == 0).flatten()
            if len(dead):
                pick = torch.randint(0, len(residual), (len(dead),), generator=gen)
                book[dead] = residual[pick]
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key][level, dead] = 0
                n_reset += len(dead)
            residual = residual - chosen
    return n_reset


def code_perplexity(codes: np.ndarray, codebook_size: int) -> list[float]:
    """exp(entropy) of code usage per level: K means every code used evenly, 1 means collapse."""
    result = []
    for level in range(codes.shape[1]):
        p = np.bincount(codes[:, level], minlength=codebook_size) / max(len(codes), 1)
        p = p[p > 0]
        result.append(float(np.exp(-(p * np.log(p)).sum())))
    return result


def fit_rqvae(x: np.ndarray, cfg: RQVAEConfig, *, progress: bool = True) -> tuple[RQVAE, dict]:
    """Train an RQ-VAE on residual vectors x [N, d]; returns the model and a training report."""
    if len(x) == 0:
        raise ValueError("cannot fit an RQ-VAE on zero vectors")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    model = RQVAE(xt.shape[1], cfg)
    model.input_scale.fill_(float(xt.std().clamp_min(1e-8)))
    init_sample = xt[torch.randperm(len(xt), generator=gen)[: min(len(xt), 65536)]]
    _kmeans_init(model, init_sample, cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history, resets = [], 0
    bar = tqdm(range(cfg.epochs), desc="rq-vae", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        usage = torch.zeros(cfg.levels, cfg.codebook_size)
        perm = torch.randperm(len(xt), generator=gen)
        total, n = 0.0, 0
        for start in range(0, len(xt), cfg.batch_size):
            xb = xt[perm[start:start + cfg.batch_size]]
            x_hat, codes, vq_loss = model(xb)
            recon = ((x_hat - xb) ** 2).mean() / model.input_scale**2
            loss = recon + vq_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            for level in range(cfg.levels):
                usage[level] += torch.bincount(codes[:, level], minlength=cfg.codebook_size)
            total += recon.item() * len(xb)
            n += len(xb)
        history.append(total / n)
        if epoch < cfg.epochs - 1:  # never leave freshly reset, untrained codes in the final model
            resets += _reset_dead_codes(model, init_sample, usage, gen, opt)
        bar.set_postfix(recon=f"{history[-1]:.4f}")
    codes = model.encode(x)
    report = {
        "recon_mse_scaled": history,
        "dead_code_resets": resets,
        "perplexity": code_perplexity(codes, cfg.codebook_size),
        # share of the residual energy the codes do not explain
        "relative_recon_error": float(model.reconstruction_error(x).sum() / max(float((x ** 2).sum()), 1e-12)),
    }
    return model.eval(), report
