"""What every CAM method shares: the hook on the target layer, gradients of the image-text score, text
embeddings cached per prompt, and the release of the hook; and what the gradient methods share (`GradientCAM`)."""
from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from ..maps import describe_flat
from ..models.base import VisionTextModel
from ..timing import StageTimes

log = logging.getLogger(__name__)


@dataclass
class GridMap:
    """One prompt's map on the model's patch grid, before resizing to the film, and why it is empty if it is."""
    cam: np.ndarray          # (h, w) float32, >= 0
    warning: str = ""


class BaseCAM(ABC):
    """A class-activation method for a CLIP-like model. Subclasses implement `explain_grid`."""

    name = "base"

    def __init__(self, model: VisionTextModel, target_layer: str = "auto", batch_size: int = 64,
                 precision: str = "fp32"):
        self.model = model
        self.target_layer = model.default_target_layer() if target_layer == "auto" else target_layer
        self.layer = model.find_module(self.target_layer)
        self.batch_size = batch_size
        self.precision = precision   # of the masked forwards: fp32, tf32, bf16 or fp16 (the last three on CUDA)
        self._text_cache: dict[str, torch.Tensor] = {}
        self.masked_forwards = 0   # image forwards made on masked inputs, for the run's summary
        self.times = StageTimes()  # the run replaces it with its own, to report seconds per stage
        self._oom_reported = False

    def forward_in_batches(self, count: int, make_batch) -> torch.Tensor:
        """encode_image over `make_batch(start, stop)` for start in 0..count by BATCH_SIZE, concatenated.

        On CUDA out-of-memory the batch size is halved for the rest of the run and the batch retried; at batch
        size 1 the error goes to the caller (the item fails).
        """
        embeddings, start = [], 0
        while start < count:
            stop = min(start + self.batch_size, count)
            try:
                with self.fast_math():
                    embeddings.append(self.model.encode_image(make_batch(start, stop)).float())
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
        return torch.cat(embeddings)

    def fast_math(self):
        """The masked forwards' arithmetic: bf16/fp16 autocast, or fp32 matrix products on TF32 tensor cores."""
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.model.device.type, dtype=dtype)
        if self.precision == "tf32":
            return _matmul_precision("high")
        return contextlib.nullcontext()

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """(Q, D) embeddings in fp32; each distinct prompt is encoded once for the whole run.

        Prompts are encoded one at a time: an embedding then does not depend on which other prompts shared its
        batch, so a resumed run reproduces an uninterrupted one bit for bit. Text is cheap next to k image forwards.
        """
        for prompt in dict.fromkeys(prompts):
            if prompt not in self._text_cache:
                with torch.inference_mode():
                    self._text_cache[prompt] = self.model.encode_text([prompt]).float()[0]
        return torch.stack([self._text_cache[p] for p in prompts])

    @contextlib.contextmanager
    def _capture(self):
        """Keep the target layer's output while the block runs; the hook is always removed."""
        store = {}
        handle = self.layer.register_forward_hook(lambda module, args, output: store.__setitem__("out", output))
        try:
            yield store
        finally:
            handle.remove()

    def activations_and_gradients(self, pixels: torch.Tensor, text: torch.Tensor):
        """One forward of the image and one backward per prompt of the scaled cosine score, in fp32 always.

        Returns the activations (C, h, w) and the gradients (Q, C, h, w) on the patch grid. The map is a sum of these
        activations, which can nearly cancel, so they are not autocast: one forward per film is cheap next to the
        masked forwards, which are.
        """
        with self._capture() as store, torch.enable_grad():
            image = self.model.encode_image(pixels.detach().clone().requires_grad_(True))
            scores = self.model.logit_scale * image.float() @ text.T        # (1, Q)
            output = store["out"]
            gradients = [torch.autograd.grad(scores[0, q], output, retain_graph=q < len(text) - 1)[0]
                         for q in range(len(text))]
        activations = self.model.activations_to_grid(output.detach().float())[0]
        gradients = self.model.activations_to_grid(torch.cat(gradients).float())
        return activations, gradients

    def explain(self, pixels: torch.Tensor, prompts: list[str]) -> list[GridMap]:
        """One map per prompt for one image given as the model input (1, 3, H, W)."""
        self.notes = [""] * len(prompts)   # what a method has to say about a prompt's map (e.g. scores it dropped)
        cams = self.explain_grid(pixels, prompts)
        results = []
        for cam, note in zip(cams, self.notes):
            cam = cam.detach().float().cpu().numpy()
            flat = describe_flat(cam)
            results.append(GridMap(np.zeros_like(cam) if flat else cam, "; ".join(w for w in (note, flat) if w)))
        return results

    @abstractmethod
    def explain_grid(self, pixels: torch.Tensor, prompts: list[str]) -> list[torch.Tensor]:
        """ReLU'd maps (h, w) on the patch grid, one per prompt."""


class GradientCAM(BaseCAM):
    """A method that combines the target layer's activations with the gradients of the prompt's score: one forward
    and one backward per prompt, no masked forwards. Subclasses implement `combine`."""

    def __init__(self, model, target_layer="auto", batch_size=64, precision="fp32", topk: int | None = None):
        super().__init__(model, target_layer, batch_size, precision)   # TOPK is gScoreCAM's: every channel counts here

    def explain_grid(self, pixels, prompts):
        with self.times("gradient pass"):
            text = self.text_embeddings(prompts)
            activations, gradients = self.activations_and_gradients(pixels, text)
            return [torch.relu(self.combine(activations, prompt_gradients)) for prompt_gradients in gradients]

    @abstractmethod
    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """The map (h, w) before the ReLU, from the activations and one prompt's gradients, both (C, h, w)."""


@contextlib.contextmanager
def _matmul_precision(level: str):
    """torch's float32 matmul precision ("high": TF32) inside the block, restored after it."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
