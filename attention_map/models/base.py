"""The one interface through which the pipeline reaches a model (`ModelAdapter`), what a map explains (`Targets`),
and the search for the layer to explain by one dry forward."""
from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says what to do."""


class TargetError(ValueError):
    """A target the model has no output for; the message names the target and what the model has."""


@dataclass
class Targets:
    """What the maps of one input explain: one label per map (the manifest's `target`) and the function that scores
    them from the model's outputs for a batch of inputs (the clean input, or its masked copies).

    One asked name gives one map, except where a model makes several of it (a detector's `box`: one per detection);
    then `asked` says which name each map answers and `files` the suffix that names its own file. `notes` say what a
    map's reader should know (no detection); `cold` marks maps with nothing to explain, all zero whatever the method
    (EigenCAM, say, ignores the target); `detections` are the input's, where the model detects."""
    labels: list[str]
    score: Callable[[torch.Tensor], torch.Tensor]   # outputs (B, ...) -> (B, len(labels))
    asked: list[str] | None = None                  # None: the names asked, one map each
    files: list[str | None] | None = None           # None each: the map is the asked name's own file
    notes: list[str] | None = None
    cold: list[bool] | None = None
    detections: tuple = ()


class ModelAdapter(ABC):
    """A model kind: the input made from a film, a batched forward, the targets scored from the forward's outputs,
    and the layer a CAM weights. A new kind is one subclass of this in a new file, plus a line in `models.load_model`.
    """

    module: torch.nn.Module       # the whole network (hooks are registered on its submodules)
    image_size: tuple[int, int]   # (height, width) of the model input
    mean: tuple[float, ...]       # per input channel: 3 (grey copied to RGB) or 1 (grey)
    std: tuple[float, ...]
    detects = False               # True: the maps come with the input's detections (Targets.detections)

    @abstractmethod
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, channels, H, W) prepared inputs -> the outputs that targets are scored from (B, ...)."""

    @abstractmethod
    def targets(self, names: list[str], outputs: torch.Tensor) -> Targets:
        """The targets that `names` ask for, given the clean input's outputs (1, ...), which fix what depends on
        the input (the predicted class). Raises TargetError for a name the model has no output for."""

    def note(self, name: str) -> str:
        """A warning about how the model reads a target (a truncated prompt), or ''."""
        return ""

    def check_target(self, name: str) -> str:
        """Why the model has no output for the target `name`, or '' when it has (any prompt suits a CLIP-like model)."""
        return ""

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def prepare(self, film: np.ndarray, size: tuple[int, int] | None = None) -> torch.Tensor:
        """A grey film in [0, 1] -> (1, channels, H, W) model input: squashed (not cropped) to `size` (by default
        the model's input size) with bicubic resampling, grey copied to every channel, normalised with the model's
        mean and std."""
        tensor = torch.from_numpy(film).to(self.device, torch.float32)[None, None]
        resized = F.interpolate(tensor, size=size or self.image_size, mode="bicubic", align_corners=False,
                                antialias=True)
        channels = resized.clamp(0, 1).expand(-1, len(self.mean), -1, -1)
        mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
        return ((channels - mean) / std).contiguous()

    def prepare_batch(self, films: list[np.ndarray]) -> torch.Tensor:
        """`prepare` of each film, as one (B, channels, H, W) batch."""
        return torch.cat([self.prepare(film) for film in films])

    def default_target_layer(self) -> str:
        """The layer TARGET_LAYER=auto explains, found by one dry forward (see `find_target_layer`)."""
        return self._probe()[0]

    def activations_to_grid(self, activations: torch.Tensor) -> torch.Tensor:
        """The target layer's output -> (B, C, h, w): a convolutional output as it is, ViT tokens on the patch grid
        that the dry forward saw."""
        if activations.dim() == 4:
            return activations
        if activations.dim() != 3:
            raise ValueError(f"target layer output of shape {tuple(activations.shape)} is neither tokens nor a grid")
        return tokens_to_grid(activations, self._probe()[1])

    def _probe(self) -> tuple[str, tuple[int, int] | None]:
        if not hasattr(self, "_probed"):
            example = torch.zeros(1, len(self.mean), *self.image_size, device=self.device)
            self._probed = find_target_layer(self.module, lambda: self.forward(example))
        return self._probed

    def find_module(self, path: str) -> torch.nn.Module:
        """Resolve 'visual.trunk.blocks[-1].norm1' (or 'visual.trunk.blocks.-1.norm1') to a submodule."""
        module = self.module
        for part in re.findall(r"[^.\[\]]+", path):
            try:
                module = module[int(part)] if re.fullmatch(r"-?\d+", part) else getattr(module, part)
            except (AttributeError, IndexError, TypeError):
                raise ModelLoadError(f"TARGET_LAYER={path}: the model has no module {part!r} there") from None
        if not isinstance(module, torch.nn.Module):
            raise ModelLoadError(f"TARGET_LAYER={path} is not a module")
        return module


def find_target_layer(module: torch.nn.Module, forward: Callable[[], object]) -> tuple[str, tuple[int, int] | None]:
    """The layer TARGET_LAYER=auto explains and, for a ViT, the patch grid, from one dry forward that records every
    submodule's output in the order they ran (not from names, which differ between libraries).

    A ViT (norms inside a sequence of blocks give tokens (B, N, C)): the first norm of the last block, the input of
    its attention (after it only the class token feeds the output, so later layers have no gradient on the patch
    tokens); its grid is that of the last spatial output before the blocks (the patch embedding). Otherwise: the
    last layer with a spatial (B, C, h, w) output, h * w > 1. Raises ModelLoadError naming TARGET_LAYER and listing
    the last layers that ran when none fits.
    """
    ran: list[tuple[str, tuple]] = []
    handles = [child.register_forward_hook(
        lambda child, args, output, name=name: ran.append((name, tuple(output.shape)))
        if isinstance(output, torch.Tensor) else None)
        for name, child in module.named_modules() if name and not isinstance(child, torch.nn.Identity)]
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(module.named_modules())

    def in_block(name: str) -> bool:   # a norm whose parent is one block of a sequence of blocks
        parent = name.rpartition(".")[0]
        return "." in parent and isinstance(modules[parent.rpartition(".")[0]], (torch.nn.Sequential,
                                                                                 torch.nn.ModuleList))

    spatial = [i for i, (_, shape) in enumerate(ran) if len(shape) == 4 and shape[2] * shape[3] > 1]
    tokens = [i for i, (name, shape) in enumerate(ran)
              if len(shape) == 3 and "norm" in type(modules[name]).__name__.lower() and in_block(name)]
    before = [i for i in spatial if tokens and i < tokens[0]]
    if tokens and before:
        grid = ran[before[-1]][1][2:]
        block = ran[tokens[-1]][0].rpartition(".")[0]
        first = next(ran[i] for i in tokens if ran[i][0].rpartition(".")[0] == block)
        if first[1][1] >= grid[0] * grid[1]:
            return readable_path(module, first[0]), (int(grid[0]), int(grid[1]))
    if not spatial:
        shapes = ", ".join(f"{name} {list(shape)}" for name, shape in ran[-8:])
        raise ModelLoadError(f"TARGET_LAYER=auto: no layer of this model has a spatial (B, C, h, w) output; name one "
                             f"with TARGET_LAYER (the last layers that ran: {shapes})")
    return readable_path(module, ran[spatial[-1]][0]), None


def readable_path(module: torch.nn.Module, name: str) -> str:
    """'visual.trunk.blocks.11.norm1' -> 'visual.trunk.blocks[-1].norm1': indices in brackets, the last child of
    a sequence as [-1], so that the name reads the same for any depth."""
    parts, node = [], module
    for part in name.split("."):
        if part.isdigit() and isinstance(node, (torch.nn.Sequential, torch.nn.ModuleList)):
            index = int(part)
            bracket = f"[{-1 if index == len(node) - 1 else index}]"
            parts[-1:] = [parts[-1] + bracket] if parts else [bracket]
            node = node[index]
        else:
            parts.append(part)
            node = getattr(node, part)
    return ".".join(parts)


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    """(B, N, C) tokens -> (B, C, h, w). Prefix tokens (CLS, registers) are the first N - h*w tokens.

    With no known grid, the patch tokens are taken as the largest square that fits.
    """
    count = tokens.shape[1]
    if grid is None:
        side = int(count ** 0.5)
        grid = (side, side)
    h, w = grid
    prefix = count - h * w
    if prefix < 0:
        raise ValueError(f"{count} tokens cannot hold a {h}x{w} patch grid")
    patches = tokens[:, prefix:, :]
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def read_model_folder(spec: str, libraries, config_name: str, weights: Path | None) -> tuple[str, dict, Path | None]:
    """MODEL -> (the library's model name, the folder's config or {}, the weights file): a library name
    (`timm:resnet50`) is as it is; a folder's `config_name` names the library's model and, unless MODEL_WEIGHTS does,
    the weights."""
    if spec.startswith(tuple(libraries)):
        return spec, {}, weights
    folder = Path(spec.removeprefix("local-dir:")).expanduser()
    config = json.loads((folder / config_name).read_text())
    if weights is None and config.get("weights"):
        weights = folder / config["weights"]
    return config["model"], config, weights


def build_by_prefix(libraries: dict, model_spec: str, spec: str, weights: Path | None, kwargs: dict):
    """What the library that `model_spec` starts with builds of the rest of it; one line naming MODEL otherwise."""
    prefix = next((p for p in libraries if model_spec.startswith(p)), None)
    if prefix is None:
        raise ModelLoadError(f"MODEL={spec}: \"model\" must start with {', '.join(libraries)}")
    return libraries[prefix](model_spec[len(prefix):], spec, weights, kwargs)


def save_weights(module: torch.nn.Module, path: Path, made_by: str, half: bool = False) -> None:
    """`module`'s state_dict as safetensors at `path`, floating tensors in fp16 where `half` (the pipeline computes
    in fp32 or the PRECISION asked, whatever the file holds), with one metadata key: safetensors writes metadata in
    hash order, and the same weights must give the same bytes."""
    from safetensors.torch import save_file

    state = {name: (tensor.detach().to(torch.float16) if half and tensor.is_floating_point() else tensor.detach())
             .contiguous().clone() for name, tensor in module.state_dict().items()}
    save_file(state, str(path), metadata={"made_by": made_by})


def write_model_folder(folder: Path, module: torch.nn.Module, config: dict, config_name: str, made_by: str) -> Path:
    """A trained model as a folder the pipeline loads: `config` as `config_name` and the fp16 weights in the file
    it names; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(module, folder / config["weights"], made_by, half=True)
    (folder / config_name).write_text(json.dumps(config, indent=2) + "\n")
    return folder
