"""Where outputs go and how they are written: names mirroring the input tree, atomic PNG writes, the manifest."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

import numpy as np

MANIFEST = "vqa_manifest.csv"
ERRORS = "errors.csv"
RUN_CONFIG = "run_config.conf"
BOXES = "boxes.jsonl"
DETECTIONS = "detections.jsonl"


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
    frame: str = ""      # the frame explained, of a multi-frame DICOM (0-based); empty for a single image
    target: str = ""     # what the map explains: the prompt, or the classifier output's name or index
    score: str = ""      # the model's score for the target on the film (CLIP: logit_scale * cosine; else the output)
    boxes: str = ""      # where boxes are made: JSON [[x0, y0, x1, y1, score], ...] in film pixels, best first
    detections: str = ""  # a detector's detections on the film: JSON [[x0, y0, x1, y1, class, score], ...]
    model_answer: str = ""    # a generative VLM's greedy answer to the question
    p_yes: str = ""           # its P(yes) / (P(yes) + P(no)) at the first answer token, for a yes/no question
    prompt_similarity: str = ""   # mean Spearman correlation of the map with the film's other questions' maps


MANIFEST_COLUMNS = [f.name for f in fields(ManifestRow)]


def safe_name(text: str) -> str:
    """A path component made of letters, digits, '.', '_' and '-' only, and never '.' or '..'."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text)
    return "_" if text.strip(".") == "" else text


def relative_image_path(image_path: str, image_root: Path, allow_outside: bool = False) -> PurePosixPath:
    """The record's image path relative to IMAGE_ROOT, which is also where its overlays go under OUTPUT_DIR.

    Paths are compared as written (symbolic links inside IMAGE_ROOT are fine). A path that leaves IMAGE_ROOT
    (absolute elsewhere, or through '..') raises ValueError, unless `allow_outside`: then it is placed under
    `outside/` followed by its absolute path.
    """
    root = Path(os.path.normpath(os.path.abspath(image_root)))
    full = Path(os.path.normpath(os.path.join(root, image_path)))
    try:
        return PurePosixPath(full.relative_to(root).as_posix())
    except ValueError:
        if not allow_outside:
            raise ValueError(f"{image_path} is outside IMAGE_ROOT {image_root} "
                             f"(set ALLOW_OUTSIDE_IMAGE_ROOT=true to allow it)") from None
        return PurePosixPath("outside", *full.parts[1:])


def overlay_name(relative: PurePosixPath, q_id: str, region: int | None, frame: int | None = None) -> str:
    """`<path without extension>_idx<q_id>[_r<j>][_f<frame>].png`, relative to OUTPUT_DIR; no part can be '..' or
    absolute. The frame is named only where every frame of a multi-frame object gets its own map."""
    return _beside(relative, f"_idx{safe_name(q_id)}" + ("" if region is None else f"_r{region}")
                   + ("" if frame is None else f"_f{frame}"))


def target_overlay_name(relative: PurePosixPath, target: str, frame: int | None = None) -> str:
    """A classifier's map: `<path without extension>_<target>[_f<frame>].png` ('predicted' for the predicted class)."""
    return _beside(relative, f"_{safe_name(target or 'predicted')}" + ("" if frame is None else f"_f{frame}"))


def _beside(relative: PurePosixPath, suffix: str) -> str:
    """The film's relative path without its extension, plus `suffix` and .png, every part made safe."""
    parts = [safe_name(p) for p in relative.parent.parts if p not in ("", ".", "/")]
    stem = safe_name(relative.stem) + suffix + ".png"
    return str(PurePosixPath(*parts, stem)) if parts else stem


def raw_map_name(overlay: str) -> str:
    return overlay[: -len(".png")] + "_cam.png"


def boxes_image_name(overlay: str) -> str:
    return overlay[: -len(".png")] + "_boxes.png"


def boxes_text(boxes) -> str:
    """The manifest's `boxes` cell: JSON of the boxes, or empty where none were made (None)."""
    return "" if boxes is None else json.dumps([list(box) for box in boxes], separators=(",", ":"))


TEMPORARY_SUFFIX = ".am-tmp"
# a run's file gone or damaged after the run: the run's own command remakes it
REMAKE = "the same `attention-map run` again (RESUME=true) remakes the run's missing or damaged files"

# The process's umask, read once at import (reading it means setting it, which is not safe once threads run).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~_UMASK)    # mkstemp makes 0600; outputs get the modes any new file gets
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):      # a full disk, a folder in the output's place: name the output
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise


def write_png(path: Path, image: np.ndarray) -> None:
    """uint8 RGB (H, W, 3) or grey uint8/uint16 (H, W) as PNG."""
    write_atomic(path, encode_png(image))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_png(image: np.ndarray) -> bytes:
    """The PNG of uint8 RGB (H, W, 3) or grey uint8/uint16 (H, W): every row with the Sub filter, deflated by ISA-L
    at level 1. Against OpenCV's libpng writer at 1024 x 1024 this takes a third of the time and gives smaller files
    (benchmarks/bench_finish.py); the same image gives the same bytes."""
    from isal import isal_zlib

    channels = 1 if image.ndim == 2 else image.shape[2]
    if image.dtype not in (np.uint8, np.uint16) or channels not in (1, 3) or (channels == 3 and image.dtype != np.uint8):
        raise ValueError(f"cannot write a {image.dtype} image of shape {image.shape} as PNG")
    height, width = image.shape[:2]
    step = channels * image.itemsize                      # bytes per pixel: how far back the Sub filter looks
    rows = np.ascontiguousarray(image, image.dtype.newbyteorder(">")).view(np.uint8).reshape(height, width * step)
    filtered = np.empty((height, 1 + width * step), np.uint8)
    filtered[:, 0] = 1                                    # filter type: Sub (each byte minus the one a pixel back)
    filtered[:, 1:1 + step] = rows[:, :step]
    np.subtract(rows[:, step:], rows[:, :-step], out=filtered[:, 1 + step:])   # modulo 256, as PNG defines it
    header = struct.pack(">IIBBBBB", width, height, 8 * image.itemsize, 0 if channels == 1 else 2, 0, 0, 0)
    return (_PNG_SIGNATURE + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", isal_zlib.compress(filtered.tobytes(), 1)) + _png_chunk(b"IEND", b""))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def remove_temporaries(folder: Path) -> int:
    """Delete the temporary files that killed runs left under `folder`; return how many there were."""
    count = 0
    for stale in folder.rglob(f".*{TEMPORARY_SUFFIX}"):
        stale.unlink(missing_ok=True)
        count += 1
    return count


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def png_is_complete(path: Path) -> bool:
    """Whether `path` is a PNG that ends with its IEND chunk (a truncated or missing file is not)."""
    try:
        with open(path, "rb") as handle:
            if handle.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            handle.seek(-len(_PNG_END), os.SEEK_END)
            return handle.read() == _PNG_END
    except OSError:
        return False


ERROR_COLUMNS = ["row", "image_path", "stage", "reason"]


def csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def boxes_line(row: dict[str, str]) -> bytes:
    """The boxes.jsonl line of a manifest row: the film as its record names it (boxes are in its pixels), the frame
    where it has several, q_id, prompt, the image the manifest names, and the boxes."""
    line = dict(image_path=row["source_image"], q_id=row["q_id"], prompt=row["prompt"])
    if row.get("frame"):
        line["frame"] = int(row["frame"])
    line |= dict(overlay=row["image_path"], boxes=json.loads(row["boxes"]))
    return (json.dumps(line, ensure_ascii=False) + "\n").encode()


def detections_lines(rows: list[dict[str, str]]) -> bytes:
    """detections.jsonl: one line per film (and frame) that a detector read, in manifest order: the film as its
    record names it, the frame where it has several, and its detections in film pixels, best first."""
    lines, seen = [], set()
    for row in rows:
        key = (row["source_image"], row.get("frame", ""))
        if row.get("detections") and key not in seen:
            seen.add(key)
            line = dict(image_path=row["source_image"])
            if row.get("frame"):
                line["frame"] = int(row["frame"])
            line["detections"] = [dict(box=d[:4], label=d[4], score=d[5]) for d in json.loads(row["detections"])]
            lines.append((json.dumps(line, ensure_ascii=False) + "\n").encode())
    return b"".join(lines)


class DamagedFileError(ValueError):
    """A CSV that a run wrote is cut short or damaged (a copy cut off, an edit); the message names the file and row."""


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV that a run wrote, as dicts. DamagedFileError where a row has another number of fields than
    the header (a row cut short would otherwise pass on as a row of empty fields) or the file is not UTF-8."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            for row in reader:
                if row and len(row) != len(header):
                    raise DamagedFileError(f"{path}:{reader.line_num}: {len(row)} fields where the header has "
                                           f"{len(header)}: the file is cut short or damaged")
                if row:
                    rows.append(dict(zip(header, row)))
    except UnicodeDecodeError as error:
        raise DamagedFileError(f"{path}: not UTF-8 (byte {error.start}): the file is damaged") from None
    except csv.Error as error:
        raise DamagedFileError(f"{path}: {error}: the file is damaged") from None
    return rows


def read_manifest(output_dir: Path, purpose: str) -> list[dict[str, str]]:
    """The rows of OUTPUT_DIR/vqa_manifest.csv; FileNotFoundError saying to `purpose` a finished run if absent."""
    manifest = Path(output_dir) / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: {purpose} a finished run (after `merge` for an array)")
    try:
        return read_csv(manifest)
    except DamagedFileError as error:
        raise DamagedFileError(f"{error}; `attention-map merge {output_dir}` writes it again from the run's shards") \
            from None


def errors_bytes(errors: list[tuple[str, str, str, str]]) -> bytes:
    """errors.csv: row (line in DATA_FILE), image_path, stage, one-line reason."""
    return csv_bytes(ERROR_COLUMNS, [list(e) for e in errors])
