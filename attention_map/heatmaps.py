"""The heatmaps of films: the model's part (CAM on the patch grid of a batch of films, in the main process) and each
film's CPU part (body mask, CRF, colour map, PNGs; `finish`, which may run in a worker process), with failures named
by the stage they happened in.

This module imports no torch, so worker processes that only run `finish` start fast and stay small.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import sys

from . import outputs
from .config import Settings
from .images import Film, ImageError
from .maps import CAMError, grid_to_image
from .plan import Job, Made, part_job
from .body_mask import body_mask
from .boxes import boxes_from_map, renormalize_in_boxes
from .postprocess import CRFParams, apply_mask, crf_refine
from .render import draw_boxes, label_boxes, overlay, raw_map_16bit
from .timing import StageTimes


def explain(model, cam, films: list[Film], jobs: list[list[Job]], fallback=None) -> list:
    """The maps on the patch grid of a batch of films: for each film (its jobs, one per map; maps; how each was made:
    method, target, score, warnings so far such as what the reader assumed, flat map, truncated prompt; a detector's
    detections), or a StageError("cam") where its maps could not be made. A job answered by several maps (one per
    detection) becomes one job per map (`plan.part_job`).

    One `explain_batch` for the whole batch, each film with its own targets (gradient methods: one forward, and one
    backward for the films' first targets, one for their second, ...; gScoreCAM: their masked images in full
    batches). Where `cam` cannot run (CAMError) the `fallback` method makes the maps,
    and their warning says so. Where the batch fails, each film is tried alone, so that a bad film costs only itself.
    """
    names = [list(dict.fromkeys(job.prompt.text for job in film_jobs)) for film_jobs in jobs]
    try:
        with _stage("cam"):
            pixels = model.prepare_batch([film.pixels for film in films])
            try:
                batch_maps, method, why = cam.explain_batch(pixels, names), cam.name, ""
            except CAMError as error:
                if fallback is None:
                    raise
                batch_maps, method = fallback.explain_batch(pixels, names), fallback.name
                why = f"made by FALLBACK_CAM={fallback.name}: {cam.name} could not run ({error})"
    except StageError as error:
        if len(films) == 1:
            return [error]
        return [result for film, film_jobs in zip(films, jobs)
                for result in explain(model, cam, [film], [film_jobs], fallback)]
    results = []
    for film, film_jobs, grid_maps in zip(films, jobs, batch_maps):
        height, width = film.pixels.shape
        # the film's detections, the same on each of its maps: in film pixels once
        detections = (tuple(tuple(d.in_pixels(width, height)) for d in grid_maps[0].detections)
                      if model.detects and grid_maps else None)
        made_jobs, cams, made = [], [], []
        for job in film_jobs:
            answers = [grid_map for grid_map in grid_maps if grid_map.asked == job.prompt.text]
            for part, grid_map in enumerate(answers, start=1):
                made_jobs.append(job if grid_map.file is None else part_job(job, part, len(answers), grid_map.file))
                cams.append(grid_map.cam)
                made.append(Made(method, grid_map.target, grid_map.score, "; ".join(
                    w for w in (film.warning, why, grid_map.warning, model.note(job.prompt.text)) if w),
                    detections=detections, answer=grid_map.answer, p_yes=grid_map.p_yes,
                    similarity=grid_map.similarity))
        results.append((made_jobs, cams, made))
    return results


def crf_params(settings: Settings) -> CRFParams:
    return CRFParams(settings.CRF_ITERATIONS, settings.CRF_TAU, settings.CRF_GAUSSIAN_SXY,
                     settings.CRF_GAUSSIAN_COMPAT, settings.CRF_BILATERAL_SXY, settings.CRF_BILATERAL_SRGB,
                     settings.CRF_BILATERAL_COMPAT)


def finish(settings: Settings, film, jobs: list[Job], grid_maps: list, made: list[Made]):
    """Body mask, CRF, colour map, boxes and PNGs of one film's maps.

    Returns ((job, Made with every warning and the boxes) per heatmap written, seconds per stage). Raises StageError
    naming the stage (post, write) that failed, with the heatmaps written before it. Arguments and results are plain
    data, so this runs as well in a worker process as in the caller's."""
    times, crf = StageTimes(), crf_params(settings)
    written = []
    try:
        with _stage("post"), times("body mask"):
            mask = body_mask(film, settings.body_mask) if settings.body_mask else None
        height, width = film.shape
        for job, grid_map, how in zip(jobs, grid_maps, made):
            notes, boxes, images = [how.warning], None, {}
            # a detection's own map is about its box; any other map of a detector about all of them
            detections = how.detections or ()
            boxes_about = detections[job.part - 1:job.part] if job.part else detections
            with _stage("post"):
                with times("render"):
                    heat = grid_to_image(grid_map, (width, height))
                    if settings.RENORMALIZE_IN_BOXES and how.detections is not None:
                        heat = renormalize_in_boxes(heat, boxes_about)
                if mask is not None:
                    with times("body mask"):
                        heat, mask_warning = apply_mask(heat, mask)
                    notes.append(mask_warning)
                if settings.crf and heat.max() > 0:
                    with times("crf"):
                        heat = crf_refine(film, heat, crf)
                if job.boxes_image:
                    with times("boxes"):
                        boxes = tuple((*box[:4], round(box[4], 4)) for box in boxes_from_map(
                            heat, settings.BOX_THRESHOLD, settings.BOX_MIN_AREA, settings.BOX_PADDING))
                        images[job.boxes_image] = draw_boxes(film, boxes)
                if job.heatmap:
                    with times("render"):
                        images[job.heatmap] = overlay(film, heat, settings.COLORMAP, settings.ALPHA)
                        if settings.DRAW_BOXES and boxes_about:
                            label_boxes(images[job.heatmap], [(*d[:4], f"{d[4]} {d[5]:.2f}") for d in boxes_about])
            with _stage("write"), times("png write"):
                if job.raw_map:
                    images[job.raw_map] = raw_map_16bit(heat)
                for name in job.files:     # the manifest's image last: its presence means done
                    outputs.write_png(settings.OUTPUT_DIR / name, images[name])
            written.append((job, dataclasses.replace(how, warning="; ".join(n for n in notes if n), boxes=boxes)))
    except StageError as error:
        error.written = written
        raise
    return written, times.ordered()


class StageError(Exception):
    """An item's failure and the stage it happened in (load, cam, post, write); picklable, so a worker process
    can raise it to the run."""

    def __init__(self, stage: str, reason: str):
        super().__init__(stage, reason)
        self.stage, self.reason = stage, reason
        self.written: list = []   # heatmaps of the film written before the failure

    def __str__(self) -> str:
        return self.reason

    @classmethod
    def of(cls, stage: str, error: BaseException) -> StageError:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        torch = sys.modules.get("torch")   # only a process that loaded torch can raise its out-of-memory error
        if torch is not None and isinstance(error, torch.cuda.OutOfMemoryError):
            reason = "CUDA out of memory at BATCH_SIZE=1"
        failure = cls(stage, reason)
        failure.__cause__ = error       # what `-v` shows below the film's ERROR line, with the error's own cause
        error.__suppress_context__ = False
        return failure


# A write refused for these would be refused for every film after it: the run stops rather than fail them all.
FILE_SYSTEM_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@contextlib.contextmanager
def _stage(name: str):
    """Turns the errors an item can raise into a StageError naming where it happened; a full or read-only file
    system stops the run instead (an OSError, exit status 1)."""
    try:
        yield
    except (ImageError, OSError, ValueError, RuntimeError) as error:
        if name == "write" and isinstance(error, OSError) and error.errno in FILE_SYSTEM_FULL:
            raise OSError(error.errno, f"{error.strerror}; the run stops here, what was finished is kept, and the same "
                                       f"command resumes it", error.filename) from error
        raise StageError.of(name, error) from error
