"""HiResCAM (Draelos and Carin, 2020): activations times their gradients, element by element, summed over channels
(Grad-CAM without averaging the gradients away, so the map shows where the score actually came from)."""
from __future__ import annotations

from .base import GradientCAM


class HiResCAM(GradientCAM):
    name = "HiResCAM"

    def combine(self, activations, gradients):
        return (gradients * activations).sum(dim=0)
