"""Colour maps, the film-heatmap blend and the 16-bit raw map: pure functions returning arrays."""
from __future__ import annotations

import cv2
import numpy as np

_OPENCV_COLORMAPS = {"jet": cv2.COLORMAP_JET, "turbo": cv2.COLORMAP_TURBO, "inferno": cv2.COLORMAP_INFERNO,
                     "hot": cv2.COLORMAP_HOT}
# purple -> blue -> green -> yellow -> red, evenly spaced (RGB)
_PURPLE_RED_STOPS = np.array([[128, 0, 128], [0, 0, 255], [0, 200, 0], [255, 255, 0], [255, 0, 0]], np.float64)


def colormap_lut(name: str) -> np.ndarray:
    """(256, 3) uint8 RGB lookup table; index 0 = no attention, 255 = most (red or white-hot)."""
    if name == "custom_purple_red":
        positions = np.linspace(0, 255, len(_PURPLE_RED_STOPS))
        return np.stack([np.interp(np.arange(256), positions, _PURPLE_RED_STOPS[:, c]) for c in range(3)],
                        axis=1).round().astype(np.uint8)
    if name not in _OPENCV_COLORMAPS:
        raise ValueError(f"unknown colour map {name!r}")
    bgr = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], _OPENCV_COLORMAPS[name])[:, 0]
    return bgr[:, ::-1].copy()


def overlay(film: np.ndarray, cam: np.ndarray, colormap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 RGB: round((1 - alpha) * 255 * film + alpha * colour(round(255 * cam))).

    OpenCV's lookup table and weighted sum, a few passes over the film (numpy's float arithmetic took four times as
    long at 1024 x 1024; the two differ by one level on about one pixel in a million, where float rounding meets .5).
    """
    index = cv2.convertScaleAbs(np.clip(cam, 0, 1).astype(np.float32), alpha=255)
    heat = cv2.LUT(cv2.merge([index] * 3), colormap_lut(colormap)[None])
    grey = cv2.merge([np.clip(film, 0, 1).astype(np.float32)] * 3)
    return cv2.addWeighted(grey, (1.0 - alpha) * 255, heat, alpha, 0, dtype=cv2.CV_8U)


RAW_MAX = 65535      # a raw map's value that stands for 1


def raw_map_16bit(cam: np.ndarray) -> np.ndarray:
    """(H, W) uint16: 0..RAW_MAX stands for 0..1."""
    return np.round(np.clip(cam, 0, 1) * RAW_MAX).astype(np.uint16)


BOX_COLOURS = np.array([[255, 64, 64], [255, 200, 0], [0, 220, 0], [0, 200, 255], [200, 80, 255]], np.uint8)  # RGB


def draw_boxes(film: np.ndarray, boxes) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the grey film with each box (x0, y0, x1, y1, score) outlined, labelled with its rank and
    its share of the map's mass."""
    grey = np.round(np.clip(film, 0, 1) * 255).astype(np.uint8)
    return label_boxes(cv2.merge([grey] * 3), [(*box[:4], f"{rank}: {box[4]:.2f}")
                                               for rank, box in enumerate(boxes, start=1)])


def label_boxes(image: np.ndarray, boxes) -> np.ndarray:
    """`image` (H, W, 3) uint8 RGB with each box (x0, y0, x1, y1, text) outlined in turn in the next colour and
    labelled; lines and text scale with the image, so they read the same on any size. Draws in place."""
    height, width = image.shape[:2]
    thickness = max(1, round(min(height, width) / 300))
    font = max(0.35, min(height, width) / 700)
    for number, (x0, y0, x1, y1, label) in enumerate(boxes):
        colour = tuple(int(c) for c in BOX_COLOURS[number % len(BOX_COLOURS)])
        cv2.rectangle(image, (int(x0), int(y0)), (int(x1) - 1, int(y1) - 1), colour, thickness)
        (text_width, text_height), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font, thickness)
        top = int(y0) - text_height - base if int(y0) >= text_height + base else int(y0) + thickness
        cv2.rectangle(image, (int(x0), top), (int(x0) + text_width, top + text_height + base), colour, cv2.FILLED)
        cv2.putText(image, label, (int(x0), top + text_height), cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 0), thickness,
                    cv2.LINE_AA)
    return image
