"""The shipped zone classifier: its outputs find the zones that hold a lesion, and each method's zone maps peak in
the named zone at least as often as the floors below (figures on 200 films in docs/methods.md)."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from attention_map import explain
from attention_map.models import load_model
from attention_map.models.zones import CONFIG, SHIPPED, STEPS, check_zone_model
from attention_map.synthetic import CHEST_ZONES, make_zone_film

# Floors under the shipped model's figures on the first 40 held-out films (GradCAM, XGradCAM and HiResCAM 0.89,
# GradCAM++ 0.82, LayerCAM 0.78, gScoreCAM 0.24; every AUROC 1.0). ScoreCAM is gScoreCAM here (128 channels, fewer
# than TOPK); EigenCAM ignores the target (see the last test).
AUROC_FLOOR = 0.99
POINTING_FLOORS = {"GradCAM": 0.85, "HiResCAM": 0.85, "XGradCAM": 0.85, "GradCAM++": 0.75, "LayerCAM": 0.7,
                   "gScoreCAM": 0.15}


@pytest.fixture(scope="module")
def figures():
    return check_zone_model(SHIPPED, count=40, methods=list(POINTING_FLOORS))


def test_the_shipped_zone_classifier_is_small_and_made_by_the_recipe():
    files = {path.name: path.stat().st_size for path in SHIPPED.iterdir()}
    assert set(files) == {"classifier_config.json", "model.safetensors"} and sum(files.values()) < 1_500_000
    assert json.loads((SHIPPED / "classifier_config.json").read_text()) == CONFIG
    with safe_open(str(SHIPPED / "model.safetensors"), "pt") as weights:
        assert weights.metadata()["made_by"] == f"attention-map train-zone-model --steps {STEPS} --seed 0"
    model = load_model(str(SHIPPED), torch.device("cpu"))
    assert model.output_names == CHEST_ZONES and model.default_target_layer() == "layer4"


def test_each_zone_output_finds_its_lesions(figures):
    assert set(figures["auroc"]) == set(CHEST_ZONES)
    assert min(figures["auroc"].values()) >= AUROC_FLOOR, figures["auroc"]


@pytest.mark.parametrize("method", POINTING_FLOORS)
def test_each_method_points_at_the_named_zone(figures, method):
    assert figures["pointing"][method] >= POINTING_FLOORS[method], figures["pointing"]


def test_eigencam_ignores_the_target_and_gradient_methods_do_not():
    film, zones = make_zone_film(7)
    model = load_model(str(SHIPPED), torch.device("cpu"))
    eigen = explain(model, film[None], list(CHEST_ZONES), method="EigenCAM")[0]
    assert all(np.array_equal(eigen[0], zone_map) for zone_map in eigen[1:])
    grad = explain(model, film[None], list(CHEST_ZONES), method="GradCAM")[0]
    assert not np.allclose(grad[0], grad[1])


@pytest.mark.slow
def test_a_retrain_with_the_shipped_recipe_meets_the_goal(zone_retrain):
    """The recipe, retrained on two CPU threads with the processor pinned (conftest.py; the shipped model was trained
    without the pins, so the retrain is a sibling): its outputs find the lesions and GradCAM and HiResCAM point at the
    named zone at least 0.8 of the time, on the first 40 films (0.82 measured on an Intel Xeon, 0.78 on 200 films; on
    an AMD EPYC 0.93 and 0.83: docs/methods.md).
    The recipe is seed-sensitive, so this floor is the goal, not the shipped model's figures."""
    print("retrained zone classifier:", "the shipped bytes" if zone_retrain["shipped_bytes"] else "a sibling",
          zone_retrain)
    assert min(zone_retrain["auroc"].values()) >= AUROC_FLOOR, zone_retrain["auroc"]
    assert zone_retrain["pointing"]["GradCAM"] >= 0.8 and zone_retrain["pointing"]["HiResCAM"] >= 0.8, zone_retrain
