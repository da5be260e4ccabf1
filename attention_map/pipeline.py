"""The run: records -> films -> model -> CAM -> body mask / CRF -> overlays -> manifest."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
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
    """Makes and writes the heatmaps of one film: CAM on the model grid, then body mask, CRF, overlay, PNGs."""

    def __init__(self, settings: Settings, model, cam):
        self.settings, self.model, self.cam = settings, model, cam
        self.crf = CRFParams(settings.CRF_ITERATIONS, settings.CRF_TAU, settings.CRF_GAUSSIAN_SXY,
                             settings.CRF_GAUSSIAN_COMPAT, settings.CRF_BILATERAL_SXY, settings.CRF_BILATERAL_SRGB,
                             settings.CRF_BILATERAL_COMPAT)

    def make(self, film, jobs: list[Job], on_written) -> None:
        """Calls on_written(job, raw_map_name, warning) after each heatmap's PNGs are in place.

        Raises StageError naming the stage (cam, post, write) that failed."""
        settings = self.settings
        with _stage("cam"):
            grid_maps = self.cam.explain(self.model.prepare(film), [job.prompt.text for job in jobs])
        with _stage("post"):
            mask = body_mask(film) if settings.ENABLE_BODY_MASK else None
        height, width = film.shape
        for job, grid_map in zip(jobs, grid_maps):
            warnings = [grid_map.warning, _truncation_warning(self.model, job.prompt.text)]
            with _stage("post"):
                heat = grid_to_image(grid_map.cam, (width, height))
                if mask is not None:
                    heat, mask_warning = apply_mask(heat, mask)
                    warnings.append(mask_warning)
                if not settings.SKIP_CRF and heat.max() > 0:
                    heat = crf_refine(film, heat, self.crf)
                image = overlay(film, heat, settings.COLORMAP, settings.ALPHA)
            with _stage("write"):
                raw_name = ""
                if settings.SAVE_RAW_CAM:
                    raw_name = outputs.raw_map_name(job.overlay)
                    outputs.write_png(settings.OUTPUT_DIR / raw_name, raw_map_16bit(heat))
                outputs.write_png(settings.OUTPUT_DIR / job.overlay, image)   # last: its presence means done
            on_written(job, raw_name, "; ".join(w for w in warnings if w))


class StageError(Exception):
    def __init__(self, stage: str, error: BaseException):
        self.stage = stage
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
    todo: dict[str, list[Job]] = {}
    for film, jobs in mine.items():
        # A film is skipped only when all its heatmaps are done: the prompts of one film share their masked
        # forwards, so making the missing ones alone would not reproduce an uninterrupted run bit for bit.
        finished = [progress.finished(job.overlay, job.prompt.text) for job in jobs]
        if all(finished):
            for job, entry in zip(jobs, finished):
                rows[job.index] = _manifest_row(job, settings, entry["raw_map"], entry["warning"])
            summary.skipped += len(jobs)
        else:
            todo[film] = jobs
    if summary.skipped:
        log.info("resuming: %d heatmaps already done are skipped, %d to make", summary.skipped, total - summary.skipped)
    if progress.other_settings:
        log.warning("%d heatmaps in %s were made with other settings and are made again",
                    progress.other_settings, settings.OUTPUT_DIR)

    model = load_model(settings.MODEL, device, offline=settings.OFFLINE)
    cam = CAM_METHODS[settings.CAM_METHOD](model, settings.TARGET_LAYER, settings.BATCH_SIZE,
                                           resolve_autocast(settings.PRECISION, device), topk=settings.TOPK)
    log.info("model %s on %s, %s at %s", settings.MODEL, device, cam.name, cam.target_layer)

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

    heatmaps = Heatmaps(settings, model, cam)
    bar = tqdm(todo.items(), total=len(todo), unit="img", desc="heatmaps", dynamic_ncols=True)
    try:
        for image_path, jobs in bar:
            try:
                with _stage("load"):
                    film = load_film(settings.IMAGE_ROOT / image_path, settings.MAX_IMAGE_PIXELS)
                heatmaps.make(film, jobs, written)
                summary.images += 1
            except StageError as error:
                for job in jobs:
                    if job.index not in rows:
                        record = job.prompt.record
                        summary.errors.append((str(record.line), record.image_path, error.stage, str(error)))
                log.error("%s: %s failed: %s", image_path, error.stage, error)
                if settings.FAIL_FAST:
                    summary.stopped = f"{image_path}: {error.stage}: {error}"
                    break
            bar.set_postfix(heatmaps=summary.heatmaps, failed=summary.failures)
    finally:
        bar.close()
        progress.close([job.overlay for jobs in mine.values() for job in jobs])

    if summary.stopped:
        outputs.write_atomic(summary.errors_file, outputs.errors_bytes(summary.errors))
    else:
        shards.write_shard(settings.OUTPUT_DIR, shard, rows, summary.errors)
        if shard.count == 1:
            shards.merge(settings.OUTPUT_DIR, 1)
    summary.masked_forwards = cam.masked_forwards
    summary.seconds = time.perf_counter() - started
    return summary
