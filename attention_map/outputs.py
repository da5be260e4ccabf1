"""Where outputs go and how they are written: names mirroring the input tree, atomic PNG writes, the manifest."""
from __future__ import annotations

import csv
import os
import re
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

MANIFEST = "vqa_manifest.csv"
ERRORS = "errors.csv"
RUN_CONFIG = "run_config.conf"


@dataclass(frozen=True)
class ManifestRow:
    """One heatmap. The first three columns are what the VQA-generation stage reads."""
    image_path: str      # overlay, relative to OUTPUT_DIR
    question: str
    answer: str
    source_image: str    # the film, as the record names it
    prompt: str
    region: str          # region index for PROMPT_SOURCE=regions|both, else empty
    cam_method: str
    q_id: str
    row_id: str
    choices: str
    raw_map: str         # 16-bit map relative to OUTPUT_DIR, when SAVE_RAW_CAM=true
    warning: str


MANIFEST_COLUMNS = [f.name for f in fields(ManifestRow)]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text) or "_"


def relative_image_path(image_path: str, image_root: Path) -> PurePosixPath:
    """The record's image path relative to IMAGE_ROOT; ValueError if it points outside IMAGE_ROOT."""
    root = image_root.resolve()
    full = (root / image_path).resolve()
    try:
        return PurePosixPath(full.relative_to(root).as_posix())
    except ValueError:
        raise ValueError(f"{image_path} is outside IMAGE_ROOT {image_root}") from None


def overlay_name(relative: PurePosixPath, q_id: str, region: int | None) -> str:
    """`<path without extension>_idx<q_id>[_r<j>].png`, relative to OUTPUT_DIR."""
    parts = [_safe(p) for p in relative.parent.parts if p not in ("", ".")]
    stem = f"{_safe(relative.stem)}_idx{_safe(q_id)}" + ("" if region is None else f"_r{region}")
    return str(PurePosixPath(*parts, stem + ".png")) if parts else stem + ".png"


def raw_map_name(overlay: str) -> str:
    return overlay[: -len(".png")] + "_cam.png"


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_png(path: Path, image: np.ndarray) -> None:
    """uint8 RGB (H, W, 3) or grey uint8/uint16 (H, W) as PNG."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    write_atomic(path, encoded.tobytes())


def _csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    import io

    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def write_manifest(path: Path, rows: list[ManifestRow]) -> None:
    write_atomic(path, _csv_bytes(MANIFEST_COLUMNS, [[getattr(r, c) for c in MANIFEST_COLUMNS] for r in rows]))


def write_errors(path: Path, errors: list[tuple[str, str, str, str]]) -> None:
    """errors.csv: row (line in DATA_FILE), image_path, stage, reason."""
    write_atomic(path, _csv_bytes(["row", "image_path", "stage", "reason"], [list(e) for e in errors]))
