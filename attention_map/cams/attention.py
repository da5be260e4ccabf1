"""A generative VLM's attention from the query tokens to the image tokens (CAM_VERSION=attention), on the image
tokens' grid.

Per layer of ATTENTION_LAYERS the attention rows of the query tokens (ATTENTION_QUERY: the question's tokens, the
last prompt token, or the generated answer's tokens) over the image tokens are averaged over the query tokens, the
heads then combined (ATTENTION_HEADS: mean or max), and the layers averaged.

Raw attention misleads: a few "sink" image tokens take most of it whatever the question. ATTENTION_NORMALIZE=relative
divides the map, token by token, by the map the same layers give a generic prompt (`GENERIC_PROMPT`) about the same
film, as in "MLLMs know where to look" (Zhang et al., ICLR 2025). Each map's `prompt_similarity` is its mean Spearman
correlation with the maps of the film's other questions: near 1, the maps do not depend on the question.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import torch

from ..config import LAYER_RANGE
from ..models.base import ModelLoadError, Targets
from ..saliency import spearman
from ..timing import StageTimes
from .base import BaseCAM, GridMap, grid_maps

GENERIC_PROMPT = "Write a general description of the image."


def parse_layers(text: str, depth: int) -> list[int]:
    """ATTENTION_LAYERS -> decoder layer indices: `auto` (the last half), or comma-separated indices and ranges
    `a-b` (inclusive), negative counted from the end."""
    if text == "auto":
        return list(range(depth // 2, depth))
    chosen = []
    for part in text.split(","):
        match = re.fullmatch(LAYER_RANGE, part)
        if not match:
            raise ModelLoadError(f"ATTENTION_LAYERS={text}: {part.strip()!r} is neither an index nor a range a-b")
        first, last = (int(g) % depth if g is not None and -depth <= int(g) < depth else None
                       for g in (match[1], match[2] or match[1]))
        if first is None or last is None:
            raise ModelLoadError(f"ATTENTION_LAYERS={text}: the language model has layers 0..{depth - 1}")
        chosen.extend(range(first, last + 1))
    return list(dict.fromkeys(chosen))


def combine(attention: torch.Tensor, heads: str) -> torch.Tensor:
    """(layers, heads, query tokens, image tokens) -> (image tokens,): mean over the query tokens, `heads` (mean
    or max) over the heads, mean over the layers."""
    per_head = attention.mean(dim=2)
    per_layer = per_head.amax(dim=1) if heads == "max" else per_head.mean(dim=1)
    return per_layer.mean(dim=0)


def similarities(cams: list[np.ndarray]) -> list[float]:
    """Each map's mean Spearman correlation with the others (NaN for a lone map; a flat map correlates 0)."""
    return [float(np.mean([spearman(cams[i], cams[j]) for j in range(len(cams)) if j != i]))
            if len(cams) > 1 else float("nan") for i in range(len(cams))]


class AttentionMap(BaseCAM):
    """The maps of a generative VLM (`models.vlm.VisionLanguageModel`) from its attention: no target layer, hook or
    gradient; each question is one `read` of the model."""

    name = "attention"
    needs_gradients = False

    def __init__(self, model, target_layer="auto", batch_size=64, precision="fp32", attention_layers: str = "auto",
                 heads: str = "mean", query: str = "question", normalize: str = "none", max_new_tokens: int = 32):
        if not getattr(model, "generates", False):
            raise ModelLoadError("CAM_VERSION=attention reads a generative VLM's attention (MODEL=hf:<id> or a "
                                 "LLaVA-style or Gemma-3-style folder)")
        if target_layer != "auto":
            raise ModelLoadError(f"TARGET_LAYER={target_layer}: the attention maps read ATTENTION_LAYERS")
        self.model, self.batch_size = model, batch_size
        self.layers = parse_layers(attention_layers, model.depth)
        self.heads, self.query, self.normalize, self.max_new_tokens = heads, query, normalize, max_new_tokens
        self.target_layer = f"language_model.layers[{','.join(map(str, self.layers))}]"
        self.precision = str(model.module.dtype).removeprefix("torch.")
        self.masked_forwards, self.times = 0, StageTimes()
        self.description = (f"{query} tokens, {heads} of the heads, {normalize} normalisation, weights in "
                            f"{self.precision}, answers of up to {max_new_tokens} tokens")

    @staticmethod
    def options(settings) -> dict:
        return dict(attention_layers=settings.ATTENTION_LAYERS, heads=settings.ATTENTION_HEADS,
                    query=settings.ATTENTION_QUERY, normalize=settings.ATTENTION_NORMALIZE,
                    max_new_tokens=settings.MAX_NEW_TOKENS)

    def hold(self) -> None:
        """Nothing to hold: the recording attention function is the model's from loading on, and records only
        inside `VisionLanguageModel.read`."""

    def release(self) -> None:
        """Nothing to release (see `hold`)."""

    def read(self, image: torch.Tensor, question: str):
        with self.times("attention"):
            return self.model.read(image, question, self.layers, self.query, self.max_new_tokens)

    def explain_grid(self, pixels, names):
        image = pixels[0]
        readings = [self.read(image, name) for name in names]
        cams = [combine(reading.attention, self.heads) for reading in readings]
        if self.normalize == "relative":
            generic = combine(self.read(image, GENERIC_PROMPT).attention, self.heads)
            cams = [cam / generic.clamp_min(1e-12) for cam in cams]
        self.readings = readings
        self.notes = {i: reading.note for i, reading in enumerate(readings) if reading.note}
        return [cam.view(reading.grid) for cam, reading in zip(cams, readings)]

    def explain(self, pixels, names) -> list[GridMap]:
        self.notes = {}
        cams = self.explain_grid(pixels, names)
        maps = grid_maps(cams, self.notes, Targets(list(names), None), [float("nan")] * len(names), names)
        alike = similarities([grid_map.cam for grid_map in maps])
        return [dataclasses.replace(grid_map, answer=reading.answer, p_yes=reading.p_yes, similarity=similar)
                for grid_map, reading, similar in zip(maps, self.readings, alike)]
