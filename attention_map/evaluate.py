"""Heatmaps against expert boxes: pointing game, energy in the boxes, IoU/Dice of thresholded maps, pixel AUROC, and
the boxes drawn from the maps scored as detections (precision and recall at IoU 0.5, best IoU); aggregated with 95%
confidence intervals by a cluster bootstrap over films (a film's heatmaps are not independent).

Ground truth is GEMeX records (`visual_locations`: [x1, y1, x2, y2] corners on the 224 x 224 grid, one box per
visual region, scaled to each film) or a CSV of pixel boxes `image_path,x,y,w,h,label`. A question's heatmap is
scored against all boxes of its record, a region prompt's heatmap against its region's box. A CSV row with x, y, w
and h all empty is a film without a box (a "Normal" film); a row or record whose boxes cannot be read is left out,
named (file, row, field) in a warning and in evaluation.json.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy.stats import rankdata
from skimage.filters import threshold_otsu

from . import outputs
from .boxes import box_scores
from .records import DataFileError, RecordError, q_id_of, read_items
from .render import RAW_MAX
from .timing import progress

log = logging.getLogger(__name__)

GEMEX_GRID = 224
METRICS = ("hit", "energy", "energy_ratio", "iou_otsu", "dice_otsu", "iou_top", "dice_top", "auroc")
BOX_METRICS = ("box_precision", "box_recall", "box_best_iou", "boxes_predicted")


class EvaluationError(ValueError):
    """The outputs or the ground truth cannot be evaluated; the message says what to do."""


@dataclass(frozen=True)
class Boxes:
    corners: tuple[tuple[float, float, float, float], ...]   # (x1, y1, x2, y2)
    grid: int | None = None    # the corners are on a grid x grid image (GEMeX: 224); None: pixels of the film

    def pixels(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """The boxes in the pixels of a film of this size, (x0, y0, x1, y1) with exclusive right and bottom edges."""
        sx, sy = (width / self.grid, height / self.grid) if self.grid else (1.0, 1.0)
        return [(max(0, int(np.floor(x1 * sx))), max(0, int(np.floor(y1 * sy))),
                 min(width, int(np.ceil(x2 * sx))), min(height, int(np.ceil(y2 * sy))))
                for x1, y1, x2, y2 in self.corners]

    def mask(self, height: int, width: int) -> np.ndarray:
        mask = np.zeros((height, width), bool)
        for left, top, right, bottom in self.pixels(height, width):
            mask[top:bottom, left:right] = True
        return mask


def read_truth(path: Path) -> tuple[dict, list[str]]:
    """{(image_path, q_id): [Boxes per visual region]} for GEMeX records, {image_path: [Boxes]} for a box CSV; and a
    one-line reason (file, row, field) for each row or record whose boxes cannot be read, which is left out."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: {'a folder, not a file' if path.is_dir() else 'no such file'} (--truth "
                              f"takes GEMeX records with visual_locations, JSONL or JSON, or a box CSV "
                              f"image_path,x,y,w,h[,label])")
    truth: dict = {}
    skipped = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = {"image_path", "x", "y", "w", "h"} - set(reader.fieldnames or [])
            if missing:
                raise EvaluationError(f"{path}:1: missing column(s) {', '.join(sorted(missing))} "
                                      f"(a box CSV needs image_path,x,y,w,h[,label])")
            for row in reader:
                line = reader.line_num     # the file's line (blank lines are skipped, not counted out)
                fields = {name: (row[name] or "").strip() for name in "xywh"}
                if not any(fields.values()):
                    continue       # a film listed without a box (e.g. "Normal")
                bad = next((name for name in "xywh" if not _is_number(fields[name], positive=name in "wh")), None)
                if bad:
                    skipped.append(f"{path}:{line}: {bad}={fields[bad]!r} is not "
                                   f"{'a size above 0' if bad in 'wh' else 'a coordinate'} in pixels of the film")
                    continue
                x, y, w, h = (float(fields[name]) for name in "xywh")
                truth.setdefault(row["image_path"], []).append(Boxes(((x, y, x + w, y + h),)))
        return truth, skipped
    try:
        items = read_items(path)
    except DataFileError as error:
        raise EvaluationError(str(error)) from None
    for index, (line, item) in enumerate(items):   # index: the q_id default, as for the run's records
        if isinstance(item, RecordError):           # a line that is not JSON
            skipped.append(f"{path}:{item.line}: {item.reason}")
        if not (isinstance(item, dict) and item.get("visual_locations")):
            continue
        boxes = item["visual_locations"]
        # a record's boxes go with its visual regions by position, so one bad box leaves out the record's boxes
        bad = next((number for number, box in enumerate(boxes) if not _is_corners(box)), None) \
            if isinstance(boxes, list) else 0
        if bad is not None:
            shown = boxes[bad] if isinstance(boxes, list) else boxes
            skipped.append(f"{path}:{line}: visual_locations[{bad}]={shown!r} is not [x1, y1, x2, y2] with x1 < x2 "
                           f"and y1 < y2 (the {GEMEX_GRID} x {GEMEX_GRID} grid); the record's boxes are left out")
            continue
        key = (str(item.get("image_path", "")).strip(), q_id_of(item, index))
        truth[key] = [Boxes((tuple(map(float, box)),), GEMEX_GRID) for box in boxes]
    return truth, skipped


def _is_number(text, positive: bool = False) -> bool:
    """Whether `text` (a CSV field or a JSON value) is a finite number, and above 0 where `positive`."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return False
    return bool(np.isfinite(value)) and (value > 0 or not positive) and not isinstance(text, bool)


def _is_corners(box) -> bool:
    """Whether a GEMeX visual location is [x1, y1, x2, y2]: four numbers, the second corner below and right."""
    return (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(value) for value in box)
            and float(box[0]) < float(box[2]) and float(box[1]) < float(box[3]))


def heatmap_scores(heat: np.ndarray, boxes: np.ndarray, top_percent: float) -> dict[str, float]:
    """The metrics of one map (H, W) >= 0 against a box mask (H, W) of the same size."""
    inside = boxes.astype(bool)
    total = float(heat.sum())
    fraction = float(inside.mean())
    energy = float(heat[inside].sum()) / total if total > 0 else 0.0
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    scores = dict(hit=float(total > 0 and inside[peak]), energy=energy,
                  energy_ratio=energy / fraction if fraction > 0 else 0.0, box_fraction=fraction)
    flat = heat.max() <= heat.min()
    otsu = np.zeros_like(inside) if flat else heat > threshold_otsu(heat)
    top = np.zeros_like(inside) if flat else heat >= np.quantile(heat, 1 - top_percent / 100)
    for name, mask in (("otsu", otsu), ("top", top)):
        overlap = float(np.logical_and(mask, inside).sum())
        union = float(np.logical_or(mask, inside).sum())
        size = float(mask.sum() + inside.sum())
        scores[f"iou_{name}"] = overlap / union if union else 0.0
        scores[f"dice_{name}"] = 2 * overlap / size if size else 0.0
    scores["auroc"] = auroc(heat, inside)
    return scores


def auroc(heat: np.ndarray, inside: np.ndarray) -> float:
    """The chance that a pixel inside the boxes is hotter than one outside, ties counting half (Mann-Whitney U);
    NaN where either side is empty. A raw map holds at most 65536 levels, so it is counted per level (a linear
    pass) rather than ranked (a sort of every pixel, most of the evaluation's time)."""
    positives, negatives = int(inside.sum()), int(inside.size - inside.sum())
    if not (positives and negatives):
        return float("nan")
    levels = heat * RAW_MAX
    if np.abs(levels - np.rint(levels)).max() < 1e-6:
        counts = [np.bincount(np.rint(levels[side]).astype(np.int64), minlength=RAW_MAX + 1).astype(np.float64)
                  for side in (inside, ~inside)]
        below = np.cumsum(counts[1]) - counts[1]          # pixels outside that are strictly cooler, per level
        return float((counts[0] * (below + 0.5 * counts[1])).sum()) / (positives * negatives)
    ranks = rankdata(heat.ravel())
    return float(ranks[inside.ravel()].sum() - positives * (positives + 1) / 2) / (positives * negatives)


def cluster_bootstrap(values: np.ndarray, clusters: np.ndarray, resamples: int = 2000, seed: int = 0):
    """(mean, low, high): the 95% percentile interval of the mean when whole clusters (films) are resampled."""
    values = np.asarray(values, float)
    keep = ~np.isnan(values)
    values, clusters = values[keep], np.asarray(clusters)[keep]
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    names, members = np.unique(clusters, return_inverse=True)
    sums = np.bincount(members, weights=values, minlength=len(names))
    counts = np.bincount(members, minlength=len(names))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(names), size=(resamples, len(names)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


@dataclass
class Evaluation:
    heatmaps: int
    films: int
    without_boxes: int
    top_percent: float
    aggregates: dict
    skipped_rows: list     # the truth file's rows or records whose boxes could not be read, one line each

    def markdown(self) -> str:
        lines = [f"# Evaluation of {self.heatmaps} heatmaps on {self.films} films", "",
                 f"Means with 95% confidence intervals (cluster bootstrap over films). Top-p threshold: "
                 f"{self.top_percent:g}% of pixels. {self.without_boxes} heatmaps had no box and are not counted." +
                 (f" {len(self.skipped_rows)} rows of the truth file could not be read (see evaluation.json)."
                  if self.skipped_rows else ""), ""]
        return "\n".join(lines + metric_table(self.aggregates)) + "\n"


def metric_table(aggregates: dict) -> list[str]:
    """Markdown lines of a table of (mean, low, high) per metric."""
    return ["| metric | mean | 95% CI |", "|---|---|---|"] + [
        f"| {name} | {mean:.3f} | {low:.3f} to {high:.3f} |" for name, (mean, low, high) in aggregates.items()]


def write_results(output_dir: Path, stem: str, scored: list[dict], result, **extra) -> None:
    """<stem>.csv (a row per heatmap), <stem>.json (`result`'s fields, aggregates as mean/low/high, and `extra`)
    and <stem>.md (`result.markdown()`) in `output_dir`."""
    columns = list(scored[0])
    outputs.write_atomic(output_dir / f"{stem}.csv",
                         outputs.csv_bytes(columns, [[_text(s[c]) for c in columns] for s in scored]))
    aggregates = {k: dict(zip(("mean", "low", "high"), v)) for k, v in result.aggregates.items()}
    summary = asdict(result) | {"aggregates": aggregates} | extra
    outputs.write_atomic(output_dir / f"{stem}.json", (json.dumps(summary, indent=2) + "\n").encode())
    outputs.write_atomic(output_dir / f"{stem}.md", result.markdown().encode())


def evaluate(output_dir: Path, truth_path: Path, top_percent: float = 15.0, resamples: int = 2000,
             seed: int = 0) -> Evaluation:
    """Score every heatmap of a finished run: its raw map (SAVE_RAW_CAM=true) by the map metrics and its boxes
    (OUTPUT_KIND=boxes|both) as detections; writes evaluation.csv, evaluation.json and evaluation.md."""
    output_dir, truth_path = Path(output_dir), Path(truth_path)
    manifest = output_dir / outputs.MANIFEST
    try:
        rows = outputs.read_manifest(output_dir, "evaluate")
    except FileNotFoundError as error:
        raise EvaluationError(str(error)) from None
    if rows and not rows[0]["raw_map"] and not rows[0].get("boxes"):
        raise EvaluationError(f"{manifest}: the run kept neither raw maps nor boxes; run it again with "
                              f"SAVE_RAW_CAM=true or OUTPUT_KIND=both (RESUME makes only the missing files)")
    truth, skipped = read_truth(truth_path)
    for reason in skipped:
        log.warning("%s", reason)
    scored, without = [], 0
    for row in progress(rows, "evaluate"):
        boxes = truth.get((row["source_image"], row["q_id"]), truth.get(row["source_image"]))
        if boxes and row["region"] != "" and len(boxes) > int(row["region"]) and truth_path.suffix != ".csv":
            boxes = [boxes[int(row["region"])]]
        if not boxes:
            without += 1
            continue
        scores = dict(image_path=row["image_path"], source_image=row["source_image"], prompt=row["prompt"])
        if row["raw_map"]:
            heat = read_raw_map(output_dir, row["raw_map"])
            mask = np.zeros(heat.shape, bool)
            for box in boxes:
                mask |= box.mask(*heat.shape)
            scores |= heatmap_scores(heat, mask, top_percent)
        if row.get("boxes"):
            width, height = png_size(output_dir / row["image_path"])
            true_boxes = [corner for box in boxes for corner in box.pixels(height, width)]
            scores |= box_scores(json.loads(row["boxes"]), true_boxes)
        scored.append(scores)
    if not scored:
        named = next((key[0] if isinstance(key, tuple) else key for key in truth), None)
        raise EvaluationError(f"no heatmap of {manifest} has a box in {truth_path} (matched by image path and q_id; "
                              f"the run's first film is {rows[0]['source_image'] if rows else None!r}, " +
                              (f"the truth's {named!r})" if named is not None else "the truth has no box it could "
                               "read)"))
    films = np.array([s["source_image"] for s in scored])
    aggregates = {name: cluster_bootstrap(np.array([s[name] for s in scored]), films, resamples, seed)
                  for name in METRICS + BOX_METRICS if name in scored[0]}
    result = Evaluation(len(scored), len(set(films)), without, top_percent, aggregates, skipped)
    write_results(output_dir, "evaluation", scored, result, truth=str(truth_path), bootstrap_resamples=resamples,
                  seed=seed)
    return result


def read_raw_map(output_dir: Path, name: str) -> np.ndarray:
    """A run's 16-bit raw map as float64 in [0, 1]."""
    heat = cv2.imread(str(output_dir / name), cv2.IMREAD_UNCHANGED) if (output_dir / name).is_file() else None
    if heat is None:
        raise EvaluationError(f"{output_dir / name}: raw map missing or unreadable; {outputs.REMAKE}")
    return heat.astype(np.float64) / RAW_MAX


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG the run wrote (film-sized), from its header."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(24)
    except OSError as error:
        raise EvaluationError(f"{path}: cannot read it ({error.strerror}); {outputs.REMAKE}") from None
    if len(header) < 24 or header[:8] != b"\x89PNG\r\n\x1a\n":
        raise EvaluationError(f"{path}: not a PNG; {outputs.REMAKE}")
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def _text(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
