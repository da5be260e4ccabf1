"""Boxes from a map, and boxes against boxes: pure functions on numpy arrays.

A box is (x0, y0, x1, y1, score) in film pixels, x1 and y1 exclusive (the pixel edges), so a box covering the
whole film of width W and height H is (0, 0, W, H); score is the share of the map's mass inside the box.
"""
from __future__ import annotations

import cv2
import numpy as np
from skimage.filters import threshold_otsu


def threshold_mask(heat: np.ndarray, threshold: str | float) -> np.ndarray:
    """The pixels of `heat` above `threshold`: 'otsu' (Otsu's threshold of the map's values) or a fraction of the
    map's peak. A flat or all-zero map has none."""
    if heat.max() <= 0 or heat.max() <= heat.min():
        return np.zeros(heat.shape, bool)
    if threshold == "otsu":
        return heat > threshold_otsu(heat)
    return heat >= float(threshold) * heat.max()


def boxes_from_map(heat: np.ndarray, threshold: str | float = "otsu", min_area: float = 0.005,
                   padding: float = 0.1) -> list[tuple[int, int, int, int, float]]:
    """One box per connected region (8-connected) of the thresholded map that covers at least `min_area` of the film,
    padded on each side by `padding` times its own width and height (a large region gets a wider margin than a small
    one), clipped to the film, and ranked by the share of the map's mass inside it, largest first."""
    height, width = heat.shape
    mask = threshold_mask(heat, threshold)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    total = float(heat.sum(dtype=np.float64))
    boxes = []
    for left, top, w, h, area in stats[1:]:        # label 0 is the background
        if area < min_area * height * width:
            continue
        pad_x, pad_y = int(round(padding * w)), int(round(padding * h))
        x0, y0 = max(0, left - pad_x), max(0, top - pad_y)
        x1, y1 = min(width, left + w + pad_x), min(height, top + h + pad_y)
        mass = float(heat[y0:y1, x0:x1].sum(dtype=np.float64)) / total if total > 0 else 0.0
        boxes.append((int(x0), int(y0), int(x1), int(y1), mass))
    return sorted(boxes, key=lambda box: -box[4])


def iou(a, b) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1, ...) with exclusive right and bottom edges."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    overlap = max(0.0, width) * max(0.0, height)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - overlap
    return float(overlap / union) if union > 0 else 0.0


def box_scores(predicted, truth, threshold: float = 0.5) -> dict[str, float]:
    """Predicted boxes (ranked, best first) against true boxes, as detection is scored: each predicted box in turn
    takes the free true box it overlaps most, and counts as a true positive when that IoU is at least `threshold`.
    precision = true positives / predicted boxes (NaN when there are none), recall = true positives / true boxes,
    best_iou = the mean over true boxes of the best IoU any predicted box reaches (0 where there is no box)."""
    free = list(range(len(truth)))
    hits = 0
    for box in predicted:
        if not free:
            break
        overlaps = [iou(box, truth[t]) for t in free]
        best = int(np.argmax(overlaps))
        if overlaps[best] >= threshold:
            hits += 1
            free.pop(best)
    best_iou = [max((iou(p, t) for p in predicted), default=0.0) for t in truth]
    return dict(box_precision=hits / len(predicted) if predicted else float("nan"),
                box_recall=hits / len(truth) if truth else float("nan"),
                box_best_iou=float(np.mean(best_iou)) if truth else float("nan"),
                boxes_predicted=float(len(predicted)))


def renormalize_in_boxes(cam: np.ndarray, boxes) -> np.ndarray:
    """The map rescaled to [0, 1] inside each box (x0, y0, x1, y1, ...) in pixels, and zero outside them (where boxes
    overlap, the larger value); the box-renormalised map of pytorch-grad-cam, for detectors."""
    result = np.zeros_like(cam)
    height, width = cam.shape
    for box in boxes:
        x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
        x1, y1 = min(width, int(np.ceil(box[2]))), min(height, int(np.ceil(box[3])))
        if x1 > x0 and y1 > y0:
            inside = cam[y0:y1, x0:x1]
            low, high = inside.min(), inside.max()
            scaled = (inside - low) / (high - low) if high > low else np.zeros_like(inside)
            result[y0:y1, x0:x1] = np.maximum(result[y0:y1, x0:x1], scaled)
    return result
