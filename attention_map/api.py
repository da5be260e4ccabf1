"""The Python API: maps of any model from inside Python, a notebook or a training loop.

    from attention_map import explain, EpochHeatmaps

    maps = explain(model, images, targets=["right_sup", "left_inf"], method="GradCAM")   # (N, T, H, W) in [0, 1]

Maps are computed in eval mode (dropout off, batch-norm running statistics) whatever mode the model is in. Afterwards
no hook is left on the model, every submodule's train/eval mode and every parameter's `requires_grad` are as they
were, and no parameter's `.grad` has changed.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from . import outputs
from .cams import CAM_METHODS
from .maps import grid_to_image
from .models import ModelAdapter, TargetError
from .models.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier
from .render import overlay

_METHODS = {name.lower(): name for name in CAM_METHODS}


@contextlib.contextmanager
def evaluating(module: torch.nn.Module):
    """Eval mode and parameters without gradients inside the block; modes and flags as they were after it."""
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval().requires_grad_(False)
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


def as_adapter(model, image_size: tuple[int, int], channels: int = 3, mean=None, std=None,
               output_names=()) -> ModelAdapter:
    """`model` as it is when it is an adapter (from `attention_map.models.load_model`); a bare nn.Module as a
    classifier reading `image_size` inputs with `channels` channels (ImageNet's mean and std unless given)."""
    if isinstance(model, ModelAdapter):
        return model
    mean = mean or (IMAGENET_MEAN if channels == 3 else (0.5,) * channels)
    std = std or (IMAGENET_STD if channels == 3 else (0.5,) * channels)
    classifier = Classifier(model, image_size, mean, std, output_names)
    if output_names:       # names that do not fit would label the maps of other outputs
        count = classifier.output_count()
        if len(output_names) != count:
            raise ValueError(f"output_names names {len(output_names)} outputs but the model has {count} (give "
                             f"output_names, every output's name in order, and the targets among them)")
    return classifier


def _as_tensor(images) -> torch.Tensor:
    """The images as one float tensor: model inputs (N, C, H, W), or grey films (N, H, W) (a list of (H, W) arrays
    stacked) in [0, 1] (8-bit films are divided by 255, as the Explainer does with video frames)."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(image) for image in images])
    tensor = torch.as_tensor(images)
    tensor = tensor.float() / 255 if tensor.dtype == torch.uint8 and tensor.dim() == 3 else tensor.float()
    if tensor.dim() not in (3, 4) or len(tensor) == 0:
        raise ValueError(f"images of shape {list(tensor.shape)}: give model inputs (N, C, H, W) or grey films "
                         f"(N, H, W) in [0, 1], N at least 1")
    bad = _outside_0_1(tensor) if tensor.dim() == 3 else None
    if bad is not None:
        raise ValueError(f"grey films (N, H, W) are read in [0, 1] but these hold {bad:g} (divide 16-bit values by "
                         f"65535; or give model inputs (N, C, H, W), used as they are)")
    return tensor


def _outside_0_1(values) -> float | None:
    """A value of `values` outside [0, 1] (NaN is), or None where every value is inside."""
    values = torch.as_tensor(values)
    outside = ~((values >= 0) & (values <= 1))
    return values[outside][0].item() if bool(outside.any()) else None


def _inputs(adapter: ModelAdapter, images: torch.Tensor) -> torch.Tensor:
    """Model inputs (N, C, H, W): 4-D images are the model's input as they are; grey films in [0, 1] are prepared
    as the pipeline prepares films."""
    if images.dim() == 4:
        return images.to(adapter.device)
    return torch.cat([adapter.prepare(film) for film in images.cpu().numpy()])


def _method(method: str):
    """The CAM method named, in any case; ValueError naming the ones there are."""
    if method.lower() not in _METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(CAM_METHODS)}")
    return CAM_METHODS[_METHODS[method.lower()]]


def _check_targets(adapter: ModelAdapter, names: list[str]) -> None:
    """TargetError for the first target the model has no output for, before any work."""
    for name in dict.fromkeys(names):
        if reason := adapter.check_target(name):
            raise TargetError(reason)


def _names(targets) -> list[str]:
    """Targets as the methods take them: None (the predicted class), one, or a list."""
    if targets is None:
        return [""]
    return [str(t) for t in targets] if isinstance(targets, (list, tuple)) else [str(targets)]


def explain(model, images, targets=None, method: str = "GradCAM", layer: str = "auto", batch_size: int = 16,
            channels: int = 3, mean=None, std=None, output_names=()) -> np.ndarray:
    """Maps (N, T, H, W) in [0, 1] at the images' size: for each image, one per target.

    model: an nn.Module whose output is (B, K) scores, (B, zones, classes) or a list or dict of heads; or an adapter
        from `attention_map.models.load_model` (a CLIP-like model takes prompts as targets; a generative VLM,
        with method="attention", questions).
    images: model inputs (N, C, H, W), array or tensor, used as they are; or grey films (N, H, W) or a list of
        (H, W) arrays in [0, 1] (uint8: divided by 255), resized to the adapter's input size and normalised (a bare
        module: the films' size, `channels` channels, `mean` and `std`).
    targets: None (each image's predicted class), one output index or name, or a list of them (T maps per image);
        names are those of `output_names` (a bare module: every output's name, in order) or of the adapter (a
        CLIP-like model's are prompts). A target the model has no output for raises TargetError before any work.
    method: any CAM_VERSION name, any case. Gradient methods explain `batch_size` images per forward and backward.
    """
    method_class, names = _method(method), _names(targets)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: explain at least 1 image per pass")
    module = model.module if isinstance(model, ModelAdapter) else model
    images = _as_tensor(images)
    size = tuple(images.shape[-2:])                    # of the input, and of the maps
    with evaluating(module):
        adapter = as_adapter(model, size, channels, mean, std, output_names)
        _check_targets(adapter, names)
        inputs = _inputs(adapter, images)
        cam = method_class(adapter, layer, batch_size)
        maps = []
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start:start + batch_size]
            for image_maps in cam.explain_batch(batch, [names] * len(batch)):
                maps.append([grid_to_image(grid_map.cam, size[::-1]) for grid_map in image_maps])
    return np.asarray(maps, dtype=np.float32)


class Explainer:
    """One model and method made ready once for a stream of frames (live video, a detector at the bedside): the hook
    on the target layer is registered when the Explainer is made and removed by `close` (or at the end of a `with`
    block), not for each frame.

        with Explainer(load_model("torchvision-det:fcos_resnet50_fpn", device), "HiResCAM", ["topk"]) as explainer:
            for frame in frames:                         # grey (H, W) in [0, 1], or (H, W, 3) uint8 as video gives
                maps, detections = explainer(frame)      # (T, H, W) in [0, 1]; [x0, y0, x1, y1, class, score]

    `layer`: as TARGET_LAYER (several, comma-separated, are averaged). The model stays in eval mode with parameters
    without gradients until `close`, which puts them back as they were. A detector's `box` target gives one map
    per detection, so T differs between frames; `labels` says what each map of the last frame explains.
    """

    def __init__(self, model, method: str = "HiResCAM", targets=None, layer: str = "auto", image_size=None,
                 channels: int = 3, mean=None, std=None, output_names=()):
        from .cams.layers import on_layers

        method_class, self.names = _method(method), _names(targets)
        module = model.module if isinstance(model, ModelAdapter) else model
        if not isinstance(model, ModelAdapter) and image_size is None:
            raise ValueError("a bare nn.Module needs image_size=(height, width) of its input")
        self._evaluating = evaluating(module)
        self._evaluating.__enter__()
        try:
            self.adapter = as_adapter(model, image_size, channels, mean, std, output_names)
            _check_targets(self.adapter, self.names)
            self.cam = on_layers(method_class, self.adapter, layer)
            self.cam.hold()
        except BaseException:
            self._evaluating.__exit__(None, None, None)
            raise
        self.labels: list[str] = []

    def __call__(self, frame) -> tuple[np.ndarray, list]:
        """The maps (T, H, W) in [0, 1] of one frame at its own size, and its detections (a detector's: [x0, y0,
        x1, y1, class, score] in the frame's pixels; [] for other models)."""
        film = np.asarray(frame)
        if film.ndim == 3:   # colour video: the grey the pipeline reads
            film = film.mean(axis=2)
        film = film.astype(np.float32) / (255.0 if np.asarray(frame).dtype == np.uint8 else 1.0)
        bad = _outside_0_1(film)
        if bad is not None:
            raise ValueError(f"a frame is read in [0, 1] (uint8: 0..255) but this one holds {bad:g}")
        height, width = film.shape
        grid_maps = self.cam.explain(self.adapter.prepare(film), self.names)
        self.labels = [grid_map.target for grid_map in grid_maps]
        maps = np.stack([grid_to_image(grid_map.cam, (width, height)) for grid_map in grid_maps])
        detections = [d.in_pixels(width, height) for d in grid_maps[0].detections] if grid_maps else []
        return maps, detections

    def close(self) -> None:
        """Remove the hook and put the model's modes and flags back."""
        if self._evaluating is not None:
            self.cam.release()
            self._evaluating.__exit__(None, None, None)
            self._evaluating = None

    def __enter__(self) -> Explainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EpochHeatmaps:
    """Heatmaps of a fixed set of images written during training.

        heatmaps = EpochHeatmaps("runs/zones", films, ["right_sup", "left_sup", ...], every=5)
        for epoch in range(epochs):
            train_one_epoch(model)
            heatmaps(model, epoch, metric=validation_auc)      # heatmaps/{epoch:03d}_heatmap_{target}.png
        heatmaps.finish()                                      # heatmap_{target}.png, of the best epoch

    `images`: grey films (N, H, W) in [0, 1] (shown under the maps), or model inputs (N, C, H, W) (their first
    channel, scaled to [0, 1], is shown). `target_names` are also the model's output names, every one in order,
    unless `output_names` (in `explain_options`) names them. Each PNG holds the N images side by side for one
    target. Maps are made when `epoch % every == 0` and whenever `metric` (higher is better) is the best so far, so
    `finish` can write the best epoch's maps; `finish(model)` makes them from the model given instead (e.g. the best
    checkpoint).
    """

    def __init__(self, out_dir, images, target_names, every: int = 1, colormap: str = "custom_purple_red",
                 method: str = "GradCAM", layer: str = "auto", alpha: float = 0.5, **explain_options):
        if every < 1:
            raise ValueError(f"every={every}: maps are made every `every` epochs, at least 1")
        self.out_dir, self.every, self.colormap, self.alpha = Path(out_dir), every, colormap, alpha
        self.images, self.target_names = images, [str(t) for t in target_names]
        self.options = dict(method=method, layer=layer, **explain_options)
        if "output_names" not in self.options and not all(t.lstrip("-").isdigit() for t in self.target_names):
            self.options["output_names"] = tuple(self.target_names)
        shown = _as_tensor(images)
        shown = shown[:, 0] if shown.dim() == 4 else shown
        low = shown.amin(dim=(1, 2), keepdim=True)
        self.films = ((shown - low) / (shown.amax(dim=(1, 2), keepdim=True) - low + 1e-8)).cpu().numpy()
        self.best_metric, self.best_maps, self.last_maps = None, None, None

    def __call__(self, model, epoch: int, metric: float | None = None) -> list[Path]:
        """Write this epoch's heatmaps when it is due; keep its maps when `metric` is the best so far."""
        due = epoch % self.every == 0
        best = metric is not None and (self.best_metric is None or metric > self.best_metric)
        if not (due or best):
            return []
        maps = self.last_maps = explain(model, self.images, self.target_names, **self.options)
        if best:
            self.best_metric, self.best_maps = metric, maps
        return self._write(maps, f"{epoch:03d}_") if due else []

    def finish(self, model=None) -> list[Path]:
        """heatmap_{target}.png: of `model` if given, else of the epoch with the best metric (else the last made)."""
        maps = (explain(model, self.images, self.target_names, **self.options) if model is not None else
                self.best_maps if self.best_maps is not None else self.last_maps)
        if maps is None:
            raise ValueError("EpochHeatmaps.finish(): no maps were made yet; pass the model")
        return self._write(maps, "", folder=self.out_dir)

    def _write(self, maps: np.ndarray, prefix: str, folder: Path | None = None) -> list[Path]:
        folder = folder or self.out_dir / "heatmaps"
        written = []
        for t, target in enumerate(self.target_names):
            tiles = [overlay(film, maps[i, t], self.colormap, self.alpha) for i, film in enumerate(self.films)]
            path = folder / f"{prefix}heatmap_{outputs.safe_name(target)}.png"
            outputs.write_png(path, np.concatenate(tiles, axis=1))
            written.append(path)
        return written
