"""Detectors: a map explains the detection head's class scores, the k strongest of them (`topk`), all of them (`sum`)
or one detection's (`box`, one map per detection above SCORE_THRESHOLD).

MODEL is `torchvision-det:<name>` (fasterrcnn_*, retinanet_*, fcos_*, ssd300_vgg16, ssdlite320_mobilenet_v3_large,
or this project's `tiny_fcos`), `yolo:<file.pt | name.yaml>` (the optional `ultralytics` package,
`pip install 'attention-map[yolo]'`), or a local folder with `detector_config.json`:

    {"model": "torchvision-det:tiny_fcos", "model_kwargs": {"num_classes": 3}, "weights": "model.safetensors",
     "target_names": ["nodule", "opacity", "effusion"], "image_size": [256, 256]}

Every detector is read the same way: its forward gives, for each of N candidate places (anchors, points, proposals),
a box in model-input pixels and a probability per class, as one (B, N, 4 + K) tensor. Detections are the NMS of the
candidates above SCORE_THRESHOLD. The input is squashed to the model's size and normalised as its own transform
would; the library's resizing and post-processing are not run, so that the head's raw scores are what a map explains.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_iou, remove_small_boxes

from ..config import DETECTOR_CONFIG
from .base import (ModelAdapter, ModelLoadError, Targets, TargetError, build_by_prefix, read_model_folder,
                   readable_path)
from .classifier import IMAGENET_MEAN, IMAGENET_STD, load_weights

DETECTION_TARGETS = ("topk", "sum", "box")
NMS_IOU = 0.5              # candidates of one class overlapping more than this are one detection
MAX_DETECTIONS = 100       # per film, as torchvision's detections_per_img
MATCH_IOU = 0.5            # a masked input's candidate stands for a detection when it overlaps it this much


@dataclass(frozen=True)
class Detection:
    """One detection on the model input: box (x0, y0, x1, y1) as fractions of the input's width and height, the
    class index and name, and its score."""
    box: tuple[float, float, float, float]
    label: int
    name: str
    score: float

    def in_pixels(self, width: int, height: int) -> list:
        """[x0, y0, x1, y1, class, score] on a film of this size (rounded: pixels and 4 digits)."""
        x0, y0, x1, y1 = self.box
        return [round(x0 * width, 1), round(y0 * height, 1), round(x1 * width, 1), round(y1 * height, 1), self.name,
                round(self.score, 4)]


class Detector(ModelAdapter):
    """A detector seen through `candidates`: pixels (B, C, H, W) -> (B, N, 4 + K) boxes in input pixels and class
    probabilities. `head` is the module that reads the feature maps; the default target layer is the finest of them."""

    detects = True

    def __init__(self, module: torch.nn.Module, candidates: Callable[[torch.Tensor], torch.Tensor],
                 head: torch.nn.Module, image_size, mean, std, class_names=(), name: str = "",
                 score_threshold: float = 0.5, topk_outputs: int | None = None):
        self.module, self.candidates, self.head = module, candidates, head
        self.image_size, self.mean, self.std = tuple(image_size), tuple(mean), tuple(std)
        self.class_names, self.name = tuple(class_names), name
        self.score_threshold, self.topk_outputs = score_threshold, topk_outputs

    def forward(self, pixels):
        return self.candidates(pixels)

    def class_name(self, label: int) -> str:
        return self.class_names[label] if label < len(self.class_names) else str(label)

    def detect(self, outputs: torch.Tensor) -> list[Detection]:
        """One input's (N, 4 + K) candidates -> its detections, best first: per-class NMS of those above
        SCORE_THRESHOLD."""
        boxes, probabilities = outputs[:, :4].float(), outputs[:, 4:].float()
        place, label = torch.nonzero(probabilities > self.score_threshold, as_tuple=True)
        sized = remove_small_boxes(boxes[place], 1e-2)   # as torchvision drops them: a box of no area is no object
        place, label = place[sized], label[sized]
        scores = probabilities[place, label]
        keep = batched_nms(boxes[place], scores, label, NMS_IOU)[:MAX_DETECTIONS]
        height, width = self.image_size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=boxes.device)
        return [Detection(tuple((boxes[place[i]] / scale).clamp(0, 1).tolist()), int(label[i]),
                          self.class_name(int(label[i])), float(scores[i])) for i in keep.tolist()]

    def topk(self, outputs: torch.Tensor) -> int:
        """k of the `topk` target: TOPK_OUTPUTS, by default max(50, 1% of the class scores), never more than there are."""
        count = outputs.shape[1] * (outputs.shape[2] - 4)
        return min(self.topk_outputs or max(50, count // 100), count)

    def targets(self, names, outputs):
        detections = self.detect(outputs[0].detach())
        picks = []   # (label, the name it answers, its file's suffix, note, score function or None for a cold map)
        for name in names:
            if name not in DETECTION_TARGETS:
                raise TargetError(self.check_target(name))
            if not detections:   # nothing to explain: a cold map, and why
                picks.append(("no detection", name, None,
                              f"no detection above SCORE_THRESHOLD={self.score_threshold:g}", None))
            elif name == "box":
                picks += [(f"det{j}_{d.name}", name, f"det{j}_{d.name}", "",
                           lambda batch, d=d: _detection_score(batch, d, self.image_size))
                          for j, d in enumerate(detections)]
            elif name == "topk":
                k = self.topk(outputs)
                picks.append((f"top{k}", name, None, "",
                              lambda batch, k=k: batch[:, :, 4:].flatten(1).topk(k, dim=1).values.sum(1)))
            else:
                picks.append(("sum", name, None, "DETECTION_TARGET=sum: every output of the head, which gives "
                              "diffuse maps; topk is the default", lambda batch: batch[:, :, 4:].flatten(1).sum(1)))
        labels, asked, files, notes, scorers = (list(column) for column in zip(*picks))

        def score(batch: torch.Tensor) -> torch.Tensor:
            zero = batch.flatten(1)[:, :1].sum(1) * 0 + 0.0   # keeps the graph: a cold map, not a missing gradient
            return torch.stack([zero if s is None else s(batch) for s in scorers], dim=1)

        return Targets(labels, score, asked=asked, files=files, notes=notes, cold=[s is None for s in scorers],
                       detections=tuple(detections))

    def check_target(self, name):
        return "" if name in DETECTION_TARGETS else (f"DETECTION_TARGET={name!r}: a detector's maps explain "
                                                     f"{', '.join(DETECTION_TARGETS)}")

    def default_target_layer(self) -> str:
        return self.head_inputs()[0]

    def head_inputs(self) -> list[str]:
        """The modules whose outputs the head reads, finest grid first, found by one dry forward: the module that
        returned the very tensor, else the last one before the head with an output of the same shape."""
        if not hasattr(self, "_head_inputs"):
            ran: list[tuple[str, torch.Tensor]] = []
            read: list[torch.Tensor] = []
            handles = [child.register_forward_hook(
                lambda child, args, output, name=name: ran.append((name, output))
                if isinstance(output, torch.Tensor) and output.dim() == 4 else None)
                for name, child in self.module.named_modules() if name and child is not self.head]
            before = []   # how many modules had run when the head started: only those can feed it

            def head_starts(module, args):
                if not read:
                    read.extend(_tensors(args))
                    before.append(len(ran))

            handles.append(self.head.register_forward_pre_hook(head_starts))
            try:
                with torch.no_grad():
                    self.forward(torch.zeros(1, len(self.mean), *self.image_size, device=self.device))
            finally:
                for handle in handles:
                    handle.remove()
            names, ran = [], ran[:before[0]] if before else []
            for tensor in sorted(read, key=lambda t: -t.shape[-1] * t.shape[-2]):
                same = [name for name, out in ran if out is tensor] or [
                    name for name, out in ran if out.shape == tensor.shape]
                if same and same[-1] not in names:
                    names.append(same[-1])
            if not names:
                raise ModelLoadError(f"MODEL={self.name}: no module's output reaches the detection head; name the "
                                     f"layer with TARGET_LAYER")
            self._head_inputs = [readable_path(self.module, name) for name in names]
        return self._head_inputs

    def activations_to_grid(self, activations):
        if activations.dim() != 4:
            raise ValueError(f"target layer output of shape {tuple(activations.shape)} is not a (B, C, h, w) map")
        return activations


def _tensors(args) -> list[torch.Tensor]:
    """The 4-d tensors among a module's inputs (a list of feature maps, or a dict of them)."""
    found = []
    for arg in args:
        items = arg.values() if isinstance(arg, dict) else arg if isinstance(arg, (list, tuple)) else [arg]
        found.extend(t for t in items if isinstance(t, torch.Tensor) and t.dim() == 4)
    return found


def _detection_score(batch: torch.Tensor, detection: Detection, image_size) -> torch.Tensor:
    """The detection's class score in each of a batch's outputs: the best score of its class among the candidates
    that overlap its box by MATCH_IOU (on the clean input, the detection's own score; on a masked input, that of
    whatever still finds the object there)."""
    height, width = image_size
    box = torch.tensor(detection.box, device=batch.device) * torch.tensor([width, height, width, height],
                                                                         device=batch.device)
    scores = []
    for outputs in batch:
        overlaps = box_iou(outputs[:, :4].detach().float(), box[None]).squeeze(1) >= MATCH_IOU
        candidates = outputs[:, 4 + detection.label]
        scores.append(torch.where(overlaps, candidates, torch.zeros_like(candidates)).max())
    return torch.stack(scores)


# -- torchvision ---------------------------------------------------------------------------------------------------

def _torchvision_candidates(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The (B, N, 4 + K) candidates of a torchvision detector, computed as its forward does up to its own
    post-processing (which keeps only the detections)."""
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.ssd import SSD
    from torchvision.models.detection.image_list import ImageList

    def features_of(pixels):
        images = ImageList(pixels, [tuple(pixels.shape[-2:])] * len(pixels))
        features = model.backbone(pixels)
        return images, features if isinstance(features, dict) else {"0": features}

    def single_stage(pixels):
        images, features = features_of(pixels)
        levels = list(features.values())
        head = model.head(levels)
        anchors = model.anchor_generator(images, levels)
        if isinstance(model, FCOS):
            probabilities = torch.sqrt(torch.sigmoid(head["cls_logits"]) * torch.sigmoid(head["bbox_ctrness"]))
            boxes = model.box_coder.decode(head["bbox_regression"], torch.stack(anchors))
        else:
            probabilities = (torch.sigmoid(head["cls_logits"]) if isinstance(model, RetinaNet)
                             else F.softmax(head["cls_logits"], dim=-1)[..., 1:])   # SSD: class 0 is background
            boxes = torch.stack([model.box_coder.decode_single(r, a) for r, a in zip(head["bbox_regression"], anchors)])
        return torch.cat([boxes, probabilities], dim=-1)

    def two_stage(pixels):   # Faster R-CNN: each proposal, its best class's refined box; padded to one N per batch
        images, features = features_of(pixels)
        proposals, _ = model.rpn(images, features)
        heads = model.roi_heads
        pooled = heads.box_head(heads.box_roi_pool(features, proposals, images.image_sizes))
        logits, regression = heads.box_predictor(pooled)
        probabilities = F.softmax(logits, dim=-1)[:, 1:]
        boxes = heads.box_coder.decode(regression, proposals)[:, 1:]                # (R, K, 4)
        best = boxes[torch.arange(len(boxes)), probabilities.argmax(dim=1)]
        rows = torch.cat([best, probabilities], dim=1).split([len(p) for p in proposals])
        width = max(len(r) for r in rows)
        return torch.stack([F.pad(r, (0, 0, 0, width - len(r))) for r in rows])

    if isinstance(model, FasterRCNN):
        return two_stage
    if isinstance(model, (FCOS, RetinaNet, SSD)):
        return single_stage
    raise ModelLoadError(f"{type(model).__name__} is not a torchvision detector this project reads (Faster R-CNN, "
                         f"RetinaNet, FCOS, SSD)")


def tiny_fcos(num_classes: int = 3, width: int = 32, **kwargs) -> torch.nn.Module:
    """A small FCOS (ResNet-style trunk of four stages, FPN of `width` channels on strides 8, 16, 32) for the
    project's trained detector and fast tests: about 0.26 M parameters."""
    from collections import OrderedDict

    from torchvision.models.detection import FCOS
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

    def stage(cin, cout):
        return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(cout),
                                   torch.nn.ReLU(inplace=True), torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                   torch.nn.BatchNorm2d(cout), torch.nn.ReLU(inplace=True))

    class Backbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = stage(3, 16)          # stride 2
            self.layer1 = stage(16, 24)       # 4
            self.layer2 = stage(24, 32)       # 8
            self.layer3 = stage(32, 48)       # 16
            self.layer4 = stage(48, 64)       # 32
            self.fpn = FeaturePyramidNetwork([32, 48, 64], width, extra_blocks=LastLevelP6P7(width, width))
            self.out_channels = width

        def forward(self, x):
            c2 = self.layer2(self.layer1(self.stem(x)))
            c3 = self.layer3(c2)
            return self.fpn(OrderedDict([("0", c2), ("1", c3), ("2", self.layer4(c3))]))

    from torchvision.models.detection.anchor_utils import AnchorGenerator
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)
    return FCOS(Backbone(), num_classes, anchor_generator=anchors, min_size=256, max_size=256,
                image_mean=[0.5] * 3, image_std=[0.25] * 3, **kwargs)


PROJECT_DETECTORS = {"tiny_fcos": tiny_fcos}


def _torchvision_detector(name: str, spec: str, weights: Path | None, kwargs: dict):
    import torchvision
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.ssd import SSD

    if name in PROJECT_DETECTORS:
        module, names = PROJECT_DETECTORS[name](**kwargs), ()
    else:
        try:
            default = torchvision.models.get_model_weights(name).DEFAULT
        except ValueError:
            raise ModelLoadError(f"MODEL={spec}: torchvision has no detector {name!r} (and this project's are: "
                                 f"{', '.join(PROJECT_DETECTORS)})") from None
        try:
            module = torchvision.models.get_model(name, weights=default if weights is None else None,
                                                  **({"weights_backbone": None} if weights is not None else {}),
                                                  **kwargs)
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ModelLoadError(f"MODEL={spec}: the library's own weights cannot be loaded ({reason}); on an "
                                 f"offline node set MODEL_WEIGHTS=<file>, or cache them first") from None
        names = list(default.meta.get("categories", ())) if weights is None else []
        if names and isinstance(module, (FasterRCNN, SSD)):   # their probabilities drop the background class
            names = names[1:]
    transform = module.transform
    size = tuple(transform.fixed_size) if transform.fixed_size else (transform.min_size[-1],) * 2
    head = module.rpn.head if hasattr(module, "rpn") else module.head
    return module, _torchvision_candidates(module), head, size, transform.image_mean, transform.image_std, names


# -- ultralytics YOLO (optional) -------------------------------------------------------------------------------

def _yolo(name: str, spec: str, weights: Path | None, kwargs: dict):
    from PIL import Image

    pillow_open = Image.open
    try:
        from ultralytics import YOLO
        from ultralytics.nn.tasks import DetectionModel
    except ImportError:
        raise ModelLoadError(f"MODEL={spec}: YOLO models need the optional ultralytics package: "
                             f"pip install 'attention-map[yolo]'") from None
    finally:
        # ultralytics replaces PIL.Image.open when imported, with one that for a file Pillow cannot read imports
        # pi_heif and fails with ImportError: the films' one-line errors need Pillow's own
        Image.open = pillow_open
    size = (int(kwargs.pop("imgsz", 640)),) * 2
    if name.endswith((".yaml", ".yml")):
        module = DetectionModel(name, verbose=False, **kwargs)
    else:
        try:
            module = YOLO(name).model
        except Exception as error:
            raise ModelLoadError(f"MODEL={spec}: {str(error).splitlines()[0]}") from None
    module = module.float()
    head = module.model[-1]
    names = [module.names[i] for i in sorted(module.names)] if isinstance(getattr(module, "names", None), dict) else ()

    def candidates(pixels):   # eval mode: (B, 4 + K, N), boxes as centre and size in input pixels, K sigmoid scores
        outputs = module(pixels)
        outputs = (outputs[0] if isinstance(outputs, (list, tuple)) else outputs).transpose(1, 2)
        centre, size_ = outputs[..., :2], outputs[..., 2:4]
        return torch.cat([centre - size_ / 2, centre + size_ / 2, outputs[..., 4:]], dim=-1)

    return module, candidates, head, size, (0.0,) * 3, (1.0,) * 3, names


LIBRARIES = {"torchvision-det:": _torchvision_detector, "yolo:": _yolo}


def build(model_spec: str, spec: str, weights: Path | None, kwargs: dict):
    """(module, candidates function, head, input size, mean, std, class names) of `model_spec`; with `weights` None
    the library's own weights are loaded, else the module is built empty for them."""
    return build_by_prefix(LIBRARIES, model_spec, spec, weights, kwargs)


def load(spec: str, device: torch.device, weights: Path | None = None, target_names=(), score_threshold=0.5,
         topk_outputs: int | None = None) -> Detector:
    """The detector MODEL names, in eval mode with gradients of its parameters off."""
    model_spec, folder_config, weights = read_model_folder(spec, LIBRARIES, DETECTOR_CONFIG, weights)
    module, candidates, head, size, mean, std, names = build(model_spec, spec, weights,
                                                            dict(folder_config.get("model_kwargs", {})))
    if weights is not None:
        load_weights(module, Path(weights), spec)
    module = module.to(device).eval().requires_grad_(False)
    return Detector(module, candidates, head, folder_config.get("image_size") or size,
                    folder_config.get("mean") or mean or IMAGENET_MEAN, folder_config.get("std") or std or IMAGENET_STD,
                    target_names or folder_config.get("target_names") or names, spec, score_threshold, topk_outputs)
