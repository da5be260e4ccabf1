"""Pure arithmetic on attention maps (numpy, float32, values in [0, 1] unless said otherwise)."""
from __future__ import annotations

import cv2
import numpy as np


class CAMError(RuntimeError):
    """A method cannot make a map for this input (no gradient reaches the target layer, an output it cannot read);
    FALLBACK_CAM, where set, stands in. Here, not with the methods, so the torch-free pipeline stages know it."""


def scale_to_unit(cam: np.ndarray) -> np.ndarray:
    """(x - min) / (max + 1e-8) after the shift, as the reference does; a constant map becomes all zero."""
    shifted = cam - cam.min()
    return (shifted / (shifted.max() + 1e-8)).astype(np.float32)


def grid_to_image(grid_cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The reference's last steps: ReLU'd grid map, normalised, resized to (width, height) bilinear, clipped at 0
    and normalised again."""
    width, height = size
    resized = cv2.resize(scale_to_unit(grid_cam), (width, height), interpolation=cv2.INTER_LINEAR)
    return scale_to_unit(np.maximum(resized, 0))


def describe_flat(grid_cam: np.ndarray) -> str:
    """Why a raw map carries no information, or '' when it does."""
    if not np.isfinite(grid_cam).all():
        return "map has non-finite values"
    if grid_cam.max() <= 0:
        return "map is zero everywhere (every weighted channel sum was negative)"
    if grid_cam.max() - grid_cam.min() <= 1e-12:
        return "map is constant"
    return ""
