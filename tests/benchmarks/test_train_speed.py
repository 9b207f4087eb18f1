"""benchmarks/train_speed.py: its steady-rate rule and its refusals (the full run is documented in
docs/benchmarks.md; at a useful size it takes minutes)."""
import subprocess
import sys
from pathlib import Path

from tests.benchmarks.scripts import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_speed.py"


def test_steady_rate_leaves_the_first_epoch_out():
    bench = load_script(SCRIPT, "train_speed_bench")
    assert bench.steady_epoch_s([9.0, 2.0, 2.2, 1.8]) == 2.0
    assert bench.steady_epoch_s([3.0]) == 3.0


def test_one_epoch_is_refused(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--epochs", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--epochs must be >= 2" in result.stderr
