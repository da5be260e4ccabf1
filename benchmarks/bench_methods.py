"""Heatmaps per second of the gradient methods on a classifier: attention-map's `explain` (a batch of films per
forward and backward) against the grad-cam package (pytorch-grad-cam, the test dependency) on the same model, films,
method, layer and targets (each film's predicted class), in one run, with the largest difference of their maps.

    python benchmarks/bench_methods.py [--model resnet50] [--films 32] [--batch 16] [--methods GradCAM,HiResCAM]

The model is the timm architecture with random weights (built offline). Both are given the same prepared inputs;
grad-cam is timed twice: with the model as users hand it over (parameters requiring gradients, so its backward also
computes every weight's gradient) and frozen (parameters without gradients, the input requiring one: the same work as
attention-map, which turns the flags off for the maps and back on after). Films: the NIH films of
../shared/data/cxr, else synthetic ones.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attention_map import explain  # noqa: E402
from attention_map.images import load_film  # noqa: E402
from attention_map.models.classifier import Classifier  # noqa: E402


def _films(count: int, size: int) -> np.ndarray:
    import cv2

    folder = REPO.parent / "shared" / "data" / "cxr" / "nih"
    paths = sorted(folder.glob("*.png"))
    if paths:
        films = [cv2.resize(load_film(paths[i % len(paths)]), (size, size), interpolation=cv2.INTER_AREA)
                 for i in range(count)]
        print(f"{count} films from {folder}")
    else:
        from attention_map.synthetic import make_film

        films = [make_film(seed, size)[0] for seed in range(count)]
        print(f"{count} synthetic films ({folder} not found)")
    return np.stack(films).astype(np.float32)


def _rate(count: int, batch: int, run) -> tuple[float, object]:
    run(min(batch, count))                            # warm-up: one batch of the same shape
    started = time.perf_counter()
    result = run(count)
    return count / (time.perf_counter() - started), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="timm architecture (random weights)")
    parser.add_argument("--films", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--methods", default="GradCAM,GradCAM++,XGradCAM,HiResCAM,LayerCAM")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    import pytorch_grad_cam
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=14).eval()
    adapter = Classifier(model, (224, 224))
    layer_name = adapter.default_target_layer()
    layer = adapter.find_module(layer_name)
    films = _films(args.films, 224)
    inputs = torch.cat([adapter.prepare(film) for film in films])
    print(f"timm {args.model} (random weights, 14 outputs) at {layer_name}, 224 x 224, batch {args.batch}, "
          f"{args.threads} CPU threads, torch {torch.__version__}; targets: each film's predicted class")
    explain(model, inputs, None, batch_size=args.batch)    # warm-up, off the clock: the first pass is slower
    print(f"{'method':<10} {'attention-map':>14} {'grad-cam':>9} {'frozen':>7} {'ratios':>14} {'max |diff|':>11}"
          f"   (heatmaps/s)")
    for method in args.methods.split(","):
        package = {"GradCAM": pytorch_grad_cam.GradCAM, "GradCAM++": pytorch_grad_cam.GradCAMPlusPlus,
                   "XGradCAM": pytorch_grad_cam.XGradCAM, "HiResCAM": pytorch_grad_cam.HiResCAM,
                   "LayerCAM": pytorch_grad_cam.LayerCAM, "EigenCAM": pytorch_grad_cam.EigenCAM}[method]

        def ours(count):
            return explain(model, inputs[:count], None, method=method, batch_size=args.batch)[:, 0]

        def theirs(count, frozen=False):
            model.requires_grad_(not frozen)
            with package(model=model, target_layers=[layer]) as cam:
                maps = np.concatenate([cam(input_tensor=inputs[start:min(start + args.batch, count)].clone()
                                           .requires_grad_(frozen), targets=None)
                                       for start in range(0, count, args.batch)])
            model.requires_grad_(True)
            return maps

        ours_rate, ours_maps = _rate(len(inputs), args.batch, ours)
        theirs_rate, theirs_maps = _rate(len(inputs), args.batch, theirs)
        frozen_rate, frozen_maps = _rate(len(inputs), args.batch, lambda count: theirs(count, frozen=True))
        difference = max(np.abs(ours_maps - theirs_maps).max(), np.abs(ours_maps - frozen_maps).max())
        print(f"{method:<10} {ours_rate:>14.2f} {theirs_rate:>9.2f} {frozen_rate:>7.2f} "
              f"{ours_rate / theirs_rate:>6.2f}x {ours_rate / frozen_rate:>6.2f}x {difference:>11.2e}")


if __name__ == "__main__":
    main()
