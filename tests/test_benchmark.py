"""The benchmark script runs and compares the two implementations (a tiny model and k = 8 keep it short)."""
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench(script: str, *args) -> str:
    """What `benchmarks/<script>` prints with these arguments; it must succeed."""
    result = subprocess.run([sys.executable, f"benchmarks/{script}", *map(str, args)], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_benchmark_reports_both_implementations_and_their_agreement(tiny_model, cxr, tmp_path):
    # 5 films from a folder of 2 repeat under new names; the reference runs on the first 2; 3 films per batch leave
    # a short last batch. Few films: the engine runs three times (default, 3 films per batch, compiled).
    folder = tmp_path / "data" / "nih"
    folder.mkdir(parents=True)
    for film in sorted((cxr / "nih").glob("*.png"))[:2]:
        (folder / film.name).symlink_to(film)
    out = _bench("bench_gscorecam.py", "--model", tiny_model, "--cxr", folder.parent, "--topk", "8", "--prompts", "3",
                 "--films", "5", "--reference-films", "2", "--work", tmp_path / "work", "--films-per-batch", "3",
                 "--compile")
    assert "(a) reference, per prompt" in out and "(b) engine, as a user runs it" in out
    assert out.count("seconds per stage: decode") == 2 and "masked forwards" in out and "png write" in out
    assert "5 films (2 for the reference) x 3 prompts" in out
    assert re.search(r"\(a\) reference.*: 6 heatmaps .*\n.*\n\(b\) engine.*: 15 heatmaps", out)
    difference = re.search(r"\|map \(a\) - map \(b\)\|: max ([0-9.e+-]+), .* (\d+) of (\d+) maps differ", out)
    assert float(difference.group(1)) <= 1e-4 and difference.group(2, 3) == ("0", "6")
    fewer = float(re.search(r"image forwards per heatmap ([0-9.]+)x fewer", out).group(1))
    assert fewer > 1.0     # three prompts share their masked forwards
    assert re.search(r"engine at 3 films per batch: [0-9.]+ heatmaps/s, .* the default \(1 film per batch\) "
                     r"against it: [0-9.]+x", out)
    assert re.search(r"engine with COMPILE=true: [0-9.]+ heatmaps/s, compile [0-9.]+ s, masked forwards", out)
    compiled = re.search(r"\|compiled - eager\|: max ([0-9.e+-]+), .* (\d+) of (\d+) maps differ", out)
    assert float(compiled.group(1)) <= 1e-4 and compiled.group(2, 3) == ("0", "6")


def test_body_mask_benchmark_reports_lungs_background_letters_and_time(cxr):
    out = _bench("bench_body_mask.py", "--cxr", cxr, "--limit", "6", "--repeats", "1")
    assert re.search(r"^6 films with lung masks \(\d+ with background\), 7 letters on 6 NIH films", out, re.M)
    kept = re.search(r"lung kept: median ([0-9.]+), 5th percentile ([0-9.]+), min ([0-9.]+); (\d+) of 6 films", out)
    assert kept and 0 <= float(kept.group(3)) <= float(kept.group(2)) <= float(kept.group(1)) <= 1
    assert re.findall(r"^(\w+)\n  lung kept", out, re.M) == ["otsu", "air"]
    assert len(re.findall(r"letters dropped: min 1\.000, mean 1\.000 over 7 letters", out)) == 2   # as tested
    hard = re.findall(r"hard cases: lung kept at least ([0-9.]+) \(.*\); (\d+) of 10 under 0\.99", out)
    assert len(hard) == 2 and float(hard[1][0]) >= 0.99 and hard[1][1] == "0" and float(hard[0][0]) < 0.9
    assert re.search(r"[0-9.]+ ms per film at 1024 x 1024 \(1\.00x otsu\)", out)
    assert re.search(r"[0-9.]+ ms per film at 1024 x 1024 \([0-9.]+x otsu\)", out.split("\nair\n")[1])


def test_finish_benchmark_compares_the_former_and_current_cpu_part(cxr):
    out = _bench("bench_finish.py", "--films", "2", "--prompts", "2", "--size", "256", "--crf-films", "1")
    for stage in ("body mask", "render", "png write", "all three"):
        assert re.search(rf"^\| {stage} \| [0-9.]+ \| [0-9.]+ \| [0-9.]+x \|$", out, re.M), stage
    agreement = re.search(r"overlays differ by at most (\d+) grey level\(s\), raw maps differ in (\d+) of 4", out)
    assert agreement and int(agreement.group(1)) <= 1 and agreement.group(2) == "0"
    assert re.search(r"CRF on 2 maps: full size [0-9.]+ s per map, .* \(within 1e-2: \d of 2\)", out)


def test_methods_benchmark_times_both_packages_and_their_maps_agree(cxr):
    out = _bench("bench_methods.py", "--model", "resnet10t", "--films", "2", "--batch", "2", "--methods", "HiResCAM")
    assert "2 films from" in out and "timm resnet10t (random weights, 14 outputs) at layer4" in out
    for method in ("HiResCAM",):
        row = re.search(rf"^{re.escape(method)} +([0-9.]+) +([0-9.]+) +([0-9.]+) +([0-9.]+)x +([0-9.]+)x +"
                        rf"([0-9.e+-]+)$", out, re.M)
        assert row, method
        ours, theirs, frozen, ratio = (float(row.group(i)) for i in range(1, 5))
        assert min(ours, theirs, frozen) > 0 and abs(ratio - ours / theirs) <= 0.01 * ratio + 0.01
        assert float(row.group(6)) <= 1e-4     # the same maps


def test_vlm_benchmark_times_both_ways_and_their_maps_agree():
    result = subprocess.run([sys.executable, "benchmarks/bench_vlm.py", "--models", "tiny-llava,tiny-gemma3",
                             "--repeats", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| tiny-llava | 4 (2) |" in result.stdout and "| tiny-gemma3 | 4 (2) |" in result.stdout
    figures = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [f["model"] for f in figures] == ["tiny-llava", "tiny-gemma3"]
    assert all(f["max_abs_difference"] < 1e-5 and f["ours_s"] > 0 and f["naive_peak_mib"] > 0 for f in figures)
