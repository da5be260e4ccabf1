"""Post-processing of a map against its film: the body mask and the dense-CRF refinement."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_multiotsu, threshold_otsu

_MASK_SIDE = 512          # the mask is computed on a copy of the film at most this large (speed; it is coarse)
_KEEP_FRACTION = 0.2      # components at least this share of the largest are kept (two lung fields, say)
_DILATION_FRACTION = 0.015  # of the longer side: a small margin so the body's edge is never cut
_MARK_FRACTION = 0.03       # of the longer side: about the size of a burned-in letter
_BAND_FRACTION = 0.2        # marks are looked for in this outer share of each side


def body_mask(film: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of the body on a chest film.

    Otsu threshold of the lightly blurred film, largest component(s), holes filled (the lungs are dark inside a
    bright rib cage) and each row's span between the body's outermost pixels closed, then a small dilation.
    Burned-in letters and markers in the corners are separate small components and fall outside.
    """
    height, width = film.shape
    scale = min(1.0, _MASK_SIDE / max(height, width))
    small = cv2.resize(film, (max(2, round(width * scale)), max(2, round(height * scale))),
                       interpolation=cv2.INTER_AREA) if scale < 1 else film
    small = cv2.GaussianBlur(small.astype(np.float32), (0, 0), sigmaX=2)
    if small.max() - small.min() < 1e-6:
        return np.ones(film.shape, bool)
    foreground = small > _body_threshold(small)
    labels, count = ndimage.label(foreground)
    if count == 0:
        return np.ones(film.shape, bool)
    sizes = ndimage.sum_labels(foreground, labels, index=np.arange(1, count + 1))
    keep = np.flatnonzero(sizes >= _KEEP_FRACTION * sizes.max()) + 1
    mask = np.isin(labels, keep)
    mask = ndimage.binary_fill_holes(mask)
    mask = _close_rows(mask)
    mask = cv2.dilate(mask.astype(np.uint8), _disk(_DILATION_FRACTION * max(mask.shape))).astype(bool)
    mask &= ~_burned_in_marks(small)
    if mask.shape != film.shape:
        mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    return mask


def _disk(radius: float) -> np.ndarray:
    radius = max(1, round(radius))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _burned_in_marks(small: np.ndarray) -> np.ndarray:
    """Small, near-white, high-contrast marks (side letters, "PORTABLE", arrows) in the film's outer band.

    Lead markers are the brightest thing on a film and much brighter than their surroundings (white top-hat);
    bone is bright too but broad, and the band keeps the search away from the chest's centre.
    """
    height, width = small.shape
    tophat = cv2.morphologyEx(small, cv2.MORPH_TOPHAT, _disk(_MARK_FRACTION * max(small.shape)))
    marks = (small > 0.75) & (tophat > 0.2)
    band = np.ones_like(marks)
    by, bx = round(_BAND_FRACTION * height), round(_BAND_FRACTION * width)
    band[by:height - by, bx:width - bx] = False
    marks &= band
    return cv2.dilate(marks.astype(np.uint8), _disk(_MARK_FRACTION * max(small.shape) / 2)).astype(bool)


def _body_threshold(small: np.ndarray) -> float:
    """The grey level between the air around the body and everything else.

    Three-class Otsu (air, lung and soft tissue, bone): the lowest threshold. Lungs are as dark as soft tissue at
    the body's edge, so a two-class Otsu can cut the lungs off from the body on thin or well-exposed films.
    """
    try:
        return float(threshold_multiotsu(small, classes=3)[0])
    except ValueError:  # too few grey levels for three classes
        return float(threshold_otsu(small))


def _close_rows(mask: np.ndarray) -> np.ndarray:
    """Fill each row between its first and last body pixel (lungs open to the top are inside the body too)."""
    out = mask.copy()
    rows = np.flatnonzero(mask.any(axis=1))
    for row in rows:
        columns = np.flatnonzero(mask[row])
        out[row, columns[0]:columns[-1] + 1] = True
    return out


def apply_mask(cam: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, str]:
    """The map zeroed outside `mask` and scaled back to a maximum of 1; a warning when nothing is left."""
    masked = np.where(mask, cam, 0).astype(np.float32)
    top = masked.max()
    if top <= 0:
        return masked, "map is zero inside the body mask" if cam.max() > 0 else ""
    return masked / top, ""


@dataclass(frozen=True)
class CRFParams:
    """Dense-CRF settings; the defaults are MedCLIP-SAM's (v1)."""
    iterations: int = 1
    tau: float = 1.05
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 60.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 5.0


def crf_refine(film: np.ndarray, cam: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """The map refined by a two-label dense CRF against the film: the foreground marginal in [0, 1].

    Unaries as MedCLIP-SAM: U0 = -log(1 - p + eps) / (tau * sigmoid(1 - p)), U1 = -log(p + eps) / (tau * sigmoid(p)).
    """
    import pydensecrf.densecrf as dcrf

    height, width = cam.shape
    p = np.clip(cam.astype(np.float64), 0, 1)
    eps = 1e-8

    def sigmoid(x):
        return 1 / (1 + np.exp(-x))

    unary = np.stack([-np.log(1 - p + eps) / (params.tau * sigmoid(1 - p)),
                      -np.log(p + eps) / (params.tau * sigmoid(p))]).reshape(2, -1)
    crf = dcrf.DenseCRF2D(width, height, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    grey = np.round(np.clip(film, 0, 1) * 255).astype(np.uint8)
    rgb = np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=rgb,
                             compat=params.bilateral_compat)
    marginals = np.array(crf.inference(params.iterations), dtype=np.float32).reshape(2, height, width)
    return marginals[1]
