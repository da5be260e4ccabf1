"""The toy CLIP trained on synthetic films: its gScoreCAM maps point where the caption says, and random weights'
maps do not (the figures are printed by `train-toy-model`; README, "The toy model")."""
import json

import cv2
import numpy as np
import pytest
import torch

from attention_map.synthetic import captions, corner_boxes, make_chest

from test_cli import cli, read_manifest


# What the toy model's maps must show on the 60 held-out films (README, "The toy model"): figure -> (floor, ceiling)
THRESHOLDS = {
    "retrieval": (0.6, None),            # 10 captions: chance is 0.1
    "named_side": (0.85, None),
    "energy_ratio": (3.0, None),         # 1 is a uniform map
    "pointing_cell": (0.4, None),
    "pointing": (0.5, None),             # the goal is 0.8; nine seeds of the recipe gave 0.65 to 0.88
    "other_side": (0.65, None),          # films with a lesion in each lung: 0.5 is chance
    "randomized_ssim": (None, 0.5),      # the maps of the model's initial random weights look unlike its own
}


def unmet(figures: dict) -> dict:
    """The figures outside their THRESHOLDS."""
    return {name: round(figures[name], 3) for name, (floor, ceiling) in THRESHOLDS.items()
            if (floor is not None and figures[name] < floor) or (ceiling is not None and figures[name] >= ceiling)}


@pytest.fixture(scope="session")
def figures(toy_model):
    from attention_map.models.toy import check_toy_model

    result = check_toy_model(toy_model, count=60)
    print("toy model on 60 held-out films:", result)
    return result


@pytest.mark.parametrize("name", THRESHOLDS)
def test_the_shipped_toy_model_meets_its_threshold(figures, name):
    assert name not in unmet(figures), (name, figures[name], THRESHOLDS[name])


@pytest.mark.slow
def test_a_retrain_with_the_shipped_recipe_meets_every_threshold(toy_retrain, figures):
    """The recipe, not only the shipped bytes, makes maps that mean something. The retrain runs beside the other tests,
    its threads and processor pinned (conftest.py): on the kind of processor that trained the shipped model (an AMD
    EPYC, Zen 3) it writes the shipped bytes, whose figures are the shipped model's (the fixture above, computed once);
    elsewhere (an Intel processor or an AMD EPYC of Zen 5, where MKL takes other paths) the sibling it trains was
    checked on 60 films unseen by the recipe's choice."""
    retrained = figures if toy_retrain["shipped_bytes"] else toy_retrain["figures"]
    print("retrained toy model:",
          "the shipped bytes" if toy_retrain["shipped_bytes"] else f"on {toy_retrain['films']} unseen films", retrained)
    assert not unmet(retrained), retrained


def test_generator_is_deterministic_and_boxes_hold_the_lesion():
    for seed in range(12):
        film, lesions = make_chest(seed, 192)
        again, same = make_chest(seed, 192)
        assert np.array_equal(film, again) and lesions == same and lesions[0].caption in captions()
        x, y, w, h = lesions[0].box
        assert x >= 0 and y >= 0 and x + w <= 192 and y + h <= 192
        assert film[y + h // 2, x + w // 2] > np.median(film)        # the lesion is brighter than the film
        lesion = lesions[0]
        (chosen,) = make_chest(seed, 192, kind=lesion.kind, sides=(lesion.side,), zone=lesion.zone)[1]
        assert (chosen.kind, chosen.side, chosen.zone) == (lesion.kind, lesion.side, lesion.zone)
    two = make_chest(5, 192, kind="nodule", sides=("right", "left"), zone="upper")[1]
    assert [lesion.side for lesion in two] == ["right", "left"] and two[0].box[0] < 96 <= two[1].box[0]


def test_pipeline_with_the_toy_model_keeps_the_corner_letters_cold(tmp_path, toy_model):
    from attention_map.synthetic import write_demo_data

    data = write_demo_data(tmp_path / "data", count=6, size=192, first_seed=500)
    out = tmp_path / "out"
    result = cli("run", f"DATA_FILE={data}", f"MODEL={toy_model}", f"OUTPUT_DIR={out}", "PROMPT_SOURCE=both",
                 "SAVE_RAW_CAM=true", "SKIP_CRF=true")
    assert result.returncode == 0, result.stderr
    rows = read_manifest(out)
    assert len(rows) == 12
    for row in rows:
        heat = cv2.imread(str(out / row["raw_map"]), cv2.IMREAD_UNCHANGED) / 65535.0
        film = cv2.imread(str(tmp_path / "data" / row["source_image"]), cv2.IMREAD_GRAYSCALE)
        for x, y, w, h in corner_boxes(heat.shape[0]):
            letters = film[y:y + h, x:x + w] > 200          # the burned-in letters' own pixels
            assert letters.sum() > 20 and heat[y:y + h, x:x + w][letters].max() <= 0.05, row["raw_map"]
    evaluation = cli("evaluate", out, "--truth", tmp_path / "data" / "boxes.csv")
    assert evaluation.returncode == 0, evaluation.stderr
    assert "| hit |" in evaluation.stdout and "| energy_ratio |" in evaluation.stdout
    aggregates = json.loads((out / "evaluation.json").read_text())["aggregates"]
    assert aggregates["energy_ratio"]["mean"] > 1.5        # 1 is a uniform map
    # the synthetic readers dwell on the lesion: the maps agree with their gaze, and pick out their own film's
    # (measured 0.544, 0.687 and 0.833 of 6)
    gaze = cli("evaluate", out, "--truth-maps", tmp_path / "data" / "gaze.csv", "--baseline", "centre")
    assert gaze.returncode == 0, gaze.stderr
    agreed = json.loads((out / "agreement.json").read_text())
    assert agreed["aggregates"]["cc"]["mean"] > 0.3 and agreed["aggregates"]["auc_shuffled"]["mean"] > 0.6
    assert agreed["retrieval"]["model_to_clinician_r@1"]["value"] >= 0.5       # chance: 1 of 6


def test_train_toy_model_keeps_a_model_of_the_same_recipe_and_code(tmp_path):
    from safetensors.torch import load_file

    from attention_map.cli import _parser
    from attention_map.models.toy import SEED, is_current, made_by

    folder = tmp_path / "toy"
    few = ("--steps", "2", "--films", "200", "--check-films", "0")     # 200 films: a few of each caption
    first = cli("train-toy-model", folder, *few)
    assert first.returncode == 0, first.stderr
    assert is_current(folder, steps=2, films=200) and not is_current(folder, steps=2) and "step 2/2" in first.stderr
    assert "shipped model" not in first.stderr       # another recipe than the shipped one: nothing to compare
    # the command the model records is one the CLI takes, and asks for the same model
    recorded = made_by(folder)["made_by"].split()
    assert recorded[:2] == ["attention-map", "train-toy-model"]
    parsed = _parser().parse_args([recorded[1], str(folder), *recorded[2:]])
    assert (parsed.steps, parsed.seed, parsed.films) == (2, SEED, 200)
    weights = load_file(str(folder / "open_clip_model.safetensors"))
    written = (folder / "open_clip_model.safetensors").read_bytes()
    again = cli("train-toy-model", folder, *few)
    assert again.returncode == 0 and "already holds the toy model" in again.stderr
    forced = cli("train-toy-model", folder, *few, "--force")
    assert forced.returncode == 0 and "step 2/2" in forced.stderr
    retrained = load_file(str(folder / "open_clip_model.safetensors"))
    assert all(torch.equal(weights[name], retrained[name]) for name in weights)   # the same seed, the same weights
    assert (folder / "open_clip_model.safetensors").read_bytes() == written        # and the same file
    initial = cli("train-toy-model", tmp_path / "initial", "--steps", "0", "--check-films", "0")
    assert initial.returncode == 0, initial.stderr
    initial = load_file(str(tmp_path / "initial" / "open_clip_model.safetensors"))
    assert initial.keys() == weights.keys()
    assert not torch.equal(initial["visual.conv1.weight"], weights["visual.conv1.weight"])
    other_seed = cli("train-toy-model", tmp_path / "seed1", "--steps", "0", "--seed", "1", "--check-films", "0")
    assert other_seed.returncode == 0, other_seed.stderr
    seed1 = load_file(str(tmp_path / "seed1" / "open_clip_model.safetensors"))
    assert not torch.equal(seed1["visual.conv1.weight"], initial["visual.conv1.weight"])


def test_too_few_training_films_is_one_clear_line_and_keeps_the_folder(tmp_path):
    folder = tmp_path / "toy"
    made = cli("train-toy-model", folder, "--steps", "0", "--check-films", "0")
    assert made.returncode == 0, made.stderr
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    result = cli("train-toy-model", folder, "--steps", "2", "--films", "30", "--check-films", "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("attention-map: --films: 30 training films hold "), \
        result.stderr
    assert "a batch takes 6 films of each caption" in result.stderr and "Traceback" not in result.stderr
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before    # the model it held is intact


def test_the_shipped_toy_model_is_small_and_made_by_the_recipe(toy_model):
    from attention_map.models.toy import is_current

    assert is_current(toy_model)        # the recipe's steps, seed and films
    size = sum(path.stat().st_size for path in toy_model.iterdir())
    assert size <= 5 * 2**20, f"{toy_model} holds {size} bytes"


def test_the_toy_tokenizer_splits_the_training_texts_as_open_clips_full_tokenizer(toy_model):
    """The shipped tokenizer keeps only the merges the captions use; each text must keep its tokens, so that the
    model's embedding rows are those a full vocabulary trains."""
    from open_clip.tokenizer import SimpleTokenizer

    from attention_map.models import load_model
    from attention_map.models.toy import _vocabulary, training_texts

    _, ids = _vocabulary()
    model = load_model(str(toy_model), torch.device("cpu"))
    compact = model.tokenizer(training_texts())
    full = SimpleTokenizer(context_length=compact.shape[1])(training_texts())
    assert model.module.token_embedding.num_embeddings == len(ids) < 1000
    ends = compact.argmax(dim=1)                 # the end-of-text token, the largest id of both vocabularies
    assert torch.equal(ends, full.argmax(dim=1))
    for row, end in enumerate(ends.tolist()):
        assert torch.equal(torch.tensor(ids)[compact[row, :end + 1]], full[row, :end + 1]), training_texts()[row]


def test_train_toy_model_on_a_missing_gpu_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here, so --device cuda is valid")
    result = cli("train-toy-model", tmp_path / "toy", "--device", "cuda")
    assert result.returncode != 0 and "--device cuda but no CUDA device is visible" in result.stderr
    assert not (tmp_path / "toy").exists()
