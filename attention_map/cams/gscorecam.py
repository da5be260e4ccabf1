"""gScoreCAM (Chen et al., ACCV 2022): Score-CAM on the top-k channels by mean gradient.

For several targets (prompts, classes) on one image the masked images depend only on the image and the channel, so
the outputs of the union of the targets' kept channels are computed once and every target is scored from them: an
image with Q targets costs at most C masked forwards, not Q * k, with exactly the reference's result.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .base import BaseCAM

log = logging.getLogger(__name__)


class GScoreCAM(BaseCAM):
    name = "gScoreCAM"

    def __init__(self, model, target_layer="auto", batch_size=64, precision="fp32", topk: int = 300):
        super().__init__(model, target_layer, batch_size, precision)
        self.topk = topk

    @staticmethod
    def options(settings) -> dict:
        return {"topk": settings.TOPK}

    def channel_masks(self, activations: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """(U, 1, H, W) masks: each channel upsampled bilinear (align_corners=True) and scaled to [0, 1]."""
        grids = activations[channels][:, None]
        masks = F.interpolate(grids, size=self.model.image_size, mode="bilinear", align_corners=True)
        low = masks.amin(dim=(2, 3), keepdim=True)
        high = masks.amax(dim=(2, 3), keepdim=True)
        return (masks - low) / (high - low + 1e-6)

    @torch.inference_mode()
    def masked_outputs(self, pixels: torch.Tensor, activations: torch.Tensor, channels: torch.Tensor):
        """(U, ...) outputs of the model for the input multiplied by each channel's mask, in batches."""
        outputs = self.forward_in_batches(
            len(channels), lambda start, stop: pixels * self.channel_masks(activations, channels[start:stop]))
        self.masked_forwards += len(channels)
        return outputs

    def explain_grid(self, pixels, names):
        with self.times("gradient pass"):
            activations, gradients, targets, _ = self.activations_and_gradients(pixels, names)
            activations, gradients, targets = activations[0], gradients[0], targets[0]
        channels = activations.shape[0]
        importance = gradients.mean(dim=(2, 3))                          # (Q, C), signed
        kept = importance.topk(min(self.topk, channels), dim=1).indices  # (Q, k)
        union = torch.unique(kept)                                       # sorted
        log.debug("%d targets keep %d channels in all: %d masked forwards", len(names), len(union), len(union))
        with torch.inference_mode(), self.times("masked forwards"):
            all_scores = targets.score(self.masked_outputs(pixels.detach(), activations, union))   # (U, Q)
            # a masked forward that overflowed (fp16) scores as an unmasked channel would not: taken as 0, and said
            finite = torch.isfinite(all_scores)
            all_scores = torch.where(finite, all_scores, torch.zeros_like(all_scores))
            cams = []
            for q in range(len(targets.labels)):
                rows = torch.searchsorted(union, kept[q])
                scores = torch.zeros(channels, device=activations.device)
                scores[kept[q]] = all_scores[rows, q]
                dropped = int((~finite[rows, q]).sum())
                if dropped:
                    self.notes[q] = (f"{dropped} of {len(rows)} masked-image scores were not finite at "
                                     f"PRECISION={self.precision} and were taken as 0")
                weights = torch.softmax(scores, dim=0)   # over all C channels, as the reference does
                cams.append(torch.relu((weights[:, None, None] * activations).sum(dim=0)))
        return cams
