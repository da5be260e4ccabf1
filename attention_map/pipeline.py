"""The run: records -> films -> model -> CAM -> body mask / CRF -> overlays -> manifest."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import outputs, shards
from .cams import CAM_METHODS
from .config import ConfigError, Settings
from .images import ImageError, load_film
from .maps import grid_to_image
from .models import ModelLoadError, load_model
from .postprocess import CRFParams, apply_mask, body_mask, crf_refine
from .records import Prompt, prompts_of, read_records
from .render import overlay, raw_map_16bit
from .timing import StageTimes

log = logging.getLogger(__name__)

EXIT_ITEMS_FAILED = 3  # the run finished, but some records or images failed (see errors.csv)
EXIT_STOPPED = 4       # FAIL_FAST=true and an item failed: the run stopped there


@dataclass(frozen=True)
class Job:
    """One heatmap to make: its place in the manifest, the prompt, and the overlay's name under OUTPUT_DIR."""
    index: int
    prompt: Prompt
    overlay: str


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
    errors: list[tuple[str, str, str, str]] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return len(self.errors)

    @property
    def exit_status(self) -> int:
        return EXIT_STOPPED if self.stopped else EXIT_ITEMS_FAILED if self.failures else 0

    def text(self) -> str:
        rate = self.heatmaps / self.seconds if self.seconds > 0 else 0.0
        per_heatmap = f" ({self.masked_forwards / self.heatmaps:.0f} per heatmap)" if self.heatmaps else ""
        failed = (f"{self.failures} failed (see {self.errors_file})" if self.failures
                  else "0 failed")
        where = (f"Overlays and {outputs.MANIFEST} are in {self.output_dir}." if not self.shard else
                 f"Overlays are in {self.output_dir}; shard {self.shard} is done, "
                 f"`attention-map merge {self.output_dir}` joins the shards once all are.")
        if self.stopped:
            where = f"Stopped at the first failure (FAIL_FAST=true): {self.stopped}. A rerun resumes."
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


def resolve_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. Autocast is used on CUDA only."""
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            log.warning("PRECISION=%s applies on CUDA only; running fp32 on %s", precision, device)
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def plan_jobs(settings: Settings, errors: list) -> dict[str, list[Job]]:
    """The heatmaps of the run grouped by film, films in first-seen order, at most STOP_AFTER films."""
    records, record_errors = read_records(settings.DATA_FILE)
    errors.extend((str(e.line), e.image_path, f"record:{e.field}", e.reason) for e in record_errors)
    groups: dict[str, list[Job]] = {}
    taken: dict[str, int] = {}
    index = 0
    for record in records:
        try:
            relative = outputs.relative_image_path(record.image_path, settings.IMAGE_ROOT,
                                                   settings.ALLOW_OUTSIDE_IMAGE_ROOT)
        except ValueError as error:
            errors.append((str(record.line), record.image_path, "record:image_path", str(error)))
            continue
        key = relative.as_posix()
        if key not in groups and settings.STOP_AFTER is not None and len(groups) >= settings.STOP_AFTER:
            continue
        for prompt in prompts_of(record, settings.PROMPT_SOURCE):
            name = outputs.overlay_name(relative, record.q_id, prompt.region)
            if not prompt.text.strip():
                errors.append((str(record.line), record.image_path, "record:question", "empty prompt"))
            elif name in taken:
                errors.append((str(record.line), record.image_path, "record:q_id",
                               f"output {name} is already made by the record on line {taken[name]}"))
            else:
                taken[name] = record.line
                groups.setdefault(key, []).append(Job(index, prompt, name))
                index += 1
    return groups


def _manifest_row(job: Job, settings: Settings, raw_map: str, warning: str) -> outputs.ManifestRow:
    record = job.prompt.record
    return outputs.ManifestRow(
        image_path=job.overlay, question=record.question, answer=record.answer, source_image=record.image_path,
        prompt=job.prompt.text, region="" if job.prompt.region is None else str(job.prompt.region),
        cam_method=settings.CAM_METHOD, q_id=record.q_id, row_id=record.row_id, choices=record.choices,
        raw_map=raw_map, warning=warning)


def _check_earlier_run(settings: Settings) -> None:
    """With RESUME=false and OVERWRITE=false, an OUTPUT_DIR that holds a run is left alone."""
    if settings.RESUME or settings.OVERWRITE:
        return
    if (settings.OUTPUT_DIR / outputs.RUN_CONFIG).exists() or (settings.OUTPUT_DIR / shards.FOLDER).exists():
        raise ConfigError([f"OUTPUT_DIR={settings.OUTPUT_DIR} holds an earlier run and RESUME=false: set "
                           f"RESUME=true to continue it, OVERWRITE=true to redo it, or choose another OUTPUT_DIR"])


def _truncation_warning(model, prompt: str) -> str:
    tokens = model.count_tokens(prompt)
    if tokens <= model.context_length:
        return ""
    return f"prompt truncated to the model's {model.context_length} tokens ({tokens - model.context_length} dropped)"


class Heatmaps:
    """The heatmaps of one film: `explain` runs the model (the accelerator's part), `finish` post-processes and
    writes them (CPU work, safe to run in a worker thread while the model explains the next film)."""

    def __init__(self, settings: Settings, model, cam, times: StageTimes):
        self.settings, self.model, self.cam, self.times = settings, model, cam, times
        self.crf = CRFParams(settings.CRF_ITERATIONS, settings.CRF_TAU, settings.CRF_GAUSSIAN_SXY,
                             settings.CRF_GAUSSIAN_COMPAT, settings.CRF_BILATERAL_SXY, settings.CRF_BILATERAL_SRGB,
                             settings.CRF_BILATERAL_COMPAT)

    def explain(self, film, jobs: list[Job]):
        with _stage("cam"):
            return self.cam.explain(self.model.prepare(film), [job.prompt.text for job in jobs])

    def finish(self, film, jobs: list[Job], grid_maps) -> list[tuple[Job, str, str]]:
        """Body mask, CRF, colour map and PNGs; returns (job, raw map name, warning) per heatmap written.

        Raises StageError naming the stage (post, write) that failed, with the heatmaps written before it."""
        settings, times = self.settings, self.times
        written = []
        try:
            with _stage("post"), times("body mask"):
                mask = body_mask(film) if settings.ENABLE_BODY_MASK else None
            height, width = film.shape
            for job, grid_map in zip(jobs, grid_maps):
                warnings = [grid_map.warning, _truncation_warning(self.model, job.prompt.text)]
                with _stage("post"):
                    with times("render"):
                        heat = grid_to_image(grid_map.cam, (width, height))
                    if mask is not None:
                        with times("body mask"):
                            heat, mask_warning = apply_mask(heat, mask)
                        warnings.append(mask_warning)
                    if not settings.SKIP_CRF and heat.max() > 0:
                        with times("crf"):
                            heat = crf_refine(film, heat, self.crf)
                    with times("render"):
                        image = overlay(film, heat, settings.COLORMAP, settings.ALPHA)
                with _stage("write"), times("png write"):
                    raw_name = ""
                    if settings.SAVE_RAW_CAM:
                        raw_name = outputs.raw_map_name(job.overlay)
                        outputs.write_png(settings.OUTPUT_DIR / raw_name, raw_map_16bit(heat))
                    outputs.write_png(settings.OUTPUT_DIR / job.overlay, image)   # last: its presence means done
                written.append((job, raw_name, "; ".join(w for w in warnings if w)))
        except StageError as error:
            error.written = written
            raise
        return written


class StageError(Exception):
    def __init__(self, stage: str, error: BaseException):
        self.stage = stage
        self.written: list = []   # heatmaps of the film written before the failure
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if isinstance(error, torch.cuda.OutOfMemoryError):
            reason = "CUDA out of memory at BATCH_SIZE=1"
        super().__init__(reason)


@contextlib.contextmanager
def _stage(name: str):
    """Turns the errors an item can raise into a StageError naming where it happened."""
    try:
        yield
    except (ImageError, OSError, ValueError, RuntimeError) as error:
        raise StageError(name, error) from error


def resolve_workers(workers: int | None, device: torch.device) -> int:
    """WORKERS, or by default 4 on CUDA (decoding and post-processing overlap the GPU's work) and 0 on the CPU
    (where the model already uses every core and extra threads only compete with it)."""
    if workers is not None:
        return workers
    return min(4, max(1, (os.cpu_count() or 2) // 2)) if device.type == "cuda" else 0


def resolve_batch_size(batch_size: int | None, device: torch.device) -> int:
    """BATCH_SIZE, or by default 256 masked images per forward on CUDA and 64 on the CPU."""
    return batch_size or (256 if device.type == "cuda" else 64)


class _Films(torch.utils.data.Dataset):
    """Films decoded (in DataLoader workers when WORKERS > 0): (position, film or None, error or None, seconds)."""

    def __init__(self, root: Path, paths: list[str], max_pixels: int):
        self.root, self.paths, self.max_pixels = root, paths, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        started = time.perf_counter()
        try:
            film, error = load_film(self.root / self.paths[position], self.max_pixels), None
        except (ImageError, OSError, ValueError) as problem:   # returned, not raised: it costs only this film
            film, error = None, problem
        return position, film, error, time.perf_counter() - started


def _as_is(item):
    return item


def _films(settings: Settings, paths: list[str], workers: int):
    films = _Films(settings.IMAGE_ROOT, paths, settings.MAX_IMAGE_PIXELS)
    if workers == 0:
        return (films[i] for i in range(len(films)))
    return iter(torch.utils.data.DataLoader(films, batch_size=None, num_workers=workers, prefetch_factor=2,
                                            collate_fn=_as_is))


def _submit(pool: ThreadPoolExecutor | None, function, *args) -> Future:
    """pool.submit, or the same done at once when there is no pool."""
    if pool is not None:
        return pool.submit(function, *args)
    future = Future()
    try:
        future.set_result(function(*args))
    except StageError as error:
        future.set_exception(error)
    return future


def _skip_finished(films: dict[str, list[Job]], progress: shards.Progress, settings: Settings,
                   rows: dict[int, outputs.ManifestRow]) -> dict[str, list[Job]]:
    """The films still to make; the manifest rows of the finished ones go into `rows`.

    A film is skipped only when all its heatmaps are done: the prompts of one film share their masked forwards,
    so making the missing ones alone would not reproduce an uninterrupted run bit for bit.
    """
    todo = {}
    for film, jobs in films.items():
        finished = [progress.finished(job.overlay, job.prompt.text) for job in jobs]
        if all(finished):
            for job, entry in zip(jobs, finished):
                rows[job.index] = _manifest_row(job, settings, entry["raw_map"], entry["warning"])
        else:
            todo[film] = jobs
    return todo


def run(settings: Settings, environ: dict[str, str] | None = None) -> Summary:
    """Make the heatmaps of this shard of `settings` (all of them outside a Slurm array); resumable."""
    started = time.perf_counter()
    environ = dict(os.environ) if environ is None else environ
    device = resolve_device(settings.DEVICE)
    shard = shards.resolve_shard(settings, environ)
    _check_earlier_run(settings)
    summary = Summary(output_dir=settings.OUTPUT_DIR, shard=shard.tag if shard.count > 1 else "",
                      errors_file=settings.OUTPUT_DIR / outputs.ERRORS if shard.count == 1 else
                      shard.path(settings.OUTPUT_DIR, "errors"))
    plan_errors: list = []
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
    rows: dict[int, outputs.ManifestRow] = {}
    todo = _skip_finished(mine, progress, settings, rows)
    summary.skipped = len(rows)
    if summary.skipped:
        log.info("resuming: %d heatmaps already done are skipped, %d to make", summary.skipped, total - summary.skipped)
    if progress.other_settings:
        log.warning("%d heatmaps in %s were made with other settings and are made again",
                    progress.other_settings, settings.OUTPUT_DIR)

    model = load_model(settings.MODEL, device, offline=settings.OFFLINE)
    cam = CAM_METHODS[settings.CAM_METHOD](model, settings.TARGET_LAYER, resolve_batch_size(settings.BATCH_SIZE, device),
                                           resolve_autocast(settings.PRECISION, device), topk=settings.TOPK)
    log.info("model %s on %s, %s at %s, batch size %d, %d workers", settings.MODEL, device, cam.name,
             cam.target_layer, cam.batch_size, resolve_workers(settings.WORKERS, device))

    # Only now is anything written: a run that cannot start leaves OUTPUT_DIR as it was.
    settings.OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    recorded = dataclasses.replace(settings, SHARD_INDEX=None, SHARD_COUNT=shard.count)
    outputs.write_atomic(settings.OUTPUT_DIR / outputs.RUN_CONFIG, recorded.to_conf().encode())
    (settings.OUTPUT_DIR / outputs.MANIFEST).unlink(missing_ok=True)   # present only when every shard is done
    progress.open()

    def written(job: Job, raw_name: str, warning: str) -> None:
        progress.add(job.overlay, job.prompt.text, warning, raw_name)
        rows[job.index] = _manifest_row(job, settings, raw_name, warning)
        summary.heatmaps += 1
        if warning:
            summary.warnings += 1
            log.warning("%s (%s): %s", job.overlay, job.prompt.text, warning)

    times = StageTimes(torch.cuda.synchronize if device.type == "cuda" else None)
    cam.times = times
    heatmaps = Heatmaps(settings, model, cam, times)
    workers = resolve_workers(settings.WORKERS, device)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="post") if workers else None
    pending: deque = deque()   # (film, jobs, future of Heatmaps.finish), in input order
    bar = tqdm(total=len(todo), unit="img", desc="heatmaps", dynamic_ncols=True)

    def failed(image_path: str, jobs: list[Job], error: StageError) -> None:
        for done in error.written:
            written(*done)
        for job in jobs:
            if job.index not in rows:
                record = job.prompt.record
                summary.errors.append((str(record.line), record.image_path, error.stage, str(error)))
        log.error("%s: %s failed: %s", image_path, error.stage, error)
        if settings.FAIL_FAST and not summary.stopped:
            summary.stopped = f"{image_path}: {error.stage}: {error}"

    def collect(wait_all: bool) -> None:
        """Record finished films in order; waits while more than 2 per worker are in flight (flat memory)."""
        while pending and (wait_all or pending[0][2].done() or len(pending) > 2 * max(workers, 1)):
            image_path, jobs, future = pending.popleft()
            try:
                for done in future.result():
                    written(*done)
                summary.images += 1
            except StageError as error:
                failed(image_path, jobs, error)
            bar.update(1)
            bar.set_postfix(heatmaps=summary.heatmaps, failed=summary.failures)

    paths = list(todo)
    try:
        for position, film, load_error, seconds in _films(settings, paths, workers):
            times.add("decode", seconds)
            image_path, jobs = paths[position], todo[paths[position]]
            try:
                if load_error is not None:
                    raise StageError("load", load_error)
                grid_maps = heatmaps.explain(film, jobs)
            except StageError as error:
                failed(image_path, jobs, error)
                bar.update(1)
            else:
                pending.append((image_path, jobs, _submit(pool, heatmaps.finish, film, jobs, grid_maps)))
            collect(wait_all=False)
            if summary.stopped:
                break
        collect(wait_all=True)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        progress.close([job.overlay for jobs in mine.values() for job in jobs])
    summary.stage_seconds = times.ordered()

    if summary.stopped:
        outputs.write_atomic(summary.errors_file, outputs.errors_bytes(summary.errors))
    else:
        shards.write_shard(settings.OUTPUT_DIR, shard, rows, summary.errors)
        if shard.count == 1:
            shards.merge(settings.OUTPUT_DIR, 1)
    summary.masked_forwards = cam.masked_forwards
    summary.seconds = time.perf_counter() - started
    return summary
