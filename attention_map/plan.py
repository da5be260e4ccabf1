"""Records -> the heatmaps to make: one Job per (record, prompt, frame), grouped by the film they are made of, and
their manifest rows."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import outputs
from .config import Settings
from .images import frame_count
from .records import Prompt, prompts_of, read_records


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
    """One heatmap to make: its place in the manifest, the prompt, the overlay's name under OUTPUT_DIR, and the frame
    it explains (of a multi-frame object; None for a single image, or until the loader has resolved first/middle)."""
    index: int
    prompt: Prompt
    overlay: str
    frame: int | None = None


def _frames(path: Path, dicom_frame: str) -> list[int | str]:
    """The frames to explain: under DICOM_FRAME=all every frame (its count read from the header), else the one the
    loader picks."""
    if dicom_frame != "all":
        return [dicom_frame]
    count = frame_count(path)
    return list(range(count)) if count > 1 else ["first"]


def plan_jobs(settings: Settings, errors: list) -> dict[Source, list[Job]]:
    """The heatmaps of the run grouped by film, films in first-seen order, at most STOP_AFTER files."""
    records, record_errors = read_records(settings.DATA_FILE)
    errors.extend((str(e.line), e.image_path, f"record:{e.field}", e.reason) for e in record_errors)
    groups: dict[Source, list[Job]] = {}
    frames_of: dict[Path, list[int | str]] = {}   # files in first-seen order, with the frames each gives
    taken: dict[str, int] = {}
    index = 0
    for record in records:
        try:
            relative = outputs.relative_image_path(record.image_path, settings.IMAGE_ROOT,
                                                   settings.ALLOW_OUTSIDE_IMAGE_ROOT)
        except ValueError as error:
            errors.append((str(record.line), record.image_path, "record:image_path", str(error)))
            continue
        path = Path(os.path.normpath(os.path.join(settings.IMAGE_ROOT, record.image_path)))
        if path not in frames_of:
            if settings.STOP_AFTER is not None and len(frames_of) >= settings.STOP_AFTER:
                continue
            frames_of[path] = _frames(path, settings.DICOM_FRAME)
        for prompt in prompts_of(record, settings.PROMPT_SOURCE):
            if not prompt.text.strip():
                errors.append((str(record.line), record.image_path, "record:question", "empty prompt"))
                continue
            for frame in frames_of[path]:
                number = frame if isinstance(frame, int) else None
                name = outputs.overlay_name(relative, record.q_id, prompt.region, number)
                if name in taken:
                    errors.append((str(record.line), record.image_path, "record:q_id",
                                   f"output {name} is already made by the record on line {taken[name]}"))
                    break
                taken[name] = record.line
                groups.setdefault(Source(path, frame), []).append(Job(index, prompt, name, number))
                index += 1
    return groups


def manifest_row(job: Job, settings: Settings, raw_map: str, warning: str) -> outputs.ManifestRow:
    record = job.prompt.record
    return outputs.ManifestRow(
        image_path=job.overlay, question=record.question, answer=record.answer, source_image=record.image_path,
        prompt=job.prompt.text, region="" if job.prompt.region is None else str(job.prompt.region),
        cam_method=settings.CAM_VERSION, q_id=record.q_id, row_id=record.row_id, choices=record.choices,
        raw_map=raw_map, warning=warning, frame="" if job.frame is None else str(job.frame))
