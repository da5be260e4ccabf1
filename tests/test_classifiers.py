"""Classifier backbones (timm, torchvision, torchxrayvision, a classifier folder), TARGET_LAYER=auto by a dry forward,
targets, the example configs and FALLBACK_CAM, through the public interfaces."""
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from attention_map import heatmaps
from attention_map.cams import CAM_METHODS, SCORE_METHODS
from attention_map.images import read_film
from attention_map.maps import CAMError
from attention_map.models import ModelLoadError, TargetError, load_model
from attention_map.models.base import find_target_layer
from attention_map.models.classifier import Classifier
from attention_map.models.random_models import CLASSIFIER_ARCHS, make_test_model
from attention_map.outputs import read_csv
from attention_map.plan import Job
from attention_map.records import Prompt, Record
from attention_map.synthetic import CHEST_ZONES

from test_cli import cli

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict[str, Path]:
    """Every classifier arch of make-test-model, random weights, built offline."""
    root = tmp_path_factory.mktemp("classifiers")
    return {arch: make_test_model(root / arch, arch, seed=0) for arch in CLASSIFIER_ARCHS}


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules())


@pytest.mark.parametrize("arch, layer, grid", [
    ("timm-resnet", "layer4", None), ("timm-vit", "blocks[-1].norm1", (14, 14)),
    ("torchvision-densenet", "features", None), ("xrv-densenet", "features", None), ("zone-resnet", "layer4", None)])
def test_auto_target_layer_is_found_by_one_dry_forward(classifiers, arch, layer, grid):
    model = load_model(str(classifiers[arch]), CPU)
    assert model.default_target_layer() == layer
    assert model._probe()[1] == grid
    assert _hooks(model.module) == 0


@pytest.mark.parametrize("arch, layer", [("tiny", "visual.transformer.resblocks[-1].ln_1"),
                                         ("tiny-resnet", "visual.layer4")])
def test_auto_target_layer_of_clip_models_is_the_one_named_before(tmp_path, arch, layer):
    model = load_model(str(make_test_model(tmp_path / arch, arch, seed=0)), CPU)
    assert model.default_target_layer() == layer


def test_a_model_without_a_spatial_layer_gets_one_line_naming_target_layer():
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 2))
    with pytest.raises(ModelLoadError) as error:
        find_target_layer(mlp, lambda: mlp(torch.zeros(1, 3, 8, 8)))
    message = str(error.value)
    assert "\n" not in message and "TARGET_LAYER" in message and "1 [1, 16]" in message and "3 [1, 2]" in message
    assert _hooks(mlp) == 0


def test_each_library_keeps_its_own_preprocessing(classifiers):
    film = np.zeros((300, 200), dtype=np.float32)
    film[150:] = 1.0
    xrv = load_model(str(classifiers["xrv-densenet"]), CPU)
    pixels = xrv.prepare(film)
    assert pixels.shape == (1, 1, 224, 224)      # one grey channel at the weights' resolution
    assert pixels.min().item() == -1024 and pixels.max().item() == 1024     # black and white, as xrv reads them
    assert xrv.output_names[:2] == ("Atelectasis", "Consolidation") and len(xrv.output_names) == 18
    vit = load_model(str(classifiers["timm-vit"]), CPU)
    assert vit.mean == (0.5, 0.5, 0.5) and vit.image_size == (224, 224)     # timm's data config for this model
    densenet = load_model(str(classifiers["torchvision-densenet"]), CPU)
    assert densenet.mean == (0.485, 0.456, 0.406) and densenet.image_size == (224, 224)
    assert load_model(str(classifiers["timm-resnet"]), CPU).image_size == (224, 224)   # timm's inference size


def test_a_checkpoint_and_a_library_name_load_like_the_folder(classifiers, tmp_path):
    folder = classifiers["timm-resnet"]
    state = load_file(str(folder / "model.safetensors"))
    checkpoint = tmp_path / "epoch_3.pt"      # a training checkpoint, saved from DataParallel
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}, "lr": 0.1}, checkpoint)
    pixels = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = load_model(str(folder), CPU).forward(pixels)
        got = load_model("timm:resnet10t", CPU, weights=checkpoint).forward(pixels)   # a 1000-class head resized
    assert got.shape == (2, 14) and torch.equal(got, expected)


def test_weights_that_do_not_fit_name_missing_and_unexpected_keys(classifiers, tmp_path):
    state = load_file(str(classifiers["timm-resnet"] / "model.safetensors"))
    state["layer9.weight"] = state.pop("layer4.0.conv1.weight")
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, str(wrong))
    with pytest.raises(ModelLoadError) as error:
        load_model("timm:resnet10t", CPU, weights=wrong)
    message = str(error.value)
    assert "\n" not in message and str(wrong) in message
    assert "1 missing keys (layer4.0.conv1.weight)" in message and "1 unexpected keys (layer9.weight)" in message


def test_a_weights_file_that_cannot_be_read_is_one_line_saying_why(classifiers, tmp_path):
    """Text, a cut-short file of either format, and a training checkpoint that pickles its hyper-parameters beside
    the tensors (which torch.load refuses with a page of advice): one line each, naming the file and what it holds;
    the remedy it gives for the checkpoint loads, its keys named as the Lightning module named them."""
    import argparse

    state = load_file(str(classifiers["timm-resnet"] / "model.safetensors"))
    torch.save({"state_dict": {f"model.{key}": value for key, value in state.items()},
                "hparams": argparse.Namespace(lr=1e-3)}, tmp_path / "last.ckpt")
    torch.save(state, tmp_path / "whole.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    for name, source in (("cut.pt", "whole.pt"), ("cut.safetensors", classifiers["timm-resnet"] / "model.safetensors"),
                         ("notes.safetensors", "notes.pt")):
        (tmp_path / name).write_bytes((tmp_path / source).read_bytes()[:2000])
    for name in ("notes.pt", "cut.pt", "cut.safetensors", "notes.safetensors", "last.ckpt"):
        with pytest.raises(ModelLoadError) as error:
            load_model("timm:resnet10t", CPU, weights=tmp_path / name)
        message = str(error.value)
        assert message.startswith(f"MODEL_WEIGHTS={tmp_path / name}: ") and "\n" not in message, message
        assert "\x1b" not in message and len(message) < 400, message
        if name == "last.ckpt":
            assert "a pickled argparse.Namespace beside its tensors" in message and "state_dict alone" in message
        else:
            assert "not a readable PyTorch or safetensors weights file (" in message, message
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)     # the remedy, on a file this test made
    torch.save(checkpoint["state_dict"], tmp_path / "weights.pt")
    model = load_model("timm:resnet10t", CPU, weights=tmp_path / "weights.pt")
    assert torch.equal(model.module.state_dict()["fc.weight"], state["fc.weight"])


@pytest.mark.parametrize("prefix", ["module.", "model.", "module.model."])
def test_weights_saved_with_a_prefix_to_every_key_load(classifiers, tmp_path, prefix):
    """DataParallel's `module.`, a Lightning module's `model.`: the prefix is dropped where the model lacks it."""
    state = load_file(str(classifiers["timm-resnet"] / "model.safetensors"))
    torch.save({"epoch": 3, "state_dict": {prefix + key: value for key, value in state.items()}}, tmp_path / "w.pt")
    loaded = load_model("timm:resnet10t", CPU, weights=tmp_path / "w.pt").module.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())
    del state["fc.bias"]        # keys that do not fit are named as the model would name them
    torch.save({prefix + key: value for key, value in state.items()}, tmp_path / "w.pt")
    with pytest.raises(ModelLoadError, match=r"1 missing keys \(fc\.bias\), 0 unexpected keys"):
        load_model("timm:resnet10t", CPU, weights=tmp_path / "w.pt")


def test_target_names_must_fit_the_outputs(classifiers):
    with pytest.raises(ModelLoadError, match="TARGET_NAMES names 2 outputs but MODEL=.* has 14"):
        load_model(str(classifiers["timm-resnet"]), CPU, target_names=("a", "b"))


def test_targets_by_index_name_and_prediction_score_the_outputs(classifiers):
    model = load_model(str(classifiers["timm-resnet"]), CPU, target_names=tuple(f"c{i}" for i in range(14)))
    pixels = torch.rand(3, 3, 224, 224)
    with torch.no_grad():
        outputs = model.forward(pixels)
    targets = model.targets(["", "2", "c5"], outputs[1:2])
    predicted = int(outputs[1].argmax())
    assert targets.labels == [f"c{predicted}", "c2", "c5"]
    assert torch.equal(targets.score(outputs), outputs[:, [predicted, 2, 5]])
    with pytest.raises(TargetError, match="no output of that name.*c0, c1"):
        model.targets(["Effusion"], outputs[:1])
    with pytest.raises(TargetError, match="has 14 outputs"):
        model.targets(["14"], outputs[:1])


def test_zone_targets_score_the_predicted_class_of_their_zone(classifiers):
    model = load_model(str(classifiers["zone-resnet"]), CPU)
    assert model.output_names == CHEST_ZONES
    with torch.no_grad():
        outputs = model.forward(torch.rand(1, 3, 224, 224))
    assert outputs.shape == (1, 6, 4)
    targets = model.targets(["left_mid", "right_inf"], outputs)
    classes = [int(outputs[0, CHEST_ZONES.index(z)].argmax()) for z in ("left_mid", "right_inf")]
    expected = torch.stack([outputs[:, 3, classes[0]], outputs[:, 4, classes[1]]], dim=1)
    assert targets.labels == ["left_mid", "right_inf"] and torch.equal(targets.score(outputs), expected)
    with pytest.raises(TargetError, match="zone outputs"):
        model.targets([""], outputs)


@pytest.mark.parametrize("config, arch", [("timm_resnet", "timm-resnet"),
                                          ("torchvision_densenet", "torchvision-densenet"),
                                          ("xrv_densenet", "xrv-densenet"), ("csi_zones", "zone-resnet")])
def test_each_example_config_runs_offline_on_the_real_films(classifiers, cxr, tmp_path, config, arch):
    folder = classifiers[arch]
    model = (["MODEL_WEIGHTS=" + str(folder / "model.safetensors")] if config != "csi_zones"
             else [f"MODEL={folder}"])
    out = tmp_path / "out"
    result = cli("run", "--config", f"configs/examples/{config}.conf", f"IMAGE_ROOT={cxr}", f"OUTPUT_DIR={out}",
                  "STOP_AFTER=1", "DEVICE=cpu", "OFFLINE=true", *model)
    assert result.returncode == 0, result.stderr
    rows = read_csv(out / "vqa_manifest.csv")
    conf = (REPO / "configs/examples" / f"{config}.conf").read_text()
    expected_targets = {"timm_resnet": 1, "torchvision_densenet": 2, "xrv_densenet": 2, "csi_zones": 6}[config]
    assert len(rows) == expected_targets
    for row in rows:
        assert row["cam_method"] in conf and math.isfinite(float(row["score"])) and row["question"] == ""
        stem = Path(row["source_image"]).stem
        assert row["image_path"] == f"nih/{stem}_{row['prompt'] or 'predicted'}.png"
        assert (out / row["image_path"]).is_file()
    if config == "csi_zones":
        assert [row["target"] for row in rows[:6]] == list(CHEST_ZONES)
    if config == "xrv_densenet":
        assert {row["target"] for row in rows} == {"Cardiomegaly", "Effusion"}


def test_csv_targets_and_unknown_targets(classifiers, cxr, tmp_path):
    films = sorted((cxr / "nih").glob("*.png"))[:2]
    data = tmp_path / "records.csv"
    data.write_text(f"image_path,target\n{films[0].name},left_sup\n{films[1].name},left_lung\n{films[1].name},\n")
    out = tmp_path / "out"
    result = cli("run", f"DATA_FILE={data}", f"IMAGE_ROOT={films[0].parent}", f"MODEL={classifiers['zone-resnet']}",
                  f"OUTPUT_DIR={out}", "CAM_VERSION=HiResCAM", "DEVICE=cpu", "TARGETS=right_inf")
    assert result.returncode == 3, result.stderr
    rows = read_csv(out / "vqa_manifest.csv")
    assert [(row["source_image"], row["target"]) for row in rows] == [(films[0].name, "left_sup"),
                                                                     (films[1].name, "right_inf")]
    errors = read_csv(out / "errors.csv")
    assert len(errors) == 1 and errors[0]["row"] == "3" and errors[0]["stage"] == "record:target"
    assert "'left_lung'" in errors[0]["reason"]
    assert "right_sup, left_sup" in errors[0]["reason"]
    bad = cli("run", f"DATA_FILE={data}", f"IMAGE_ROOT={films[0].parent}", f"MODEL={classifiers['zone-resnet']}",
               f"OUTPUT_DIR={tmp_path / 'bad'}", "DEVICE=cpu", "TARGETS=apex")
    assert bad.returncode == 2 and "TARGETS: target 'apex'" in bad.stderr and not (tmp_path / "bad").exists()


def test_gradient_methods_explain_films_in_batches_and_a_rerun_redoes_a_batch_whole(classifiers, cxr, tmp_path):
    """BATCH_SIZE films per forward and backward; the maps are those of one film at a time (up to float rounding),
    and a rerun after an interruption inside a batch remakes that batch whole, so every byte is as an uninterrupted
    run's."""
    import hashlib
    import shutil

    def run(out, batch, *extra):
        return cli("run", "--config", "configs/examples/timm_resnet.conf", f"IMAGE_ROOT={cxr}", f"OUTPUT_DIR={out}",
                    "STOP_AFTER=5", "DEVICE=cpu", "OFFLINE=true", "SAVE_RAW_CAM=true", f"BATCH_SIZE={batch}",
                    f"MODEL_WEIGHTS={classifiers['timm-resnet'] / 'model.safetensors'}", *extra)

    def digests(folder):
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*.png"))}

    batched = run(tmp_path / "batched", 2)
    assert batched.returncode == 0, batched.stderr
    assert "GradCAM at layer4, 2 films per forward" in batched.stderr
    one_by_one = run(tmp_path / "one", 1)
    assert one_by_one.returncode == 0 and "1 film per forward" in one_by_one.stderr
    rows = read_csv(tmp_path / "batched" / "vqa_manifest.csv")
    assert len(rows) == 5
    for row, alone in zip(rows, read_csv(tmp_path / "one" / "vqa_manifest.csv")):
        assert row["image_path"] == alone["image_path"]
        assert abs(float(row["score"]) - float(alone["score"])) < 1e-4
        maps = [cv2.imread(str(folder / row["raw_map"]), cv2.IMREAD_UNCHANGED).astype(int)
                for folder in (tmp_path / "batched", tmp_path / "one")]
        assert np.abs(maps[0] - maps[1]).max() <= 2      # of 65535

    # interrupted after the first film of the second batch (films 2 and 3): its journal line and files are gone
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "batched", again)
    journal = again / "shards" / "progress-0000-of-0001.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(line for line in lines if rows[3]["image_path"] not in line))
    (again / rows[3]["image_path"]).unlink()
    (again / rows[3]["raw_map"]).unlink()
    (again / "vqa_manifest.csv").unlink()
    resumed = run(again, 2)
    assert resumed.returncode == 0, resumed.stderr
    assert "2 heatmaps written, 0 failed, 3 already done" in resumed.stdout    # films 2 and 3
    assert digests(again) == digests(tmp_path / "batched")
    assert read_csv(again / "vqa_manifest.csv") == rows


class _NoGradientToLayer(torch.nn.Module):
    """A classifier whose head reads a detached copy of its last feature map: no gradient reaches that layer."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.features(x).detach().mean(dim=(2, 3)))


def test_fallback_cam_stands_in_where_the_method_cannot_run_and_says_so(cxr):
    torch.manual_seed(0)
    model = Classifier(_NoGradientToLayer().eval(), (64, 64))
    film = read_film(cxr / "nih" / "00000001_000.png")
    record = Record(1, "nih/00000001_000.png", "", "", "0", "")
    jobs = [Job(0, Prompt(record, "1"), "a_1.png")]
    grad, eigen = CAM_METHODS["GradCAM"](model), CAM_METHODS["EigenCAM"](model)
    [error] = heatmaps.explain(model, grad, [film], [jobs])
    assert isinstance(error, heatmaps.StageError)
    assert error.stage == "cam" and "does not depend on TARGET_LAYER=features" in error.reason
    [(made_jobs, maps, made)] = heatmaps.explain(model, grad, [film], [jobs], fallback=eigen)
    assert made_jobs == jobs and made[0].method == "EigenCAM"
    assert "FALLBACK_CAM=EigenCAM: GradCAM could not run" in made[0].warning
    assert made[0].target == "1" and maps[0].shape == (32, 32) and maps[0].max() > 0
    with pytest.raises(CAMError):   # ScoreCAM needs no gradient either, gScoreCAM does
        CAM_METHODS["gScoreCAM"](model, topk=4).explain(model.prepare(film.pixels), ["1"])
    assert CAM_METHODS["ScoreCAM"](model).explain(model.prepare(film.pixels), ["1"])[0].cam.max() > 0


@pytest.mark.parametrize("arch", list(CLASSIFIER_ARCHS))
def test_every_method_makes_a_map_of_every_classifier_backbone(classifiers, cxr, arch):
    """One code path per method for every adapter: each makes finite maps on the backbone's grid, and the scores
    it reports are the model's outputs. For time, the CNNs read 128 x 128 inputs here (the DenseNets 64 x 64), and
    ScoreCAM (as many masked forwards as the layer has channels) runs on the ViT (192) and the zone ResNet (512)
    only."""
    model = load_model(str(classifiers[arch]), CPU)
    if arch != "timm-vit":
        model.image_size = (64, 64) if "densenet" in arch else (128, 128)
    pixels = model.prepare(read_film(cxr / "nih" / "00000001_000.png").pixels)
    names = ["left_sup", "right_inf"] if arch == "zone-resnet" else ["", "3"]
    with torch.no_grad():
        expected = model.targets(names, model.forward(pixels)).score(model.forward(pixels))[0].tolist()
    grid = model.activations_to_grid(_layer_output(model, pixels)).shape[2:]
    for method in SCORE_METHODS:
        if method == "ScoreCAM" and arch not in ("timm-vit", "zone-resnet"):
            continue
        options = {"topk": 8} if method in ("gScoreCAM", "ScoreCAM") else {}
        results = CAM_METHODS[method](model, **options).explain(pixels, names)
        assert [r.cam.shape for r in results] == [tuple(grid)] * 2, method
        assert all(np.isfinite(r.cam).all() and r.cam.min() >= 0 for r in results), method
        assert [r.score for r in results] == pytest.approx(expected, rel=1e-5, abs=1e-6), method
    assert _hooks(model.module) == 0


def _layer_output(model, pixels):
    store = []
    handle = model.find_module(model.default_target_layer()).register_forward_hook(lambda m, a, o: store.append(o))
    with torch.no_grad():
        model.forward(pixels)
    handle.remove()
    return store[0]
