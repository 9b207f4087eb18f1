"""Typed configuration: YAML files and `key.sub=value` overrides into dataclasses."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from cart_core.errors import ConfigError, InputNotFound, first_line, shown
from cart_core.settings import GeneratorConfig, RQVAEConfig, TrainConfig, VerifyConfig


@dataclass
class IdentifierConfig:
    source: Literal["features", "captions", "both"] = "features"  # what ids are built from
    coarse: bool = True           # K-Means first token (off = "RQ-VAE only" ablation)
    n_clusters: int = 32
    spherical: bool = True
    kmeans_sample: int = 65536
    fine: Literal["rqvae", "residual_kmeans", "none"] = "rqvae"  # residual_kmeans: the "K-Means only" ablation
    rqvae: RQVAEConfig = field(default_factory=RQVAEConfig)
    seed: int = 0

    def __post_init__(self):  # found at load, not after Ray started and the sample was drawn
        if self.coarse and isinstance(self.kmeans_sample, int) and isinstance(self.n_clusters, int) \
                and self.kmeans_sample < self.n_clusters:
            raise ConfigError(f"identifiers.kmeans_sample: {self.kmeans_sample} vectors cannot fit "
                              f"identifiers.n_clusters = {self.n_clusters} clusters; sample at least as many")


@dataclass
class EvalConfig:
    query_caption_index: int = 4
    beam_size: int = 20
    k: int = 10
    batch_size: int = 64


@dataclass
class ExtractConfig:
    """`cart extract`: decoding and the embedding models (loaded once per Ray actor)."""

    image_model: str = "openai/clip-vit-base-patch32"   # CLIP by hub name or local path
    audio_model: str = "laion/clap-htsat-unfused"       # CLAP by hub name or local path
    frames: int = 8                 # frames sampled uniformly per video, embedded and mean-pooled
    sample_rate: int = 48000        # audio is resampled to the CLAP feature extractor's rate
    max_audio_s: float = 10.0
    batch_size: int = 16
    actors: int = 1                 # embedding actors (autoscaling pool 1..actors)
    num_cpus: float = 1.0           # per actor
    num_gpus: float = 0.0           # per actor; 1 on GPU workers


@dataclass
class CaptionConfig:
    """`cart caption`: pseudo-queries from an image-to-text model (BLIP / GIT class)."""

    model: str = "Salesforce/blip-image-captioning-base"
    frames: int = 1                 # frames captioned per video (one caption each)
    max_new_tokens: int = 20
    batch_size: int = 8
    actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class JobsConfig:
    """How the Ray jobs use the cluster: workers, resources, checkpoints, batch sizes."""

    train_workers: int = 0          # Ray Train workers (`cart train --workers` overrides); 0 = one per node (GPU: per GPU)
    cpus_per_worker: float = 0.0    # 0 = every CPU of the smallest node; torch runs one thread per CPU
    use_gpu: bool = False
    checkpoint_every: int = 1       # epochs between training checkpoints in the store
    pseudo_query_weight: float = 0.5  # loss weight of `source = pseudo` training pairs
    quantize_batch_size: int = 8192
    quantize_actors: int = 2        # `cart quantize`: actors that embed captions and assign codes
    quantize_num_cpus: float = 1.0
    retrieve_batch_size: int = 64
    retrieve_actors: int = 1
    retrieve_num_cpus: float = 1.0
    retrieve_num_gpus: float = 0.0
    retrieve_save_s: float = 60.0   # `cart retrieve` saves finished queries this often (and when it stops): a rerun resumes; 0 = after every block
    serve_max_batch_size: int = 32
    serve_batch_wait_s: float = 0.01
    serve_replicas: int = 1
    train_max_failures: int = 2     # Ray Train restarts from the last checkpoint after a lost worker / node
    train_start_tries: int = 30     # Ray Train's start (60 s) tried again this often while no nodes hold the workers; -1: without limit


@dataclass
class QueryConfig:
    """The query rules `cart serve`, `cart retrieve` and `cart evaluate` share (pipelines/queries.py):
    a query is normalised (Unicode NFC, control characters to spaces, whitespace collapsed) and
    refused when empty or longer than the limit; k is refused outside [1, max_k]."""

    max_chars: int = 1000           # characters per query after normalisation
    max_k: int = 100                # results per query
    max_per_request: int = 256      # queries per HTTP request (`cart serve`)


@dataclass
class ServeConfig:
    """`cart serve`: what a request may cost before it reaches the model, and who may send one."""

    max_body_bytes: int = 1_000_000  # HTTP request body (413 above it, answered without reading it)
    watcher_failures: int = 5       # consecutive failed polls of the store before /healthz says unhealthy
    token_env: str = "CART_SERVE_TOKEN"  # bearer token from this variable when no --token-file is given


@dataclass
class ReindexConfig:
    """`cart reindex`: the fine-tune that teaches the generator new items, and drift alarms."""

    finetune: bool = False          # the fine-tune costs old items more R@1 than the gated fallback (docs/benchmarks.md)
    finetune_epochs: int = 8
    finetune_lr: float = 5e-4       # below train.lr: the generator already knows the old items
    rehearsal: float = 8.0          # old pairs replayed per new pair (old items must not regress)
    distill: float = 0.0            # weight of KL(old generator || fine-tuned) on the replayed pairs
    drift_factor: float = 1.5       # refit due when new items sit this much farther than the fitted ones
                                    # (items built like them: with captions when the ids use captions)
    keep_versions: int = 10         # `cart compact` keeps the last N versions
    fallback_fpr: float = 0.05      # share of other items' queries a pending item may displace from rank 1
    fallback_impostors: int = 1000  # old training captions that calibrate the fallback's threshold (no verifier only)
    fallback_interleave: int = 1    # dense hits below the threshold merged into the ranking (rank 2, 4, ...)
    keep_fallback: bool = True      # keep the dense fallback after the fine-tune, until a full `cart train`
    calibrate_added: bool = True    # added items with captions get a calibrated verification vector (cart_core/added_items.py)
    id_deltas: int = 16             # reindexes stored as id-table deltas before one rewrites it whole (0: always whole)


@dataclass
class CartConfig:
    identifiers: IdentifierConfig = field(default_factory=IdentifierConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    reindex: ReindexConfig = field(default_factory=ReindexConfig)
    queries: QueryConfig = field(default_factory=QueryConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)


def _build(cls, data: dict[str, Any], source: str, key: str = ""):
    """The dataclass `cls` from plain data; every error names the source, the dotted key, the value
    and, for a field with choices, the choices. Raised at load time, before any job starts."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {key or 'the config'} must be a section of key: value lines, got {data!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        dotted = [f"{key}.{u}" if key else u for u in unknown]
        raise ConfigError(f"{source}: unknown config key(s) {dotted}; {key or 'the top level'} has: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        path = f"{key}.{name}" if key else name
        sub = known[name].default_factory if known[name].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value, source, path)
        else:
            where = f"{source}: {path}"
            kwargs[name] = _check_range(_check_choice(_coerce(value, known[name], where), hints.get(name), where),
                                        path, where)
    return cls(**kwargs)


def _coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    """Give a value its field's type ('1e-3' -> 0.001: YAML reads floats without a dot as text)."""
    if value is None and "None" in str(f.type).replace(" ", "").split("|"):  # `float | None` takes null
        return None
    default = f.default if f.default is not dataclasses.MISSING else None
    kind = type(default) if default is not None else _optional_kind(f)
    if value is None and kind in (str, int, float):  # `key:` or `--set key=` with nothing after it
        raise ConfigError(f"{where}: no value given; {'an' if kind is int else 'a'} {kind.__name__} is needed")
    try:
        if kind in (int, float, str) and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
            raise ValueError  # YAML's yes / on / true, or a list or a section, where a number or a name goes
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind is float:
            return float(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a valid {kind.__name__}") from None
    return value


def _optional_kind(f: dataclasses.Field) -> type | None:
    """The number type of a `float | None` / `int | None` field whose default is None."""
    parts = str(f.type).replace(" ", "").split("|")
    return next((kind for kind in (float, int) if kind.__name__ in parts and "None" in parts), None)


def _check_choice(value: Any, hint: Any, where: str) -> Any:
    """A `Literal[...]` field takes one of its choices; the error lists them."""
    if get_origin(hint) is Literal and value not in get_args(hint):
        raise ConfigError(f"{where}: {value!r} is not one of {' | '.join(map(str, get_args(hint)))}")
    return value


# ---- ranges: every number is checked at load time ---------------------------------------------
# A count or a size must be >= 1 (a float rate or scale > 0); a share lies in [0, 1] (or [0, 1));
# every other number must be >= 0 (seeds, weights, indices; 0 = "auto" or "off" where a comment
# says so); jobs.train_max_failures and jobs.train_start_tries also take Ray's -1 (without limit).
AT_LEAST_ONE = {
    "identifiers.n_clusters", "identifiers.kmeans_sample", "identifiers.rqvae.levels",
    "identifiers.rqvae.codebook_size", "identifiers.rqvae.latent_dim", "identifiers.rqvae.hidden_dim",
    "identifiers.rqvae.epochs", "identifiers.rqvae.batch_size",
    "generator.max_query_tokens", "generator.vector_layers", "generator.vector_slots", "generator.vector_hidden",
    "generator.d_model", "generator.n_layers", "generator.n_heads", "generator.ff_dim",
    "train.epochs", "train.batch_size", "eval.beam_size", "eval.k", "eval.batch_size",
    "extract.frames", "extract.sample_rate", "extract.batch_size", "extract.actors",
    "caption.frames", "caption.max_new_tokens", "caption.batch_size", "caption.actors",
    "jobs.checkpoint_every", "jobs.quantize_batch_size", "jobs.quantize_actors", "jobs.retrieve_batch_size",
    "jobs.retrieve_actors", "jobs.serve_max_batch_size", "jobs.serve_replicas",
    "reindex.finetune_epochs", "reindex.keep_versions", "verify.mask_repeats",
    "verify.caption_predictor.folds", "verify.expand_depth",
    "queries.max_chars", "queries.max_k", "queries.max_per_request", "serve.max_body_bytes", "serve.watcher_failures",
    "verify.candidates", "verify.neighbors", "verify.neighbor_probe", "verify.align.epochs", "verify.align.batch_size", "verify.align.negatives",
    "verify.caption_metric.epochs", "verify.caption_metric.batch_size", "verify.caption_metric.negatives",
}
ABOVE_ZERO = {
    "identifiers.rqvae.lr", "generator.prototype_scale", "train.lr", "extract.max_audio_s", "reindex.finetune_lr",
    "reindex.drift_factor", "verify.align.lr", "verify.align.temperature",
    "verify.caption_metric.lr", "verify.caption_metric.temperature",
}
MINUS_ONE_ALLOWED = {"jobs.train_max_failures", "jobs.train_start_tries"}
SHARES = {  # key: whether 1 itself is allowed
    "generator.dropout": False, "train.warmup_frac": True, "verify.holdout": False, "verify.mask_captions": True,
    "reindex.fallback_fpr": True, "verify.captionless_query_share": True,
}


def _check_range(value: Any, path: str, where: str) -> Any:
    """Numbers outside their key's range are refused with the range (see AT_LEAST_ONE / SHARES)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if path in AT_LEAST_ONE:
        ok, rule = value >= 1, ">= 1"
    elif path in ABOVE_ZERO:
        ok, rule = value > 0, "> 0"
    elif path in MINUS_ONE_ALLOWED:
        ok, rule = value >= -1, ">= -1 (-1: without limit)"
    elif path in SHARES:
        closed = SHARES[path]
        ok, rule = (0 <= value <= 1, "in [0, 1]") if closed else (0 <= value < 1, "in [0, 1)")
    else:
        ok, rule = value >= 0, ">= 0"
    if not ok or value != value:  # NaN is never in range
        raise ConfigError(f"{where}: {value!r} is out of range; must be {rule}")
    return value


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping: YAML would keep the last silently."""


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one section (a second `train:` section
    would otherwise replace the first one's settings without a word)."""

    def construct_mapping(self, node, deep=False):
        first_line_of: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in first_line_of:
                    raise _DuplicateKey(f"line {key_node.start_mark.line + 1}: key {shown(key)} is given twice "
                                        f"(first on line {first_line_of[key]}); give each key once")
                first_line_of[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the base class says so
                break
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_StrictLoader)


def _parse_value(text: str) -> Any:
    try:
        return _load_yaml(text)
    except _DuplicateKey as exc:
        raise ConfigError(f"override value {shown(text)}: {exc}") from None
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b=3` sets data['a']['b'] = 3 (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is not a section")
        node[parts[-1]] = _parse_value(value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CartConfig:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise InputNotFound(f"{path}: config file not found")
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder; give the YAML config file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); give the YAML config file") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read ({exc.strerror or first_line(exc)})") from None
        try:
            data = _load_yaml(text) or {}
        except _DuplicateKey as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({first_line(exc)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    source = str(path or "config") + (" with --set" if overrides else "")
    return _build(CartConfig, data, source)


def config_dict(cfg: CartConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any], where: str = "config") -> CartConfig:
    """Inverse of config_dict (how a config travels to Ray workers: as plain JSON-able data)."""
    return _build(CartConfig, data, where)
