"""gScoreCAM (Chen et al., ACCV 2022): Score-CAM on the top-k channels by mean gradient.

For several targets (prompts, classes) on one image the masked images depend only on the image and the channel, so
the outputs of the union of the targets' kept channels are computed once and every target is scored from them: an
image with Q targets costs at most C masked forwards, not Q * k, with exactly the reference's result. The masked
images of a batch of films go through the model together, so that every forward is full (one film's few hundred
leave the last of its own forwards part empty).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .base import BatchCAM

log = logging.getLogger(__name__)


class GScoreCAM(BatchCAM):
    name = "gScoreCAM"
    films_per_batch = {"cuda": 8, "cpu": 1}   # see docs/benchmarks.md, films per batch
    batch_size_counts_films = False           # it counts masked images

    def __init__(self, model, target_layer="auto", batch_size=64, precision="fp32", topk: int = 300,
                 compile: bool = False):
        super().__init__(model, target_layer, batch_size, precision)
        self.topk = topk
        if compile:   # the masked forwards only: the gradient pass, with its hook and backward, stays eager
            self.compiled = torch.compile(model.forward)
        self._compiling = compile

    @staticmethod
    def options(settings) -> dict:
        return {"topk": settings.TOPK, "compile": settings.COMPILE}

    def channel_masks(self, grids: torch.Tensor) -> torch.Tensor:
        """(U, 1, H, W) masks from (U, h, w) channels: each upsampled bilinear (align_corners=True) and scaled to
        [0, 1]."""
        masks = F.interpolate(grids[:, None], size=self.model.image_size, mode="bilinear", align_corners=True)
        low = masks.amin(dim=(2, 3), keepdim=True)
        high = masks.amax(dim=(2, 3), keepdim=True)
        return (masks - low) / (high - low + 1e-6)

    @torch.inference_mode()
    def masked_outputs(self, pixels: torch.Tensor, activations: torch.Tensor, channels: list[torch.Tensor]):
        """(sum of U_i, ...) outputs of the model for each input i multiplied by the mask of each of its channels
        `channels[i]` (U_i), in batches of BATCH_SIZE that run on from one input to the next."""
        film = torch.cat([torch.full((len(kept),), i, device=activations.device) for i, kept in enumerate(channels)])
        channel = torch.cat(channels)
        outputs = self.forward_in_batches(len(channel), lambda start, stop: (
            pixels[film[start:stop]] * self.channel_masks(activations[film[start:stop], channel[start:stop]])))
        self.masked_forwards += len(channel)
        return outputs

    def explain_inputs(self, pixels, names):
        with self.times("gradient pass"):
            activations, gradients, targets, scores = self.activations_and_gradients(pixels, names)
        channels = activations.shape[1]
        kept = [gradients[i, :len(t.labels)].mean(dim=(2, 3)).topk(min(self.topk, channels), dim=1).indices
                for i, t in enumerate(targets)]                  # (Q_i, k): the top k channels by mean gradient
        unions = [torch.unique(film_kept) for film_kept in kept]   # sorted
        log.debug("%d films keep %s channels: %d masked forwards", len(unions), [len(u) for u in unions],
                  sum(len(u) for u in unions))
        if self._compiling:   # the first compiled forward compiles: its time is a stage of its own
            with torch.inference_mode(), self.times("compile"):
                self.forward_in_batches(1, lambda start, stop: torch.zeros_like(pixels[:1]))
            self._compiling = False
        cams, notes = [], []
        with torch.inference_mode(), self.times("masked forwards"):
            outputs = self.masked_outputs(pixels.detach(), activations, unions)
            start = 0
            for film_activations, film_kept, union, film_targets in zip(activations, kept, unions, targets):
                film_outputs, start = outputs[start:start + len(union)], start + len(union)
                film_cams, film_notes = self._weighted(film_activations, film_kept, union,
                                                       film_targets.score(film_outputs))
                cams.append(film_cams)
                notes.append(film_notes)
        return cams, notes, targets, scores

    def _weighted(self, activations, kept, union, all_scores):
        """One film's maps: its activations (C, h, w) weighted by the softmax of the scores (U, Q) of its masked
        images over every channel, those not kept by a target scoring 0; and what to say about them."""
        # a masked forward that overflowed (fp16) scores as an unmasked channel would not: taken as 0, and said
        finite = torch.isfinite(all_scores)
        all_scores = torch.where(finite, all_scores, torch.zeros_like(all_scores))
        cams, notes = [], {}
        for q, target_kept in enumerate(kept):
            rows = torch.searchsorted(union, target_kept)
            scores = torch.zeros(activations.shape[0], device=activations.device)
            scores[target_kept] = all_scores[rows, q]
            dropped = int((~finite[rows, q]).sum())
            if dropped:
                notes[q] = (f"{dropped} of {len(rows)} masked-image scores were not finite at "
                            f"PRECISION={self.precision} and were taken as 0")
            weights = torch.softmax(scores, dim=0)   # over all C channels, as the reference does
            cams.append(torch.relu((weights[:, None, None] * activations).sum(dim=0)))
        return cams, notes
