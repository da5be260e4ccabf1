"""Generative vision-language models through transformers: LLaVA-style (`LlavaForConditionalGeneration`, llava-hf
format: LLaVA-Med, LLaVA-Rad; `LlavaNextForConditionalGeneration`, whose "anyres" tiles are mapped back to the film)
and Gemma-3-style (`Gemma3ForConditionalGeneration`: MedGemma).

What the `attention` maps read of one (film, question) (`VisionLanguageModel.read`): the prompt made by the
processor's own chat template, with the image placeholder expanded by the processor into the image tokens, whose
positions are found in its output (never at a fixed offset); the greedy answer; P(yes) against P(no) at the first
answer token; and the attention that the chosen decoder layers give the query tokens over the image tokens.

Only those rows of those layers are computed explicitly: the language model runs with an attention function
registered with transformers (`ATTENTION`) that calls scaled-dot-product attention as `sdpa` does and, for a layer
being recorded, also softmax(q k^T * scale + mask) for the query rows alone, from the q and k that the layer itself
made (its projections, q/k norms and rotary embedding). The analysis forward keeps no key/value cache, so memory does
not grow with the layers not chosen, nor with the square of the sequence.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import VLM_PREFIX
from ..maps import CAMError
from .base import ModelAdapter, ModelLoadError, TargetError, Targets

ATTENTION = "attention_map_sdpa"   # the attention implementation the language model runs with
YES, NO = ("yes", "Yes", " yes", " Yes", "YES"), ("no", "No", " no", " No", "NO")


@dataclass
class Reading:
    """What the model made of one (film, question)."""
    attention: torch.Tensor   # (layers, heads, query tokens, image tokens), float32 on the CPU
    grid: tuple[int, int]     # the image tokens' grid, rows x columns, in the film's orientation
    answer: str               # the greedy answer ('' when MAX_NEW_TOKENS=0)
    p_yes: float              # P(yes) / (P(yes) + P(no)) at the first answer token
    note: str = ""            # what the reader should know (no generated token to read)


class _Recording:
    """The rows of the attention weights that the recorded layers give the query positions, over the key positions
    kept, by the layer's place in `modules`."""

    def __init__(self, modules: list[torch.nn.Module], queries: torch.Tensor, keys: torch.Tensor):
        self.order = {id(module): i for i, module in enumerate(modules)}
        self.queries, self.keys = queries, keys
        self.rows: dict[int, torch.Tensor] = {}


_recording: _Recording | None = None


def attention_rows(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                   queries: torch.Tensor, keys: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) of the rows `queries` only, in float32, the columns `keys` kept:
    (B, heads, len(queries), len(keys)). `query` (B, heads, Lq, D) and `key` (B, kv heads, Lk, D) are the layer's
    own after its norms and rotary embedding; kv heads are shared by groups of query heads (grouped-query attention).
    `mask` is the one the layer gets: boolean (True: may attend) or additive, (B, 1, Lq, Lk); None means causal."""
    rows = query[:, :, queries].float()
    key = key.float().repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = rows @ key.transpose(-1, -2) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    length = key.shape[2]
    if mask is None:
        offset = length - query.shape[2]   # keys already cached before this forward's queries
        allowed = torch.arange(length, device=scores.device) <= (queries.to(scores.device) + offset)[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[:, :, queries.to(mask.device), :length], float("-inf"))
    else:
        scores = scores + mask[:, :, queries.to(mask.device), :length].float()
    return scores.softmax(dim=-1)[..., keys.to(scores.device)]


def differing_span(ids: list[int], other: list[int]) -> tuple[int, int]:
    """[start, end) of `ids` between its longest common prefix and longest common suffix with `other`."""
    start = 0
    while start < min(len(ids), len(other)) and ids[start] == other[start]:
        start += 1
    suffix = 0
    while suffix < min(len(ids), len(other)) - start and ids[-1 - suffix] == other[-1 - suffix]:
        suffix += 1
    return start, len(ids) - suffix


def _attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers' sdpa attention; for a layer being recorded, also its rows of attention weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recording = _recording
    if recording is not None and id(module) in recording.order:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        recording.rows[recording.order[id(module)]] = attention_rows(
            query, key, attention_mask, scale, recording.queries, recording.keys, kwargs.get("softcap"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)   # the masks sdpa gets


@contextlib.contextmanager
def recording(modules: list[torch.nn.Module], queries: torch.Tensor, keys: torch.Tensor):
    """Record, during the forwards inside the block, the attention rows of `modules` (decoder attention layers)
    for the query positions `queries` over the key positions `keys`."""
    global _recording
    _recording = _Recording(modules, queries, keys)
    try:
        yield _recording
    finally:
        _recording = None


class VisionLanguageModel(ModelAdapter):
    """A generative VLM: its maps are read from its attention (CAM_VERSION=attention), not from a score's
    gradient, so it has no `forward`/`targets` for the CAM methods."""

    generates = True

    def __init__(self, model, processor, spec: str):
        self.module, self.processor, self.spec = model, processor, spec
        config = model.config
        self.image_token_id = getattr(config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(config, "image_token_index", None)
        if self.image_token_id is None or getattr(processor, "image_processor", None) is None:
            raise ModelLoadError(f"MODEL={spec}: a {config.model_type} model has no image tokens; attention maps "
                                 f"need a LLaVA-style or Gemma-3-style model")
        self.attention_layers = [layer.self_attn for layer in model.model.language_model.layers]
        image = processor.image_processor
        size = getattr(image, "crop_size", None) if getattr(image, "do_center_crop", False) else None
        size = size or image.size
        side = size.get("shortest_edge")
        self.image_size = (side, side) if side else (size["height"], size["width"])
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)   # `prepare` gives the squashed film in [0, 1]
        self.pinpoints = getattr(config, "image_grid_pinpoints", None)   # tiles ("anyres", LLaVA-NeXT), (h, w)
        text = config.get_text_config()
        self.context = text.max_position_embeddings
        tokenizer = processor.tokenizer
        self.yes_no = tuple(sorted({tokenizer.encode(word, add_special_tokens=False)[0] for word in words})
                            for words in (YES, NO))
        self._notes: dict[str, str] = {}

    @property
    def depth(self) -> int:
        return len(self.attention_layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        raise CAMError(f"MODEL={self.spec} is a generative VLM: its maps are CAM_VERSION=attention")

    def targets(self, names: list[str], outputs: torch.Tensor) -> Targets:
        raise TargetError(f"MODEL={self.spec} is a generative VLM: its maps are CAM_VERSION=attention")

    def note(self, name: str) -> str:
        return self._notes.get(name, "")

    def prepare(self, film: np.ndarray, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The film squashed to the processor's input size, or for a tiled model at its own aspect ratio, its longer
        side at most the largest tile layout's: the processor picks the tiles that fit it best."""
        if self.pinpoints and size is None:
            scale = min(1.0, max(max(pinpoint) for pinpoint in self.pinpoints) / max(film.shape))
            size = (max(1, round(film.shape[0] * scale)), max(1, round(film.shape[1] * scale)))
        return super().prepare(film, size)

    def map_tokens(self, inputs, image_positions: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The image tokens a map is made of and their grid (rows, columns), which covers the film.

        One square grid of image tokens (LLaVA-1.5's 24 x 24, Gemma 3's pooled 16 x 16) is the map. Of a tiled
        input (LLaVA-NeXT) the map is the tiles' grid, laid out by the model's own functions: the tiles side by side,
        the padding the processor added to keep the film's aspect ratio cut away (`unpad_image`), and a newline
        token closing each row, which is left out; the overview image's tokens before it are left out too."""
        count = len(image_positions)
        if not self.pinpoints:
            side = int(round(count ** 0.5))
            if count == 0 or side * side != count:
                raise CAMError(f"the processor made {count} image tokens, not a square grid (Gemma 3's pan-and-scan "
                               f"crops are not read: set do_pan_and_scan to false)")
            return image_positions, (side, side)
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        vision = self.module.config.vision_config
        side = vision.image_size // vision.patch_size
        size = inputs["image_sizes"][0].tolist()
        rows, columns = get_anyres_image_grid_shape(size, self.pinpoints, vision.image_size)
        height, width = unpad_image(torch.empty(1, rows * side, columns * side), size).shape[1:]
        if count != side * side + height * (width + 1):
            raise CAMError(f"the processor made {count} image tokens, not the {side * side} of the overview and the "
                           f"{height} x {width + 1} of the tiles that the model reads")
        return image_positions[side * side:].view(height, width + 1)[:, :width].flatten(), (height, width)

    def _prompt(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, image: torch.Tensor, question: str, room: int):
        """The processor's inputs for `question` about `image` (3, H, W) in [0, 1] (from `prepare`), on the model's
        device and in its type, and the positions of the question's tokens (see `_inputs`)."""
        picture = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        inputs, question_positions = self._inputs(picture, question, room)
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.module.dtype)
        return inputs, question_positions

    def _inputs(self, picture: np.ndarray, question: str, room: int):
        """The processor's inputs for `question` about `picture` and the positions of the question's tokens; the
        question cut to the tokens that leave `room` in the context.

        The question's tokens are where the prompt's tokens differ from those of the same prompt with an empty
        question (the processor's output both times), so no template's layout is assumed."""
        bos = self.processor.tokenizer.bos_token

        def encode(text: str):
            # as transformers' apply_chat_template: a template that writes the BOS token gets no second one
            prompt = self._prompt(text)
            return self.processor(text=prompt, images=picture, return_tensors="pt",
                                  add_special_tokens=not (bos and prompt.startswith(bos)))

        inputs, bare = encode(question), encode("")["input_ids"][0].tolist()
        ids = inputs["input_ids"][0].tolist()
        start, end = differing_span(ids, bare)
        excess = len(ids) + room - self.context
        if excess > 0:
            keep = end - start - excess
            if keep <= 0:
                raise CAMError(f"the prompt without the question takes {len(bare)} of the model's {self.context} "
                               f"tokens of context, with MAX_NEW_TOKENS={room}")
            tokenizer = self.processor.tokenizer
            cut = tokenizer.decode(ids[start:start + keep], skip_special_tokens=True)
            self._notes[question] = (f"question truncated to its first {keep} tokens to fit the model's context "
                                     f"of {self.context} tokens")
            return self._inputs(picture, cut, room)
        return inputs, torch.arange(start, max(end, start + 1))

    def read(self, image: torch.Tensor, question: str, layers: list[int], query: str,
             max_new_tokens: int) -> Reading:
        """The model's reading of `question` about `image` (3, H, W) in [0, 1] (from `prepare`): its attention at
        `layers` from the `query` tokens to the image tokens, its greedy answer and P(yes)."""
        inputs, question_positions = self.encode(image, question, max_new_tokens)
        ids = inputs["input_ids"]
        image_positions, grid = self.map_tokens(inputs, (ids[0] == self.image_token_id).nonzero()[:, 0])
        length = ids.shape[1]
        answer_ids = torch.empty(0, dtype=ids.dtype, device=ids.device)
        note = ""   # the question's truncation is the model's `note` about it
        with torch.no_grad():
            if max_new_tokens > 0:
                made = self.module.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, length:]
                stop = self.module.generation_config.eos_token_id
                stops = set(stop if isinstance(stop, list) else [stop] if stop is not None else [])
                ends = [i for i, token in enumerate(made.tolist()) if token in stops]
                answer_ids = made[:ends[0]] if ends else made
            queries = {"question": question_positions, "last": torch.tensor([length - 1]),
                       "generated": torch.arange(length, length + len(answer_ids))}[query]
            if len(queries) == 0:
                queries = torch.tensor([length - 1])
                note = "no answer token generated: the last prompt token read instead"
            full = dict(inputs)
            if len(answer_ids):
                full["input_ids"] = torch.cat([ids, answer_ids[None]], dim=1)
                full["attention_mask"] = torch.ones_like(full["input_ids"])
                if "token_type_ids" in full:
                    full["token_type_ids"] = torch.cat([full["token_type_ids"], torch.zeros_like(answer_ids[None])],
                                                       dim=1)
                full.pop("mm_token_type_ids", None)
            with recording([self.attention_layers[i] for i in layers], queries, image_positions.cpu()) as kept:
                logits = self.module(**full, use_cache=False).logits[0, length - 1].float()
        missing = [layers[i] for i in range(len(layers)) if i not in kept.rows]
        if missing:
            raise CAMError(f"attention layers {missing} did not run through the recording attention function")
        attention = torch.stack([kept.rows[i][0] for i in range(len(layers))]).cpu()
        probabilities = logits.softmax(-1)
        yes, no = (float(probabilities[list(ids_)].sum()) for ids_ in self.yes_no)
        answer = self.processor.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        return Reading(attention, grid, answer, yes / (yes + no) if yes + no > 0 else float("nan"), note)


def load(spec: str, device: torch.device, precision: str = "auto", offline: bool = False) -> VisionLanguageModel:
    """A VLM from `hf:<hub id>` or a local folder in the hub's format (`fetch-model`, `make-test-model --arch
    llava|gemma3`): bf16 on CUDA unless PRECISION says fp16 or fp32, fp32 on the CPU."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    _register()
    name = spec.removeprefix(VLM_PREFIX)
    if not spec.startswith(VLM_PREFIX):
        name = str(Path(spec.removeprefix("local-dir:")).expanduser())
    dtype = torch.float32
    if device.type == "cuda":
        dtype = {"fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}.get(precision, torch.bfloat16)
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=offline)
        if getattr(config, "image_token_id", getattr(config, "image_token_index", None)) is None:
            raise ModelLoadError(f"MODEL={spec}: a {config.model_type} model has no image tokens; attention maps "
                                 f"need a LLaVA-style or Gemma-3-style model")
        processor = AutoProcessor.from_pretrained(name, local_files_only=offline)
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, local_files_only=offline)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"MODEL={spec}: cannot load it with transformers ({reason})") from None
    return adapter(model, processor, spec, device)


def adapter(model, processor, spec: str, device: torch.device) -> VisionLanguageModel:
    """A transformers VLM and its processor as the pipeline reads them: the language model on the recording
    attention function, on `device`, in eval mode."""
    _register()
    model.set_attn_implementation({"text_config": ATTENTION})
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or processor.tokenizer.pad_token_id
    return VisionLanguageModel(model.to(device).eval(), processor, spec)
