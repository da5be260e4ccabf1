"""Models are reached through `ModelAdapter`; `load_model` picks the adapter for a MODEL value."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import model_kind
from .base import ModelAdapter, ModelLoadError, Targets, TargetError
from . import classifier, detector, open_clip_model, vlm

# The environment under which the models the project trains (toy.py, zones.py, lesion_detector.py) give the same
# bytes on every Intel processor with AVX2 for a given number of threads: ATen's, MKL's (its conditional numerical
# reproducibility) and oneDNN's AVX2 code, which each pick their code by the processor otherwise. It must be set
# before PyTorch starts; on other processors MKL takes its own branch, the same on processors of one kind (an AMD
# EPYC of Zen 3 trained the shipped toy model; one of Zen 5 trains a sibling).
PINNED_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def holds_shipped_bytes(folder: Path, shipped: Path) -> bool:
    """Whether `folder` holds every file of the shipped model folder `shipped`, byte for byte: what a retrain of its
    recipe writes on the kind of processor, number of threads and environment that trained it (elsewhere a sibling)."""
    folder = Path(folder)
    return all((folder / path.name).is_file() and (folder / path.name).read_bytes() == path.read_bytes()
               for path in Path(shipped).iterdir())


def load_model(spec: str, device: torch.device, offline: bool = False, weights: Path | None = None,
               target_names: tuple = (), score_threshold: float = 0.5, topk_outputs: int | None = None,
               precision: str = "auto") -> ModelAdapter:
    """The model named by MODEL: a CLIP-like model (`hf-hub:<id>` or an open_clip folder), a classifier
    (`timm:`, `torchvision:`, `xrv:` or a classifier folder, with MODEL_WEIGHTS and TARGET_NAMES), a detector
    (`torchvision-det:`, `yolo:` or a detector folder; SCORE_THRESHOLD and TOPK_OUTPUTS shape its targets) or a
    generative VLM (`hf:<id>` or its folder; PRECISION sets its weights' type on CUDA).

    `offline`: never touch the network (a hub model must then be in the local cache).
    A new kind of model is one module implementing ModelAdapter and one branch here.
    """
    if offline:
        open_clip_model.go_offline()
    if model_kind(spec) == "classifier":
        return classifier.load(spec, device, weights, target_names)
    if model_kind(spec) == "detector":
        return detector.load(spec, device, weights, target_names, score_threshold, topk_outputs)
    if model_kind(spec) == "vlm":
        return vlm.load(spec, device, precision, offline)
    if weights is not None or target_names:
        raise ModelLoadError(f"MODEL={spec} is CLIP-like: MODEL_WEIGHTS and TARGET_NAMES apply to classifiers")
    return open_clip_model.load(spec, device)


__all__ = ["ModelAdapter", "ModelLoadError", "PINNED_NUMERICS", "Targets", "TargetError", "holds_shipped_bytes",
           "load_model"]
