"""Records -> the heatmaps to make: one Job per (record, prompt), grouped by film, and their manifest rows."""
from __future__ import annotations

from dataclasses import dataclass

from . import outputs
from .config import Settings
from .records import Prompt, prompts_of, read_records


@dataclass(frozen=True)
class Job:
    """One heatmap to make: its place in the manifest, the prompt, and the overlay's name under OUTPUT_DIR."""
    index: int
    prompt: Prompt
    overlay: str


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


def manifest_row(job: Job, settings: Settings, raw_map: str, warning: str) -> outputs.ManifestRow:
    record = job.prompt.record
    return outputs.ManifestRow(
        image_path=job.overlay, question=record.question, answer=record.answer, source_image=record.image_path,
        prompt=job.prompt.text, region="" if job.prompt.region is None else str(job.prompt.region),
        cam_method=settings.CAM_METHOD, q_id=record.q_id, row_id=record.row_id, choices=record.choices,
        raw_map=raw_map, warning=warning)
