"""Overlay clips: the per-frame overlays of a video or multi-frame object, joined into one clip per (object, prompt)
once the run is complete. MP4 (MPEG-4 Part 2, the encoder OpenCV's FFmpeg always has), or an animated GIF where no
MP4 encoder opens."""
from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
from PIL import Image

from . import outputs
from .images import frame_rate

log = logging.getLogger(__name__)


def clip_name(image_path: str, frame: str) -> str:
    """The clip of a frame's image: `<name>_idx<q_id>_f<frame>.png` -> `<name>_idx<q_id>.mp4` (the boxes images'
    `..._f<frame>_boxes.png` -> `..._boxes.mp4`)."""
    path = PurePosixPath(image_path)
    head, _, tail = path.stem.rpartition(f"_f{frame}")
    return str(path.with_name(head + tail + ".mp4"))


def write_clip(path: Path, frames: list[np.ndarray], fps: float) -> Path:
    """`frames` (H, W, 3) uint8 RGB as an MP4 at `path`, or as a GIF beside it where no MP4 encoder opens; written
    whole or not at all, as every output. Returns the path written."""
    height, width = frames[0].shape[:2]
    with tempfile.TemporaryDirectory() as folder:
        encoded = Path(folder) / "clip.mp4"      # the encoder picks the container by the name
        writer = cv2.VideoWriter(str(encoded), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        opened = writer.isOpened()
        for frame in frames if opened else []:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))
        writer.release()
        if opened:
            outputs.write_atomic(path, encoded.read_bytes())
            return path
    gif, buffer = path.with_suffix(".gif"), io.BytesIO()
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    outputs.write_atomic(gif, buffer.getvalue())
    return gif


def write_clips(output_dir: Path, rows: list[dict[str, str]], image_root: Path | None) -> list[Path]:
    """One overlay clip per (object, prompt) with maps of two or more frames, frames in order, at the object's own
    frame rate divided by the frame stride (10 frames/s where the object does not say)."""
    groups: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        if row.get("frame"):
            groups.setdefault(clip_name(row["image_path"], row["frame"]), []).append(row)
    written, rates = [], {}      # rates: frames per second of each source, read once for all its prompts
    for name, members in groups.items():
        if len(members) < 2:
            continue
        members.sort(key=lambda row: int(row["frame"]))
        frames = [cv2.imread(str(output_dir / row["image_path"]), cv2.IMREAD_COLOR) for row in members]
        if any(frame is None for frame in frames) or len({frame.shape for frame in frames}) != 1:
            log.warning("%s: not made, a frame's overlay is missing or of another size", name)
            continue
        stride = int(members[1]["frame"]) - int(members[0]["frame"])
        source = members[0]["source_image"]
        if source not in rates:
            rates[source] = frame_rate(image_root / source) if image_root else 10.0
        rate = rates[source]
        written.append(write_clip(output_dir / name, [frame[..., ::-1] for frame in frames], rate / max(stride, 1)))
    return written
