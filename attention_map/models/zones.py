"""The zone classifier: a small CNN that says, for each of the six chest zones, whether a lesion is there. It is
trained on the CPU in a few minutes on synthetic films (attention_map.synthetic.make_zone_film) to show that a
classifier's maps mean something: the map of a zone that holds a lesion should peak in that zone.

The recipe: timm's ResNet-10t with channels 16-32-64-128 and output stride 16 (a 12 x 12 grid at 192 px), six logits
(CHEST_ZONES), binary cross-entropy, Adam. It ships in the repository (examples/models/zone-classifier, fp16, about
0.6 MB) as a classifier folder; `attention-map train-zone-model DIR` reproduces it and prints its check (the same
bytes on this project's 2-core machine without PINNED_NUMERICS, with which it trains a sibling: docs/methods.md).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..config import CLASSIFIER_CONFIG
from ..synthetic import CHEST_ZONES, make_zone_film, zone_box
from .base import write_model_folder

log = logging.getLogger(__name__)

SIZE = 192
CONFIG = {"model": "timm:resnet10t",
          "model_kwargs": {"num_classes": len(CHEST_ZONES), "channels": [16, 32, 64, 128], "stem_width": 16,
                           "output_stride": 16},
          "target_names": list(CHEST_ZONES), "image_size": [SIZE, SIZE], "mean": [0.5] * 3, "std": [0.25] * 3,
          "weights": "model.safetensors"}
STEPS, BATCH, LEARNING_RATE, SEED = 150, 32, 2e-3, 0   # longer: the maps move off the lesions (docs/methods.md)
HELD_OUT = 10_000_000          # check films' seeds start here; training films use seed * 1e6 + 0, 1, ...
SHIPPED = Path(__file__).resolve().parents[2] / "examples" / "models" / "zone-classifier"   # in a source checkout


def _batch(first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    films, labels = [], []
    for seed in range(first, first + count):
        film, zones = make_zone_film(seed, SIZE)
        films.append(film)
        labels.append([zone in zones for zone in CHEST_ZONES])
    return torch.from_numpy(np.stack(films)), torch.tensor(labels, dtype=torch.float32)


def train_zone_model(folder: Path, steps: int = STEPS, seed: int = SEED) -> Path:
    """Train the recipe into `folder` (a classifier folder: config and fp16 weights); return the folder."""
    import timm
    from .classifier import Classifier

    torch.manual_seed(seed)
    net = timm.create_model("resnet10t", pretrained=False, **CONFIG["model_kwargs"])
    adapter = Classifier(net, (SIZE, SIZE), CONFIG["mean"], CONFIG["std"])
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, total_steps=max(steps, 1))
    started = time.perf_counter()
    net.train()
    for step in range(steps):
        films, labels = _batch(seed * 1_000_000 + step * BATCH, BATCH)
        pixels = torch.cat([adapter.prepare(film.numpy()) for film in films])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(pixels), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("step %d/%d: loss %.4f (%.0f s)", step + 1, steps, loss.item(), time.perf_counter() - started)
    return write_model_folder(folder, net, CONFIG, CLASSIFIER_CONFIG, f"attention-map train-zone-model --steps {steps} --seed {seed}")


def check_zone_model(folder: Path, count: int = 200, methods=None, first_seed: int = HELD_OUT) -> dict:
    """On `count` held-out films: the AUROC of each zone's output, and for each method the share of zone maps whose
    peak lies in the named zone's box, over the zones that hold a lesion ('pointing')."""
    from sklearn.metrics import roc_auc_score

    from ..api import explain
    from ..cams import SCORE_METHODS
    from . import load_model

    model = load_model(str(folder), torch.device("cpu"))
    films, labels = _batch(first_seed, count)
    with torch.no_grad():
        scores = torch.cat([model.forward(torch.cat([model.prepare(f.numpy()) for f in films[i:i + 50]]))
                            for i in range(0, count, 50)]).numpy()
    figures = {"auroc": {zone: float(roc_auc_score(labels[:, z], scores[:, z])) for z, zone in enumerate(CHEST_ZONES)},
               "pointing": {}}
    boxes = [zone_box(zone, SIZE) for zone in CHEST_ZONES]
    for method in methods or SCORE_METHODS:
        maps = explain(model, films.numpy(), list(CHEST_ZONES), method=method, batch_size=50)   # (N, 6, H, W)
        hits = []
        for i, z in zip(*np.nonzero(labels.numpy())):
            y, x = np.unravel_index(np.argmax(maps[i, z]), maps.shape[2:])
            bx, by, bw, bh = boxes[z]
            hits.append(bx <= x < bx + bw and by <= y < by + bh)
        figures["pointing"][method] = float(np.mean(hits))
    figures["lesion_zones"] = int(labels.sum())
    return figures
