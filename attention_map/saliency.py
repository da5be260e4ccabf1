"""Saliency metrics: a model's map against where people looked, as the saliency benchmarks define them (Bylinskii et
al., "What do different evaluation metrics tell us about saliency models?", 2018; Kuemmerer et al. for the
information gain). Pure functions on numpy arrays of one shape.

`saliency` is the model's map (>= 0); `truth` a map of where people looked (a fixation density, >= 0); `fixations` a
boolean mask of the fixated pixels. Distribution metrics (CC, KL, SIM) compare two maps; location metrics (NSS,
AUC-Judd, shuffled AUC, information gain) need the fixated pixels themselves.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy.stats import rankdata

EPS = np.finfo(np.float64).eps     # the MIT benchmark's epsilon in KL and the information gain


def _on_film(points, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of points (x, y, ...) in pixels, those that fall on the film as an (N, k) array, and their pixels' rows and
    columns."""
    array = np.asarray(points, np.float64).reshape(len(points), -1) if len(points) else np.zeros((0, 3))
    rows, columns = np.round(array[:, 1]).astype(int), np.round(array[:, 0]).astype(int)
    inside = (rows >= 0) & (rows < shape[0]) & (columns >= 0) & (columns < shape[1])
    return array[inside], rows[inside], columns[inside]


def fixation_map(points, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """A fixation density (H, W), summing to 1: each fixation (x, y, duration) in pixels a Gaussian of `sigma` pixels
    (truncated at 4 sigma) weighted by its duration. All zero when there is no fixation on the film."""
    impulses = np.zeros(shape, np.float64)
    kept, rows, columns = _on_film(points, shape)
    np.add.at(impulses, (rows, columns), np.maximum(kept[:, 2], 0.0))
    if impulses.sum() <= 0:
        return impulses
    size = 2 * int(np.ceil(4 * sigma)) + 1
    density = cv2.GaussianBlur(impulses, (size, size), sigma, borderType=cv2.BORDER_CONSTANT)
    return density / density.sum()


def fixation_mask(points, shape: tuple[int, int]) -> np.ndarray:
    """The fixated pixels (x, y[, ...] in pixels) that fall on the film."""
    mask = np.zeros(shape, bool)
    _, rows, columns = _on_film(points, shape)
    mask[rows, columns] = True
    return mask


def _standard(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64)
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


def _distribution(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64)
    total = values.sum()
    return values / total if total > 0 else np.full(values.shape, 1.0 / values.size)


def cc(saliency: np.ndarray, truth: np.ndarray) -> float:
    """Pearson's correlation of the two maps; 0 where either is constant."""
    return float((_standard(saliency) * _standard(truth)).mean())


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's correlation of the two maps (Pearson's of their ranks); 0 where either is constant."""
    return cc(rankdata(np.ravel(a)), rankdata(np.ravel(b)))


def sim(saliency: np.ndarray, truth: np.ndarray) -> float:
    """Similarity (histogram intersection) of the two maps as distributions: 1 identical, 0 disjoint."""
    return float(np.minimum(_distribution(saliency), _distribution(truth)).sum())


def kl(saliency: np.ndarray, truth: np.ndarray) -> float:
    """KL divergence of the model's distribution from the truth's, KL(truth || saliency), in nats; 0 is best."""
    p, q = _distribution(truth), _distribution(saliency)
    return float((p * np.log(EPS + p / (q + EPS))).sum())


def nss(saliency: np.ndarray, fixations: np.ndarray) -> float:
    """Normalised scanpath saliency: the mean of the standardised map at the fixated pixels (0 is chance)."""
    return float(_standard(saliency)[fixations].mean()) if fixations.any() else float("nan")


def auc_judd(saliency: np.ndarray, fixations: np.ndarray) -> float:
    """AUC-Judd: the map's values at the fixated pixels are the thresholds; true positives are the fixations above
    each, false positives the other pixels above it; the area under that curve (from (0, 0) to (1, 1))."""
    count, pixels = int(fixations.sum()), fixations.size
    if count == 0 or count == pixels:
        return float("nan")
    values = np.asarray(saliency, np.float64).ravel()
    thresholds = np.sort(values[fixations.ravel()])[::-1]
    above = np.searchsorted(np.sort(values), thresholds, side="left")      # pixels below each threshold
    true_positive = np.r_[0.0, np.arange(1, count + 1) / count, 1.0]
    false_positive = np.r_[0.0, (pixels - above - np.arange(1, count + 1)) / (pixels - count), 1.0]
    return float(np.trapezoid(true_positive, false_positive))


def auc_shuffled(saliency: np.ndarray, fixations: np.ndarray, other_fixations: np.ndarray) -> float:
    """Shuffled AUC: the map at this film's fixations against the map at the places other films were fixated
    (`other_fixations`, a mask on this film's grid), as the area under the ROC curve (ties count half). Centre bias
    alone scores 0.5."""
    positives = np.asarray(saliency, np.float64)[fixations]
    negatives = np.asarray(saliency, np.float64)[other_fixations & ~fixations]
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    ranks = rankdata(np.r_[positives, negatives])
    return float((ranks[:len(positives)].sum() - len(positives) * (len(positives) + 1) / 2)
                 / (len(positives) * len(negatives)))


def information_gain(saliency: np.ndarray, baseline: np.ndarray, fixations: np.ndarray) -> float:
    """Bits per fixation that the model's map, as a distribution, gains over `baseline` at the fixated pixels."""
    if not fixations.any():
        return float("nan")
    p, b = _distribution(saliency), _distribution(baseline)
    return float((np.log2(EPS + p[fixations]) - np.log2(EPS + b[fixations])).mean())


def centre_baseline(shape: tuple[int, int]) -> np.ndarray:
    """A centre-bias map: an isotropic Gaussian at the film's centre, sigma a quarter of its smaller side."""
    rows, columns = np.mgrid[: shape[0], : shape[1]]
    sigma = min(shape) / 4
    return np.exp(-((rows - (shape[0] - 1) / 2) ** 2 + (columns - (shape[1] - 1) / 2) ** 2) / (2 * sigma ** 2))
