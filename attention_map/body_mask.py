"""Body masks: where on a film the body is, so a map can be zeroed outside it (`BODY_MASK`).

* `air` (the default): drops the air around the body and the burned-in marks lying on it, and nothing it cannot
  tell from a lung. Its first duty is to keep every lung pixel.
* `otsu`: the earlier mask (three-class Otsu, largest components, rows closed, a top-hat cut of bright marks in the
  outer band); kept so older runs can be reproduced. It cuts lungs that reach the film's edge or are as dark as the
  air, and ribs that are near-white in the outer band.

Both work on a copy of the film at most 512 px on its longer side (speed; a mask is coarse) and return a boolean
(H, W) mask at the film's size. `benchmarks/bench_body_mask.py` measures them on real films.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_multiotsu, threshold_otsu

_MASK_SIDE = 512
_KEEP_FRACTION = 0.2        # components at least this share of the largest are kept (two lung fields, say)
_DILATION_FRACTION = 0.015  # of the longer side: a margin so the body's edge is never cut
_MARK_FRACTION = 0.03       # of the longer side: about the size of a burned-in letter
_BAND_FRACTION = 0.2        # marks are looked for in this outer share of each side

# `air`: each figure chosen on the 61 films with lung masks (benchmarks/bench_body_mask.py), none on one film alone
_AIR_SHARE = 0.7            # air is darker than this point between the air's grey and the lungs' grey
_AIR_GAP = 0.05             # a film whose edges are not this much darker than its lungs has no air around the body
_EDGE_BAND = 0.02           # of the longer side: air this near an edge reaches it (films have thin frames)
_LUNG_DEPTH = 0.1           # dark air opening onto a single edge and reaching this deep (of the side) is lung
_MARK_CONTRAST = 0.25       # a mark is this much brighter than its surroundings and touches the air ...
_MARK_ON_AIR = 0.1          # ... (this share of its surroundings is air) ...
_MARK_CONTRAST_ALONE = 0.4  # ... or is this much brighter wherever it lies (text on soft tissue)
_MARK_MARGIN = 0.005        # of the longer side, cut around a mark


def air_mask(film: np.ndarray) -> np.ndarray:
    """The body as everything but the air around it and the marks lying on that air.

    Air is what is both dark and joined to the film's edges. "Dark" is measured on the film itself: below a point
    between the grey of the film's edges and the grey of its lungs (the dark pixels of its centre), and not at all
    on a film whose edges are not clearly darker than its lungs (a tight crop has no air). Dark parts opening onto the
    top edge alone (apices of a film cropped through them), or deep onto one other edge (a lung cut by that edge:
    cropped figures, a dark lung on a portable film), stay. Constant padding (a black or white border) is never body. Burned-in marks (letters, markers)
    are compact, near-white blobs much brighter than their surroundings in the film's outer band; only those on the
    air, or of a contrast bone never has, are cut out, so ribs and clavicles stay.
    """
    mask = np.zeros(film.shape, bool)
    y0, y1, x0, x1 = content_box(film)
    if y1 - y0 < 2 or x1 - x0 < 2:
        return ~mask
    small = _downscale(film[y0:y1, x0:x1])
    blur = cv2.GaussianBlur(small, (0, 0), sigmaX=2)
    if blur.max() - blur.min() < 1e-6:
        mask[y0:y1, x0:x1] = True
        return mask
    air = _dark_air(blur)
    marks = _marks(small, air)
    body = _largest_components(~_reaching_the_edges(air | marks))
    if not body.any():   # nothing but air: nothing to tell the body by
        body[:] = True
    body = ndimage.binary_fill_holes(body)
    body = cv2.dilate(body.astype(np.uint8), _disk(_DILATION_FRACTION * max(body.shape))).astype(bool)
    body &= ~marks
    mask[y0:y1, x0:x1] = _upscale(body, (y1 - y0, x1 - x0))
    return mask


def otsu_mask(film: np.ndarray) -> np.ndarray:
    """The earlier body mask, unchanged (see the module's docstring).

    Otsu threshold of the lightly blurred film, largest component(s), holes filled (the lungs are dark inside a
    bright rib cage) and each row's span between the body's outermost pixels closed, then a small dilation.
    Burned-in letters and markers in the corners are separate small components and fall outside.
    """
    small = _downscale(film)
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=2)
    if small.max() - small.min() < 1e-6:
        return np.ones(film.shape, bool)
    foreground = small > _body_threshold(small)
    if not foreground.any():
        return np.ones(film.shape, bool)
    mask = _largest_components(foreground)
    mask = ndimage.binary_fill_holes(mask)
    mask = _close_rows(mask)
    mask = cv2.dilate(mask.astype(np.uint8), _disk(_DILATION_FRACTION * max(mask.shape))).astype(bool)
    mask &= ~_marks(small)
    return _upscale(mask, film.shape)


BODY_MASKS = {"air": air_mask, "otsu": otsu_mask}


def body_mask(film: np.ndarray, method: str = "air") -> np.ndarray:
    """Boolean (H, W) mask of the body on a chest film, by `method` (a name of BODY_MASKS)."""
    return BODY_MASKS[method](film)


def content_box(film: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the film less the rows and columns at its edges that hold a single grey value (padding)."""
    box = []
    for lines in (film, film.T):
        constant = np.ptp(lines, axis=1) < 1 / 255
        if constant.all():
            return 0, 0, 0, 0
        box += [int(np.argmin(constant)), len(constant) - int(np.argmin(constant[::-1]))]
    return tuple(box)


def _dark_air(blur: np.ndarray) -> np.ndarray:
    """Pixels dark enough to be the air around the body (see air_mask)."""
    height, width = blur.shape
    threshold = _body_threshold(blur)
    band = max(1, round(_EDGE_BAND * max(height, width)))
    edges = np.concatenate([blur[:band].ravel(), blur[-band:].ravel(), blur[:, :band].ravel(),
                            blur[:, -band:].ravel()])
    edge_grey = np.percentile(edges, 5)
    centre = blur[height // 4:3 * height // 4, width // 5:4 * width // 5]
    dark_centre = centre[centre < threshold]
    lung_grey = np.median(dark_centre) if dark_centre.size > 0.02 * centre.size else np.percentile(centre, 10)
    if lung_grey - edge_grey < _AIR_GAP:
        return np.zeros(blur.shape, bool)
    return blur < min(threshold, edge_grey + _AIR_SHARE * (lung_grey - edge_grey))


def _reaching_the_edges(air: np.ndarray) -> np.ndarray:
    """The parts of `air` that are the air around the body: those reaching two of the film's edges, or the side or
    bottom edge without reaching deep into the film. Dark parts opening onto the top edge alone are lungs of a film
    cropped through the apices; those opening deep onto one other edge are lungs cut by that edge."""
    labels, count = ndimage.label(air)
    band = max(1, round(_EDGE_BAND * max(air.shape)))
    touches = np.zeros((count + 1, 4), bool)   # top, bottom, left, right
    for side, strip in enumerate((labels[:band], labels[-band:], labels[:, :band], labels[:, -band:])):
        touches[np.unique(strip), side] = True
    touches[0] = False
    background = touches.sum(axis=1) >= 2
    boxes = ndimage.find_objects(labels)
    for label in np.flatnonzero(touches.sum(axis=1) == 1):
        rows, columns = boxes[label - 1]
        side = np.flatnonzero(touches[label])[0]
        depth = (rows.stop - rows.start) / air.shape[0] if side < 2 else (columns.stop - columns.start) / air.shape[1]
        background[label] = side > 0 and depth < _LUNG_DEPTH
    return background[labels]


def _marks(small: np.ndarray, air: np.ndarray | None = None) -> np.ndarray:
    """Burned-in marks (side letters, "PORTABLE", arrows) in the film's outer band.

    Lead markers are the brightest thing on a film and much brighter than their surroundings (white top-hat); bone
    is bright too but broad, and the band keeps the search away from the chest's centre. Given the `air`, only the
    marks lying on it or of a contrast that bone does not reach are kept, and cut with a narrow margin (the `air`
    mask); without, every candidate is cut with a wide one (the `otsu` mask).
    """
    height, width = small.shape
    side = max(height, width)
    tophat = cv2.morphologyEx(small, cv2.MORPH_TOPHAT, _disk(_MARK_FRACTION * side))
    candidates = ((small > 0.75) & (tophat > 0.2)).astype(np.uint8)
    by, bx = round(_BAND_FRACTION * height), round(_BAND_FRACTION * width)
    candidates[by:height - by, bx:width - bx] = 0
    if air is None:
        return cv2.dilate(candidates, _disk(_MARK_FRACTION * side / 2)).astype(bool)
    labels, count = ndimage.label(candidates)
    if count == 0:
        return np.zeros(small.shape, bool)
    # each candidate's surroundings: a ring around it, each ring pixel given to a candidate beside it
    grown = cv2.dilate(labels.astype(np.float32), _disk(0.01 * side)).astype(np.int64)
    ring = (grown > 0) & ~cv2.dilate(candidates, _disk(2)).astype(bool)
    owner, inside = grown[ring], labels[labels > 0]

    def per_candidate(where, values=None):
        return np.bincount(where, values, minlength=count + 1)[1:]

    ring_size, area = per_candidate(owner), per_candidate(inside)
    contrast = (per_candidate(inside, small[labels > 0]) / np.maximum(area, 1)
                - per_candidate(owner, small[ring]) / np.maximum(ring_size, 1))
    contrast[ring_size == 0] = 0
    on_the_air = per_candidate(owner, air[ring]) / np.maximum(ring_size, 1) >= _MARK_ON_AIR
    is_mark = (area >= 3) & (((contrast >= _MARK_CONTRAST) & on_the_air) | (contrast >= _MARK_CONTRAST_ALONE))
    marks = np.concatenate([[False], is_mark])[labels]
    return cv2.dilate(marks.astype(np.uint8), _disk(_MARK_MARGIN * side)).astype(bool)


def _largest_components(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    return np.concatenate([[False], sizes >= _KEEP_FRACTION * sizes.max()])[labels]


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
    for row in np.flatnonzero(mask.any(axis=1)):
        columns = np.flatnonzero(mask[row])
        out[row, columns[0]:columns[-1] + 1] = True
    return out


def _downscale(film: np.ndarray) -> np.ndarray:
    height, width = film.shape
    scale = min(1.0, _MASK_SIDE / max(height, width))
    film = film.astype(np.float32)
    if scale == 1:
        return film
    return cv2.resize(film, (max(2, round(width * scale)), max(2, round(height * scale))),
                      interpolation=cv2.INTER_AREA)


def _upscale(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == tuple(shape):
        return mask
    return cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)


def _disk(radius: float) -> np.ndarray:
    radius = max(1, round(radius))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
