"""Synthetic chest-like films for the bundled demo and the README picture: deterministic by seed.

A body with two dark lung fields, a spine, a heart shadow, ribs, a burned-in side letter and "PORTABLE" label in
the corners, and one round lesion at a known place named in the record's question.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from .outputs import write_png

LESION_PLACES = {"left upper lung": (0.68, 0.35), "left lower lung": (0.68, 0.6),
                 "right upper lung": (0.32, 0.35), "right lower lung": (0.32, 0.6)}


def make_film(seed: int, size: int = 384) -> tuple[np.ndarray, str]:
    """A (size, size) float32 film in [0, 1] and the place of its lesion (patient's left is the image's right)."""
    rng = np.random.default_rng(seed)
    film = np.zeros((size, size), np.float32)
    s = size
    cv2.ellipse(film, (s // 2, int(0.62 * s)), (int(0.42 * s), int(0.55 * s)), 0, 0, 360, 0.55, -1)   # body
    for cx in (0.32, 0.68):                                                                              # lungs
        cv2.ellipse(film, (int(cx * s), int(0.47 * s)), (int(0.13 * s), int(0.27 * s)), 0, 0, 360, 0.2, -1)
    for y in np.linspace(0.25, 0.7, 7):                                                                   # ribs
        for side in (-1, 1):
            cv2.ellipse(film, (s // 2, int(y * s)), (int(0.3 * s), int(0.05 * s)), 0, 90 - side * 90 + 10 * side,
                        90 - side * 90 + 70 * side, 0.45, max(1, s // 96))
    cv2.ellipse(film, (int(0.55 * s), int(0.6 * s)), (int(0.12 * s), int(0.1 * s)), 0, 0, 360, 0.6, -1)   # heart
    cv2.rectangle(film, (int(0.47 * s), int(0.1 * s)), (int(0.53 * s), s), 0.75, -1)                    # spine
    place = list(LESION_PLACES)[seed % len(LESION_PLACES)]
    lx, ly = LESION_PLACES[place]
    jitter = rng.normal(0, 0.02, 2)
    cv2.circle(film, (int((lx + jitter[0]) * s), int((ly + jitter[1]) * s)), int(0.05 * s), 0.7, -1)     # lesion
    film = cv2.GaussianBlur(film, (0, 0), s / 128) + rng.normal(0, 0.02, film.shape).astype(np.float32)
    letters = np.zeros((s, s), np.uint8)   # OpenCV draws text on 8-bit images only
    cv2.putText(letters, "L", (int(0.9 * s), int(0.08 * s)), cv2.FONT_HERSHEY_SIMPLEX, s / 256, 255, max(1, s // 128))
    cv2.putText(letters, "PORTABLE", (int(0.02 * s), int(0.06 * s)), cv2.FONT_HERSHEY_SIMPLEX, s / 640, 255,
                max(1, s // 256))
    return np.clip(np.maximum(film, letters / 255.0), 0, 1).astype(np.float32), place


def write_demo_data(folder: Path, count: int = 4, size: int = 384) -> Path:
    """`count` films under folder/films and folder/records.jsonl (GEMeX fields); returns the records file."""
    folder = Path(folder)
    lines = []
    for seed in range(count):
        film, place = make_film(seed, size)
        name = f"films/synthetic_{seed:03d}.png"
        write_png(folder / name, np.round(film * 255).astype(np.uint8))
        lines.append(json.dumps({"question": f"Is there a nodule in the {place}?", "answer": "Yes.",
                                 "type": "location", "visual_regions": [place, "heart"],
                                 "image_path": name, "q_id": 0, "row_id": f"row_{seed}"}))
    records = folder / "records.jsonl"
    records.write_text("\n".join(lines) + "\n")
    return records
