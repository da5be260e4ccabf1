"""The heatmaps of one film: the model's part (CAM on the patch grid) and the CPU's part (body mask, CRF,
colour map, PNGs), with failures named by the stage they happened in."""
from __future__ import annotations

import contextlib

import torch

from . import outputs
from .config import Settings
from .images import ImageError
from .maps import grid_to_image
from .plan import Job
from .postprocess import CRFParams, apply_mask, body_mask, crf_refine
from .render import overlay, raw_map_16bit
from .timing import StageTimes


def truncation_warning(model, prompt: str) -> str:
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
                warnings = [grid_map.warning, truncation_warning(self.model, job.prompt.text)]
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
