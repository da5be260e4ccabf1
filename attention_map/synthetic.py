"""Synthetic chest-like films with lesions at known places, and captions that name them: deterministic by seed.

A body with two dark lung fields, a spine, a heart shadow, ribs, a burned-in side letter and "PORTABLE" label in the
corners, and lesions of three kinds: a nodule (small, round, sharp), an opacity (larger, soft) and a pleural
effusion (fluid filling a lung's base under a meniscus). Each lesion has a side, a zone and a box in pixels, and a
caption such as "nodule in the left upper lung". Sides are the patient's: the patient's left is the image's right.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .outputs import write_png

KINDS = ("nodule", "opacity", "effusion")
SIDES = ("right", "left")             # the patient's: right is the image's left half
ZONES = ("upper", "lower")
LUNG_X = {"right": 0.32, "left": 0.68}   # lung centres, as fractions of the width
ZONE_Y = {"upper": 0.35, "lower": 0.58}  # lesion centres, as fractions of the height
LUNG_Y, LUNG_HALF_WIDTH, LUNG_HALF_HEIGHT = 0.47, 0.13, 0.27   # lung ellipses, as fractions of the size
RADIUS = {"nodule": 0.065, "opacity": 0.1}   # lesion radii, as fractions of the size


@dataclass(frozen=True)
class Lesion:
    kind: str
    side: str
    zone: str
    box: tuple[int, int, int, int]   # x, y, width, height in pixels of the film

    @property
    def caption(self) -> str:
        if self.kind == "effusion":
            return f"effusion at the {self.side} lung base"
        return f"{self.kind} in the {self.side} {self.zone} lung"

    @property
    def question(self) -> str:
        return question(self.caption)

    @property
    def place(self) -> str:
        return f"{self.side} {self.zone} lung"


def captions() -> list[str]:
    """Every caption the generator writes, in a fixed order (10: nodule and opacity in 4 places, effusion on 2 sides)."""
    return [Lesion(kind, side, zone, (0, 0, 0, 0)).caption for kind in KINDS for side in SIDES for zone in ZONES
            if kind != "effusion" or zone == "lower"]


def question(caption: str) -> str:
    """A caption as a VQA question: "Is there a nodule in the left upper lung?"."""
    return f"Is there {'an' if caption[0] in 'aeiou' else 'a'} {caption}?"


def _anatomy(size: int) -> np.ndarray:
    s, film = size, np.zeros((size, size), np.float32)
    cv2.ellipse(film, (s // 2, int(0.62 * s)), (int(0.42 * s), int(0.55 * s)), 0, 0, 360, 0.55, -1)   # body
    for side in SIDES:                                                                                  # lungs
        _draw_lung(film, side, 0.2)
    for y in np.linspace(0.25, 0.7, 7):                                                                 # ribs
        for sign in (-1, 1):
            cv2.ellipse(film, (s // 2, int(y * s)), (int(0.3 * s), int(0.05 * s)), 0, 90 - sign * 90 + 10 * sign,
                        90 - sign * 90 + 70 * sign, 0.45, max(1, s // 96))
    cv2.ellipse(film, (int(0.55 * s), int(0.6 * s)), (int(0.12 * s), int(0.1 * s)), 0, 0, 360, 0.6, -1)  # heart
    cv2.rectangle(film, (int(0.47 * s), int(0.1 * s)), (int(0.53 * s), s), 0.75, -1)                   # spine
    return film


def _draw_lung(image: np.ndarray, side: str, value: float) -> None:
    s = image.shape[0]
    cv2.ellipse(image, (int(LUNG_X[side] * s), int(LUNG_Y * s)), (int(LUNG_HALF_WIDTH * s), int(LUNG_HALF_HEIGHT * s)),
                0, 0, 360, value, -1)


def _draw_lesion(film: np.ndarray, kind: str, side: str, zone: str, rng: np.random.Generator) -> Lesion:
    s = film.shape[0]
    cx = LUNG_X[side] + rng.uniform(-0.03, 0.03)
    if kind == "effusion":
        top = LUNG_Y + LUNG_HALF_HEIGHT - rng.uniform(0.16, 0.2)      # the meniscus, above the lung's base
        fluid = np.zeros_like(film)
        _draw_lung(fluid, side, 1.0)
        fluid[: int(top * s)] = 0
        film[:] = np.where(fluid > 0, 0.62, film)
        ys, xs = np.nonzero(fluid)
        return Lesion(kind, side, "lower", (int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1))
    cy = ZONE_Y[zone] + rng.uniform(-0.03, 0.03)
    radius = RADIUS[kind] * s * rng.uniform(0.9, 1.1)
    spot = np.zeros_like(film)
    cv2.circle(spot, (int(cx * s), int(cy * s)), int(radius), 1.0, -1)
    if kind == "opacity":                                # soft edges, less dense
        spot = cv2.GaussianBlur(spot, (0, 0), radius / 3)
        film[:] = np.where(spot > 0.01, np.maximum(film, 0.2 + 0.45 * spot), film)
    else:
        film[:] = np.where(spot > 0, 0.75, film)
    r = int(round(radius))
    return Lesion(kind, side, zone, (int(cx * s) - r, int(cy * s) - r, 2 * r + 1, 2 * r + 1))


def make_chest(seed: int, size: int = 384, kind: str | None = None, sides: tuple[str, ...] | None = None,
               zone: str | None = None) -> tuple[np.ndarray, list[Lesion]]:
    """A (size, size) float32 film in [0, 1] and its lesions: one, of a kind, side and zone drawn from the seed,
    unless given; `sides=("right", "left")` puts one lesion of the same kind and zone in each lung."""
    rng = np.random.default_rng(seed)
    kind = kind or KINDS[rng.integers(len(KINDS))]
    sides = (SIDES[rng.integers(len(SIDES))],) if sides is None else sides
    zone = "lower" if kind == "effusion" else zone or ZONES[rng.integers(len(ZONES))]
    film = _anatomy(size)
    lesions = [_draw_lesion(film, kind, side, zone, rng) for side in sides]
    film = cv2.GaussianBlur(film, (0, 0), size / 128) + rng.normal(0, 0.02, film.shape).astype(np.float32)
    letters = np.zeros((size, size), np.uint8)   # OpenCV draws text on 8-bit images only
    cv2.putText(letters, "L", (int(0.9 * size), int(0.08 * size)), cv2.FONT_HERSHEY_SIMPLEX, size / 256, 255,
                max(1, size // 128))
    cv2.putText(letters, "PORTABLE", (int(0.02 * size), int(0.06 * size)), cv2.FONT_HERSHEY_SIMPLEX, size / 640, 255,
                max(1, size // 256))
    return np.clip(np.maximum(film, letters / 255.0), 0, 1).astype(np.float32), lesions


def corner_boxes(size: int) -> list[tuple[int, int, int, int]]:
    """Boxes (x, y, w, h) around the burned-in side letter and label, which a map should leave cold."""
    return [(int(0.88 * size), 0, size - int(0.88 * size), int(0.11 * size)), (0, 0, int(0.36 * size), int(0.09 * size))]


# The six chest zones of the zone-score convention (CSI): each lung's height in thirds, named by the patient's side.
CHEST_ZONES = ("right_sup", "left_sup", "right_mid", "left_mid", "right_inf", "left_inf")
_THIRDS = {"sup": 0, "mid": 1, "inf": 2}


def zone_box(zone: str, size: int) -> tuple[int, int, int, int]:
    """The zone's box (x, y, w, h) in pixels: the lung ellipse's bounding box, a third of its height."""
    side, third = zone.split("_")
    top, height = LUNG_Y - LUNG_HALF_HEIGHT, 2 * LUNG_HALF_HEIGHT / 3
    x0, y0 = (LUNG_X[side] - LUNG_HALF_WIDTH) * size, (top + _THIRDS[third] * height) * size
    return int(round(x0)), int(round(y0)), int(round(2 * LUNG_HALF_WIDTH * size)), int(round(height * size))


def make_zone_film(seed: int, size: int = 192) -> tuple[np.ndarray, list[str]]:
    """A film with lesions (nodules or opacities) in none to three of the six zones, and those zones. A lesion sits
    in the middle of its zone's box, jittered, so that its centre never leaves the zone."""
    rng = np.random.default_rng(seed)
    zones = sorted(rng.choice(CHEST_ZONES, size=rng.integers(0, 4), replace=False).tolist(), key=CHEST_ZONES.index)
    film = _anatomy(size)
    for zone in zones:
        x, y, w, h = zone_box(zone, size)
        kind = ("nodule", "opacity")[rng.integers(2)]
        centre = (x + w / 2 + rng.uniform(-0.15, 0.15) * w, y + h / 2 + rng.uniform(-0.15, 0.15) * h)
        radius = RADIUS[kind] * size * rng.uniform(0.6, 0.8)   # smaller than the toy's: a zone is a third of a lung
        spot = np.zeros_like(film)
        cv2.circle(spot, (int(centre[0]), int(centre[1])), int(radius), 1.0, -1)
        if kind == "opacity":
            spot = cv2.GaussianBlur(spot, (0, 0), radius / 3)
            film[:] = np.where(spot > 0.01, np.maximum(film, 0.2 + 0.45 * spot), film)
        else:
            film[:] = np.where(spot > 0, 0.75, film)
    film = cv2.GaussianBlur(film, (0, 0), size / 128) + rng.normal(0, 0.02, film.shape).astype(np.float32)
    return np.clip(film, 0, 1).astype(np.float32), zones


def make_film(seed: int, size: int = 384) -> tuple[np.ndarray, str]:
    """A film with one nodule, and its place ("left upper lung"): the places cycle with the seed."""
    side, zone = [(side, zone) for side in SIDES for zone in ZONES][seed % 4]
    film, lesions = make_chest(seed, size, kind="nodule", sides=(side,), zone=zone)
    return film, lesions[0].place


# A reader's search of a chest film, as fractions of its size: apices, down the right lung, down the left lung,
# the heart, the bases (the order of a systematic reading).
READING_PATH = ((0.32, 0.25), (0.68, 0.25), (0.30, 0.40), (0.30, 0.55), (0.32, 0.68), (0.68, 0.40), (0.70, 0.55),
                (0.68, 0.68), (0.50, 0.60), (0.30, 0.78), (0.70, 0.78))


def gaze_fixations(lesion: Lesion, size: int, seed: int, reader: int = 0) -> list[tuple[float, float, float]]:
    """Synthetic eye-gaze of one reader on a film: fixations (x, y in pixels, duration in seconds) along
    READING_PATH (short, jittered by 3% of the film) and then on the lesion (longer, spread over its box), as eye-gaze
    studies of chest films describe a reading: a systematic search, then dwelling on the finding."""
    rng = np.random.default_rng((seed, reader, 7))
    path = [(x * size + rng.normal(0, 0.03 * size), y * size + rng.normal(0, 0.03 * size), rng.uniform(0.15, 0.35))
            for x, y in READING_PATH]
    x, y, w, h = lesion.box
    dwell = [(x + w / 2 + rng.normal(0, w / 5), y + h / 2 + rng.normal(0, h / 5), rng.uniform(0.5, 1.2))
             for _ in range(int(rng.integers(5, 9)))]
    return [(float(np.clip(u, 0, size - 1)), float(np.clip(v, 0, size - 1)), round(float(d), 3))
            for u, v, d in path + dwell]


def write_demo_data(folder: Path, count: int = 24, size: int = 384, first_seed: int = 0) -> Path:
    """`count` films under folder/films, folder/records.jsonl (GEMeX fields: a question naming the lesion's kind
    and place, `visual_locations` with its box on the 224 grid), folder/boxes.csv (the boxes in pixels) and
    folder/gaze.csv (two synthetic readers' fixations on each film); returns the records file."""
    folder = Path(folder)
    lines, boxes, gaze = [], ["image_path,x,y,w,h,label"], ["image_path,x,y,duration,reader"]
    for seed in range(first_seed, first_seed + count):
        film, lesions = make_chest(seed, size)
        name = f"films/synthetic_{seed:03d}.png"
        write_png(folder / name, np.round(film * 255).astype(np.uint8))
        lesion = lesions[0]
        x, y, w, h = lesion.box
        grid = [round(v * 224 / size) for v in (x, y, x + w, y + h)]
        lines.append(json.dumps({"question": lesion.question, "answer": "Yes.",
                                 "type": "location", "visual_regions": [lesion.caption],
                                 "visual_locations": [grid], "image_path": name, "q_id": 0,
                                 "row_id": f"row_{seed}"}))
        boxes.append(f"{name},{x},{y},{w},{h},{lesion.kind}")
        gaze += [f"{name},{u:.1f},{v:.1f},{d:g},{reader}" for reader in (1, 2)
                 for u, v, d in gaze_fixations(lesion, size, seed, reader)]
    records = folder / "records.jsonl"
    records.write_text("\n".join(lines) + "\n")
    (folder / "boxes.csv").write_text("\n".join(boxes) + "\n")
    (folder / "gaze.csv").write_text("\n".join(gaze) + "\n")
    return records


def make_clip(seed: int, frames: int = 8, size: int = 192) -> tuple[list[np.ndarray], list[Lesion]]:
    """A breathing chest: `frames` films of one chest (make_chest's film of `seed`) scaled about the top of the
    chest by up to 4% in height over one breath, each with its own noise, and the lesion's box on each."""
    film, (lesion,) = make_chest(seed, size)
    rng = np.random.default_rng((seed, 11))
    shots, boxes = [], []
    for index in range(frames):
        scale = 1 + 0.04 * np.sin(np.pi * index / max(frames - 1, 1))        # in, then out
        warp = np.float32([[1, 0, 0], [0, scale, -0.1 * size * (scale - 1)]])   # stretched below 0.1 of the height
        moved = cv2.warpAffine(film, warp, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        shots.append(np.clip(moved + rng.normal(0, 0.01, moved.shape), 0, 1).astype(np.float32))
        x, y, w, h = lesion.box
        top = warp[1, 1] * y + warp[1, 2]
        boxes.append(Lesion(lesion.kind, lesion.side, lesion.zone, (x, int(round(top)), w, int(round(h * scale)))))
    return shots, boxes


def write_demo_clips(folder: Path, count: int = 3, frames: int = 8, size: int = 192, first_seed: int = 100) -> Path:
    """`count` clips under folder/clips (MP4), folder/records.jsonl (a question naming each clip's lesion) and
    folder/gaze.csv (a synthetic reader's fixations on every frame, with its `frame`); returns the records file."""
    folder = Path(folder)
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    lines, gaze = [], ["image_path,frame,x,y,duration,reader"]
    for seed in range(first_seed, first_seed + count):
        shots, lesions = make_clip(seed, frames, size)
        name = f"clips/clip_{seed:03d}.mp4"
        writer = cv2.VideoWriter(str(folder / name), cv2.VideoWriter_fourcc(*"mp4v"), 10, (size, size))
        for shot in shots:
            writer.write(cv2.cvtColor(np.round(shot * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR))
        writer.release()
        lines.append(json.dumps({"question": lesions[0].question, "answer": "Yes.", "image_path": name, "q_id": 0,
                                 "row_id": f"clip_{seed}"}))
        gaze += [f"{name},{index},{u:.1f},{v:.1f},{d:g},1" for index, lesion in enumerate(lesions)
                 for u, v, d in gaze_fixations(lesion, size, seed * 100 + index)]
    records = folder / "records.jsonl"
    records.write_text("\n".join(lines) + "\n")
    (folder / "gaze.csv").write_text("\n".join(gaze) + "\n")
    return records
