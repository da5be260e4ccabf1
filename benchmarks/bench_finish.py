"""The CPU's part of each heatmap (body mask, render, PNG write), and whether the CRF can run on a smaller film.

    .venv/bin/python benchmarks/bench_finish.py [--films 6] [--prompts 5] [--size 1024] [--crf-films 2]

On real films (../shared/data/cxr/nih/, resized to --size x --size) with random patch-grid maps, on one core (OpenCV
with one thread, as in the pipeline's worker processes), in one run:
  * milliseconds per heatmap of each stage, (a) as the pipeline did it before: a numpy float blend for the overlay
    and OpenCV's libpng writer for both PNGs, and (b) as `heatmaps.finish` does it now (OpenCV's lookup table and
    weighted sum; PNGs deflated by ISA-L), with the ratio; the body mask is computed once per film in both and its
    cost shared among the film's heatmaps. The two overlays differ by at most one grey level and the PNGs decode to
    the same pixels, which the run checks.
  * the dense CRF at full size against the CRF on the film and map downscaled by 2 and the result upscaled
    (bilinear): seconds per map and the largest absolute difference of the maps (the pipeline keeps the full size
    unless that stays within 1e-2).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from attention_map import heatmaps  # noqa: E402
from attention_map.config import load_settings  # noqa: E402
from attention_map.maps import grid_to_image  # noqa: E402
from attention_map.plan import Made, make_job  # noqa: E402
from attention_map.body_mask import body_mask  # noqa: E402
from attention_map.postprocess import apply_mask, crf_refine  # noqa: E402
from attention_map.render import colormap_lut, raw_map_16bit  # noqa: E402
from attention_map.timing import StageTimes  # noqa: E402

CXR = REPO.parent / "shared" / "data" / "cxr"


def former_overlay(film: np.ndarray, cam: np.ndarray, colormap: str, alpha: float) -> np.ndarray:
    """The overlay as the pipeline computed it before: float arithmetic in numpy."""
    grey = np.clip(film, 0, 1)[:, :, None] * 255.0
    heat = colormap_lut(colormap)[np.round(np.clip(cam, 0, 1) * 255).astype(np.uint8)].astype(np.float32)
    return np.round((1.0 - alpha) * grey + alpha * heat).clip(0, 255).astype(np.uint8)


def former_png(path: Path, image: np.ndarray) -> None:
    """A PNG as the pipeline wrote it before: OpenCV's libpng writer at its default settings."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image)
    assert ok
    path.write_bytes(encoded.tobytes())


def former_finish(film, grids, out: Path, name: str, colormap: str, alpha: float) -> StageTimes:
    times = StageTimes()
    with times("body mask"):
        mask = body_mask(film)
    for q, grid in enumerate(grids):
        with times("render"):
            heat = grid_to_image(grid, film.shape[::-1])
        with times("body mask"):
            heat, _ = apply_mask(heat, mask)
        with times("render"):
            image = former_overlay(film, heat, colormap, alpha)
        with times("png write"):
            former_png(out / f"{name}_{q}_cam.png", raw_map_16bit(heat))
            former_png(out / f"{name}_{q}.png", image)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--films", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=5, help="heatmaps per film")
    parser.add_argument("--size", type=int, default=1024, help="films are resized to size x size")
    parser.add_argument("--crf-films", type=int, default=2, help="films whose maps go through both CRFs (0: none)")
    args = parser.parse_args()
    cv2.setNumThreads(1)       # as in the pipeline's worker processes: the times are one core's
    paths = sorted((CXR / "nih").glob("*.png"))[: args.films]
    if not paths:
        raise SystemExit(f"real films not found at {CXR}/nih (the shared data folder sits beside the checkout)")
    films = [cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (args.size, args.size),
                        interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255 for path in paths]
    rng = np.random.default_rng(0)
    grids = [[rng.random((14, 14)).astype(np.float32) for _ in range(args.prompts)] for _ in films]
    work = Path(tempfile.mkdtemp(prefix="attention-bench-finish-"))
    settings, _ = load_settings(REPO / "configs" / "demo.conf",
                                {"OUTPUT_DIR": str(work / "b"), "SKIP_CRF": "true", "SAVE_RAW_CAM": "true"})
    (work / "a").mkdir()
    count = len(films) * args.prompts
    print(f"{len(films)} films of {args.size} x {args.size}, {args.prompts} heatmaps each ({count}), raw maps on, "
          f"CRF off, COLORMAP={settings.COLORMAP}, ALPHA={settings.ALPHA}; milliseconds per heatmap")

    totals = {"a": StageTimes(), "b": StageTimes()}
    for index, (film, film_grids) in enumerate(zip(films, grids)):
        for stage, seconds in former_finish(film, film_grids, work / "a", f"f{index}", settings.COLORMAP,
                                            settings.ALPHA).seconds.items():
            totals["a"].add(stage, seconds)
        jobs = [make_job(q, None, f"f{index}_{q}.png", None, settings) for q in range(args.prompts)]
        made = [Made("gScoreCAM", "", 0.0)] * len(jobs)
        _, seconds_by_stage = heatmaps.finish(settings, film, jobs, film_grids, made)
        for stage, seconds in seconds_by_stage.items():
            totals["b"].add(stage, seconds)
    stages = ("body mask", "render", "png write")
    a, b = ({stage: totals[key].seconds[stage] * 1000 / count for stage in stages} for key in ("a", "b"))
    print("| stage | (a) before | (b) now | (a)/(b) |\n|---|---|---|---|")
    for stage in stages:
        print(f"| {stage} | {a[stage]:.1f} | {b[stage]:.1f} | {a[stage] / b[stage]:.2f}x |")
    print(f"| all three | {sum(a.values()):.1f} | {sum(b.values()):.1f} | {sum(a.values()) / sum(b.values()):.2f}x |")

    overlay_difference, raw_differ, size_a, size_b = 0, 0, 0, 0
    for path in sorted((work / "a").iterdir()):
        before = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(int)
        now = cv2.imread(str(work / "b" / path.name), cv2.IMREAD_UNCHANGED).astype(int)
        if path.name.endswith("_cam.png"):
            raw_differ += not np.array_equal(before, now)
        else:
            overlay_difference = max(overlay_difference, int(np.abs(before - now).max()))
        size_a, size_b = size_a + path.stat().st_size, size_b + (work / "b" / path.name).stat().st_size
    print(f"(a) against (b): overlays differ by at most {overlay_difference} grey level(s), raw maps differ in "
          f"{raw_differ} of {count}; PNG bytes written {size_a / 1e6:.1f} MB (a), {size_b / 1e6:.1f} MB (b)")

    if args.crf_films:
        crf_times, half_times, differences = [], [], []
        for film, film_grids in zip(films[: args.crf_films], grids):
            mask = body_mask(film)
            for grid in film_grids:
                heat, _ = apply_mask(grid_to_image(grid, film.shape[::-1]), mask)
                started = time.perf_counter()
                full = crf_refine(film, heat)
                crf_times.append(time.perf_counter() - started)
                started = time.perf_counter()
                small = crf_refine(cv2.resize(film, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA),
                                   cv2.resize(heat, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA))
                half = cv2.resize(small, film.shape[::-1], interpolation=cv2.INTER_LINEAR)
                half_times.append(time.perf_counter() - started)
                differences.append(float(np.abs(full - half).max()))
        print(f"CRF on {len(differences)} maps: full size {np.mean(crf_times):.2f} s per map, at half size and "
              f"upscaled {np.mean(half_times):.2f} s ({np.mean(crf_times) / np.mean(half_times):.1f}x); largest "
              f"|difference| per map: median {np.median(differences):.3f}, max {max(differences):.3f} "
              f"(within 1e-2: {sum(d <= 1e-2 for d in differences)} of {len(differences)})")


if __name__ == "__main__":
    main()
