"""Frames per second of a detector's maps over a stream of 640 x 640 frames, through the Python API's `Explainer`
(the hook registered once for the stream), per detector and method, with the same figure for `explain` (hooks
registered per call) in the same run.

    python benchmarks/bench_detector.py [--frames 20] [--device cpu|cuda] [--methods HiResCAM,EigenCAM]
                                        [--detectors yolov8n,fcos_resnet50_fpn,lesion-detector]

yolov8n: ultralytics' YOLOv8n (the optional extra; skipped with a line where it is not installed), random weights at
640 px. fcos_resnet50_fpn: torchvision's FCOS, random weights, read at 640 px. lesion-detector: the shipped tiny
FCOS (256 px input: frames are resized to it). Frames: the NIH films of ../shared/data/cxr resized to 640 x 640,
else synthetic films. Each detector's first frame is not timed (warm-up).
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

from attention_map import Explainer, explain  # noqa: E402
from attention_map.images import load_film  # noqa: E402
from attention_map.models import detector, load_model  # noqa: E402
from attention_map.models.lesion_detector import SHIPPED  # noqa: E402


def _frames(count: int, size: int = 640) -> list[np.ndarray]:
    import cv2

    paths = sorted((REPO.parent / "shared" / "data" / "cxr" / "nih").glob("*.png"))
    if paths:
        print(f"{count} frames: NIH films of ../shared/data/cxr at {size} x {size}")
        return [cv2.resize(load_film(paths[i % len(paths)]), (size, size), interpolation=cv2.INTER_AREA)
                for i in range(count)]
    from attention_map.synthetic import make_chest
    print(f"{count} frames: synthetic films at {size} x {size}")
    return [make_chest(i, size)[0] for i in range(count)]


def _detector(name: str, device: torch.device):
    if name == "lesion-detector":
        return load_model(str(SHIPPED), device)
    if name.startswith("yolo"):
        import importlib.util
        if importlib.util.find_spec("ultralytics") is None:
            return None
        module, candidates, head, size, mean, std, names = detector._yolo(f"{name}.yaml", f"yolo:{name}.yaml",
                                                                          Path("random"), {})
    else:
        module, candidates, head, size, mean, std, names = detector._torchvision_detector(name, name, Path("random"),
                                                                                          {})
        size = (640, 640)
    return detector.Detector(module.to(device).eval().requires_grad_(False), candidates, head, size, mean, std,
                             names, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default="HiResCAM,EigenCAM")
    parser.add_argument("--detectors", default="yolov8n,fcos_resnet50_fpn,lesion-detector")
    args = parser.parse_args()
    device = torch.device(args.device)
    frames = _frames(args.frames + 1)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| detector | input | method | Explainer frames/s | explain() frames/s | ratio |")
    print("|---|---|---|---|---|---|")
    for name in args.detectors.split(","):
        model = _detector(name, device)
        if model is None:
            print(f"| {name} | - | - | not installed (pip install 'attention-map[yolo]') | | |")
            continue
        for method in args.methods.split(","):
            with Explainer(model, method, ["topk"]) as explainer:
                explainer(frames[0])
                started = time.perf_counter()
                for frame in frames[1:]:
                    explainer(frame)
                streamed = args.frames / (time.perf_counter() - started)
            explain(model, frames[0][None], ["topk"], method)
            started = time.perf_counter()
            for frame in frames[1:]:
                explain(model, frame[None], ["topk"], method)
            called = args.frames / (time.perf_counter() - started)
            height, width = model.image_size
            print(f"| {name} | {width} x {height} | {method} | {streamed:.2f} | {called:.2f} | "
                  f"{streamed / called:.2f} |")


if __name__ == "__main__":
    main()
