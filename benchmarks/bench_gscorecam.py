"""Time gScoreCAM heatmaps: the plain per-prompt reference steps (a) against the pipeline's engine (b).

Both run in this one process on the same real films (../shared/data/cxr/nih/) and prompts, with the same model
(BiomedCLIP's architecture with random weights, made offline on first use), and both write overlays, so the
figures are end to end: decode, gradient pass, masked forwards, body mask, CRF, render, PNG write.

    .venv/bin/python benchmarks/bench_gscorecam.py                      # 1 film x 5 prompts, k = 300, CRF off
    .venv/bin/python benchmarks/bench_gscorecam.py --films 8 --crf on   # more films, CRF on
    .venv/bin/python benchmarks/bench_gscorecam.py --films 16 --films-per-batch 1,4,16   # films explained together
    .venv/bin/python benchmarks/bench_gscorecam.py --films 16 --skip-reference --compile  # COMPILE=true too
    .venv/bin/python benchmarks/bench_gscorecam.py --memory-check       # instead: peak RSS at 100 and 1,000 heatmaps

(a) is the reference formulation as tests/reference_gscorecam.py writes it: one (image, prompt) at a time, fp32,
masked images in batches of 64, the text re-encoded in every batch. (b) is `attention_map.pipeline.run` with the
settings a user would run (default BATCH_SIZE, PRECISION and WORKERS for the device).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))   # the reference implementation is the tests' oracle

from attention_map import outputs  # noqa: E402
from attention_map.config import Settings  # noqa: E402
from attention_map.images import load_film  # noqa: E402
from attention_map.models import load_model  # noqa: E402
from attention_map.pipeline import resolve_device, run  # noqa: E402
from attention_map.body_mask import body_mask  # noqa: E402
from attention_map.cams import GScoreCAM  # noqa: E402
from attention_map.postprocess import CRFParams, apply_mask, crf_refine  # noqa: E402
from attention_map.render import overlay  # noqa: E402
from attention_map.timing import StageTimes  # noqa: E402
from reference_gscorecam import reference_gscorecam  # noqa: E402

CXR = REPO.parent / "shared" / "data" / "cxr"
PROMPTS = ["Is there evidence of cardiomegaly in this CXR?", "Is there a pleural effusion?",
           "nodule in the left upper lung", "opacity in the right lower lung", "Is the heart size normal?",
           "left hilar structures", "Is there a pneumothorax?", "right costophrenic angle"]
VIT_B16_GFLOP = 17.6     # one ViT-B/16 image forward at 224 x 224
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 20 ms from /proc."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _gpu_peak(device) -> str:
    if device.type != "cuda":
        return "n/a (cpu)"
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"


def reference_run(model, films, prompts, topk, crf_on, out: Path, device):
    """(a): the reference steps, one (image, prompt) at a time, then the same post-processing and writing."""
    times = StageTimes(torch.cuda.synchronize if device.type == "cuda" else None)
    maps, forwards, started = {}, 0, time.perf_counter()
    crf = CRFParams()
    for film_path in films:
        with times("decode"):
            film = load_film(film_path)
        pixels = model.prepare(film)
        for q, prompt in enumerate(prompts):
            heat, kept = reference_gscorecam(model, pixels, prompt, topk, film.shape[::-1], times=times)
            forwards += 1 + len(kept)
            with times("body mask"):
                heat, _ = apply_mask(heat.astype(np.float32), body_mask(film))
            if crf_on and heat.max() > 0:
                with times("crf"):
                    heat = crf_refine(film, heat, crf)
            with times("render"):
                image = overlay(film, heat, "jet", 0.5)
            with times("png write"):
                outputs.write_png(out / f"{film_path.stem}_idx{q}.png", image)
            maps[(film_path.name, q)] = heat
    seconds = time.perf_counter() - started
    return dict(heatmaps=len(maps), seconds=seconds, forwards=forwards, stages=times.ordered()), maps


def engine_run(model_dir, films, prompts, topk, crf_on, out: Path, device_name, precision="auto", workers=None,
               compile=False):
    """(b): the pipeline, as a user runs it, on records naming the same films and prompts."""
    records = out / "records.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    with open(records, "w") as handle:
        for film_path in films:
            for q, prompt in enumerate(prompts):
                handle.write(json.dumps({"image_path": f"nih/{film_path.name}", "question": prompt, "answer": "",
                                         "q_id": q}) + "\n")
    settings = Settings(DATA_FILE=records, IMAGE_ROOT=films[0].parent.parent, OUTPUT_DIR=out / "maps", MODEL=str(model_dir), WORKERS=workers,
                        DEVICE=device_name, PRECISION=precision, TOPK=topk, SKIP_CRF=not crf_on, SAVE_RAW_CAM=True,
                        OVERWRITE=True, COMPILE=compile)
    summary = run(settings)
    if summary.failures:
        raise SystemExit(f"the engine failed on {summary.failures} items: see {summary.errors_file}")
    forwards = summary.images + summary.masked_forwards    # one gradient forward per film, then the masked ones
    return dict(heatmaps=summary.heatmaps, seconds=summary.seconds, forwards=forwards, stages=summary.stage_seconds)


def engine_maps(out: Path, films, prompts) -> dict:
    """The engine's raw maps of `films`, read back from their 16-bit PNGs (after the run, outside its memory)."""
    maps = {}
    for film_path in films:
        for q in range(len(prompts)):
            raw = cv2.imread(str(out / "maps" / "nih" / f"{film_path.stem}_idx{q}_cam.png"), cv2.IMREAD_UNCHANGED)
            maps[(film_path.name, q)] = raw.astype(np.float64) / 65535.0
    return maps


def _report(name, figures, peak_rss, gpu):
    per_heatmap = figures["forwards"] / figures["heatmaps"]
    rate = figures["heatmaps"] / figures["seconds"]
    stages = ", ".join(f"{k} {v:.1f}" for k, v in figures["stages"].items())
    print(f"{name}: {figures['heatmaps']} heatmaps in {figures['seconds']:.1f} s = {rate:.4f} heatmaps/s; "
          f"{per_heatmap:.1f} image forwards per heatmap; peak RSS {peak_rss / 2**30:.2f} GiB; GPU peak {gpu}")
    print(f"    seconds per stage: {stages}")
    return rate, per_heatmap


def _differences(a: dict, b: dict) -> str:
    """The largest |difference| per map, over the maps both runs made: max, 99th percentile, median, count > 1e-2."""
    worst = np.array([float(np.abs(a[key] - b[key]).max()) for key in a if key in b])
    return (f"max {worst.max():.2e}, 99th percentile {np.percentile(worst, 99):.2e}, median {np.median(worst):.2e}; "
            f"{int((worst > 1e-2).sum())} of {len(worst)} maps differ by more than 1e-2")


def _films(folder: Path, count: int, work: Path) -> list[Path]:
    """`count` films from `folder`; when it holds fewer, links to them under new names (the same pixels, so a
    long run reaches steady state on a small folder)."""
    films = sorted(folder.glob("*.png"))
    if count <= len(films):
        return films[:count]
    cycled = work / "cycled" / "nih"
    cycled.mkdir(parents=True)
    for number in range(count):
        film = films[number % len(films)]
        (cycled / f"r{number // len(films):03d}_{film.name}").symlink_to(film.resolve())
    return sorted(cycled.iterdir())[:count]


def memory_check(work: Path, workers: int | None) -> None:
    """Peak RSS of a tiny-model run at 100 and at 1,000 heatmaps (synthetic films, 5 prompts each)."""
    import subprocess

    from attention_map.models.random_models import make_test_model
    from attention_map.synthetic import make_film

    model = make_test_model(work / "tiny", "tiny", seed=0)
    films = work / "films"
    lines = []
    for seed in range(200):
        film, place = make_film(seed, 384)
        outputs.write_png(films / f"f{seed:03d}.png", np.round(film * 255).astype(np.uint8))
        lines += [json.dumps({"image_path": f"f{seed:03d}.png", "question": f"{p} ({place})?", "answer": "",
                              "q_id": q}) for q, p in enumerate(PROMPTS[:5])]
    (films / "records.jsonl").write_text("\n".join(lines) + "\n")
    # The child reports its own high-water mark: the rusage of a forked child would include this process's pages.
    child = ("import sys; from attention_map.cli import main; status = main(sys.argv[1:]); "
             "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))); sys.exit(status)")
    for count in (20, 200):
        result = subprocess.run([sys.executable, "-c", child, "run", f"DATA_FILE={films / 'records.jsonl'}",
                                 f"MODEL={model}", f"OUTPUT_DIR={work / f'out{count}'}", f"STOP_AFTER={count}",
                                 "SKIP_CRF=false", "SAVE_RAW_CAM=true", f"WORKERS={'' if workers is None else workers}"],
                                capture_output=True, text=True)
        peak_kib = int(result.stdout.split("VmHWM:")[1].split()[0])
        done = next(line for line in result.stdout.splitlines() if line.startswith("Done:")).split(". ")[0]
        print(f"memory: {count * 5} heatmaps, peak RSS {peak_kib / 2**20:.3f} GiB (exit {result.returncode}; {done})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--films", type=int, default=1,
                        help="real films from CXR/nih for the engine (default 1); more than the folder holds repeat")
    parser.add_argument("--reference-films", type=int,
                        help="the first this many of them for the reference, whose rate does not change with the "
                             "count, and for the fp32 comparison (default: all)")
    parser.add_argument("--cxr", type=Path, default=CXR, help=f"the data folder holding nih/ (default {CXR})")
    parser.add_argument("--prompts", type=int, default=5, help=f"prompts per film, at most {len(PROMPTS)}")
    parser.add_argument("--topk", type=int, default=300)
    parser.add_argument("--crf", choices=("off", "on"), default="off")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", type=Path, default=REPO / "results" / "models" / "bench-biomedclip",
                        help="model folder (made with random BiomedCLIP weights if missing)")
    parser.add_argument("--work", type=Path, help="folder for the outputs (default: a new temporary folder)")
    parser.add_argument("--skip-reference", action="store_true", help="time the engine only")
    parser.add_argument("--memory-check", action="store_true",
                        help="instead: peak RSS of a tiny-model run at 100 and at 1,000 heatmaps")
    parser.add_argument("--workers", type=int, help="WORKERS for the engine (default: the device's default)")
    parser.add_argument("--compare-precisions", default="fp32,tf32,fp16,bf16",
                        help="on CUDA, PRECISION values to run on the reference films and compare with fp32")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: known GPUs)")
    parser.add_argument("--compile", action="store_true",
                        help="also run the engine with COMPILE=true on the same films, against the default")
    parser.add_argument("--films-per-batch", default="1",
                        help="also run the engine with gScoreCAM explaining this many films together (comma-separated;"
                             " their masked images share full forwards), on the same films, against the default")
    args = parser.parse_args()

    if not (args.cxr / "nih").is_dir():
        raise SystemExit(f"real films not found at {args.cxr}/nih (the shared data folder sits beside the checkout; "
                         "--cxr names another)")
    if not (args.model / "open_clip_config.json").is_file():
        from attention_map.models.random_models import make_test_model
        print(f"making a random-weight BiomedCLIP-architecture model in {args.model} ...", flush=True)
        make_test_model(args.model, "biomedclip", seed=0)
    if args.memory_check:
        memory_check(args.work or Path(tempfile.mkdtemp(prefix="attention-bench-memory-")), args.workers)
        return
    device = resolve_device(args.device)
    work = args.work or Path(tempfile.mkdtemp(prefix="attention-bench-"))
    films = _films(args.cxr / "nih", args.films, work)
    reference_films = films[: args.reference_films or len(films)]
    prompts = PROMPTS[: args.prompts]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"machine: {name}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"workload: {len(films)} films ({len(reference_films)} for the reference) x {len(prompts)} prompts, "
          f"k = {args.topk}, CRF {args.crf}, model {args.model}")

    results = {}
    if not args.skip_reference:
        model = load_model(str(args.model), device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            figures, reference_maps = reference_run(model, reference_films, prompts, args.topk, args.crf == "on",
                                                    work / "reference", device)
        results["a"] = _report("(a) reference, per prompt, fp32, batch 64", figures, rss.peak, _gpu_peak(device))
        del model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        figures = engine_run(args.model, films, prompts, args.topk, args.crf == "on", work / "engine", args.device,
                             workers=args.workers)
    results["b"] = _report("(b) engine, as a user runs it", figures, rss.peak, _gpu_peak(device))
    maps = engine_maps(work / "engine", reference_films, prompts)

    if "a" in results:
        print(f"|map (a) - map (b)|: {_differences(reference_maps, maps)} "
              f"(b's maps are read back from their 16-bit PNGs: quantisation step 1.5e-5)")
        print(f"ratio (a)/(b): image forwards per heatmap {results['a'][1] / results['b'][1]:.2f}x fewer; "
              f"heatmaps per second {results['b'][0] / results['a'][0]:.2f}x")
    default_films = GScoreCAM.films_per_batch[device.type]
    for films_per_batch in [int(n) for n in args.films_per_batch.split(",") if n and int(n) != default_films]:
        GScoreCAM.films_per_batch = {**GScoreCAM.films_per_batch, device.type: films_per_batch}
        try:
            run_figures = engine_run(args.model, films, prompts, args.topk, args.crf == "on",
                                     work / f"engine-{films_per_batch}-films", args.device, workers=args.workers)
        finally:
            GScoreCAM.films_per_batch = {**GScoreCAM.films_per_batch, device.type: default_films}
        print(f"engine at {films_per_batch} films per batch: {run_figures['heatmaps'] / run_figures['seconds']:.3f} "
              f"heatmaps/s, masked forwards {run_figures['stages'].get('masked forwards', 0):.1f} s; the default "
              f"({default_films} film{'s' * (default_films > 1)} per batch) against it: "
              f"{run_figures['seconds'] / figures['seconds']:.2f}x heatmaps/s")
    if args.compile:
        run_figures = engine_run(args.model, films, prompts, args.topk, args.crf == "on", work / "engine-compiled",
                                 args.device, workers=args.workers, compile=True)
        stages = run_figures["stages"]
        print(f"engine with COMPILE=true: {run_figures['heatmaps'] / run_figures['seconds']:.3f} heatmaps/s, "
              f"compile {stages.get('compile', 0):.1f} s, masked forwards {stages.get('masked forwards', 0):.1f} s "
              f"against {figures['stages'].get('masked forwards', 0):.1f} s eager "
              f"({figures['stages'].get('masked forwards', 0) / max(stages.get('masked forwards', 0), 1e-9):.2f}x)")
        compiled_maps = engine_maps(work / "engine-compiled", reference_films, prompts)
        print(f"    |compiled - eager|: {_differences(maps, compiled_maps)}")
    if device.type == "cuda":
        # Each PRECISION on the reference films against the engine's fp32 maps: speed and fidelity side by side.
        fp32_maps = None
        for precision in ["fp32"] + [p for p in args.compare_precisions.split(",") if p and p != "fp32"]:
            run_figures = engine_run(args.model, reference_films, prompts, args.topk, args.crf == "on",
                                     work / f"engine-{precision}", args.device, precision=precision,
                                     workers=args.workers)
            run_maps = engine_maps(work / f"engine-{precision}", reference_films, prompts)
            fp32_maps = fp32_maps or run_maps
            against = (f"vs (a): {_differences(reference_maps, run_maps)}" if precision == "fp32" and "a" in results
                       else f"vs engine fp32: {_differences(fp32_maps, run_maps)}")
            print(f"engine PRECISION={precision}: {run_figures['heatmaps'] / run_figures['seconds']:.2f} heatmaps/s, "
                  f"masked forwards {run_figures['stages'].get('masked forwards', 0):.1f} s; |difference| {against}")
        masked = figures["stages"].get("masked forwards", 0.0)
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if masked and peak:
            achieved = (figures["forwards"] - len(films)) * VIT_B16_GFLOP / masked / 1e3
            # the dense TF32 peak of each of these GPUs is half its bf16 peak
            print(f"masked-forward phase: {achieved:.1f} TFLOP/s = {100 * achieved / peak:.1f}% of the "
                  f"{peak:.0f} TFLOP/s bf16 peak, {200 * achieved / peak:.1f}% of the {peak / 2:.0f} TFLOP/s TF32 peak")
    print(f"outputs in {work}")


if __name__ == "__main__":
    main()
