"""The run: records -> films -> model -> CAM -> body mask / CRF -> overlays -> manifest."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import outputs
from .cams import CAM_METHODS
from .config import Settings
from .images import ImageError, load_film
from .maps import grid_to_image
from .models import ModelLoadError, load_model
from .postprocess import CRFParams, apply_mask, body_mask, crf_refine
from .records import Prompt, prompts_of, read_records
from .render import overlay, raw_map_16bit

log = logging.getLogger(__name__)

EXIT_ITEMS_FAILED = 3  # the run finished, but some records or images failed (see errors.csv)


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
    warnings: int = 0
    masked_forwards: int = 0
    seconds: float = 0.0
    output_dir: Path = Path(".")
    errors: list[tuple[str, str, str, str]] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return len(self.errors)

    def text(self) -> str:
        rate = self.heatmaps / self.seconds if self.seconds > 0 else 0.0
        per_heatmap = f" ({self.masked_forwards / self.heatmaps:.0f} per heatmap)" if self.heatmaps else ""
        failed = (f"{self.failures} failed (see {self.output_dir / outputs.ERRORS})" if self.failures
                  else "0 failed")
        return (f"Done: {self.images} images, {self.heatmaps} heatmaps written, {failed}, "
                f"{self.warnings} with warnings, in {self.seconds:.1f} s ({rate:.2f} heatmaps/s; "
                f"{self.masked_forwards} masked forwards{per_heatmap}). "
                f"Overlays and {outputs.MANIFEST} are in {self.output_dir}.")


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
            relative = outputs.relative_image_path(record.image_path, settings.IMAGE_ROOT)
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


def run(settings: Settings) -> Summary:
    started = time.perf_counter()
    device = resolve_device(settings.DEVICE)
    summary = Summary(output_dir=settings.OUTPUT_DIR)
    groups = plan_jobs(settings, summary.errors)
    total = sum(len(jobs) for jobs in groups.values())
    log.info("%d heatmaps on %d images planned from %s", total, len(groups), settings.DATA_FILE)
    model = load_model(settings.MODEL, device)
    cam = CAM_METHODS[settings.CAM_METHOD](model, settings.TARGET_LAYER, settings.BATCH_SIZE,
                                           resolve_autocast(settings.PRECISION, device), topk=settings.TOPK)
    log.info("model %s on %s, %s at %s", settings.MODEL, device, cam.name, cam.target_layer)
    settings.OUTPUT_DIR.mkdir(parents=True, exist_ok=True)   # only now: a run that cannot start writes nothing
    outputs.write_atomic(settings.OUTPUT_DIR / outputs.RUN_CONFIG, settings.to_conf().encode())
    crf = CRFParams(settings.CRF_ITERATIONS, settings.CRF_TAU, settings.CRF_GAUSSIAN_SXY,
                    settings.CRF_GAUSSIAN_COMPAT, settings.CRF_BILATERAL_SXY, settings.CRF_BILATERAL_SRGB,
                    settings.CRF_BILATERAL_COMPAT)

    rows: dict[int, outputs.ManifestRow] = {}
    progress = tqdm(groups.items(), total=len(groups), unit="img", desc="heatmaps", dynamic_ncols=True)
    for image_path, jobs in progress:
        stage = "load"
        try:
            film = load_film(settings.IMAGE_ROOT / image_path)
            stage = "cam"
            before = cam.masked_forwards
            grid_maps = cam.explain(model.prepare(film), [job.prompt.text for job in jobs])
            log.debug("%s: %d prompts, %d masked forwards", image_path, len(jobs), cam.masked_forwards - before)
            stage = "post"
            mask = body_mask(film) if settings.ENABLE_BODY_MASK else None
            height, width = film.shape
            for job, grid_map in zip(jobs, grid_maps):
                heat = grid_to_image(grid_map.cam, (width, height))
                warning = grid_map.warning
                if mask is not None:
                    heat, mask_warning = apply_mask(heat, mask)
                    warning = warning or mask_warning
                if not settings.SKIP_CRF and heat.max() > 0:
                    heat = crf_refine(film, heat, crf)
                outputs.write_png(settings.OUTPUT_DIR / job.overlay,
                                  overlay(film, heat, settings.COLORMAP, settings.ALPHA))
                raw_name = ""
                if settings.SAVE_RAW_CAM:
                    raw_name = outputs.raw_map_name(job.overlay)
                    outputs.write_png(settings.OUTPUT_DIR / raw_name, raw_map_16bit(heat))
                if warning:
                    summary.warnings += 1
                    log.warning("%s (%s): %s", job.overlay, job.prompt.text, warning)
                rows[job.index] = _manifest_row(job, settings, raw_name, warning)
                summary.heatmaps += 1
            summary.images += 1
        except (ImageError, OSError, ValueError, RuntimeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            if isinstance(error, torch.cuda.OutOfMemoryError):
                raise
            for job in jobs:
                if job.index not in rows:
                    summary.errors.append((str(job.prompt.record.line), job.prompt.record.image_path, stage, reason))
            log.error("%s: %s failed: %s", image_path, stage, reason)
        progress.set_postfix(heatmaps=summary.heatmaps, failed=summary.failures)
    progress.close()

    outputs.write_manifest(settings.OUTPUT_DIR / outputs.MANIFEST, [rows[i] for i in sorted(rows)])
    errors_file = settings.OUTPUT_DIR / outputs.ERRORS
    if summary.errors:
        outputs.write_errors(errors_file, summary.errors)
    else:
        errors_file.unlink(missing_ok=True)
    summary.masked_forwards = cam.masked_forwards
    summary.seconds = time.perf_counter() - started
    return summary
