"""The settings of each model component (generator, training, RQ-VAE, verification), free of torch.

Why a module of their own: cart_core.config checks a whole config (types, choices, ranges) before
any job starts. Kept beside their models, these dataclasses made every `cart` command import torch
(about 2 s on a 2-vCPU box) just to refuse a typo in --set. Here they load in milliseconds; the
model modules re-export them, so `from cart_core.generator import GeneratorConfig` still works.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cart_core.errors import ConfigError

DEFAULT_TEXT_ENCODER = "minilm"

SIGNALS = ("caption_cos", "caption_metric_cos", "caption_bm25", "feature_cos", "predicted_caption_cos",
           "gen_item_logp", "gen_cluster_logp")
# measured on Flickr8k and VATEX (docs/benchmarks.md): the generator's log-probabilities win the
# held-out slice's R@1 but lose on the evaluation captions, so by default the generator proposes
# and the dense signals rank; the log-probabilities stay available (verify.signals) and ablated
DEFAULT_SIGNALS = ("caption_cos", "caption_metric_cos", "caption_bm25", "feature_cos", "predicted_caption_cos")
# signals only items without captions have: fitted with the captionless weights (cart_core/hybrid.py)
UNCAPTIONED_SIGNALS = ("predicted_caption_cos",)


@dataclass
class GeneratorConfig:
    vocab_sizes: list[int] = field(default_factory=list)  # per identifier position
    query: Literal["text", "vector"] = "text"  # HF encoder, or precomputed vectors
    text_encoder: str = DEFAULT_TEXT_ENCODER
    max_query_tokens: int = 32
    query_dim: int = 0                  # vector queries: input dimension
    vector_layers: int = 2              # vector queries: pseudo layers S
    vector_slots: int = 4               # vector queries: pseudo tokens T per layer
    vector_hidden: int = 256            # vector queries: pseudo state width H
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    ff_dim: int = 512
    dropout: float = 0.1
    coarse_fusion: bool = True
    fine_fusion: bool = True
    # "linear": logits = W y. "prototype": logits also get scale * (pooled query + delta(y)) . E_tok,
    # with E initialised so that summing token scores along an identifier approximates the
    # cosine between the query and the item's caption centroid (see prototypes.py)
    output_head: Literal["linear", "prototype"] = "linear"
    finetune_layers: int = 0            # top text-encoder layers trained with the decoder (0 = frozen)
    prototype_scale: float = 20.0

    def __post_init__(self):  # found at load, not in a Ray Train worker building the model
        if isinstance(self.d_model, int) and isinstance(self.n_heads, int) and self.n_heads > 0 \
                and self.d_model % self.n_heads:
            raise ConfigError(f"generator.d_model: {self.d_model} is not a multiple of generator.n_heads = "
                              f"{self.n_heads} (each attention head takes an equal share of the width)")
        if self.query == "vector" and isinstance(self.query_dim, int) and self.query_dim <= 0:
            raise ConfigError("generator.query: 'vector' needs generator.query_dim > 0 (the query vectors' "
                              "dimension); the cart jobs answer text queries (generator.query: text)")


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.05
    rdrop_weight: float = 1.0   # omega; 0 switches R-Drop off
    encoder_lr: float = 5e-5    # for generator.finetune_layers > 0
    seed: int = 0


@dataclass
class RQVAEConfig:
    levels: int = 2            # M: number of residual codebooks
    codebook_size: int = 32    # K: codes per codebook
    latent_dim: int = 64
    hidden_dim: int = 256
    beta: float = 0.25         # commitment weight
    epochs: int = 30
    batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0


@dataclass
class AlignConfig:
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.05
    negatives: int = 16384     # items scored per step: all of them up to this many, else a sample
    seed: int = 0


@dataclass
class CaptionMetricConfig:
    epochs: int = 1           # VATEX gains the same after 1, 3 or 6 epochs, Flickr8k loses more with each
    batch_size: int = 256
    lr: float = 1e-3
    temperature: float = 0.05
    negatives: int = 16384    # items scored per step: all of them up to this many, else a sample
    seed: int = 0


@dataclass
class PredictorConfig:
    # ridge strengths tried (the folds choose): VATEX chose 0.01, Flickr8k 0.3 (holdout seed 1)
    alphas: list[float] = field(default_factory=lambda: [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    folds: int = 5            # cross-fitting folds over the captioned items (also choose the alpha)
    seed: int = 0

    def __post_init__(self):
        if self.folds < 2:
            raise ConfigError(f"verify.caption_predictor.folds: {self.folds} is out of range; cross-fitting needs >= 2")
        if isinstance(self.alphas, str) or not isinstance(self.alphas, (list, tuple)):
            raise ConfigError(f"verify.caption_predictor.alphas: {self.alphas!r} must be a list, e.g. [0.01, 0.1]")
        alphas = []
        for a in self.alphas:  # YAML reads 1e-3 as text: taken as the number it spells
            try:
                alphas.append(float(a) if not isinstance(a, bool) else None)
            except (TypeError, ValueError):
                alphas.append(None)
            if alphas[-1] is None or not alphas[-1] > 0:
                raise ConfigError(f"verify.caption_predictor.alphas: {a!r} is not a ridge strength > 0")
        if not alphas:
            raise ConfigError("verify.caption_predictor.alphas: [] has no ridge strength; give one or more > 0")
        self.alphas = alphas


@dataclass
class VerifyConfig:
    mode: Literal["hybrid", "generative"] = "hybrid"  # generative: beam order only (the ablation)
    candidates: int = 300        # candidates verified per query (beam items first, then their prefixes' items)
    expand_depth: int = 1        # shallowest beam prefix whose items become candidates (L = no expansion)
    clusters: int = 60           # depth 1: this many best first tokens instead of the beam's (0 = the beam's)
    neighbor_seeds: int = 0      # then follow the neighbour lists of this many best verified candidates (0 = off)
    neighbors: int = 16          # neighbour list length per item (cart_core/neighbors.py)
    neighbor_probe: int = 1      # neighbour lists searched in the item's cluster and this many - 1 nearest ones
    holdout: float = 0.15        # share of training captions kept from the generator to fit the fusion
    mask_captions: float = 0.2   # candidates shown captionless while fitting the weights of items without captions
    mask_repeats: int = 4        # seeded masks stacked for that fit (one mask's luck moved unseen R@1 4 to 10)
    # share of the held-out R@1 that queries for items without captions carry when those items'
    # weights are tuned: None = as often as the masked slice asks for them (~mask_captions);
    # 0.5 = as findable as captioned items, which costs captioned items R@1 (Flickr8k, holdout
    # seed 1, whole catalog: seen 72.3 at 0.3 against 74.4 at None, unseen 29.0 against 18.6; the
    # trade-off plot of docs/benchmarks.md §0); no effect on a catalog whose items all have captions
    captionless_query_share: float | None = None
    # chooses that share instead (null: the share above is used as set): the largest of
    # hybrid.CAPTIONLESS_SHARES whose captioned queries' R@1 on the masked slice stays within this many
    # points of the null setting's, i.e. what items without captions may cost captioned ones
    captioned_cost: float | None = 1.0
    signals: list[str] = field(default_factory=lambda: list(DEFAULT_SIGNALS))
    align: AlignConfig = field(default_factory=AlignConfig)
    caption_metric: CaptionMetricConfig = field(default_factory=CaptionMetricConfig)
    caption_predictor: PredictorConfig = field(default_factory=PredictorConfig)

    def __post_init__(self):
        if isinstance(self.align, dict):
            self.align = AlignConfig(**self.align)
        if isinstance(self.caption_metric, dict):
            self.caption_metric = CaptionMetricConfig(**self.caption_metric)
        if isinstance(self.caption_predictor, dict):
            self.caption_predictor = PredictorConfig(**self.caption_predictor)
        if self.mode not in ("hybrid", "generative"):
            raise ConfigError(f"verify.mode must be hybrid | generative, got {self.mode!r}")
        if isinstance(self.signals, str) or not isinstance(self.signals, (list, tuple)):
            raise ConfigError(f"verify.signals: {self.signals!r} must be a list of signal names, e.g. [caption_cos]")
        unknown = set(self.signals) - set(SIGNALS)
        if unknown:
            raise ConfigError(f"verify.signals: unknown {sorted(unknown)}; choices: {list(SIGNALS)}")
        if self.mode == "hybrid" and not set(self.signals) - set(UNCAPTIONED_SIGNALS):
            raise ConfigError(f"verify.signals: {list(self.signals)} has nothing to rank items with captions by; "
                              f"add one of {[n for n in SIGNALS if n not in UNCAPTIONED_SIGNALS]}")
