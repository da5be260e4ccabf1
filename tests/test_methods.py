"""Every CAM_VERSION method, checked twice on a CNN (open_clip ModifiedResNet), a ViT (open_clip ViT) and a timm
classifier (ResNet-10t), each with random weights, on a real film: against the method's published formula written
here in numpy, from activations and gradients this file captures with its own hook; and against the `grad-cam`
package (pytorch-grad-cam) on the same model, input, layer and target (the prompt's scaled cosine score as a
one-class classifier; the classifier's output). All after pytorch-grad-cam's normalisation ((x - min) / (max + 1e-7),
resized to the input, again): max |difference| <= 1e-4."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attention_map.cams import CAM_METHODS
from attention_map.config import CAM_VERSIONS
from attention_map.images import load_film
from attention_map.models import load_model

PROMPT = "opacity in the right lower lung"
TOLERANCE = 1e-4


def _relu(x):
    return np.maximum(x, 0)


# The published formulas, on activations A and gradients G of shape (C, h, w); each returns the map before the ReLU.
def _weighted(weights, activations):
    return np.tensordot(weights, activations, axes=1)


def _gradcampp(a, g):
    alpha = g ** 2 / (2 * g ** 2 + a.sum(axis=(1, 2))[:, None, None] * g ** 3 + 1e-6)
    return _weighted((_relu(g) * np.where(g != 0, alpha, 0)).sum(axis=(1, 2)), a)


def _eigencam(a, g):
    tokens = a.reshape(len(a), -1).T
    tokens = tokens - tokens.mean(axis=0)
    return (tokens @ np.linalg.svd(tokens, full_matrices=True)[2][0]).reshape(a.shape[1:])


FORMULAS = {
    "GradCAM": lambda a, g: _weighted(g.mean(axis=(1, 2)), a),                                # Selvaraju et al.
    "GradCAM++": _gradcampp,                                                                    # Chattopadhay et al.
    "XGradCAM": lambda a, g: _weighted((g * a).sum(axis=(1, 2)) / (a.sum(axis=(1, 2)) + 1e-7), a),   # Fu et al.
    "HiResCAM": lambda a, g: (g * a).sum(axis=0),                                               # Draelos and Carin
    "LayerCAM": lambda a, g: (_relu(g) * a).sum(axis=0),                                        # Jiang et al.
    "EigenCAM": _eigencam,                                                                      # Muhammad and Yeasin
}


@pytest.fixture(scope="module", params=["tiny-resnet", "tiny", "timm-resnet"])
def case(request, tmp_path_factory, cxr):
    """(model, input pixels, target layer, target, the target's score as a one-output classifier); a CLIP model's
    target is PROMPT, the timm classifier's its output 3 (at 128 x 128, for time)."""
    from attention_map.models.random_models import make_test_model

    folder = make_test_model(tmp_path_factory.mktemp("models") / request.param, request.param, seed=1)
    model = load_model(str(folder), torch.device("cpu"))
    if request.param == "timm-resnet":
        model.image_size = (128, 128)
    pixels = model.prepare(load_film(cxr / "nih" / "00000001_000.png"))
    target, score = (PROMPT, PromptScore(model, PROMPT)) if request.param != "timm-resnet" else ("3", Output(model, 3))
    return model, pixels, model.find_module(model.default_target_layer()), target, score


def _to_grid(output: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) from a CNN's map or a ViT's tokens (B, 1 + h * w, C): the class token dropped."""
    if output.dim() == 4:
        return output
    side = int(round((output.shape[1] - 1) ** 0.5))
    return output[:, 1:].reshape(len(output), side, side, -1).permute(0, 3, 1, 2)


class PromptScore(torch.nn.Module):
    """The CLIP model as a one-output classifier: the prompt's scaled cosine score, what the pipeline explains."""

    def __init__(self, model, prompt):
        super().__init__()
        self.model, self.visual = model, model.module.visual
        with torch.no_grad():
            self.text = model.encode_text([prompt]).float()

    def forward(self, pixels):
        return self.model.logit_scale * F.normalize(self.model.module.encode_image(pixels), dim=-1) @ self.text.T


class Output(torch.nn.Module):
    """A classifier restricted to one output."""

    def __init__(self, model, index):
        super().__init__()
        self.module, self.index = model.module, index

    def forward(self, pixels):
        return self.module(pixels)[:, self.index:self.index + 1]


def _captured(pixels, layer, scorer):
    """Activations and gradients of the target's score at `layer`, as numpy (C, h, w)."""
    store = {}
    handle = layer.register_forward_hook(lambda module, args, output: store.__setitem__("out", output))
    try:
        with torch.enable_grad():
            score = scorer(pixels.clone().requires_grad_(True))
            gradients, = torch.autograd.grad(score[0, 0], store["out"])
    finally:
        handle.remove()
    return _to_grid(store["out"].detach())[0].numpy(), _to_grid(gradients)[0].numpy()


def _normalised(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's steps: scaled to [0, 1], resized (bilinear) to the input, scaled to [0, 1] again."""
    import cv2

    def unit(x):
        x = x - x.min()
        return x / (1e-7 + x.max())

    return unit(cv2.resize(np.float32(unit(cam)), size))


def _ours(name, model, pixels, target):
    result = CAM_METHODS[name](model).explain(pixels, [target])[0]
    assert not result.warning, result.warning
    return _normalised(result.cam, pixels.shape[-1:-3:-1])


def test_config_names_are_the_methods():
    assert tuple(CAM_METHODS) == CAM_VERSIONS


@pytest.mark.parametrize("name", FORMULAS)
def test_each_method_is_its_published_formula(case, name):
    model, pixels, layer, target, scorer = case
    activations, gradients = _captured(pixels, layer, scorer)
    expected = _normalised(_relu(FORMULAS[name](activations, gradients)), pixels.shape[-1:-3:-1])
    assert np.abs(_ours(name, model, pixels, target) - expected).max() <= TOLERANCE


@pytest.mark.parametrize("name", FORMULAS)
def test_each_method_matches_pytorch_grad_cam(case, name):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    package = {"GradCAM": pytorch_grad_cam.GradCAM, "GradCAM++": pytorch_grad_cam.GradCAMPlusPlus,
               "XGradCAM": pytorch_grad_cam.XGradCAM, "HiResCAM": pytorch_grad_cam.HiResCAM,
               "LayerCAM": pytorch_grad_cam.LayerCAM, "EigenCAM": pytorch_grad_cam.EigenCAM}[name]
    model, pixels, layer, target, scorer = case
    with package(model=scorer, target_layers=[layer], reshape_transform=_to_grid) as cam:
        # the model is frozen (requires_grad off), so the graph starts at the input
        theirs = cam(input_tensor=pixels.clone().requires_grad_(True), targets=[ClassifierOutputTarget(0)])[0]
    assert np.abs(_ours(name, model, pixels, target) - theirs).max() <= TOLERANCE
    assert not layer._forward_hooks and not layer._backward_hooks


def test_scorecam_is_gscorecam_over_every_channel(case):
    from attention_map.cams import GScoreCAM, ScoreCAM

    model, pixels, layer, target, scorer = case
    channels = _captured(pixels, layer, scorer)[0].shape[0]
    every = GScoreCAM(model, topk=channels, batch_size=256).explain(pixels, [target])[0].cam
    scorecam = ScoreCAM(model, topk=1, batch_size=256)           # topk is ignored: every channel
    assert np.array_equal(scorecam.explain(pixels, [target])[0].cam, every)
    assert scorecam.masked_forwards == channels


def test_methods_differ_from_each_other(case):
    """A method wired to another's formula would pass neither check above on both models, but make sure."""
    model, pixels, _, target, _ = case
    maps = {name: _ours(name, model, pixels, target) for name in ("GradCAM", "HiResCAM", "LayerCAM", "EigenCAM")}
    names = list(maps)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            difference = np.abs(maps[first] - maps[second]).max()
            if target != PROMPT and {first, second} == {"GradCAM", "HiResCAM"}:
                # global average pooling then a linear head: the gradient is the same at every position, and
                # HiResCAM is Grad-CAM (Draelos and Carin)
                assert difference <= TOLERANCE
            else:
                assert difference > 1e-3, (first, second)
