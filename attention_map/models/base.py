"""The one interface through which the pipeline reaches a vision-language model."""
from __future__ import annotations

import re
from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.nn.functional as F


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says what to do."""


class VisionTextModel(ABC):
    """A CLIP-like model: normalised image and text embeddings, a logit scale, and a layer to explain.

    A new backbone is one subclass of this in a new file, plus a line in `models.load_model`.
    """

    module: torch.nn.Module       # the whole network (hooks are registered on its submodules)
    image_size: tuple[int, int]   # (height, width) of the model input
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    context_length: int           # text tokens the model reads; longer prompts are truncated

    @abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D) unit-length embeddings."""

    @abstractmethod
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (Q, D) unit-length embeddings."""

    @abstractmethod
    def count_tokens(self, prompt: str) -> int:
        """Tokens the prompt takes, special tokens included, before truncation to `context_length`."""

    @property
    @abstractmethod
    def logit_scale(self) -> torch.Tensor:
        """The learned temperature, already exponentiated: score = logit_scale * cos(image, text)."""

    @abstractmethod
    def default_target_layer(self) -> str:
        """Dotted path of the layer whose activations a CAM weights."""

    @abstractmethod
    def activations_to_grid(self, activations: torch.Tensor) -> torch.Tensor:
        """The target layer's output -> (B, C, h, w), channels first on the patch grid."""

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def prepare(self, film: np.ndarray) -> torch.Tensor:
        """A grey film in [0, 1] -> (1, 3, H, W) model input: squashed (not cropped) with bicubic
        resampling, grey copied to three channels, normalised with the model's mean and std."""
        tensor = torch.from_numpy(film).to(self.device, torch.float32)[None, None]
        resized = F.interpolate(tensor, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        rgb = resized.clamp(0, 1).expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return ((rgb - mean) / std).contiguous()

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
