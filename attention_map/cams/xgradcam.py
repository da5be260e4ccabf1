"""XGradCAM (Fu et al., BMVC 2020): each channel weighted by its gradient averaged with the activation as weight."""
from __future__ import annotations

import torch

from .base import GradientCAM


class XGradCAM(GradientCAM):
    name = "XGradCAM"

    def combine(self, activations, gradients):
        weights = (gradients * activations).sum(dim=(1, 2)) / (activations.sum(dim=(1, 2)) + 1e-7)
        return torch.einsum("c,chw->hw", weights, activations)
