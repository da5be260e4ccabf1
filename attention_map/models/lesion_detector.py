"""The lesion detector: the project's tiny FCOS (models.detector.tiny_fcos) trained on the CPU in minutes on synthetic
films (attention_map.synthetic.make_chest) to find the nodule, opacity or effusion with its box, to show that a
detector's maps mean something: the `topk` map should put its energy in the true boxes, the `sum` map much less.

The recipe: 256 px films with one lesion, or one in each lung; torchvision's FCOS losses (focal, GIoU, centre-ness),
AdamW with a one-cycle schedule. It ships in the repository (examples/models/lesion-detector, fp16) as a detector
folder; `attention-map train-lesion-detector DIR` reproduces it and prints its check (docs/methods.md), to the same
bytes on two threads with PINNED_NUMERICS of attention_map.models in its environment, on an Intel processor with
AVX2 (on an AMD EPYC it trains a sibling: docs/methods.md).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..config import DETECTOR_CONFIG
from ..synthetic import KINDS, make_chest
from .base import write_model_folder

log = logging.getLogger(__name__)

SIZE = 256
CONFIG = {"model": "torchvision-det:tiny_fcos", "model_kwargs": {"num_classes": len(KINDS)},
          "target_names": list(KINDS), "image_size": [SIZE, SIZE], "weights": "model.safetensors"}
STEPS, BATCH, LEARNING_RATE, SEED = 150, 16, 3e-3, 0   # longer: the maps spread beyond the lesions
HELD_OUT = 20_000_000          # check films' seeds start here; training films use seed * 1e6 + 0, 1, ...
SHIPPED = Path(__file__).resolve().parents[2] / "examples" / "models" / "lesion-detector"   # in a source checkout


def films_and_boxes(first: int, count: int) -> tuple[list[np.ndarray], list[list[tuple]]]:
    """`count` films from seed `first` on, and each film's lesions as (x0, y0, x1, y1, class index); every third
    film has a lesion in each lung."""
    films, boxes = [], []
    for seed in range(first, first + count):
        film, lesions = make_chest(seed, SIZE, sides=("right", "left") if seed % 3 == 0 else None)
        films.append(film)
        boxes.append([(x, y, x + w, y + h, KINDS.index(lesion.kind)) for lesion in lesions
                      for x, y, w, h in [lesion.box]])
    return films, boxes


def train_lesion_detector(folder: Path, steps: int = STEPS, seed: int = SEED) -> Path:
    """Train the recipe into `folder` (a detector folder: config and fp16 weights); return the folder."""
    from .detector import tiny_fcos

    torch.manual_seed(seed)
    net = tiny_fcos(**CONFIG["model_kwargs"])
    optimizer = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, total_steps=max(steps, 1))
    started = time.perf_counter()
    net.train()
    for step in range(steps):
        films, boxes = films_and_boxes(seed * 1_000_000 + step * BATCH, BATCH)
        images = [torch.from_numpy(film)[None].expand(3, -1, -1) for film in films]   # FCOS normalises them
        targets = [{"boxes": torch.tensor([b[:4] for b in film_boxes], dtype=torch.float32),
                    "labels": torch.tensor([b[4] for b in film_boxes])} for film_boxes in boxes]
        losses = net(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            parts = ", ".join(f"{name} {value.item():.3f}" for name, value in losses.items())
            log.info("step %d/%d: loss %.3f (%s) (%.0f s)", step + 1, steps, loss.item(), parts,
                     time.perf_counter() - started)
    return write_model_folder(folder, net, CONFIG, DETECTOR_CONFIG, f"attention-map train-lesion-detector --steps {steps} --seed {seed}")


def _iou(a, b) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def check_lesion_detector(folder: Path, count: int = 200, methods=None, targets=("topk", "sum", "box"),
                          first_seed: int = HELD_OUT) -> dict:
    """On `count` held-out films: detection recall at IoU 0.5 (a true box found by a detection of its class), and
    for each method and target the share of the map's energy inside the true boxes and the pointing game (the map's
    peak inside a true box), with the share of the film the boxes cover (what a uniform map puts there). A `box`
    target's figures are over its maps, one per detection."""
    from ..cams import CAM_METHODS, SCORE_METHODS
    from ..maps import grid_to_image
    from . import load_model

    model = load_model(str(folder), torch.device("cpu"))
    films, boxes = films_and_boxes(first_seed, count)
    found = total = 0
    with torch.no_grad():
        for film, film_boxes in zip(films, boxes):
            detections = model.detect(model.forward(model.prepare(film))[0])
            for box in film_boxes:
                total += 1
                found += any(d.label == box[4] and _iou([v * SIZE for v in d.box], box[:4]) >= 0.5
                             for d in detections)
    masks = []
    for film_boxes in boxes:
        mask = np.zeros((SIZE, SIZE), bool)
        for x0, y0, x1, y1, _ in film_boxes:
            mask[y0:y1, x0:x1] = True
        masks.append(mask)
    figures = {"recall": found / total, "films": count, "uniform": float(np.mean([m.mean() for m in masks])),
               "energy": {}, "pointing": {}}
    for method in methods or SCORE_METHODS:
        cam = CAM_METHODS[method](model)
        for target in targets:
            energy, pointing = [], []
            for i, film in enumerate(films):   # one film at a time: a `box` target's map count differs per film
                for grid in cam.explain(model.prepare(film), [target]):
                    heat = grid_to_image(grid.cam, (SIZE, SIZE))
                    energy.append(heat[masks[i]].sum() / heat.sum() if heat.sum() > 0 else 0.0)
                    pointing.append(bool(masks[i].flat[np.argmax(heat)]) if heat.max() > 0 else False)
            figures["energy"][f"{method} {target}"] = round(float(np.mean(energy)), 4)
            figures["pointing"][f"{method} {target}"] = round(float(np.mean(pointing)), 4)
    return figures
