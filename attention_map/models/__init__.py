"""Models are reached through `VisionTextModel`; `load_model` picks the backend for a MODEL value."""
from __future__ import annotations

import torch

from .base import ModelLoadError, VisionTextModel
from . import open_clip_model


def load_model(spec: str, device: torch.device, offline: bool = False) -> VisionTextModel:
    """The model named by MODEL: `hf-hub:<id>` or a local folder in the pipeline's format.

    `offline`: never touch the network (a hub model must then be in the local cache).
    A new backend is one module implementing VisionTextModel and one branch here.
    """
    if offline:
        open_clip_model.go_offline()
    return open_clip_model.load(spec, device)


__all__ = ["ModelLoadError", "VisionTextModel", "load_model"]
