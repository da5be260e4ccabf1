"""What every CAM method shares: the hook on the target layer, the gradients of each target's score, batched
forwards, and the release of the hook; and what the gradient methods share (`GradientCAM`)."""
from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from ..maps import CAMError, describe_flat
from ..models.base import ModelAdapter, Targets
from ..timing import StageTimes

log = logging.getLogger(__name__)


@dataclass
class GridMap:
    """One target's map on the model's patch grid, before resizing to the film, why it is empty if it is, what it
    explains and the model's score for it on the input."""
    cam: np.ndarray          # (h, w) float32, >= 0
    warning: str = ""
    target: str = ""
    score: float = float("nan")
    asked: str = ""          # the name asked for it (several maps may answer one: a detector's `box`)
    file: str | None = None  # where it has its own file: the suffix naming it (`det0_nodule`)
    detections: tuple = ()   # the input's detections (models.detector.Detection), where the model detects
    answer: str | None = None       # a generative model's answer to the question (None: the model does not answer)
    p_yes: float = float("nan")     # its P(yes) / (P(yes) + P(no)) at the first answer token
    similarity: float = float("nan")   # mean Spearman correlation with the maps of the input's other prompts


class BaseCAM(ABC):
    """A class-activation method for any model adapter. Subclasses implement `explain_grid`."""

    name = "base"
    needs_gradients = True   # False: the method weights the activations alone, and the backward is skipped
    batches_films = False    # True (BatchCAM): `explain_batch` explains a batch of inputs at once (the run batches films)
    batch_size_counts_films = False   # BATCH_SIZE: films per forward (True), or masked images per forward

    def __init__(self, model: ModelAdapter, target_layer: str = "auto", batch_size: int = 64,
                 precision: str = "fp32"):
        self.model = model
        self.target_layer = model.default_target_layer() if target_layer == "auto" else target_layer
        self.layer = model.find_module(self.target_layer)
        self.batch_size = batch_size
        self.precision = precision   # of the masked forwards: fp32, tf32, bf16 or fp16 (the last three on CUDA)
        self.masked_forwards = 0   # image forwards made on masked inputs, for the run's summary
        self.times = StageTimes()  # the run replaces it with its own, to report seconds per stage
        self._oom_reported = False
        self._held = None          # (store, hook handle) while `hold` keeps the hook
        self.compiled = None       # the model's forward through torch.compile, for `forward_in_batches`

    @staticmethod
    def options(settings) -> dict:
        """The method's own keyword arguments from the run's settings (gScoreCAM's TOPK, say)."""
        return {}

    def forward_in_batches(self, count: int, make_batch) -> torch.Tensor:
        """The model's outputs for `make_batch(start, stop)` for start in 0..count by BATCH_SIZE, concatenated.

        On CUDA out-of-memory the batch size is halved for the rest of the run and the batch retried; at batch
        size 1 the error goes to the caller (the item fails). Through the compiled forward a short batch is padded
        with zeros to BATCH_SIZE (inputs do not mix in eval mode), so that one shape is compiled once.
        """
        outputs, start = [], 0
        while start < count:
            stop = min(start + self.batch_size, count)
            try:
                with self.fast_math():
                    batch = make_batch(start, stop)
                    if self.compiled is None:
                        outputs.append(self.model.forward(batch).float())
                    else:
                        padded = torch.cat([batch, batch.new_zeros(self.batch_size - len(batch), *batch.shape[1:])])
                        outputs.append(self.compiled(padded)[:len(batch)].float())
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size //= 2
                level = logging.DEBUG if self._oom_reported else logging.WARNING
                log.log(level, "CUDA out of memory: BATCH_SIZE halved to %d for the rest of the run", self.batch_size)
                self._oom_reported = True
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start = stop
        return torch.cat(outputs)

    def fast_math(self):
        """The masked forwards' arithmetic: bf16/fp16 autocast, or fp32 on TF32 tensor cores or in full."""
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.model.device.type, dtype=dtype)
        return _fp32_math(tf32=self.precision == "tf32")

    @contextlib.contextmanager
    def _capture(self):
        """Keep the target layer's output while the block runs; the hook is removed after it, unless `hold` keeps
        it for many calls.

        The output goes on as a copy that starts the autograd graph afresh: the gradients are wanted at this layer
        only, so nothing before it need record what a backward would use (every earlier layer's activations, for each
        input of a batch). The copy is what the model reads on, in-place changes included."""
        if self._held is not None:
            self._held[0].clear()
            yield self._held[0]
            return
        store = {}
        handle = self.layer.register_forward_hook(self._keeper(store))
        try:
            yield store
        finally:
            handle.remove()

    def _keeper(self, store: dict):
        def keep(module, args, output):
            if isinstance(output, torch.Tensor):
                output = output.detach().requires_grad_(True).clone()
            store["out"] = output
            return output
        return keep

    def hold(self) -> None:
        """Register the hook on the target layer once, for every call until `release` (a stream of frames), instead
        of once per call."""
        if self._held is None:
            store = {}
            self._held = (store, self.layer.register_forward_hook(self._keeper(store)))

    def release(self) -> None:
        """Remove the hook that `hold` registered."""
        if self._held is not None:
            self._held[1].remove()
            self._held = None

    def activations_and_gradients(self, pixels: torch.Tensor, names: list[list[str]]):
        """One forward of a batch of B inputs and one backward per target, in fp32 always; `names`: each input's own.

        Returns the activations (B, C, h, w) and the gradients (B, Q, C, h, w) on the patch grid, the targets of each
        input (what depends on the input, such as the predicted class, is fixed by its own outputs) and their scores
        (B, Q), where Q is the most targets of an input: an input with fewer has zeros after its own. The first
        input's labels and scores are kept for `explain`. Inputs do not mix in eval mode, so the gradient of the
        q-th target's scores summed over the batch is each input's own, whatever each input's q-th target is. The
        map is a sum of these activations, which can nearly cancel, so they are not autocast: one forward per film
        is cheap next to the masked forwards, which are.
        """
        with self._capture() as store, torch.enable_grad(), _fp32_math(tf32=False):
            outputs = self.model.forward(pixels)
            targets = [self.model.targets(image_names, outputs[i:i + 1].detach())
                       for i, image_names in enumerate(names)]
            most = max(len(t.labels) for t in targets)
            scores = torch.cat([torch.nn.functional.pad(t.score(outputs[i:i + 1]), (0, most - len(t.labels)))
                                for i, t in enumerate(targets)])   # (B, Q)
            output = store.get("out")
            if not isinstance(output, torch.Tensor):
                raise CAMError(f"TARGET_LAYER={self.target_layer} " + ("did not run in the model's forward"
                               if output is None else f"gives a {type(output).__name__}, not a tensor"))
            labels = max((t.labels for t in targets), key=len)
            gradients = self._gradients(scores, output, labels) if self.needs_gradients else None
        self.targets, self.scores = targets[0], scores[0, :len(targets[0].labels)].detach().float().cpu().tolist()
        try:
            activations = self.model.activations_to_grid(output.detach().float())
            gradients = (torch.stack([self.model.activations_to_grid(g.float()) for g in gradients], dim=1)
                         if gradients is not None else
                         torch.zeros(len(pixels), most, *activations.shape[1:], device=activations.device))
        except ValueError as error:
            raise CAMError(f"TARGET_LAYER={self.target_layer}: {error}") from None
        return activations, gradients, targets, scores.detach()

    def _gradients(self, scores: torch.Tensor, output: torch.Tensor, labels: list[str]) -> list[torch.Tensor]:
        """The gradient of each target's scores (B, Q) at the target layer's output; CAMError where none reaches."""
        if not output.requires_grad:
            raise CAMError(f"no gradient reaches TARGET_LAYER={self.target_layer} (its output is not a tensor that "
                           f"depends on the input through differentiable operations)")
        gradients = []
        for q, label in enumerate(labels):
            gradient = torch.autograd.grad(scores[:, q].sum(), output, retain_graph=q < len(labels) - 1,
                                           allow_unused=True)[0]
            if gradient is None:
                raise CAMError(f"the score of {label!r} does not depend on TARGET_LAYER={self.target_layer}")
            gradients.append(gradient)
        return gradients

    def explain(self, pixels: torch.Tensor, names: list[str]) -> list[GridMap]:
        """The maps of one input given as the model input (1, C, H, W): one per target name (a prompt, a class), or
        several where the model makes several of one (a detector's `box`)."""
        self.notes = {}   # what the method has to say about a map (e.g. scores it dropped), by the map's place
        self.targets, self.scores = Targets(list(names), None), [float("nan")] * len(names)   # set by the pass
        return grid_maps(self.explain_grid(pixels, names), self.notes, self.targets, self.scores, names)

    def explain_batch(self, pixels: torch.Tensor, names: list[list[str]]) -> list[list[GridMap]]:
        """`explain` for each of a batch of inputs (B, C, H, W), `names` each input's own; a method that can do the
        batch at once does (`BatchCAM`)."""
        return [self.explain(pixels[i:i + 1], image_names) for i, image_names in enumerate(names)]

    @abstractmethod
    def explain_grid(self, pixels: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        """ReLU'd maps (h, w) on the patch grid, one per target; calls `activations_and_gradients` once."""


class BatchCAM(BaseCAM):
    """A method that explains a batch of films at once: one forward of the batch and one backward per target (the
    films' q-th targets together), then the method's own part (`explain_inputs`)."""

    batches_films = True
    films_per_batch = {"cuda": 64, "cpu": 4}   # films explained together where BATCH_SIZE does not say
    batch_size_counts_films = True

    def explain_grid(self, pixels, names):
        cams, notes, _, _ = self.explain_inputs(pixels, [names])
        self.notes = notes[0]
        return cams[0]

    def explain_batch(self, pixels, names):
        cams, notes, targets, scores = self.explain_inputs(pixels, names)
        return [grid_maps(image_cams, image_notes, image_targets,
                          image_scores[:len(image_targets.labels)].float().cpu().tolist(), image_names)
                for image_cams, image_notes, image_targets, image_scores, image_names
                in zip(cams, notes, targets, scores, names)]

    @abstractmethod
    def explain_inputs(self, pixels: torch.Tensor, names: list[list[str]]):
        """For each input: its ReLU'd maps (h, w) on the patch grid, one per target, and what the method has to say
        about them by their place; and the targets and scores of `activations_and_gradients`."""


class GradientCAM(BatchCAM):
    """A method that combines the target layer's activations with the gradients of a target's score: one forward
    and one backward per target, no masked forwards. Subclasses implement `combine`."""

    def explain_inputs(self, pixels, names):
        with self.times("gradient pass"):
            activations, gradients, targets, scores = self.activations_and_gradients(pixels, names)
            maps = [[torch.relu(self.combine(image_activations, target_gradients))
                     for target_gradients in image_gradients[:len(image_targets.labels)]]
                    for image_activations, image_gradients, image_targets in zip(activations, gradients, targets)]
        return maps, [{} for _ in maps], targets, scores

    @abstractmethod
    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """The map (h, w) before the ReLU, from the activations and one target's gradients, both (C, h, w)."""


def grid_maps(cams: list[torch.Tensor], notes: dict[int, str], targets: Targets, scores: list[float],
              names: list[str]) -> list[GridMap]:
    """One input's maps as GridMaps: on the CPU, a flat map (zero or constant) zero with the reason."""
    count = len(targets.labels)
    asked = targets.asked or names
    files = targets.files or [None] * count
    model_notes = targets.notes or [""] * count
    cold = targets.cold or [False] * count
    results = []
    for i, (cam, label, score) in enumerate(zip(cams, targets.labels, scores)):
        cam = cam.detach().float().cpu().numpy()
        cam = np.zeros_like(cam) if cold[i] else cam
        flat = "" if cold[i] else describe_flat(cam)   # a cold map's note says why already
        warning = "; ".join(w for w in (model_notes[i], notes.get(i, ""), flat) if w)
        results.append(GridMap(np.zeros_like(cam) if flat else cam, warning, label, score, asked[i], files[i],
                               targets.detections))
    return results


@contextlib.contextmanager
def _fp32_math(tf32: bool):
    """fp32 matrix products and cuDNN convolutions on TF32 tensor cores (`tf32`) or in full fp32 inside the block,
    restored after it. Both flags: PyTorch's defaults run cuDNN's convolutions in TF32 while its matrix products
    are full fp32, so a convolutional model on CUDA would otherwise not be computed in the fp32 that is asked."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
