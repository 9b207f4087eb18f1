"""The generator: query encoder states -> identifier tokens, with CART's two fusion branches.

Query side (pluggable): `TextQueryEncoder` (a Hugging Face encoder, all layer states kept) or
`VectorQueryEncoder` (a precomputed query vector projected into a few pseudo layer states). Either
yields states [B, S, T, H] + mask [B, T] that the same `FusionDecoder` reads:
  coarse branch: Z = W[E1; ...; ES] + b -> cross-attention -> sigmoid gate
  fine branch:   sum_i alpha_i * CrossAttn(Y, E_i), alpha learned (softmax over layers)
With both branches off the decoder cross-attends to the last layer only (plain seq2seq).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cart_core.errors import ConfigError
from cart_core.settings import GeneratorConfig  # noqa: F401  (re-exported)
from cart_core.text import TextEncoder


class VectorQueryEncoder(nn.Module):
    """Precomputed query vectors (e.g. CLIP text embeddings) -> S x T pseudo encoder states."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        self.hidden_size, self.num_layers = cfg.vector_hidden, cfg.vector_layers
        self.proj = nn.Sequential(
            nn.LayerNorm(cfg.query_dim),
            nn.Linear(cfg.query_dim, cfg.vector_layers * cfg.vector_slots * cfg.vector_hidden),
        )

    def forward(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = vectors.shape[0]
        states = self.proj(vectors).view(b, self.cfg.vector_layers, self.cfg.vector_slots, -1)
        return states, torch.ones(b, self.cfg.vector_slots, dtype=torch.bool, device=vectors.device)


class FusionLayer(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        d, h, p = cfg.d_model, cfg.n_heads, cfg.dropout
        self.cfg = cfg
        self.norm_self, self.norm_cross, self.norm_ff = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, h, dropout=p, batch_first=True)
        if cfg.coarse_fusion:
            self.coarse_attn = nn.MultiheadAttention(d, h, dropout=p, batch_first=True)
            self.coarse_gate = nn.Linear(d, d)
        if cfg.fine_fusion:
            self.fine_attn = nn.MultiheadAttention(d, h, dropout=p, batch_first=True)
        if not (cfg.coarse_fusion or cfg.fine_fusion):
            self.plain_attn = nn.MultiheadAttention(d, h, dropout=p, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, cfg.ff_dim), nn.GELU(), nn.Dropout(p), nn.Linear(cfg.ff_dim, d))
        self.drop = nn.Dropout(p)

    def forward(
        self, y: torch.Tensor, memory: dict[str, torch.Tensor], alpha: torch.Tensor | None, width: int = 1
    ) -> torch.Tensor:
        """y [B*width, n, d]: `width` beams per query share that query's memory without copies."""
        n = y.shape[1]
        causal = torch.triu(torch.ones(n, n, dtype=torch.bool, device=y.device), 1)
        q = self.norm_self(y)
        y = y + self.drop(self.self_attn(q, q, q, attn_mask=causal, need_weights=False)[0])
        q = self.norm_cross(y)
        bw, _, d = q.shape
        b = bw // width
        q = q.reshape(b, width * n, d)  # cross-attention rows are independent: fold beams into length
        pad = memory["pad"]  # [B, T] True where padding
        fused = torch.zeros_like(q)
        if self.cfg.coarse_fusion:
            c = self.coarse_attn(q, memory["coarse"], memory["coarse"], key_padding_mask=pad, need_weights=False)[0]
            fused = fused + torch.sigmoid(self.coarse_gate(c)) * c
        if self.cfg.fine_fusion:
            fine = memory["fine"]  # [B, S, T, d]
            s, t = fine.shape[1], fine.shape[2]
            qs = q.unsqueeze(1).expand(b, s, width * n, d).reshape(b * s, width * n, d)
            kv = fine.reshape(b * s, t, d)
            f = self.fine_attn(qs, kv, kv, key_padding_mask=pad.repeat_interleave(s, 0), need_weights=False)[0]
            fused = fused + (alpha.view(1, s, 1, 1) * f.view(b, s, width * n, d)).sum(1)
        if not (self.cfg.coarse_fusion or self.cfg.fine_fusion):
            last = memory["last"]
            fused = self.plain_attn(q, last, last, key_padding_mask=pad, need_weights=False)[0]
        y = y + self.drop(fused.reshape(bw, n, d))
        return y + self.drop(self.ff(self.norm_ff(y)))


class FusionDecoder(nn.Module):
    """Decoder over identifier tokens; position l predicts a code from vocabulary l."""

    def __init__(self, cfg: GeneratorConfig, enc_hidden: int, enc_layers: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.vocab_sizes = list(cfg.vocab_sizes)
        offsets = torch.tensor([0] + self.vocab_sizes[:-1]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        total = sum(self.vocab_sizes)
        self.bos = total
        self.token_emb = nn.Embedding(total + 1, d)
        self.pos_emb = nn.Embedding(len(self.vocab_sizes), d)
        self.layer_norm_in = nn.LayerNorm(enc_hidden)
        self.fine_proj = nn.Linear(enc_hidden, d)
        self.coarse_proj = nn.Linear(enc_layers * enc_hidden, d)
        self.alpha_logits = nn.Parameter(torch.zeros(enc_layers))
        self.layers = nn.ModuleList(FusionLayer(cfg) for _ in range(cfg.n_layers))
        self.norm_out = nn.LayerNorm(d)
        # position-local output heads (a slice of one shared matrix)
        self.out = nn.Linear(d, total)
        if cfg.output_head == "prototype":
            self.prototypes = nn.Parameter(torch.randn(total, enc_hidden) * 0.01)
            self.query_delta = nn.Linear(d, enc_hidden)
            nn.init.zeros_(self.query_delta.weight)
            nn.init.zeros_(self.query_delta.bias)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
            self.log_scale = nn.Parameter(torch.tensor(float(cfg.prototype_scale)).log())
        elif cfg.output_head != "linear":
            raise ConfigError(f"generator.output_head must be linear | prototype, got {cfg.output_head!r}")

    def prepare_memory(self, states: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Project encoder states once per query; beams reuse the result."""
        b, s, t, h = states.shape
        memory = {"pad": ~mask}
        if self.cfg.output_head == "prototype":  # mean-pooled last layer, the sentence vector
            weights = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states[:, -1] * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            memory["pooled"] = F.normalize(pooled, dim=-1)
        states = self.layer_norm_in(states)  # [B, S, T, H]
        if self.cfg.coarse_fusion:
            memory["coarse"] = self.coarse_proj(states.permute(0, 2, 1, 3).reshape(b, t, s * h))
        if self.cfg.fine_fusion:
            memory["fine"] = self.fine_proj(states)
        if not (self.cfg.coarse_fusion or self.cfg.fine_fusion):
            memory["last"] = self.fine_proj(states[:, -1])
        return memory

    def hidden(self, memory: dict[str, torch.Tensor], prefix: torch.Tensor, width: int = 1) -> torch.Tensor:
        """Decoder states for raw codes prefix [B*width, l] -> [B*width, l+1, d]."""
        b, l = prefix.shape
        tokens = torch.cat([prefix.new_full((b, 1), self.bos), prefix + self.offsets[:l]], 1)
        y = self.token_emb(tokens) + self.pos_emb.weight[: l + 1]
        alpha = torch.softmax(self.alpha_logits, 0) if self.cfg.fine_fusion else None
        for layer in self.layers:
            y = layer(y, memory, alpha, width)
        return self.norm_out(y)

    def head(self, memory: dict[str, torch.Tensor], y: torch.Tensor, width: int, start: int = 0,
             size: int | None = None) -> torch.Tensor:
        """Logits of tokens start..start+size (default: all) for decoder states y [..., d]."""
        end = self.out.out_features if size is None else start + size
        logits = F.linear(y, self.out.weight[start:end], self.out.bias[start:end])
        if self.cfg.output_head == "prototype":
            pooled = memory["pooled"].repeat_interleave(width, 0)
            query = (pooled.unsqueeze(1) if y.dim() == 3 else pooled) + self.query_delta(y)
            logits = logits + self.log_scale.exp() * (query @ self.prototypes[start:end].t())
        return logits

    def forward(self, memory: dict[str, torch.Tensor], prefix: torch.Tensor, width: int = 1) -> torch.Tensor:
        """Logits given raw codes prefix [B*width, l] -> [B*width, l+1, V_total] (position l+1 is next)."""
        return self.head(memory, self.hidden(memory, prefix, width), width)

    def next_log_probs(self, memory: dict[str, torch.Tensor], prefix: torch.Tensor, level: int,
                       width: int = 1) -> torch.Tensor:
        """Log-probs over position `level`'s vocabulary only [B*width, V_level]: the last state through
        that position's slice of the output head. Beam search needs nothing else, and its cost then
        stays flat when the counter vocabulary grows with the corpus."""
        y = self.hidden(memory, prefix, width)[:, -1]
        return self.head(memory, y, width, int(self.offsets[level]), self.vocab_sizes[level]).log_softmax(-1)

    def position_log_probs(self, logits: torch.Tensor, level: int) -> torch.Tensor:
        start = int(self.offsets[level])
        return logits[..., start:start + self.vocab_sizes[level]].log_softmax(-1)

    def sequence_log_probs(self, memory: dict[str, torch.Tensor], codes: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced per-position log-probs for full identifiers codes [B, L]."""
        logits = self.forward(memory, codes[:, :-1])
        return [self.position_log_probs(logits[:, level], level) for level in range(len(self.vocab_sizes))]


class Generator(nn.Module):
    """Query encoder + fusion decoder; the unit that is trained, saved and served."""

    def __init__(self, cfg: GeneratorConfig, text_encoder: TextEncoder | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.query == "text":
            self.text_encoder = text_encoder or TextEncoder(cfg.text_encoder, cfg.max_query_tokens)
            if cfg.finetune_layers > 0 and text_encoder is not None:
                # training changes the encoder: never write into one shared with other generators
                self.text_encoder = text_encoder.copy()
            hidden, layers = self.text_encoder.hidden_size, self.text_encoder.num_layers
            if not 0 <= cfg.finetune_layers < layers:
                raise ConfigError(f"generator.finetune_layers must be in [0, {layers - 1}], got {cfg.finetune_layers}")
            self.vector_encoder = None
        elif cfg.query == "vector":
            if cfg.query_dim <= 0:
                raise ValueError("vector queries need query_dim > 0")
            self.text_encoder = None
            self.vector_encoder = VectorQueryEncoder(cfg)
            hidden, layers = cfg.vector_hidden, cfg.vector_layers
        else:
            raise ConfigError(f"unknown query kind {cfg.query!r}: expected 'text' or 'vector'")
        self.decoder = FusionDecoder(cfg, hidden, layers)

    def encode_queries(self, queries) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts (list[str]) or vectors ([B, D]) -> (states [B, S, T, H], mask [B, T])."""
        if self.text_encoder is not None:
            return self.text_encoder.layer_states(list(queries))
        device = next(self.vector_encoder.parameters()).device
        return self.vector_encoder(torch.as_tensor(queries, dtype=torch.float32, device=device))

    def to(self, *args, **kwargs) -> "Generator":
        """Also moves the text encoder, which is held outside the module tree."""
        super().to(*args, **kwargs)
        if self.text_encoder is not None:
            device = next(self.decoder.parameters()).device
            self.text_encoder.model.to(device)
            self.text_encoder.device = device
        return self

    def save(self, folder: str | Path) -> None:
        """Decoder (+ vector encoder, + fine-tuned top encoder layers) as safetensors and
        config.json; the frozen rest of the text encoder is referenced by name, not copied."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {f"decoder.{k}": v for k, v in self.decoder.state_dict().items()}
        if self.vector_encoder is not None:
            state.update({f"vector_encoder.{k}": v for k, v in self.vector_encoder.state_dict().items()})
        for i, layer in enumerate(self.tuned_encoder_layers()):
            state.update({f"encoder_top.{i}.{k}": v for k, v in layer.state_dict().items()})
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "generator.safetensors")
        (folder / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2))

    @classmethod
    def load(cls, folder: str | Path, text_encoder: TextEncoder | None = None) -> "Generator":
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = GeneratorConfig(**json.loads((folder / "config.json").read_text()))
        model = cls(cfg, text_encoder)
        state = load_file(folder / "generator.safetensors")
        model.decoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("decoder.")})
        if model.vector_encoder is not None:
            model.vector_encoder.load_state_dict(
                {k[15:]: v for k, v in state.items() if k.startswith("vector_encoder.")}
            )
        for i, layer in enumerate(model.tuned_encoder_layers()):
            prefix = f"encoder_top.{i}."
            layer.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        return model.eval()

    def grow_last_vocab(self, size: int) -> None:
        """Widen the counter position's vocabulary (an incremental add put more items under one
        prefix than the generator was built for). Existing tokens keep their weights; new counter
        tokens start as the mean of the existing ones, so they score like an average counter."""
        old = list(self.cfg.vocab_sizes)
        extra = size - old[-1]
        if extra < 0:
            raise ValueError(f"cannot shrink the counter vocabulary from {old[-1]} to {size}")
        if extra == 0:
            return
        dec, total = self.decoder, sum(old)
        start = total - old[-1]
        with torch.no_grad():
            emb = dec.token_emb.weight
            new_rows = emb[start:total].mean(0, keepdim=True).expand(extra, -1)
            dec.token_emb = nn.Embedding.from_pretrained(
                torch.cat([emb[:total], new_rows, emb[total:]]), freeze=False).to(emb.device)
            out = nn.Linear(dec.out.in_features, total + extra).to(emb.device)
            out.weight.copy_(torch.cat([dec.out.weight, dec.out.weight[start:].mean(0, keepdim=True).expand(extra, -1)]))
            out.bias.copy_(torch.cat([dec.out.bias, dec.out.bias[start:].mean().expand(extra)]))
            dec.out = out
            if self.cfg.output_head == "prototype":
                protos = dec.prototypes
                dec.prototypes = nn.Parameter(torch.cat([protos, protos[start:].mean(0, keepdim=True).expand(extra, -1)]))
        self.cfg.vocab_sizes = old[:-1] + [size]
        dec.vocab_sizes = list(self.cfg.vocab_sizes)
        dec.bos = total + extra

    def train(self, mode: bool = True) -> "Generator":
        """The text encoder is not a submodule; of it only the tuned top blocks follow `mode`."""
        super().train(mode)
        if self.text_encoder is not None:
            self.text_encoder.model.eval()
            for layer in self.tuned_encoder_layers():
                layer.train(mode)
        return self

    def tuned_encoder_layers(self) -> list[nn.Module]:
        """Text-encoder blocks that training updates (saved with the decoder)."""
        if self.text_encoder is None or self.cfg.finetune_layers <= 0:
            return []
        return self.text_encoder.top_layer_modules(self.cfg.finetune_layers)


def rdrop_kl(logp_a: list[torch.Tensor], logp_b: list[torch.Tensor]) -> torch.Tensor:
    """Symmetric KL between two dropout passes, averaged over positions (R-Drop)."""
    total = 0.0
    for a, b in zip(logp_a, logp_b):
        total = total + 0.5 * (
            F.kl_div(a, b, log_target=True, reduction="batchmean")
            + F.kl_div(b, a, log_target=True, reduction="batchmean")
        )
    return total / len(logp_a)


def identifier_nll(logp: list[torch.Tensor], codes: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the target identifier, averaged over positions (and over pairs, weighted
    by `weights` when given)."""
    if weights is None:
        return sum(F.nll_loss(lp, codes[:, level]) for level, lp in enumerate(logp)) / len(logp)
    per_pair = sum(F.nll_loss(lp, codes[:, level], reduction="none") for level, lp in enumerate(logp)) / len(logp)
    return (per_pair * weights).sum() / weights.sum().clamp_min(1e-8)
