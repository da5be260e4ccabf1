"""The run: plan the heatmaps, skip the finished ones, then films (decoded in workers) -> model -> CAM, with body
mask / CRF / overlays written in worker processes beside it -> this shard's manifest (merged at once outside an
array)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import multiprocessing
import os
import shutil
import signal
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import outputs, shards
from .cams import CAM_METHODS
from .cams.layers import on_layers
from .config import ConfigError, Settings, model_kind
from . import heatmaps
from .heatmaps import StageError
from .images import NOT_FOUND, ImageError, read_film
from .models import ModelLoadError, load_model
from .plan import Job, Made, Source, manifest_row, plan_jobs
from .timing import StageTimes, progress_bar

log = logging.getLogger(__name__)

EXIT_ITEMS_FAILED = 3  # the run finished, but some records or images failed (see errors.csv)
EXIT_STOPPED = 4       # FAIL_FAST=true and an item failed: the run stopped there
DECODERS = 4           # at most this many film-decoding processes (DataLoader workers)


@dataclass
class Summary:
    images: int = 0
    heatmaps: int = 0
    skipped: int = 0
    warnings: int = 0
    masked_forwards: int = 0
    seconds: float = 0.0
    output_dir: Path = Path(".")
    errors_file: Path = Path(outputs.ERRORS)
    shard: str = ""
    stopped: str = ""        # why FAIL_FAST stopped the run, if it did
    stage_seconds: dict = field(default_factory=dict)   # seconds per stage, summed over workers
    similarities: list = field(default_factory=list)    # of the maps written, with other prompts on their film
    errors: list[tuple[str, str, str, str]] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return len(self.errors)

    @property
    def exit_status(self) -> int:
        return EXIT_STOPPED if self.stopped else EXIT_ITEMS_FAILED if self.failures else 0

    def text(self) -> str:
        rate = self.heatmaps / self.seconds if self.seconds > 0 else 0.0
        per_heatmap = f" ({self.masked_forwards / self.heatmaps:.3g} per heatmap)" if self.heatmaps else ""
        failed = (f"{self.failures} failed (see {self.errors_file})" if self.failures
                  else "0 failed")
        where = (f"Overlays and {outputs.MANIFEST} are in {self.output_dir}." if not self.shard else
                 f"Overlays are in {self.output_dir}; shard {self.shard} is done, "
                 f"`attention-map merge {self.output_dir}` joins the shards once all are.")
        if self.stopped:
            where = f"Stopped at the first failure (FAIL_FAST=true): {self.stopped}. A rerun resumes."
        if self.similarities:
            where += (f" Prompt sensitivity: the maps of a film's questions correlate {np.mean(self.similarities):.2f} "
                      f"(mean Spearman over {len(self.similarities)} maps; near 1, a map does not depend on the "
                      f"question).")
        if self.stage_seconds:
            stages = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.stage_seconds.items())
            where += f" Seconds per stage: {stages}."
        return (f"Done: {self.images} images, {self.heatmaps} heatmaps written, {failed}, "
                f"{self.skipped} already done, {self.warnings} with warnings, in {self.seconds:.1f} s ({rate:.2f} heatmaps/s; "
                f"{self.masked_forwards} masked forwards{per_heatmap}). {where}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("DEVICE=cuda but no CUDA device is visible (check CUDA_VISIBLE_DEVICES, --gpus or --nv)")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The arithmetic of the masked forwards: PRECISION, with auto = fp32, the one whose maps kept within 1e-2 of
    the reference on every map of the benchmark (TF32 missed on 1 of 100 without CRF and 10 with it:
    docs/benchmarks.md, "Fidelity of each precision")."""
    if device.type != "cuda":
        if precision not in ("auto", "fp32"):
            log.warning("PRECISION=%s applies on CUDA only; running fp32 on %s", precision, device)
        return "fp32"
    if precision == "auto":
        return "fp32"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        log.warning("PRECISION=bf16: this GPU has no bf16; running fp16")
        return "fp16"
    return precision


def make_cam(name: str, model, settings: Settings, device: torch.device):
    """The CAM method `name` on `model` with the run's layer (several, comma-separated: averaged), batch size,
    precision and the method's own settings (gScoreCAM's TOPK, the attention's ATTENTION_*)."""
    method = CAM_METHODS[name]
    return on_layers(method, model, settings.TARGET_LAYER, resolve_batch_size(settings.BATCH_SIZE, device),
                     resolve_precision(settings.PRECISION, device), **method.options(settings))


def check_compiler(settings: Settings, device: torch.device) -> None:
    """COMPILE=true needs the compiler that torch.compile builds its kernels with: C++ for the CPU, C for Triton's
    launchers on CUDA (the container image has none); and a method with masked forwards."""
    if not settings.COMPILE:
        return
    if "compile" not in CAM_METHODS[settings.CAM_VERSION].options(settings):
        log.warning("COMPILE=true applies to the masked forwards of gScoreCAM and ScoreCAM only; %s runs eagerly",
                    settings.CAM_VERSION)
        return
    names = ("g++", "c++", "clang++") if device.type == "cpu" else ("gcc", "cc", "clang")
    if not any(shutil.which(name) for name in names):
        raise ConfigError([f"COMPILE=true: torch.compile needs a {'C++' if device.type == 'cpu' else 'C'} compiler "
                           f"({', '.join(names)}) on PATH and none was found (the container image has none): "
                           f"install one or set COMPILE=false"])


def recorded_settings(settings: Settings, shard: shards.Shard) -> Settings:
    """The settings that OUTPUT_DIR/run_config.conf records: the shard count, which the array's later tasks read,
    and the data's paths absolute, so that `report`, `robustness` and `merge` find the films and records from any
    folder. MODEL and MODEL_WEIGHTS stay as written: they are in the maps' fingerprint, which a resumed run compares."""
    absolute = {name: Path(os.path.abspath(value)) for name in ("RESULTS_ROOT", "DATA_FILE", "IMAGE_ROOT", "OUTPUT_DIR")
                if (value := getattr(settings, name)) is not None}
    return dataclasses.replace(settings, SHARD_INDEX=None, SHARD_COUNT=shard.count, **absolute)


def check_targets(model, targets: tuple[str, ...]) -> None:
    """Every name in TARGETS is an output of the model, before any film is read."""
    problems = [f"TARGETS: {reason}" for reason in map(model.check_target, targets) if reason]
    if problems:
        raise ConfigError(problems)


def drop_unknown_targets(model, todo: dict[Source, list[Job]], errors: list) -> dict[Source, list[Job]]:
    """The jobs whose target the model has (a record's own target may not be); the others go to `errors`, each
    on its own, so that they cost no other map of their film."""
    reasons = {name: model.check_target(name) for name in {job.prompt.text for jobs in todo.values() for job in jobs}}
    kept = {}
    for source, jobs in todo.items():
        for job in jobs:
            if reasons[job.prompt.text]:
                errors.append((str(job.prompt.record.line), job.prompt.record.image_path, "record:target",
                               reasons[job.prompt.text]))
        if any(not reasons[job.prompt.text] for job in jobs):
            kept[source] = [job for job in jobs if not reasons[job.prompt.text]]
    return kept


def _check_earlier_run(settings: Settings) -> None:
    """With RESUME=false and OVERWRITE=false, an OUTPUT_DIR that holds a run is left alone."""
    if settings.RESUME or settings.OVERWRITE:
        return
    if (settings.OUTPUT_DIR / outputs.RUN_CONFIG).exists() or (settings.OUTPUT_DIR / shards.FOLDER).exists():
        raise ConfigError([f"OUTPUT_DIR={settings.OUTPUT_DIR} holds an earlier run and RESUME=false: set "
                           f"RESUME=true to continue it, OVERWRITE=true to redo it, or choose another OUTPUT_DIR"])


def resolve_workers(workers: int | None, device: torch.device) -> int:
    """WORKERS, or by default on CUDA one per CPU this process may use but one (the one that drives the GPU),
    since post-processing (the CRF above all) costs more CPU time per film than the GPU's part; on the CPU 0, where
    the model already uses every core and extra processes only compete with it."""
    if workers is not None:
        return workers
    return max(1, len(os.sched_getaffinity(0)) - 1) if device.type == "cuda" else 0


def resolve_batch_size(batch_size: int | None, device: torch.device) -> int:
    """BATCH_SIZE, or by default 256 masked images per forward on CUDA and 64 on the CPU."""
    return batch_size or (256 if device.type == "cuda" else 64)


def resolve_films_per_batch(cam, batch_size: int | None, device: torch.device, per_detection: bool = False) -> int:
    """Films explained together: 1 for a method that explains one at a time, and for maps per detection, whose
    number differs between films; else BATCH_SIZE where it counts films (the gradient methods), or the method's
    default for the device (the gradient methods: 64 on CUDA and 4 on the CPU, where larger batches were slower;
    gScoreCAM, whose films share full batches of masked images: 8 on CUDA, 1 on the CPU; docs/benchmarks.md)."""
    if not cam.batches_films or per_detection:
        return 1
    if batch_size and cam.batch_size_counts_films:
        return batch_size
    return cam.films_per_batch.get(device.type, 1)


class _Films(torch.utils.data.Dataset):
    """Films decoded (in DataLoader workers when WORKERS > 0): (position, Film or None, error or None, seconds)."""

    def __init__(self, sources: list[Source], max_pixels: int):
        self.sources, self.max_pixels = sources, max_pixels

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, position: int):
        started = time.perf_counter()
        source = self.sources[position]
        try:
            film, error = read_film(source.path, self.max_pixels, source.frame), None
        except (ImageError, OSError, ValueError) as problem:   # returned, not raised: it costs only this film
            film, error = None, problem
            if torch.utils.data.get_worker_info() is not None:    # its traceback, which -v shows, stays behind
                problem.__suppress_context__ = False
                problem.add_note("".join(traceback.format_exception(problem)).rstrip())
        return position, film, error, time.perf_counter() - started


def _as_is(item):
    return item


def _films(settings: Settings, sources: list[Source], workers: int):
    films = _Films(sources, settings.MAX_IMAGE_PIXELS)
    if workers == 0:
        return (films[i] for i in range(len(films)))
    # Decoding a film costs far less than post-processing its maps: a few decoders keep up.
    return iter(torch.utils.data.DataLoader(films, batch_size=None, num_workers=min(workers, DECODERS),
                                            prefetch_factor=2, collate_fn=_as_is,
                                            worker_init_fn=functools.partial(_start_worker, os.getpid())))


def _post_pool(workers: int) -> Executor | None:
    """Worker processes for the CPU part of each film. Processes, not threads: the dense CRF holds the GIL.
    forkserver, not fork: this process has CUDA and loader threads that a forked child must not inherit."""
    if not workers:
        return None
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"),
                               initializer=_start_post_worker, initargs=(os.getpid(),))


def _start_post_worker(run: int) -> None:
    """Each worker is one of many processes: OpenCV's own thread pool would only oversubscribe the cores."""
    import cv2
    cv2.setNumThreads(1)
    _start_worker(run)


def _start_worker(run: int, *_) -> None:
    """A worker (a decoder, a post-processing worker) of the run of process id `run` leaves SIGTERM to the run, which
    shuts its workers down in order (attention_map.cli.Terminated): Slurm's scancel, preemption and time limit signal
    every process of a job, and a decoder killed while handing over a film left the run waiting for the rest of it.
    And it ends when the run is gone: a run killed outright (SIGKILL, out of memory) left its workers, and the fork
    server they keep alive, waiting for work."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_end_without, args=(run,), daemon=True).start()


def _end_without(run: int) -> None:
    while True:
        time.sleep(1)
        try:
            os.kill(run, 0)
        except (ProcessLookupError, PermissionError):   # gone; or its number taken by another user's process
            os._exit(1)


def _submit(pool: Executor | None, function, *args) -> Future:
    """pool.submit, or the same done at once when there is no pool."""
    if pool is not None:
        return pool.submit(function, *args)
    future = Future()
    try:
        future.set_result(function(*args))
    except StageError as error:
        future.set_exception(error)
    return future


def _skip_finished(films: dict[Source, list[Job]], progress: shards.Progress,
                   rows: dict[tuple[int, int], outputs.ManifestRow],
                   films_per_batch: int) -> dict[Source, list[Job]]:
    """The films still to make; the manifest rows of the finished ones go into `rows`.

    Films are explained in batches of `films_per_batch` at fixed places in the shard's list, and a batch is skipped
    only when all the heatmaps of its films are done: the prompts of one film share their masked forwards, and the
    films of one batch their forward, so making the missing ones alone would not reproduce an uninterrupted run bit
    for bit.
    """
    todo, sources = {}, list(films)
    for start in range(0, len(sources), films_per_batch):
        batch = sources[start:start + films_per_batch]
        finished = {film: [progress.finished(job) for job in films[film]] for film in batch}
        if not all(all(entries) for entries in finished.values()):
            todo.update((film, films[film]) for film in batch)
            continue
        for film in batch:
            for job, entry in (done for parts in finished[film] for done in parts):
                job = dataclasses.replace(job, frame=entry.get("frame"))
                # an entry of an older version has another settings fingerprint and never gets here
                boxes, detections = entry.get("boxes"), entry.get("detections")
                made = Made(entry["method"], entry["target"], entry["score"], entry["warning"],
                            None if boxes is None else tuple(map(tuple, boxes)),
                            None if detections is None else tuple(map(tuple, detections)),
                            entry.get("answer"), entry.get("p_yes"), entry.get("similarity"))
                rows[job.order] = manifest_row(job, made)
    return todo


def run(settings: Settings, environ: dict[str, str] | None = None) -> Summary:
    """Make the heatmaps of this shard of `settings` (all of them outside a Slurm array); resumable."""
    with contextlib.ExitStack() as hold:      # the shard, once the run starts writing it, until the run returns
        return _run(settings, environ, hold)


def _run(settings: Settings, environ: dict[str, str] | None, hold: contextlib.ExitStack) -> Summary:
    started = time.perf_counter()
    environ = dict(os.environ) if environ is None else environ
    device = resolve_device(settings.DEVICE)
    shard = shards.resolve_shard(settings, environ)
    _check_earlier_run(settings)
    shards.check_free(settings.OUTPUT_DIR, shard)
    summary = Summary(output_dir=settings.OUTPUT_DIR, shard=shard.tag if shard.count > 1 else "",
                      errors_file=settings.OUTPUT_DIR / outputs.ERRORS if shard.count == 1 else
                      shard.path(settings.OUTPUT_DIR, "errors"))
    plan_errors: list = []
    if settings.DICOM_FRAME == "all":
        log.info("DICOM_FRAME=all: reading the frame count of each file from its header")
    films = plan_jobs(settings, plan_errors)
    if shard.index == 0:          # record errors are the first shard's to report
        summary.errors.extend(plan_errors)
    if settings.FAIL_FAST and summary.errors:
        summary.stopped = "line {}: {}: {}".format(*summary.errors[0][:1], *summary.errors[0][2:])
        return summary
    mine = {film: jobs for number, (film, jobs) in enumerate(films.items()) if shard.owns(number)}
    total = sum(len(jobs) for jobs in mine.values())
    log.info("%d heatmaps on %d images planned from %s%s", total, len(mine), settings.DATA_FILE,
             f" (shard {shard.index} of 0..{shard.count - 1})" if shard.count > 1 else "")

    progress = shards.Progress(settings.OUTPUT_DIR, shard, shards.fingerprint(settings),
                               read_existing=settings.RESUME and not settings.OVERWRITE)
    rows: dict[tuple[int, int], outputs.ManifestRow] = {}
    films_per_batch = resolve_films_per_batch(CAM_METHODS[settings.CAM_VERSION], settings.BATCH_SIZE, device,
                                              per_detection=model_kind(settings.MODEL) == "detector"
                                              and settings.DETECTION_TARGET == "box")
    todo = _skip_finished(mine, progress, rows, films_per_batch)
    summary.skipped = len(rows)
    if summary.skipped:
        log.info("resuming: %d heatmaps already done are skipped, %d to make", summary.skipped, total - summary.skipped)
    if progress.other_settings:
        changed = shards.changed_settings(settings.OUTPUT_DIR, settings)
        log.warning("%d heatmaps in %s were made with other settings and are made again%s", progress.other_settings,
                    settings.OUTPUT_DIR, f": {'; '.join(changed)}" if changed else "")

    check_compiler(settings, device)
    model = load_model(settings.MODEL, device, settings.OFFLINE, settings.MODEL_WEIGHTS, settings.TARGET_NAMES,
                       settings.SCORE_THRESHOLD, settings.TOPK_OUTPUTS, settings.PRECISION)
    check_targets(model, settings.TARGETS)
    todo = drop_unknown_targets(model, todo, summary.errors)
    cam, fallback = (make_cam(name, model, settings, device) if name else None
                     for name in (settings.CAM_VERSION, settings.FALLBACK_CAM))
    if model.detects:
        log.info("the detection head reads %s (finest first); TARGET_LAYER=%s", ", ".join(model.head_inputs()),
                 cam.target_layer)
    workers = resolve_workers(settings.WORKERS, device)
    films = f"{films_per_batch} film{'s' * (films_per_batch > 1)}"
    how = getattr(cam, "description", None) or (
        f"{films} per forward" if cam.batches_films and cam.batch_size_counts_films
        else f"{films} per batch of {cam.batch_size} masked images") + f", {cam.precision} masked forwards"
    log.info("model %s on %s, %s at %s%s, %s, %d workers", settings.MODEL, device, cam.name, cam.target_layer,
             f" (FALLBACK_CAM={fallback.name})" if fallback else "", how, workers)

    # Only now is anything written: a run that cannot start leaves OUTPUT_DIR as it was.
    try:
        settings.OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    except OSError as error:        # checked with the settings; this is what the check cannot foresee
        raise ConfigError([f"OUTPUT_DIR={settings.OUTPUT_DIR} cannot be made: {error.strerror}"]) from None
    hold.enter_context(shards.held(settings.OUTPUT_DIR, shard))
    recorded = recorded_settings(settings, shard)
    outputs.write_atomic(settings.OUTPUT_DIR / outputs.RUN_CONFIG, recorded.to_conf().encode())
    (settings.OUTPUT_DIR / outputs.MANIFEST).unlink(missing_ok=True)   # present only when every shard is done
    progress.open()

    def written(job: Job, made: Made) -> None:
        progress.add(job, made)
        rows[job.order] = manifest_row(job, made)
        summary.heatmaps += 1
        if made.similarity is not None and made.similarity == made.similarity:
            summary.similarities.append(made.similarity)
        if made.warning:
            summary.warnings += 1
            log.warning("%s (%s): %s", job.overlay, job.prompt.text, made.warning)

    times = StageTimes(torch.cuda.synchronize if device.type == "cuda" else None)
    for method in (cam, fallback):
        if method is not None:
            method.times = times
    pool = _post_pool(workers)
    pending: deque = deque()   # (film, jobs, future of heatmaps.finish), in input order

    def failed(image_path: str, jobs: list[Job], error: StageError) -> None:
        for done in error.written:
            written(*done)
        made = {job.order for job, _ in error.written}
        for job in jobs:
            if job.order not in made:
                record = job.prompt.record
                summary.errors.append((str(record.line), record.image_path, error.stage, str(error)))
        log.error("%s: %s failed: %s", image_path, error.stage, error,
                  exc_info=error if log.isEnabledFor(logging.DEBUG) else None)     # -v: the traceback
        if settings.FAIL_FAST and not summary.stopped:
            summary.stopped = f"{image_path}: {error.stage}: {error}"

    def collect(wait_all: bool) -> None:
        """Record finished films in order; waits while more than 2 per worker are in flight (flat memory)."""
        while pending and (wait_all or pending[0][2].done() or len(pending) > 2 * max(workers, 1)):
            image_path, jobs, future = pending.popleft()
            try:
                done_list, seconds = future.result()
                for done in done_list:
                    written(*done)
                for stage, spent in seconds.items():
                    times.add(stage, spent)
                summary.images += 1
            except StageError as error:
                failed(image_path, jobs, error)
            except BrokenProcessPool:   # a worker was killed (out of memory?) or crashed: its films fail, not the run
                failed(image_path, jobs, StageError("post", "the post-processing worker process died (killed, out of "
                                                            "memory?); a rerun with RESUME=true makes this film"))
            advance()

    def advance() -> None:
        """One film more on the bar, with the counts so far (a film failed on loading or in the CAM included)."""
        bar.set_postfix(heatmaps=summary.heatmaps, failed=summary.failures, refresh=False)   # drawn by update
        bar.update(1)

    def post_process(source: Source, film, jobs: list[Job], grid_maps: list, made: list[Made]) -> None:
        nonlocal pool
        task = (heatmaps.finish, settings, film.pixels, jobs, grid_maps, made)
        try:
            future = _submit(pool, *task)
        except BrokenProcessPool:   # a worker died: the films in flight fail (see collect), a new pool goes on
            pool.shutdown(wait=False)
            pool = _post_pool(workers)
            future = _submit(pool, *task)
        pending.append((str(source), jobs, future))

    def explain(batch: list[tuple[Source, object, list[Job]]]) -> None:
        """The model's part of a batch of decoded films; each film's CPU part goes to the pool."""
        results = heatmaps.explain(model, cam, [film for _, film, _ in batch], [jobs for *_, jobs in batch], fallback)
        for (source, film, jobs), result in zip(batch, results):
            if isinstance(result, StageError):
                failed(str(source), jobs, result)
                advance()
            else:
                post_process(source, film, *result)   # the film's jobs, one per map (a detection's have their own)
        batch.clear()
        collect(wait_all=False)

    sources, batch = list(todo), []
    batch_of = {source: number // films_per_batch for number, source in enumerate(mine)}
    ends_a_batch = [i + 1 == len(sources) or batch_of[sources[i + 1]] != batch_of[source]
                    for i, source in enumerate(sources)]
    with progress_bar(total=len(todo), unit="img", desc="heatmaps") as bar:
        try:
            for position, film, load_error, seconds in _films(settings, sources, workers):
                times.add("decode", seconds)
                source = sources[position]
                if load_error is not None:
                    failed(str(source), todo[source], StageError.of("load", load_error))
                    advance()
                else:
                    # a clip's frame (first/middle) resolved
                    jobs = [dataclasses.replace(job, frame=film.frame) for job in todo[source]]
                    batch.append((source, film, jobs))
                if ends_a_batch[position] and batch and not summary.stopped:
                    explain(batch)
                if summary.stopped:
                    break
            collect(wait_all=True)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            progress.close([job.overlay for jobs in mine.values() for job in jobs])
    summary.stage_seconds = times.ordered()
    if summary.errors and not summary.heatmaps and all(reason.startswith(NOT_FOUND)
                                                        for *_, reason in summary.errors):
        log.warning("no image of the records was found under IMAGE_ROOT=%s: is it the folder their image_path is "
                    "relative to?", settings.IMAGE_ROOT)

    if summary.stopped:
        outputs.write_atomic(summary.errors_file, outputs.errors_bytes(summary.errors))
    else:
        shards.write_shard(settings.OUTPUT_DIR, shard, rows, summary.errors)
        if shard.count == 1:
            shards.merge(settings.OUTPUT_DIR, 1)
    summary.masked_forwards = cam.masked_forwards + (fallback.masked_forwards if fallback else 0)
    summary.seconds = time.perf_counter() - started
    return summary
