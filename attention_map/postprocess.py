"""Post-processing of a map against its film: zeroing it outside the body mask (attention_map.body_mask) and the
dense-CRF refinement."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
