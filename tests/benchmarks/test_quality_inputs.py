"""Benchmarks fail loudly on missing inputs instead of reporting zeros."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quality_refuses_missing_dataset(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--out", str(tmp_path), "--datasets", "no-such-set"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "CART_SHARED_DATA": str(tmp_path)},
    )
    assert result.returncode != 0
    assert "no-such-set" in result.stderr and "missing" in result.stderr
    assert not (tmp_path / "quality.json").exists()
