"""Score-CAM as gScoreCAM over every channel of the target layer (Wang et al., CVPR Workshops 2020; Chen et al.
keep only the top-k channels by gradient): as many masked forwards per film as the layer has channels."""
from __future__ import annotations

from .gscorecam import GScoreCAM


class ScoreCAM(GScoreCAM):
    name = "ScoreCAM"
    needs_gradients = False   # every channel is kept, so no gradient is needed to rank them

    def __init__(self, model, target_layer="auto", batch_size=64, precision="fp32", topk: int = 300,
                 compile: bool = False):
        super().__init__(model, target_layer, batch_size, precision, topk=2 ** 31 - 1,   # topk: every channel
                         compile=compile)
