"""Typed configuration: YAML files and `key.sub=value` overrides into dataclasses."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cart_core.generator import GeneratorConfig
from cart_core.rqvae import RQVAEConfig
from cart_core.training import TrainConfig


@dataclass
class IdentifierConfig:
    source: str = "features"      # what ids are built from: features | captions | both
    coarse: bool = True           # K-Means first token (off = "RQ-VAE only" ablation)
    n_clusters: int = 32
    spherical: bool = True
    kmeans_sample: int = 65536
    fine: str = "rqvae"           # rqvae | residual_kmeans ("K-Means only" ablation) | none
    rqvae: RQVAEConfig = field(default_factory=RQVAEConfig)
    seed: int = 0


@dataclass
class EvalConfig:
    query_caption_index: int = 4
    beam_size: int = 20
    k: int = 10
    batch_size: int = 64


@dataclass
class CartConfig:
    identifiers: IdentifierConfig = field(default_factory=IdentifierConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _build(cls, data: dict[str, Any], where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"{where}: unknown config key(s) {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        sub = known[name].default_factory if known[name].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub) and isinstance(value, dict):
            kwargs[name] = _build(sub, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, known[name], f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    """Give a value its field's type ('1e-3' -> 0.001: YAML reads floats without a dot as text)."""
    default = f.default if f.default is not dataclasses.MISSING else None
    kind = type(default) if default is not None else None
    try:
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
        raise ValueError(f"{where}: {value!r} is not a valid {kind.__name__}") from None
    return value


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b=3` sets data['a']['b'] = 3 (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _parse_value(value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CartConfig:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: config file not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    return _build(CartConfig, data, str(path or "config"))


def config_dict(cfg: CartConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
