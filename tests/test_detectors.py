"""Detectors (torchvision's families, YOLO, the shipped lesion detector): candidates and detections, the targets
(topk, sum, one per detection), maps per detection with their own files and manifest rows, box renormalisation,
detections.jsonl, several target layers averaged, the Explainer over a stream of frames, and the maps' meaning."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from attention_map import Explainer, explain
from attention_map.boxes import renormalize_in_boxes
from attention_map.cams import CAM_METHODS
from attention_map.maps import grid_to_image
from attention_map.models import TargetError, load_model
from attention_map.models import detector
from attention_map.models.lesion_detector import HELD_OUT, SHIPPED, check_lesion_detector, films_and_boxes
from attention_map.models.random_models import make_test_model
from attention_map.outputs import read_csv

from test_cli import cli

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lesion_detector():
    return load_model(str(SHIPPED), CPU)


def _small(name: str, size: int):
    """A torchvision detector of the real architecture, random weights, read at `size` px for speed."""
    module, candidates, head, _, mean, std, names = detector._torchvision_detector(name, name, Path("random"),
                                                                                    {"num_classes": 5})
    return detector.Detector(module.eval().requires_grad_(False), candidates, head, (size, size), mean, std, (),
                             name, score_threshold=0.0)


@pytest.mark.parametrize("name, layer, size", [
    ("fcos_resnet50_fpn", "backbone.fpn.layer_blocks[0]", 256),
    ("retinanet_resnet50_fpn", "backbone.fpn.layer_blocks[0]", 256),
    ("fasterrcnn_mobilenet_v3_large_fpn", "backbone.fpn.layer_blocks[0]", 320),
    ("ssdlite320_mobilenet_v3_large", "backbone.features[0]", 320),
    ("ssd300_vgg16", "backbone.features", 300)])
def test_each_torchvision_family_gives_candidates_detections_and_maps(name, layer, size, monkeypatch):
    monkeypatch.setattr(detector, "MAX_DETECTIONS", 3)    # random scores tie: a few maps are enough
    model = _small(name, size)
    assert model.default_target_layer() == layer    # the finest feature map the head reads, by one dry forward
    pixels = torch.rand(2, 3, size, size)
    with torch.no_grad():
        outputs = model.forward(pixels)
    classes = 4 if name.startswith(("fasterrcnn", "ssd")) else 5     # softmax over classes and the background
    assert outputs.dim() == 3 and outputs.shape[0] == 2 and outputs.shape[2] == 4 + classes
    assert torch.isfinite(outputs).all() and (outputs[..., 4:] >= 0).all() and (outputs[..., 4:] <= 1).all()
    sized = ((outputs[0, :, 2] - outputs[0, :, 0]) > 1) & ((outputs[0, :, 3] - outputs[0, :, 1]) > 1)
    strongest = outputs[0, sized, 4:].flatten().topk(3).values[-1]
    model.score_threshold = float(strongest) - 1e-6       # a few detections (random boxes may have no area)
    detections = model.detect(outputs[0])
    assert detections and all(0 <= v <= 1 for d in detections for v in d.box)
    assert [d.score for d in detections] == sorted((d.score for d in detections), reverse=True)
    maps = CAM_METHODS["GradCAM"](model).explain(pixels[:1], ["topk", "box"])
    assert maps[0].target == f"top{model.topk(outputs)}"
    assert all(np.isfinite(m.cam).all() and m.cam.shape == maps[0].cam.shape for m in maps)
    assert [m.asked for m in maps] == ["topk"] + ["box"] * len(detections)
    assert [m.file for m in maps[1:]] == [f"det{j}_{d.name}" for j, d in enumerate(detections)]


def test_topk_counts_max_of_50_and_one_percent_never_more_than_there_are(lesion_detector):
    outputs = torch.zeros(1, 20_000, 4 + 3)
    assert lesion_detector.topk(outputs) == 600                  # 1% of 60000 class scores
    assert lesion_detector.topk(torch.zeros(1, 100, 4 + 3)) == 50
    assert lesion_detector.topk(torch.zeros(1, 10, 4 + 3)) == 30   # never more than there are
    lesion_detector.topk_outputs = 7
    try:
        assert lesion_detector.topk(outputs) == 7
    finally:
        lesion_detector.topk_outputs = None


def test_target_scores_are_the_strongest_outputs_every_output_and_each_detection(lesion_detector):
    film, _ = make_film(HELD_OUT + 1)
    with torch.no_grad():
        outputs = lesion_detector.forward(lesion_detector.prepare(film))
    targets = lesion_detector.targets(["topk", "sum", "box"], outputs)
    scores = targets.score(outputs)[0]
    probabilities = outputs[0, :, 4:].flatten()
    k = lesion_detector.topk(outputs)
    assert scores[0] == pytest.approx(float(probabilities.topk(k).values.sum()), rel=1e-5)
    assert scores[1] == pytest.approx(float(probabilities.sum()), rel=1e-5)
    # a detection's target on the clean input is its own score (its candidate is the best of its class there)
    assert [round(float(s), 5) for s in scores[2:]] == [round(d.score, 5) for d in targets.detections]
    assert "diffuse" in targets.notes[1] and targets.asked == ["topk", "sum"] + ["box"] * len(targets.detections)


def test_a_film_with_no_detection_gets_a_cold_map_and_the_reason(lesion_detector):
    blank = np.zeros((256, 256), np.float32)
    for method in ("GradCAM", "gScoreCAM", "EigenCAM"):
        maps = CAM_METHODS[method](lesion_detector).explain(lesion_detector.prepare(blank), ["topk", "box"])
        assert [m.target for m in maps] == ["no detection"] * 2
        for m in maps:
            assert np.isfinite(m.cam).all() and m.cam.max() == 0
            assert m.warning == "no detection above SCORE_THRESHOLD=0.5"


def make_film(seed):
    films, boxes = films_and_boxes(seed, 1)
    return films[0], boxes[0]


def _meets_the_floors(figures: dict) -> None:
    """Floors under docs/methods.md's table (200 films there; 40 here): recall, and topk against sum and uniform."""
    assert figures["recall"] >= 0.9, figures
    for method in ("HiResCAM", "LayerCAM"):
        topk, total = figures["energy"][f"{method} topk"], figures["energy"][f"{method} sum"]
        assert topk >= 2 * total and topk >= 3 * figures["uniform"], figures
        assert figures["pointing"][f"{method} topk"] >= 0.8, figures


def test_the_shipped_lesion_detector_finds_the_lesions_and_topk_maps_sit_on_them():
    _meets_the_floors(check_lesion_detector(SHIPPED, count=40, methods=["HiResCAM", "LayerCAM"],
                                            targets=("topk", "sum")))


@pytest.mark.slow
def test_a_retrain_of_the_lesion_detector_recipe_meets_the_same_floors(lesion_retrain):
    print("retrained lesion detector:", "the shipped bytes" if lesion_retrain["shipped_bytes"] else "a sibling",
          lesion_retrain)
    _meets_the_floors(lesion_retrain)


def test_renormalize_in_boxes_rescales_inside_each_box_and_zeroes_outside():
    cam = np.linspace(0, 1, 100 * 80, dtype=np.float32).reshape(80, 100)
    result = renormalize_in_boxes(cam, [(10, 10, 30, 20, "a", 0.9), (50.5, 40, 90, 70, "b", 0.6)])
    assert result[:10].max() == 0 and result[:, :10].max() == 0 and result[25:40].max() == 0
    assert result[10:20, 10:30].min() == 0 and result[10:20, 10:30].max() == pytest.approx(1)
    assert result[40:70, 50:90].max() == pytest.approx(1)
    assert renormalize_in_boxes(cam, []).max() == 0


def test_several_target_layers_are_each_scaled_and_averaged(lesion_detector):
    film, _ = make_film(HELD_OUT + 2)
    layers = ["backbone.fpn.layer_blocks[0]", "backbone.fpn.layer_blocks[1]"]
    alone = [explain(lesion_detector, film[None], ["topk"], "HiResCAM", layer)[0, 0] for layer in layers]
    with Explainer(lesion_detector, "HiResCAM", ["topk"], layer=",".join(layers)) as explainer:
        both, _ = explainer(film)
    grids = [CAM_METHODS["HiResCAM"](lesion_detector, layer).explain(lesion_detector.prepare(film), ["topk"])[0].cam
             for layer in layers]
    fine = grids[0].shape
    expected = np.mean([grid_to_image(g, fine[::-1]) if g.shape != fine else g / g.max() for g in grids], axis=0)
    assert np.allclose(both[0], grid_to_image(expected, film.shape[::-1]), atol=1e-5)
    assert np.abs(alone[0] - alone[1]).max() > 1e-2      # the layers do differ, so the mean is of two maps


def test_explainer_keeps_one_hook_across_frames_and_leaves_the_model_as_it_was(lesion_detector):
    films = [make_film(HELD_OUT + i)[0] for i in range(3)]
    module = lesion_detector.module
    module.train()
    layer = module.get_submodule("backbone.fpn.layer_blocks.0")
    with Explainer(lesion_detector, "HiResCAM", ["topk", "box"]) as explainer:
        hook = dict(layer._forward_hooks)
        assert len(hook) == 1 and not module.training
        for film in films:
            maps, detections = explainer(film)
            assert dict(layer._forward_hooks) == hook             # the same hook, not one per frame
            assert maps.shape == (1 + len(detections), 256, 256)
            assert explainer.labels[1:] == [f"det{j}_{d[4]}" for j, d in enumerate(detections)]
            reference = explain(lesion_detector, film[None], ["topk"], "HiResCAM")[0, 0]
            assert np.allclose(maps[0], reference, atol=1e-6)
        colour = cv2.cvtColor((films[0] * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
        assert explainer(colour)[0].shape[1:] == films[0].shape
        with pytest.raises(ValueError, match=r"a frame is read in \[0, 1\] \(uint8: 0..255\) but this one holds"):
            explainer(films[0] * 255)                             # float 0..255: refused, not read as bright
    assert len(layer._forward_hooks) == 0 and module.training
    module.eval()
    with pytest.raises(TargetError, match="DETECTION_TARGET='boxes': a detector's maps explain"):
        Explainer(lesion_detector, "HiResCAM", ["boxes"])         # refused when made, leaving no hook behind
    assert len(layer._forward_hooks) == 0


def test_yolo_models_of_the_optional_package_are_read_the_same_way(tmp_path):
    from PIL import Image

    folder = make_test_model(tmp_path / "yolo", "yolo")
    model = load_model(str(folder), CPU, score_threshold=0.0)
    assert Image.open.__module__ == "PIL.Image"   # ultralytics' own replacement undone: films' errors stay Pillow's
    assert model.head_inputs() == ["model[15]", "model[18]", "model[21]"]   # the Detect head's inputs, finest first
    assert model.class_names == ("nodule", "opacity", "effusion")
    pixels = model.prepare(np.random.default_rng(0).random((300, 200), dtype=np.float32))
    with torch.no_grad():
        outputs = model.forward(pixels)
    assert outputs.shape == (1, 8400, 4 + 3)
    maps = CAM_METHODS["EigenCAM"](model, "model.15").explain(pixels, ["topk"])
    assert maps[0].cam.shape == (80, 80) and maps[0].cam.max() > 0 and maps[0].target == "top252"


def test_box_target_writes_a_map_per_detection_its_rows_and_detections_jsonl_and_resumes(tmp_path):
    out = tmp_path / "out"
    args = ["run", "--config", REPO / "configs/examples/detector_lesions.conf", f"OUTPUT_DIR={out}", "STOP_AFTER=3",
            "DETECTION_TARGET=box", "RENORMALIZE_IN_BOXES=true", "SAVE_RAW_CAM=true", "CAM_VERSION=GradCAM"]
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    rows = read_csv(out / "vqa_manifest.csv")
    lines = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    assert [line["image_path"] for line in lines] == [f"films/synthetic_00{i}.png" for i in range(3)]
    assert len(rows) == sum(len(line["detections"]) for line in lines) >= 3
    for row in rows:
        film = cv2.imread(str(REPO / "examples/demo" / row["source_image"]), cv2.IMREAD_GRAYSCALE)
        detections = json.loads(row["detections"])
        j = int(row["target"][3:].split("_")[0])
        x0, y0, x1, y1, label, score = detections[j]
        assert row["image_path"] == row["source_image"].replace(".png", f"_det{j}_{label}.png")
        assert row["prompt"] == "box" and float(row["score"]) == pytest.approx(score, abs=1e-4)
        raw = cv2.imread(str(out / row["raw_map"]), cv2.IMREAD_UNCHANGED) / 65535
        assert raw.shape == film.shape and raw.max() == pytest.approx(1, abs=1e-4)
        inside = np.zeros(raw.shape, bool)
        inside[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
        assert raw[~inside].max() == 0                      # renormalised in its own detection's box
    assert cli("report", out).returncode == 0
    first_row = rows[0]
    assert (f"explains:</span> {first_row['target']} (score {first_row['score']}); detections: "
            in (out / "index.html").read_text())
    manifest = (out / "vqa_manifest.csv").read_bytes()
    again = cli(*args)
    assert again.returncode == 0 and f"{len(rows)} already done" in again.stderr + again.stdout
    assert (out / "vqa_manifest.csv").read_bytes() == manifest


def test_a_detector_without_the_named_layer_fails_in_one_line_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    result = cli("run", "--config", REPO / "configs/examples/detector_lesions.conf", f"OUTPUT_DIR={out}",
                 "TARGET_LAYER=backbone.nothing")
    assert result.returncode == 2 and not out.exists()
    assert "TARGET_LAYER=backbone.nothing: the model has no module 'nothing' there" in result.stderr
    bad = cli("run", "--config", REPO / "configs/examples/detector_lesions.conf", f"OUTPUT_DIR={out}", "TARGETS=1")
    assert bad.returncode == 2 and "TARGETS applies to classifiers" in bad.stderr and not out.exists()


@pytest.mark.parametrize("config", ["torchvision_fasterrcnn", "torchvision_ssdlite", "yolo"])
def test_example_configs_run_offline_on_the_real_films_with_random_weights(cxr, tmp_path, config):
    arch = config.removeprefix("torchvision_")
    folder = make_test_model(tmp_path / arch, arch)
    out = tmp_path / "out"
    result = cli("run", "--config", REPO / f"configs/examples/{config}.conf", f"MODEL={folder}", f"OUTPUT_DIR={out}",
                 "STOP_AFTER=2", "SCORE_THRESHOLD=0.05")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_csv(out / "vqa_manifest.csv")
    assert len(rows) == 2 and all(row["image_path"].endswith("_topk.png") for row in rows)
    assert "the detection head reads" in result.stderr
