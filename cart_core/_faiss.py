"""One place that imports faiss, so a missing install gets one clear message."""
from __future__ import annotations


def import_faiss():
    """Return the faiss module (from faiss-cpu or faiss-gpu-cu12, whichever is installed)."""
    try:
        import faiss  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "faiss is not installed: `pip install -e .[cpu]` (faiss-cpu) or `.[gpu]` (faiss-gpu-cu12)"
        ) from exc
    return faiss
