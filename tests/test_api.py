"""The Python API: explain() and EpochHeatmaps leave the model as they found it, compute in eval mode, batch, and
write what a training loop asks for."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from attention_map import EpochHeatmaps, explain
from attention_map.models import ModelLoadError, TargetError, load_model

TARGETS = ["0", "2"]


class _Net(torch.nn.Module):
    """A small CNN with batch norm and dropout, so that train and eval mode give different outputs."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                            torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                            torch.nn.ReLU())
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.drop(self.features(x).mean(dim=(2, 3))))


def _model_mid_training() -> _Net:
    """In train mode, one layer frozen, some parameters with a gradient, one without, batch-norm statistics set."""
    torch.manual_seed(0)
    net = _Net()
    net.features[0].requires_grad_(False)
    net(torch.rand(4, 3, 32, 32)).sum().backward()
    net.head.bias.grad = None
    net.train()
    net.features[1].eval()     # a frozen batch norm: mixed modes must come back as they were
    return net


def _state(net: torch.nn.Module):
    return ([m.training for m in net.modules()], [p.requires_grad for p in net.parameters()],
            [None if p.grad is None else p.grad.clone() for p in net.parameters()],
            {k: v.clone() for k, v in net.state_dict().items()})


def _hooks(net: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in net.modules())


def _assert_unchanged(net, before):
    modes, flags, grads, state = _state(net)
    assert modes == before[0] and flags == before[1]
    assert all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
               for a, b in zip(grads, before[2]))
    assert all(torch.equal(state[k], before[3][k]) for k in state)   # batch-norm statistics not updated
    assert _hooks(net) == 0


@pytest.mark.parametrize("method", ["GradCAM", "gScoreCAM", "EigenCAM"])
def test_explain_leaves_no_hook_and_every_mode_flag_and_gradient_as_it_was(method):
    net = _model_mid_training()
    before = _state(net)
    films = np.random.default_rng(0).random((3, 40, 30), dtype=np.float32)
    maps = explain(net, films, TARGETS, method=method)
    assert maps.shape == (3, 2, 40, 30) and maps.dtype == np.float32
    assert 0 <= maps.min() and maps.max() <= 1
    _assert_unchanged(net, before)


def test_maps_are_made_in_eval_mode_whatever_mode_the_model_is_in():
    net = _model_mid_training()
    films = np.random.default_rng(1).random((2, 32, 32), dtype=np.float32)
    in_train = [explain(net, films, TARGETS) for _ in range(2)]      # dropout on in train mode would differ
    net.eval()
    np.testing.assert_array_equal(in_train[0], in_train[1])
    np.testing.assert_array_equal(in_train[0], explain(net, films, TARGETS))


def test_a_batch_gives_the_maps_of_one_image_at_a_time():
    net = _model_mid_training()
    inputs = torch.randn(5, 3, 48, 48)
    together = explain(net, inputs, TARGETS, method="HiResCAM", batch_size=5)
    alone = np.concatenate([explain(net, inputs[i:i + 1], TARGETS, method="HiResCAM") for i in range(5)])
    np.testing.assert_allclose(together, alone, atol=1e-6)
    predicted = explain(net, inputs, None)           # each image's own predicted class
    assert predicted.shape == (5, 1, 48, 48)
    with pytest.raises(ValueError, match="method='CAM'"):
        explain(net, inputs, TARGETS, method="CAM")


def test_named_outputs_and_a_clip_adapter_with_prompts():
    net = _model_mid_training()
    films = np.random.default_rng(2).random((1, 32, 32), dtype=np.float32)
    by_name = explain(net, films, ["effusion"], output_names=("normal", "nodule", "effusion"))
    np.testing.assert_array_equal(by_name, explain(net, films, [2]))
    toy = load_model(str(Path(__file__).resolve().parents[1] / "examples/models/demo-toy"), torch.device("cpu"))
    maps = explain(toy, films, ["nodule in the left upper lung"], method="gScoreCAM")
    assert maps.shape == (1, 1, 32, 32) and maps.max() == 1
    for nothing in (None, " "):      # a map of no text: refused, not made
        with pytest.raises(TargetError, match="a CLIP-like model explains a prompt: give its text as the target"):
            explain(toy, films, nothing, method="gScoreCAM")
    with pytest.raises(ModelLoadError, match=r"MODEL=\S*demo-tox: no such folder"):
        load_model(str(Path(__file__).resolve().parents[1] / "examples/models/demo-tox"), torch.device("cpu"))


def test_films_outside_0_to_1_and_impossible_options_are_refused_naming_what_to_give(tmp_path):
    # before, films of 0..255 floats and NaN films gave maps of a model fed wrong inputs, silently
    net = _model_mid_training()
    films = np.random.default_rng(4).random((2, 32, 32), dtype=np.float32)
    eight_bit = np.round(films * 255)
    assert np.array_equal(explain(net, eight_bit.astype(np.uint8), TARGETS), explain(net, eight_bit / 255, TARGETS))
    for images, message in ((eight_bit, r"grey films \(N, H, W\) are read in \[0, 1\] but these hold \d+ "),
                            (np.full((1, 32, 32), np.nan), "hold nan"),
                            (np.zeros((0, 32, 32)), r"shape \[0, 32, 32\].*N at least 1")):
        with pytest.raises(ValueError, match=message):
            explain(net, images, TARGETS)
    with pytest.raises(ValueError, match="batch_size=0"):
        explain(net, films, TARGETS, batch_size=0)
    with pytest.raises(ValueError, match="output_names names 4 outputs but the model has 3"):
        explain(net, films, ["b"], output_names=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="every=0"):
        EpochHeatmaps(tmp_path, films, TARGETS, every=0)


def test_epoch_heatmaps_write_due_epochs_and_the_best_one(tmp_path):
    net = _model_mid_training()
    before = _state(net)
    films = np.random.default_rng(3).random((2, 36, 28), dtype=np.float32)
    with pytest.raises(ValueError, match="output_names names 2 outputs but the model has 3"):
        EpochHeatmaps(tmp_path, films, ["normal", "nodule"])(net, 0)   # the names alone would label 2 of 3 outputs
    assert not any(tmp_path.iterdir())
    heatmaps = EpochHeatmaps(tmp_path, films, ["normal", "nodule"], every=2, output_names=("normal", "nodule", "other"))
    written = {epoch: heatmaps(net, epoch, metric=metric) for epoch, metric in enumerate([0.5, 0.9, 0.7, 0.6])}
    assert [path.name for path in written[0]] == ["000_heatmap_normal.png", "000_heatmap_nodule.png"]
    assert written[1] == [] and written[3] == [] and len(written[2]) == 2
    _assert_unchanged(net, before)
    best_epoch_maps = explain(net, films, ["normal", "nodule"], output_names=("normal", "nodule", "other"))
    final = heatmaps.finish()
    assert [path.name for path in final] == ["heatmap_normal.png", "heatmap_nodule.png"]
    picture = cv2.imread(str(final[1]))
    assert picture.shape == (36, 2 * 28, 3)               # the two films side by side
    assert np.array_equal(heatmaps.best_maps, best_epoch_maps)   # epoch 1 (best metric), same weights
    assert heatmaps.best_metric == 0.9
