"""Where the shared real data lives, and the fallback when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """$CART_SHARED_DATA, else ../shared/data beside the checkout."""
    return Path(os.environ.get("CART_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def default_dataset(name: str = "flickr8k-clip-vitb32") -> Path | None:
    path = shared_data_dir() / name
    return path if (path / "items.parquet").exists() else None
