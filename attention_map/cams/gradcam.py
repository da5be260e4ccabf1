"""Grad-CAM (Selvaraju et al., ICCV 2017): each channel weighted by its mean gradient."""
from __future__ import annotations

import torch

from .base import GradientCAM


class GradCAM(GradientCAM):
    name = "GradCAM"

    def combine(self, activations, gradients):
        return torch.einsum("c,chw->hw", gradients.mean(dim=(1, 2)), activations)
