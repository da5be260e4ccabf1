"""Records -> the heatmaps to make: one Job per (record, prompt, frame), grouped by the film they are made of, and
their manifest rows."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from . import outputs
from .config import Settings, model_kind
from .images import frame_count, is_video
from .records import (CLASSIFIER_CSV_COLUMNS, REQUIRED_CSV_COLUMNS, Prompt, is_yes_no, prompts_of, read_records,
                      targets_of)


@dataclass(frozen=True)
class Source:
    """One film to decode: the file, and which of its frames (an index, or DICOM_FRAME's first or middle, which
    the loader resolves; single images ignore it)."""
    path: Path
    frame: int | str = "first"

    def __str__(self) -> str:
        return str(self.path) + (f" (frame {self.frame})" if isinstance(self.frame, int) else "")


@dataclass(frozen=True)
class Job:
    """One heatmap to make: its place in the manifest, the prompt, the frame it explains (of a multi-frame object;
    None for a single image, or until the loader has resolved first/middle), and the files it writes under OUTPUT_DIR:
    `overlay`, the image the manifest names (the heatmap overlay, or under OUTPUT_KIND=boxes the boxes drawn on the
    film), and where set the heatmap overlay, the boxes image and the 16-bit raw map."""
    index: int
    prompt: Prompt
    overlay: str
    frame: int | None = None
    heatmap: str = ""
    boxes_image: str = ""
    raw_map: str = ""
    part: int = 0        # of the maps one planned job made (a detector's detections), 1, 2, ...; 0: the job itself
    parts: int = 0       # how many maps the planned job made, for a part
    parent: str = ""     # the planned job's overlay, for a part

    @property
    def order(self) -> tuple[int, int]:
        """The manifest's order: the planned job's place, then the part's."""
        return self.index, self.part

    @property
    def files(self) -> list[str]:
        """Every file the job writes, the manifest's image last (its presence means the rest are there)."""
        others = [name for name in (self.raw_map, self.heatmap, self.boxes_image) if name and name != self.overlay]
        return others + [self.overlay]


def make_job(index: int, prompt: Prompt, name: str, frame: int | None, settings: Settings) -> Job:
    """The job whose heatmap overlay would be `name`, with the files OUTPUT_KIND and SAVE_RAW_CAM ask for."""
    boxes = outputs.boxes_image_name(name) if settings.makes_boxes else ""
    return Job(index, prompt, boxes if settings.OUTPUT_KIND == "boxes" else name, frame,
               heatmap="" if settings.OUTPUT_KIND == "boxes" else name, boxes_image=boxes,
               raw_map=outputs.raw_map_name(name) if settings.SAVE_RAW_CAM else "")


PART_MARK = "_det"   # the segment of a planned `box` job's names that each detection's own names replace


def part_job(job: Job, part: int, parts: int, suffix: str) -> Job:
    """The job of one of the several maps a planned job makes (a detection's): its files named as the planned job's
    with the `_det` segment replaced by `_<suffix>` (`x_det.png` -> `x_det0_nodule.png`)."""
    def rename(name: str) -> str:
        folder, slash, base = name.rpartition("/")
        head, mark, tail = base.rpartition(PART_MARK)
        return folder + slash + head + "_" + outputs.safe_name(suffix) + tail if mark else name
    return dataclasses.replace(job, overlay=rename(job.overlay), heatmap=rename(job.heatmap),
                               boxes_image=rename(job.boxes_image), raw_map=rename(job.raw_map), part=part,
                               parts=parts, parent=job.overlay)


def _film_path(settings: Settings, record) -> Path:
    """The file a record's image_path names, under IMAGE_ROOT."""
    return Path(os.path.normpath(os.path.join(settings.IMAGE_ROOT, record.image_path)))


def _frames(path: Path, settings: Settings) -> list[int | str]:
    """The frames to explain: of a video clip, and of a DICOM under DICOM_FRAME=all, every FRAME_STRIDE-th frame up
    to MAX_FRAMES (the count read from the header); else the one the loader picks. A clip without frames is left to
    the loader, which says so."""
    clip = is_video(path)
    if not clip and settings.DICOM_FRAME != "all":
        return [settings.DICOM_FRAME]
    count = frame_count(path)
    if count > 1 or (clip and count == 1):
        return list(range(0, count, settings.FRAME_STRIDE))[:settings.MAX_FRAMES]
    return ["first"]


def plan_jobs(settings: Settings, errors: list) -> dict[Source, list[Job]]:
    """The heatmaps of the run grouped by film, films in first-seen order, at most STOP_AFTER files. A CLIP-like
    model gets one per prompt (PROMPT_SOURCE), a classifier one per target (the record's, TARGETS or TARGET_NAMES)."""
    kind = model_kind(settings.MODEL)
    classifier = kind in ("classifier", "detector")   # maps of a film told apart by their target, not a question
    key = "target" if classifier else "q_id"
    records, record_errors = read_records(settings.DATA_FILE,
                                          CLASSIFIER_CSV_COLUMNS if classifier else REQUIRED_CSV_COLUMNS)
    errors.extend((str(e.line), e.image_path, f"record:{e.field}", e.reason) for e in record_errors)
    groups: dict[Source, list[Job]] = {}
    frames_of: dict[Path, list[int | str]] = {}   # files in first-seen order, with the frames each gives
    taken: dict[str, int] = {}
    # the films the records read: where OUTPUT_DIR is IMAGE_ROOT or holds it, an output must not replace one
    films = {os.path.abspath(_film_path(settings, record)) for record in records}
    index = 0
    for record in records:
        try:
            relative = outputs.relative_image_path(record.image_path, settings.IMAGE_ROOT,
                                                   settings.ALLOW_OUTSIDE_IMAGE_ROOT)
        except ValueError as error:
            errors.append((str(record.line), record.image_path, "record:image_path", str(error)))
            continue
        path = _film_path(settings, record)
        if path not in frames_of:
            if settings.STOP_AFTER is not None and len(frames_of) >= settings.STOP_AFTER:
                continue
            frames_of[path] = _frames(path, settings)
        asks = ([Prompt(record, settings.DETECTION_TARGET)] if kind == "detector"
                else targets_of(record, settings.TARGETS, settings.TARGET_NAMES) if classifier
                else prompts_of(record, settings.PROMPT_SOURCE))
        for prompt in asks:
            if not classifier and not prompt.text.strip():
                errors.append((str(record.line), record.image_path, "record:question", "empty prompt"))
                continue
            for frame in frames_of[path]:
                number = frame if isinstance(frame, int) else None
                named = PART_MARK[1:] if prompt.text == "box" and kind == "detector" else prompt.text
                name = (outputs.target_overlay_name(relative, named, number) if classifier
                        else outputs.overlay_name(relative, record.q_id, prompt.region, number))
                if name in taken:
                    errors.append((str(record.line), record.image_path, f"record:{key}",
                                   f"output {name} is already made by the record on line {taken[name]}"))
                    break
                job = make_job(index, prompt, name, number, settings)
                film = next((file for file in (job.heatmap, job.boxes_image, job.raw_map)
                             if file and os.path.abspath(settings.OUTPUT_DIR / file) in films), None)
                if film:
                    errors.append((str(record.line), record.image_path, f"record:{key}",
                                   f"output {film} would replace a film that the records read: choose an OUTPUT_DIR "
                                   f"apart from IMAGE_ROOT"))
                    break
                taken[name] = record.line
                groups.setdefault(Source(path, frame), []).append(job)
                index += 1
    return groups


@dataclass(frozen=True)
class Made:
    """How a heatmap was made, for its manifest row: the method (FALLBACK_CAM's where it stood in), what the map
    explains and the model's score for it, the warnings, the boxes drawn from it (None where none are made) and the
    film's detections (None but for detectors); a generative VLM's answer, P(yes) and how alike the maps of the
    film's questions are (mean Spearman of this map with theirs)."""
    method: str
    target: str
    score: float
    warning: str = ""
    boxes: tuple | None = None
    detections: tuple | None = None   # a detector's, of the film: [x0, y0, x1, y1, class, score] in film pixels
    answer: str | None = None
    p_yes: float | None = None
    similarity: float | None = None


def manifest_row(job: Job, made: Made) -> outputs.ManifestRow:
    record = job.prompt.record
    return outputs.ManifestRow(
        image_path=job.overlay, question=record.question, answer=record.answer, source_image=record.image_path,
        prompt=job.prompt.text, region="" if job.prompt.region is None else str(job.prompt.region),
        cam_method=made.method, q_id=record.q_id, row_id=record.row_id, choices=record.choices,
        raw_map=job.raw_map, warning=made.warning, frame="" if job.frame is None else str(job.frame),
        target=made.target, score=_number(made.score), boxes=outputs.boxes_text(made.boxes),
        detections=outputs.boxes_text(made.detections), model_answer=made.answer or "",
        p_yes=_number(made.p_yes) if is_yes_no(record) else "", prompt_similarity=_number(made.similarity))


def _number(value: float | None) -> str:
    """A manifest number: empty where there is none."""
    return "" if value is None or value != value else f"{value:.6g}"
