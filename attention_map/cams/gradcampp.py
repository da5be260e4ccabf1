"""Grad-CAM++ (Chattopadhay et al., WACV 2018): channel weights from positive gradients, each scaled by the
closed-form alpha of the paper's exponential-score derivation (second and third powers of the gradient)."""
from __future__ import annotations

import torch

from .base import GradientCAM


class GradCAMPlusPlus(GradientCAM):
    name = "GradCAM++"

    def combine(self, activations, gradients):
        squared = gradients ** 2
        alpha = squared / (2 * squared + activations.sum(dim=(1, 2))[:, None, None] * squared * gradients + 1e-6)
        alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
        weights = (torch.relu(gradients) * alpha).sum(dim=(1, 2))
        return torch.einsum("c,chw->hw", weights, activations)
