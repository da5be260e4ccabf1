"""One method on several target layers (TARGET_LAYER=a,b): each layer's map scaled to [0, 1] on the finest of their
grids, then averaged, as pytorch-grad-cam aggregates several target layers. A detector's head reads feature maps of
several strides, and each shows the objects of its own size."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from ..maps import scale_to_unit
from .base import BaseCAM, GridMap


class LayerAverage:
    """Duck-types the BaseCAM the run uses (name, target_layer, batches_films, batch_size_counts_films, batch_size,
    precision, times, masked_forwards, explain_batch) over one method per layer."""

    def __init__(self, methods: list[BaseCAM]):
        self.methods = methods
        first = methods[0]
        self.name, self.batches_films, self.precision = first.name, first.batches_films, first.precision
        self.batch_size_counts_films = first.batch_size_counts_films
        self.target_layer = ",".join(method.target_layer for method in methods)

    @property
    def batch_size(self) -> int:
        return self.methods[0].batch_size

    @property
    def masked_forwards(self) -> int:
        return sum(method.masked_forwards for method in self.methods)

    @property
    def times(self):
        return self.methods[0].times

    @times.setter
    def times(self, value) -> None:
        for method in self.methods:
            method.times = value

    def hold(self) -> None:
        for method in self.methods:
            method.hold()

    def release(self) -> None:
        for method in self.methods:
            method.release()

    def explain_batch(self, pixels, names) -> list[list[GridMap]]:
        per_layer = [method.explain_batch(pixels, names) for method in self.methods]
        return [[average(layer_maps) for layer_maps in zip(*image_maps)] for image_maps in zip(*per_layer)]

    def explain(self, pixels, names) -> list[GridMap]:
        return self.explain_batch(pixels, [names])[0]


def average(maps: list[GridMap]) -> GridMap:
    """The mean of one target's maps from several layers, each resized (bilinear) to the finest grid and scaled to
    [0, 1]; the first layer's map says what it explains, and every layer's warnings are kept."""
    height, width = max((m.cam.shape for m in maps), key=lambda shape: shape[0] * shape[1])
    cams = [scale_to_unit(cv2.resize(m.cam, (width, height), interpolation=cv2.INTER_LINEAR)) for m in maps]
    warnings = "; ".join(dict.fromkeys(m.warning for m in maps if m.warning))
    return dataclasses.replace(maps[0], cam=np.mean(cams, axis=0).astype(np.float32), warning=warnings)


def on_layers(method: type[BaseCAM], model, layers: str, *args, **kwargs):
    """`method` on the layer TARGET_LAYER names, or averaged over several comma-separated ones."""
    methods = [method(model, layer.strip(), *args, **kwargs) for layer in layers.split(",")]
    return methods[0] if len(methods) == 1 else LayerAverage(methods)
