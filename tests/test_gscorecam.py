import math

import numpy as np
import pytest
import torch

from attention_map.cams import GScoreCAM
from attention_map.images import load_film
from attention_map.maps import grid_to_image
from attention_map.models import load_model

from reference_gscorecam import reference_gscorecam

PROMPTS = ["Is there evidence of cardiomegaly in this CXR?", "nodule in the left upper lung"]


def _check_against_reference(model, film, topk):
    """Engine maps equal the per-prompt reference within 1e-4; returns the engine and the union of kept channels."""
    cam = GScoreCAM(model, topk=topk, batch_size=64)
    grid_maps = cam.explain(model.prepare(film), PROMPTS)
    union = set()
    for prompt, grid_map in zip(PROMPTS, grid_maps):
        got = grid_to_image(grid_map.cam, film.shape[::-1])
        expected, kept = reference_gscorecam(model, model.prepare(film), prompt, topk, film.shape[::-1])
        union |= kept
        assert got.shape == film.shape
        assert np.abs(got - expected).max() <= 1e-4
    return cam, union


@pytest.mark.parametrize("topk", [300, 20])
def test_tiny_model_matches_reference(tiny_model, cxr, topk):
    model = load_model(str(tiny_model), torch.device("cpu"))
    film = load_film(cxr / "nih" / "00001369_000.png")
    cam, union = _check_against_reference(model, film, topk)
    assert cam.masked_forwards == len(union)


def test_biomedclip_architecture_matches_reference_and_shares_masked_forwards(biomedclip_model, cxr):
    """fp32 on CPU, on a real film: the engine equals the plain per-prompt reference within 1e-4."""
    topk = 24
    model = load_model(str(biomedclip_model), torch.device("cpu"))
    assert model.default_target_layer() == "visual.trunk.blocks[-1].norm1"
    film = load_film(cxr / "nih" / "00000820_000.png")
    cam, union = _check_against_reference(model, film, topk)
    # one masked forward per channel of the union of the prompts' kept channels, not one per (prompt, channel)
    assert cam.masked_forwards == len(union) < len(PROMPTS) * topk
    # the gradients at blocks[-1].norm1 depend on the prompt, so the prompts keep different channels
    assert len(union) > topk


def test_hooks_are_released_and_text_is_encoded_once(tiny_model, cxr):
    model = load_model(str(tiny_model), torch.device("cpu"))
    cam = GScoreCAM(model, topk=8)
    film = load_film(cxr / "nih" / "00000001_000.png")
    calls = []
    original = model.encode_text
    model.encode_text = lambda prompts: calls.append(list(prompts)) or original(prompts)
    for _ in range(3):
        cam.explain(model.prepare(film), PROMPTS + PROMPTS[:1])
    assert calls == [[p] for p in PROMPTS]   # each distinct prompt once, alone
    assert not cam.layer._forward_hooks


def test_flat_maps_are_zero_with_a_warning(tiny_model):
    model = load_model(str(tiny_model), torch.device("cpu"))

    class Flat(GScoreCAM):
        def explain_grid(self, pixels, prompts):
            return [torch.zeros(6, 6), torch.full((6, 6), 0.3)]

    results = Flat(model).explain(torch.zeros(1, 3, 96, 96), ["a", "b"])
    assert "zero everywhere" in results[0].warning
    assert "constant" in results[1].warning
    for result in results:
        final = grid_to_image(result.cam, (40, 30))
        assert np.isfinite(final).all() and final.max() == 0


def test_cuda_out_of_memory_halves_the_batch_and_gives_the_same_maps(tiny_model, cxr, caplog):
    import logging

    model = load_model(str(tiny_model), torch.device("cpu"))
    film = model.prepare(load_film(cxr / "nih" / "00000001_000.png"))
    expected = GScoreCAM(model, topk=16, batch_size=16).explain(film, PROMPTS)
    original = model.encode_image

    def encode_image(pixels):
        if len(pixels) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(pixels)

    model.encode_image = encode_image
    cam = GScoreCAM(model, topk=16, batch_size=16)
    with caplog.at_level(logging.DEBUG, logger="attention_map"):
        maps = cam.explain(film, PROMPTS)
        cam.explain(film, PROMPTS)
    assert cam.batch_size == 4
    for got, want in zip(maps, expected):
        np.testing.assert_allclose(got.cam, want.cam, atol=1e-6)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING and "out of memory" in r.message]) == 1
    model.encode_image = lambda pixels: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(torch.cuda.OutOfMemoryError):   # at batch size 1 the item fails (the run reports it)
        GScoreCAM(model, topk=16, batch_size=1).explain(film, PROMPTS)


def test_low_precision_reaches_the_masked_forwards_only(tiny_model, cxr):
    """PRECISION rounds the masked forwards; the gradient pass, whose activations the map sums, stays fp32.
    (bf16 autocast runs on the CPU too, so this is checked without a GPU.)"""
    model = load_model(str(tiny_model), torch.device("cpu"))
    pixels = model.prepare(load_film(cxr / "nih" / "00000001_000.png"))
    exact, rounded = GScoreCAM(model, topk=8), GScoreCAM(model, topk=8, precision="bf16")
    for got, expected in zip(rounded.activations_and_gradients(pixels, [PROMPTS])[:2],
                             exact.activations_and_gradients(pixels, [PROMPTS])[:2]):
        assert torch.equal(got, expected)
    assert rounded.scores == exact.scores
    activations = exact.activations_and_gradients(pixels, [PROMPTS])[0]
    channels = [torch.arange(8)]
    fp32, bf16 = (cam.masked_outputs(pixels, activations, channels) for cam in (exact, rounded))
    assert not torch.equal(fp32, bf16) and torch.allclose(fp32, bf16, atol=0.05)


def _tf32_flags() -> tuple[str, bool]:
    return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32


@pytest.fixture
def keep_tf32_flags():
    """The global TF32 flags as they were before the test, whatever it sets."""
    matmul, cudnn = _tf32_flags()
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn


@pytest.mark.parametrize("precision, inside", [("tf32", ("high", True)), ("fp32", ("highest", False))])
def test_the_precision_sets_matmul_and_cudnn_tf32_inside_the_masked_forwards_only(tiny_model, keep_tf32_flags,
                                                                                   precision, inside):
    """fp32 means fp32 for cuDNN's convolutions too (PyTorch's default runs them in TF32); the flags come back after."""
    model = load_model(str(tiny_model), torch.device("cpu"))
    cam = GScoreCAM(model, topk=8, precision=precision)
    torch.backends.cudnn.allow_tf32 = not inside[1]     # the opposite of what the block must set
    before, seen = _tf32_flags(), []
    cam.forward_in_batches(2, lambda start, stop: seen.append(_tf32_flags()) or torch.zeros(stop - start, 3,
                                                                                           *model.image_size))
    assert seen == [inside] and _tf32_flags() == before


def test_the_gradient_pass_runs_in_full_fp32_whatever_the_precision(tiny_model, keep_tf32_flags):
    model = load_model(str(tiny_model), torch.device("cpu"))
    cam = GScoreCAM(model, topk=8, precision="tf32")
    seen = []
    hook = cam.layer.register_forward_hook(lambda *_: seen.append(_tf32_flags()))
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        cam.activations_and_gradients(torch.zeros(1, 3, *model.image_size), [PROMPTS[:1]])
    finally:
        hook.remove()
    assert seen == [("highest", False)] and _tf32_flags() == ("high", True)


def test_scores_that_overflow_are_taken_as_zero_and_counted_in_the_warning(tiny_model, cxr):
    """An fp16 overflow makes a masked image's score inf or nan; it must not steer the softmax, nor pass unsaid."""
    model = load_model(str(tiny_model), torch.device("cpu"))
    film = model.prepare(load_film(cxr / "nih" / "00000001_000.png"))
    clean = GScoreCAM(model, topk=16).explain(film, PROMPTS[:2])
    original = model.encode_image

    def encode_image(pixels):
        embeddings = original(pixels)
        if len(pixels) > 1:                      # the masked images, not the film's own gradient pass
            embeddings[:3] = float("inf")
            embeddings[3] = float("nan")
        return embeddings

    model.encode_image = encode_image
    results = GScoreCAM(model, topk=16).explain(film, PROMPTS[:2])
    for result, before in zip(results, clean):
        assert np.isfinite(result.cam).all() and result.cam.max() > 0
        dropped = int(result.warning.split(" of ")[0]) if "not finite" in result.warning else 0
        assert 1 <= dropped <= 4 and "of 16 masked-image scores were not finite at PRECISION=fp32" in result.warning
        assert not np.allclose(result.cam, before.cam)


FILMS = ["00000001_000.png", "00000129_000.png", "00001369_000.png"]
QUESTIONS = [PROMPTS, ["opacity in the right lower lung"], ["Is there a pleural effusion?", *PROMPTS]]


@pytest.mark.parametrize("method", ["gScoreCAM", "GradCAM", "ScoreCAM"])
def test_a_batch_of_films_each_with_its_own_prompts_gives_each_film_its_own_maps(tiny_model, cxr, method):
    """Films explained together, each asking its own prompts (one, two or three), get the maps, targets and scores
    they get alone, and no map of another film's prompt."""
    from attention_map.cams import CAM_METHODS

    model = load_model(str(tiny_model), torch.device("cpu"))
    inputs = [model.prepare(load_film(cxr / "nih" / name)) for name in FILMS]
    options = {"topk": 8} if method == "gScoreCAM" else {}
    alone = [CAM_METHODS[method](model, batch_size=16, **options).explain(pixels, names)
             for pixels, names in zip(inputs, QUESTIONS)]
    together = CAM_METHODS[method](model, batch_size=16, **options).explain_batch(torch.cat(inputs), QUESTIONS)
    assert [[m.target for m in maps] for maps in together] == QUESTIONS
    for batch_maps, film_maps in zip(together, alone):
        for got, expected in zip(batch_maps, film_maps):
            assert expected.cam.max() > 0 and np.abs(got.cam - expected.cam).max() <= 1e-5 * expected.cam.max()
            assert got.score == pytest.approx(expected.score, abs=1e-5)


def test_the_masked_images_of_a_batch_of_films_fill_every_forward(tiny_model, cxr):
    """gScoreCAM's masked forwards run on from one film's masked images to the next: every forward but the last
    holds BATCH_SIZE images, where one film at a time leaves each film's last forward part empty."""
    model = load_model(str(tiny_model), torch.device("cpu"))
    pixels = torch.cat([model.prepare(load_film(cxr / "nih" / name)) for name in FILMS])
    cam = GScoreCAM(model, topk=8, batch_size=16)
    sizes, forward = [], model.forward
    model.forward = lambda batch: (sizes.append(len(batch)), forward(batch))[1]
    cam.explain_batch(pixels, QUESTIONS)
    gradient_pass, masked = sizes[0], sizes[1:]
    assert gradient_pass == len(FILMS) and sum(masked) == cam.masked_forwards > 2 * 16
    assert masked[:-1] == [16] * (len(masked) - 1) and len(masked) == -(-cam.masked_forwards // 16)


def test_a_run_explaining_films_together_writes_the_maps_of_one_film_at_a_time(tiny_model, cxr, tmp_path,
                                                                               monkeypatch):
    """The run with gScoreCAM's films batched (8 by default on CUDA; 3 here, so that a batch ends before the
    last film) gives each heatmap the map, score and row of a run that explains one film at a time."""
    import cv2

    from test_cli import REPO, cli, read_manifest

    def run(films_per_batch):
        monkeypatch.setitem(GScoreCAM.films_per_batch, "cpu", films_per_batch)
        out = tmp_path / str(films_per_batch)
        result = cli("run", "--config", REPO / "configs/gemex/exp_01_vqa.conf", f"MODEL={tiny_model}", "TOPK=16",
                     f"OUTPUT_DIR={out}", "PROMPT_SOURCE=both", "SAVE_RAW_CAM=true", "STOP_AFTER=7", "DEVICE=cpu")
        assert result.returncode == 0, result.stderr
        return out, read_manifest(out), result.stderr

    together, rows, log = run(3)
    assert "3 films per batch of 64 masked images" in log
    alone, alone_rows, alone_log = run(1)
    assert "1 film per batch of 64 masked images" in alone_log
    assert len(rows) == len(alone_rows) >= 7 and len({row["image_path"] for row in rows}) > 3
    for row, expected in zip(rows, alone_rows):
        assert (row["image_path"], row["question"]) == (expected["image_path"], expected["question"])
        # scores are written to 6 significant digits: the two may round one unit of the last digit apart
        assert math.isclose(float(row["score"]), float(expected["score"]), rel_tol=2e-5, abs_tol=1e-9)
        maps = [cv2.imread(str(folder / r["raw_map"]), cv2.IMREAD_UNCHANGED).astype(int)
                for folder, r in ((together, row), (alone, expected))]
        assert np.abs(maps[0] - maps[1]).max() <= 2      # of 65535


def test_compiled_masked_forwards_see_one_shape_and_give_the_eager_maps(tiny_model, cxr):
    """COMPILE=true: the masked forwards go through torch.compile, each batch padded to BATCH_SIZE (one shape, one
    compilation), and the maps are the eager ones."""
    from attention_map.config import Settings

    assert GScoreCAM.options(Settings(COMPILE=True))["compile"] is True
    model = load_model(str(tiny_model), torch.device("cpu"))
    pixels = model.prepare(load_film(cxr / "nih" / "00000001_000.png"))
    cam = GScoreCAM(model, topk=8, batch_size=16, compile=True)
    shapes, compiled = [], cam.compiled
    cam.compiled = lambda batch: (shapes.append(len(batch)), compiled(batch))[1]
    maps = cam.explain(pixels, PROMPTS)
    assert cam.masked_forwards % 16 and shapes == [16] * (1 + -(-cam.masked_forwards // 16))   # 1: compiling
    assert list(cam.times.ordered()) == ["gradient pass", "compile", "masked forwards"]
    for got, expected in zip(maps, GScoreCAM(model, topk=8, batch_size=16).explain(pixels, PROMPTS)):
        assert np.abs(got.cam - expected.cam).max() <= 1e-5 * expected.cam.max()


def test_compile_without_a_compiler_stops_the_run_before_it_writes(tiny_model, cxr, tmp_path, monkeypatch):
    """torch.compile builds kernels with the machine's compiler: without one (as in the container image) the run
    stops at once, naming the key; a method with no masked forwards runs eagerly and says so."""
    import shutil

    from test_cli import REPO, cli

    monkeypatch.setattr(shutil, "which", lambda name: None)
    args = ("run", "--config", REPO / "configs/gemex/exp_01_vqa.conf", f"MODEL={tiny_model}", "COMPILE=true",
            "DEVICE=cpu", "STOP_AFTER=1")
    refused = cli(*args, f"OUTPUT_DIR={tmp_path / 'refused'}")
    assert refused.returncode == 2 and not (tmp_path / "refused").exists()
    assert "COMPILE=true: torch.compile needs a C++ compiler (g++, c++, clang++) on PATH" in refused.stderr
    eager = cli(*args, f"OUTPUT_DIR={tmp_path / 'gradcam'}", "CAM_VERSION=GradCAM")
    assert eager.returncode == 0, eager.stderr
    assert "COMPILE=true applies to the masked forwards of gScoreCAM and ScoreCAM only; GradCAM runs" in eager.stderr
