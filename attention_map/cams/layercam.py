"""LayerCAM (Jiang et al., IEEE TIP 2021): activations times their positive gradients, element by element."""
from __future__ import annotations

import torch

from .base import GradientCAM


class LayerCAM(GradientCAM):
    name = "LayerCAM"

    def combine(self, activations, gradients):
        return (torch.relu(gradients) * activations).sum(dim=0)
