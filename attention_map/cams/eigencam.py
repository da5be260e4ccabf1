"""EigenCAM (Muhammad and Yeasin, IJCNN 2020): the activations projected on their first principal component. It
uses no gradient, so every target of a film gets the same map; the component's sign is the SVD's, as in
pytorch-grad-cam, so on some films the map shows the complement of what stands out."""
from __future__ import annotations

import numpy as np
import torch

from .base import GradientCAM


class EigenCAM(GradientCAM):
    name = "EigenCAM"
    needs_gradients = False

    def combine(self, activations, gradients):
        channels, height, width = activations.shape
        tokens = activations.reshape(channels, -1).T.cpu().numpy()       # (h * w, C)
        tokens = tokens - tokens.mean(axis=0)
        # numpy's SVD, as the reference, for its sign; without the full U (h*w x h*w: 6400 x 6400 on a detector's
        # 80 x 80 grid), which the first right singular vector does not need
        component = np.linalg.svd(tokens, full_matrices=False)[2][0]
        return torch.from_numpy(tokens @ component).reshape(height, width).to(activations.device)
