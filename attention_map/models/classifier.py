"""Classifiers: a map explains one output of the model, a class, or a zone of a [batch, zones, classes] output.

MODEL is `timm:<name>`, `torchvision:<name>`, `xrv:<weights name>` (torchxrayvision, e.g. densenet121-res224-all)
with MODEL_WEIGHTS (a state_dict, or a checkpoint holding one) or the library's own weights; or a local folder with
`classifier_config.json`:

    {"model": "timm:resnet10t", "model_kwargs": {"num_classes": 6}, "weights": "model.safetensors",
     "target_names": ["right_sup", ...], "output_shape": [6, 4], "image_size": [224, 224], "mean": [..], "std": [..]}

where only "model" is required ("output_shape" reshapes a flat output into zones x classes). Any `nn.Module` can be
wrapped directly (the Python API does). Each library's own preprocessing is kept: timm's data config, the
torchvision weights' transforms, torchxrayvision's one grey channel in [-1024, 1024] at the weights' resolution.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import CLASSIFIER_CONFIG
from .base import ModelAdapter, ModelLoadError, Targets, TargetError, build_by_prefix, read_model_folder

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
XRV_MEAN, XRV_STD = (0.5,), (1 / 2048,)   # [0, 1] -> [-1024, 1024], one channel


class Classifier(ModelAdapter):
    """Any network whose output is (B, K) scores, (B, zones, classes), or a list or dict of heads (stacked as
    zones). Targets: an output index, a name of `output_names`, or '' for the class the model predicts."""

    def __init__(self, module: torch.nn.Module, image_size: tuple[int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 output_names=(), output_shape: tuple[int, ...] | None = None, name: str = ""):
        self.module, self.image_size, self.mean, self.std = module, tuple(image_size), tuple(mean), tuple(std)
        self.output_names, self.output_shape, self.name = tuple(output_names), output_shape, name

    def forward(self, pixels):
        outputs = self.module(pixels)
        if isinstance(outputs, dict):
            outputs = list(outputs.values())
        if isinstance(outputs, (list, tuple)):   # named heads: one zone each
            heads = [head.reshape(len(pixels), -1) for head in outputs]
            outputs = torch.cat(heads, 1) if all(h.shape[1] == 1 for h in heads) else torch.stack(heads, 1)
        if self.output_shape:
            outputs = outputs.reshape(len(pixels), *self.output_shape)
        return outputs

    def targets(self, names, outputs):
        picks = [self._pick(name, outputs) for name in names]    # (output, class of a zone or None, label)

        def score(batch: torch.Tensor) -> torch.Tensor:
            return torch.stack([batch[:, i] if c is None else batch[:, i, c] for i, c, _ in picks], dim=1)

        return Targets([label for _, _, label in picks], score)

    def _pick(self, name: str, outputs: torch.Tensor):
        count = outputs.shape[1]
        if name == "":
            if outputs.dim() != 2:
                raise TargetError(f"the model has {count} zone outputs: name the ones to explain with TARGETS or "
                                  f"TARGET_NAMES")
            index = int(outputs[0].argmax())
        elif name.lstrip("-").isdigit() and name not in self.output_names:
            index = int(name)
            if not -count <= index < count:
                raise TargetError(f"target {name}: the model has {count} outputs (0..{count - 1})")
            index %= count
        elif name in self.output_names:
            index = self.output_names.index(name)
        else:
            known = (f"its outputs: {', '.join(self.output_names)}" if self.output_names else
                     f"its {count} outputs are numbered 0..{count - 1}; name them with TARGET_NAMES")
            raise TargetError(f"target {name!r}: the model has no output of that name ({known})")
        label = self.output_names[index] if index < len(self.output_names) else str(index)
        zone_class = int(outputs[0, index].argmax()) if outputs.dim() == 3 else None   # the zone's predicted class
        return index, zone_class, label

    def check_target(self, name):
        try:
            self._pick(name, self._dry_outputs())
        except TargetError as error:
            return str(error)
        return ""

    def _dry_outputs(self) -> torch.Tensor:
        if not hasattr(self, "_dry"):
            with torch.no_grad():
                self._dry = self.forward(torch.zeros(1, len(self.mean), *self.image_size, device=self.device))
        return self._dry

    def output_count(self) -> int:
        """The model's outputs (classes, or zones), from one dry forward."""
        return self._dry_outputs().shape[1]

    def check_names(self) -> None:
        """The output names fit the model's outputs (one dry forward)."""
        outputs = self._dry_outputs()
        if outputs.dim() not in (2, 3):
            raise ModelLoadError(f"MODEL={self.name}: the output has shape {list(outputs.shape)}; a classifier's "
                                 f"is [batch, classes] or [batch, zones, classes]")
        if self.output_names and len(self.output_names) != self.output_count():
            raise ModelLoadError(f"TARGET_NAMES names {len(self.output_names)} outputs but MODEL={self.name} has "
                                 f"{self.output_count()}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The weights in `path`: a state_dict, or a checkpoint holding one under a usual key."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:   # not a weights file, cut short, Python objects beside the tensors: one line
        raise ModelLoadError(f"MODEL_WEIGHTS={path}: {_unreadable(error)}") from None
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"MODEL_WEIGHTS={path}: holds no state_dict (a mapping of names to tensors)")
    return state


def _as_named_in(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the keys `module` gives: a leading part that every key shares and that names none of the model's
    (DataParallel's `module.`, the attribute a Lightning module holds the network in, e.g. `model.`) is dropped."""
    names, stripped = module.state_dict().keys(), state
    while (stripped and not stripped.keys() & names and all("." in key for key in stripped)
           and len({key.partition(".")[0] for key in stripped}) == 1):
        stripped = {key.partition(".")[2]: value for key, value in stripped.items()}
        if stripped.keys() & names:
            return stripped
    return state


def _unreadable(error: Exception) -> str:
    """Why a weights file was refused, in one line. torch.load's weights-only refusal is a page of advice, with
    terminal colour codes, around the one sentence that says what the file holds."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:     # a training checkpoint with its hyper-parameters, paths, ... pickled beside the weights
        return (f"the checkpoint holds a pickled {refused.group(1)} beside its tensors, which loads only by running "
                f"code from the file; where the file is trusted, save the model's state_dict alone (e.g. "
                f"torch.save(checkpoint['state_dict'], 'weights.pt')) or as .safetensors")
    reason = (unpickler.group(1) if unpickler else text.strip().splitlines()[0] if text.strip() else "").strip()
    reason = re.split(r"\.(?:\s|$)", reason)[0]      # the first sentence: a cut-short zip's is followed by four
    return (f"not a readable PyTorch or safetensors weights file ({type(error).__name__}"
            f"{': ' + reason if reason else ''})")


def load_weights(module: torch.nn.Module, path: Path, spec: str) -> None:
    """Load `path` into `module`; a classification head of another size is rebuilt to fit the weights first."""
    state = _as_named_in(module, read_state_dict(path))
    head_name, head = ([(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
                       or [("", None)])[-1]
    weight = state.get(f"{head_name}.weight") if head is not None else None
    if weight is not None and weight.shape != head.weight.shape:
        parent, _, attribute = head_name.rpartition(".")
        setattr(module.get_submodule(parent), attribute,
                torch.nn.Linear(weight.shape[1], weight.shape[0], bias=head.bias is not None))
    if "op_threshs" in state and getattr(module, "op_threshs", 0) is None:   # torchxrayvision's calibration
        module.op_threshs = state["op_threshs"]
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as error:   # shapes that differ
        detail = " ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise ModelLoadError(f"MODEL_WEIGHTS={path} does not fit MODEL={spec}: {detail}") from None
    if missing or unexpected:
        raise ModelLoadError(f"MODEL_WEIGHTS={path} does not fit MODEL={spec}: {len(missing)} missing keys "
                             f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}), {len(unexpected)} "
                             f"unexpected keys ({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})")


def _library_weights_failed(spec: str, error: Exception) -> ModelLoadError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ModelLoadError(f"MODEL={spec}: the library's own weights cannot be loaded ({reason}); on an offline "
                          f"node set MODEL_WEIGHTS=<file>, or cache them first on a machine with internet")


def _timm(name: str, spec: str, weights: Path | None, kwargs: dict):
    import timm
    from timm.data import resolve_data_config

    try:
        module = timm.create_model(name, pretrained=weights is None, **kwargs)
    except RuntimeError as error:
        raise ModelLoadError(f"MODEL={spec}: {error}") from None
    except Exception as error:   # hub errors, offline mode
        raise _library_weights_failed(spec, error) from None
    config = resolve_data_config({}, model=module, use_test_size=True)   # the inference size, not training's
    channels = config["input_size"][0]
    return module, config["input_size"][1:], config["mean"][:channels], config["std"][:channels], ()


def _torchvision(name: str, spec: str, weights: Path | None, kwargs: dict):
    import torchvision

    try:
        default = torchvision.models.get_model_weights(name).DEFAULT
    except ValueError:
        raise ModelLoadError(f"MODEL={spec}: torchvision has no classifier {name!r}") from None
    try:
        module = torchvision.models.get_model(name, weights=default if weights is None else None, **kwargs)
    except Exception as error:
        raise _library_weights_failed(spec, error) from None
    transform = default.transforms()
    names = default.meta.get("categories", ()) if weights is None else ()
    return module, (transform.crop_size[0],) * 2, transform.mean, transform.std, names


def _xrv(name: str, spec: str, weights: Path | None, kwargs: dict):
    import torchxrayvision as xrv

    known = xrv.models.model_urls.get(name)
    if known is None:
        raise ModelLoadError(f"MODEL={spec}: torchxrayvision has no weights {name!r} (it has: "
                             f"{', '.join(k for k in xrv.models.model_urls if '-' in k)})")
    if weights is None:
        try:
            module = xrv.models.get_model(name, **kwargs)
        except Exception as error:
            raise _library_weights_failed(spec, error) from None
    elif name.startswith("densenet"):
        module = xrv.models.DenseNet(num_classes=len(known["labels"]), **kwargs)
    else:   # torchxrayvision builds its ResNet only around its own downloaded file
        raise ModelLoadError(f"MODEL={spec}: torchxrayvision loads {name} only from its own weights file; "
                             f"leave MODEL_WEIGHTS empty (MODEL_WEIGHTS works with the densenet121-* names)")
    return module, (known["input_resolution"],) * 2, XRV_MEAN, XRV_STD, tuple(known["labels"])


LIBRARIES = {"timm:": _timm, "torchvision:": _torchvision, "xrv:": _xrv}


def build(model_spec: str, spec: str, weights: Path | None, kwargs: dict):
    """(module, input size, mean, std, output names) of `model_spec` ('timm:<name>', ...); with `weights` None the
    library's own weights are loaded, else the module is built empty for them."""
    return build_by_prefix(LIBRARIES, model_spec, spec, weights, kwargs)


def load(spec: str, device: torch.device, weights: Path | None = None, target_names=()) -> Classifier:
    """The classifier MODEL names, in eval mode with gradients of its parameters off (maps need only the input's)."""
    model_spec, folder_config, weights = read_model_folder(spec, LIBRARIES, CLASSIFIER_CONFIG, weights)
    module, size, mean, std, names = build(model_spec, spec, weights, folder_config.get("model_kwargs", {}))
    if weights is not None:
        load_weights(module, Path(weights), spec)
    model = Classifier(module.to(device).eval().requires_grad_(False),
                       tuple(folder_config.get("image_size") or size), folder_config.get("mean") or mean,
                       folder_config.get("std") or std, target_names or folder_config.get("target_names") or names,
                       tuple(folder_config["output_shape"]) if folder_config.get("output_shape") else None, spec)
    model.check_names()
    return model
