"""Where the configs and the shared real data live, and the fallback when data is absent."""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def packaged_config(name: str = "default.yaml") -> Path:
    """A config shipped with the package (configs/ installed as `cart_configs`): found after a
    wheel install from any directory; a bare checkout on PYTHONPATH falls back to its configs/."""
    try:
        path = Path(str(resources.files("cart_configs") / name))
    except ModuleNotFoundError:
        path = REPO_ROOT / "configs" / name
    return path


def default_config() -> Path:
    """The config a job uses without --config: $CART_CONFIG (a cluster image or a test points it
    at its own file), else the packaged default.yaml."""
    env = os.environ.get("CART_CONFIG")
    return Path(env) if env else packaged_config()


def shared_data_dir() -> Path:
    """$CART_SHARED_DATA, else ../shared/data beside the checkout."""
    return Path(os.environ.get("CART_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def default_dataset(name: str = "flickr8k-clip-vitb32") -> Path | None:
    path = shared_data_dir() / name
    return path if (path / "items.parquet").exists() else None
