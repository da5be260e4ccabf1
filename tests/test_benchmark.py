"""The benchmark script runs and compares the two implementations (a tiny model and k = 8 keep it short)."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_reports_both_implementations_and_their_agreement(tiny_model, cxr):
    result = subprocess.run([sys.executable, "benchmarks/bench_gscorecam.py", "--model", str(tiny_model), "--topk", "8",
                             "--prompts", "3"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "(a) reference, per prompt" in out and "(b) engine, as a user runs it" in out
    assert out.count("seconds per stage: decode") == 2 and "masked forwards" in out and "png write" in out
    difference = float(re.search(r"max \|map \(a\) - map \(b\)\| = ([0-9.e+-]+)", out).group(1))
    assert difference <= 1e-4
    fewer = float(re.search(r"image forwards per heatmap ([0-9.]+)x fewer", out).group(1))
    assert fewer > 1.0     # three prompts share their masked forwards
