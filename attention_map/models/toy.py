"""A toy CLIP trained on the CPU in minutes on synthetic chest films and their captions (attention_map.synthetic).

It exists to show that the maps mean something: its gScoreCAM maps point at the lesion a caption names, which random
weights cannot show. It is a toy: real work uses BiomedCLIP. The recipe: 96 px films, a ViT of patch 12, width 128
and 4 layers with average pooling over the patch tokens, open_clip's own text transformer and tokenizer, an initial
logit scale of 50, and batches with the same number of films per caption in which films of one caption are all
positives of that caption. Three parts make its evidence local: films without a lesion ("clear lungs"); films seen
through random smooth masks like gScoreCAM's, relabelled "clear lungs" when the mask hides the lesion; and patch
dropout (FLIP, Li et al., 2023: each step sees a random half of each film's patches), which also halves a step's
cost. 750 steps; without patch dropout the recipe took 2,000 steps and its figures depended on the seed
(docs/toy-recipe-history.md). For one number of CPU threads, the same seed and steps write the same bytes on one
machine, and under PINNED_NUMERICS of attention_map.models on every processor of one kind: the shipped model's on the
AMD EPYC (Zen 3) that trained it, a sibling's on an Intel processor with AVX2 or an AMD EPYC of Zen 5 (MKL takes
other paths there).

The model ships in the repository (examples/models/demo-toy, 3 MB) so that no set-up trains it: fp16 weights, and a
tokenizer that knows only the byte-pair merges of its captions' words. Training builds the full open_clip text tower
(49,408 tokens) and keeps the embedding rows of those tokens, so the weights are those a full vocabulary would train:
the other rows never receive a gradient.
"""
from __future__ import annotations

import gzip
import json
import tempfile
import logging
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import PatchDropout

from .random_models import BIOMEDCLIP_MEAN, BIOMEDCLIP_STD

log = logging.getLogger(__name__)

CONFIG = {
    "model_cfg": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 96, "patch_size": 12, "width": 128, "layers": 4, "head_width": 32,
                       "pool_type": "avg"},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
    },
    "preprocess_cfg": {"mean": list(BIOMEDCLIP_MEAN), "std": list(BIOMEDCLIP_STD)},
}
FILM_SIZE = 192          # films are drawn at this size and squashed to 96 by the model's own preparation
PER_CAPTION = 6          # films per caption in a batch
INITIAL_LOGIT_SCALE = 50.0
OCCLUDED = 0.65          # share of training films seen through a random smooth mask
MASK_GRID = 8            # the masks' random grid before upsampling: the patch grid, as gScoreCAM's masks
NORMAL = "clear lungs"   # the caption of films without a lesion: evidence of a lesion must be the lesion itself
PATCH_DROPOUT = 0.5      # share of each film's patches a training step drops (open_clip's PatchDropout)
STEPS = 750              # training steps of the recipe (3 to 4 minutes on 2 CPU threads)
LEARNING_RATE = 1e-3
SEED = 8                 # every seed of nine met the check's thresholds (README, "The toy model")
FILMS = 6000             # training films (seeds seed * 1e6 + 0 .. FILMS)
MERGES = "bpe_merges.txt.gz"   # the model's tokenizer: open_clip's byte-pair merges that its captions' words use
SHIPPED = Path(__file__).resolve().parents[2] / "examples" / "models" / "demo-toy"   # in a source checkout


class TooFewFilms(ValueError):
    """The training films hold fewer films of some caption than a batch takes."""


def training_texts() -> list[str]:
    """Every text the toy model is trained on: the captions, "clear lungs" and each caption as the demo's question."""
    from ..synthetic import captions, question

    names = captions() + [NORMAL]
    return names + [question(name) for name in names[:-1]] + [NORMAL]


def _vocabulary() -> tuple[list[tuple[str, str]], list[int]]:
    """The byte-pair merges of open_clip's tokenizer whose result lies within a word of the training texts, in rank
    order, and for each token of the tokenizer they make, its id in the full vocabulary. Any subset of the merges
    that holds every merge a word needs splits that word as the full list does, so the texts keep their tokens."""
    from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode

    full = SimpleTokenizer()
    words = {word + "</w>" for text in training_texts() for word in full.pat.findall(full.clean_fn(text))}
    ranked = sorted(full.bpe_ranks, key=full.bpe_ranks.get)
    merges = [merge for merge in ranked if any("".join(merge) in word for word in words)]
    # SimpleTokenizer's vocabulary order: bytes, bytes ending a word, one token per merge, start and end of text
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(merge) for merge in merges]
    tokens += ["<start_of_text>", "<end_of_text>"]
    return merges, [full.encoder[token] for token in tokens]


def _initial_model(seed: int) -> torch.nn.Module:
    """The recipe's initial weights: open_clip's initialisation of the full architecture under `seed`, with the
    token embedding cut to the rows of the model's own tokenizer."""
    import open_clip

    torch.manual_seed(seed)
    module = open_clip.CLIP(**CONFIG["model_cfg"], init_logit_scale=math.log(INITIAL_LOGIT_SCALE))
    _, ids = _vocabulary()
    module.token_embedding = torch.nn.Embedding.from_pretrained(module.token_embedding.weight[ids].clone(),
                                                                freeze=False)
    return module


def _films(model, seeds: range) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The model inputs (N, 3, 96, 96) of synthetic films, their lesion boxes as masks (N, 96, 96) and captions."""
    from ..synthetic import captions, make_chest

    inputs, boxes, labels = [], [], []
    size = CONFIG["model_cfg"]["vision_cfg"]["image_size"]
    for seed in seeds:
        normal = seed % (len(captions()) + 1) == 0     # as many films without a lesion as of each caption
        film, lesions = make_chest(seed, FILM_SIZE, sides=() if normal else None)
        inputs.append(model.prepare(film)[0])
        box = torch.zeros(size, size, dtype=torch.bool)
        for lesion in lesions:
            x, y, w, h = (round(v * size / FILM_SIZE) for v in lesion.box)
            box[max(0, y):y + max(1, h), max(0, x):x + max(1, w)] = True
        boxes.append(box)
        labels.append(lesions[0].caption if lesions else NORMAL)
    return torch.stack(inputs), torch.stack(boxes), labels


def train_toy_model(folder: Path, steps: int = STEPS, seed: int = SEED, films: int = FILMS, device: str = "cpu") -> Path:
    """Train the toy CLIP for `steps` steps on `films` synthetic films on `device` and write it to `folder` in the
    pipeline's model format (open_clip_config.json, open_clip_model.safetensors and the tokenizer's merges);
    returns the folder."""
    from ..synthetic import captions
    from . import load_model
    from .open_clip_model import go_offline

    go_offline()
    folder = Path(folder)
    module = _initial_model(seed)
    if steps == 0:
        _save(module, folder, 0, seed, films)
        return folder
    # the pipeline's own preparation and tokenizer, from a model folder of its own: `folder` keeps what it holds
    # until the trained model replaces it (a run that fails or is stopped part way leaves it as it was)
    with tempfile.TemporaryDirectory() as initial:
        _save(module, Path(initial), 0, seed, films)
        model = load_model(initial, torch.device(device))
    model.module.load_state_dict(module.state_dict())          # fp32, not the saved fp16

    started = time.perf_counter()
    inputs, boxes, labels = _films(model, range(seed * 1_000_000, seed * 1_000_000 + films))
    names = captions() + [NORMAL]
    by_caption = [np.flatnonzero([label == name for label in labels]) for name in names]
    fewest = min(range(len(names)), key=lambda index: len(by_caption[index]))
    if len(by_caption[fewest]) < PER_CAPTION:
        raise TooFewFilms(f"{films} training films hold {len(by_caption[fewest])} of {names[fewest]!r}; a batch takes "
                          f"{PER_CAPTION} films of each caption: use more films")
    # each caption also as the question the demo asks ("Is there a nodule in the left upper lung?")
    tokens = model.tokenizer(training_texts()).to(model.device)
    log.info("%d training films drawn in %.0f s; %d captions, %d steps", films, time.perf_counter() - started,
             len(names), steps)

    net = model.module.train().requires_grad_(True)
    # for training only (the saved model sees every patch); its draws come from torch's global generator, which
    # _initial_model seeded
    net.visual.patch_dropout = PatchDropout(PATCH_DROPOUT)
    optimizer = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=0.05)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    caption_ids = torch.arange(len(names), device=model.device)
    # oneDNN off: its kernels may size their blocks by the processor's caches, and the one convolution and GELU run
    # as fast on ATen's own, whose bytes PINNED_NUMERICS makes the same on every processor of one kind
    onednn, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    try:
        for step in range(steps):
            batch = np.concatenate([rng.choice(indices, PER_CAPTION, replace=False) for indices in by_caption])
            targets = torch.arange(len(names)).repeat_interleave(PER_CAPTION)
            pixels, hidden = _occlude(inputs[batch], boxes[batch], generator, OCCLUDED)
            targets[hidden] = len(names) - 1          # a film whose lesion the mask hides shows clear lungs
            targets = targets.to(model.device)
            images = F.normalize(net.encode_image(pixels), dim=-1)
            wording = np.arange(len(names)) + len(names) * rng.integers(0, 2, len(names))
            texts = F.normalize(net.encode_text(tokens[wording]), dim=-1)
            logits = net.logit_scale.exp() * images @ texts.T                      # (B, captions)
            image_loss = F.cross_entropy(logits, targets)
            positives = (targets[None, :] == caption_ids[:, None]).float()          # (captions, B)
            counts = positives.sum(dim=1)
            text_loss = (-(F.log_softmax(logits.T, dim=1) * positives).sum(dim=1)[counts > 0]
                         / counts[counts > 0]).mean()
            loss = (image_loss + text_loss) / 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                net.logit_scale.clamp_(0, math.log(100))
            if step % 250 == 0 or step == steps - 1:
                accuracy = (logits.argmax(dim=1) == targets).float().mean().item()
                log.info("step %d/%d: loss %.3f, batch caption accuracy %.2f, logit scale %.1f, %.0f s", step + 1,
                         steps, loss.item(), accuracy, net.logit_scale.exp().item(), time.perf_counter() - started)
    finally:
        torch.backends.mkldnn.enabled = onednn
    net.visual.patch_dropout = torch.nn.Identity()
    _save(net.eval(), folder, steps, seed, films)
    return folder


def _occlude(pixels: torch.Tensor, boxes: torch.Tensor, generator: torch.Generator, share: float):
    """`share` of the inputs multiplied by a random smooth mask in [0, 1] (a random 8 x 8 grid upsampled, as the
    masks of score-weighted CAMs are); returns them and which of them now hide their lesion (mean mask over the
    lesion box below 0.3), so that the model learns to judge a partly hidden film by what stays visible."""
    count = len(pixels)
    grids = torch.rand(count, 1, MASK_GRID, MASK_GRID, generator=generator)
    masks = F.interpolate(grids, size=pixels.shape[-2:], mode="bilinear", align_corners=True)[:, 0]
    low, high = masks.amin(dim=(1, 2), keepdim=True), masks.amax(dim=(1, 2), keepdim=True)
    masks = (masks - low) / (high - low + 1e-6)
    masked = torch.rand(count, generator=generator) < share
    masks[~masked] = 1.0
    area = boxes.sum(dim=(1, 2))
    visible = (masks * boxes).sum(dim=(1, 2)) / area.clamp(min=1)
    return pixels * masks[:, None].to(pixels.device), masked & (area > 0) & (visible < 0.3)


def recipe(steps: int, seed: int, films: int) -> str:
    """What made a toy model: the training arguments."""
    return f"attention-map train-toy-model --steps {steps} --seed {seed} --films {films}"


def made_by(folder: Path) -> dict[str, str]:
    """The training arguments a toy model folder records ({} where there is no toy model)."""
    from safetensors import safe_open

    weights = Path(folder) / "open_clip_model.safetensors"
    if not weights.is_file():
        return {}
    with safe_open(str(weights), "pt") as handle:
        return handle.metadata() or {}


def _seed(folder: Path) -> int:
    """The seed a toy model folder was trained with (its recorded command's --seed), else the recipe's."""
    found = re.search(r"--seed (\d+)", made_by(folder).get("made_by", ""))
    return int(found.group(1)) if found else SEED


def is_current(folder: Path, steps: int = STEPS, seed: int = SEED, films: int = FILMS) -> bool:
    """Whether `folder` holds a toy model trained with these arguments."""
    return made_by(folder).get("made_by") == recipe(steps, seed, films)


def _save(module: torch.nn.Module, folder: Path, steps: int, seed: int, films: int) -> None:
    """`module` in the pipeline's model format: folder/open_clip_config.json, open_clip_model.safetensors (fp16: the
    pipeline computes in fp32 or the PRECISION asked, whatever the file holds) and the tokenizer's merges."""
    from .base import save_weights

    folder.mkdir(parents=True, exist_ok=True)
    merges, ids = _vocabulary()
    config = json.loads(json.dumps(CONFIG))
    config["model_cfg"]["text_cfg"].update(vocab_size=len(ids), tokenizer_kwargs={"bpe_path": MERGES})
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # gzip without a file name or time in its header: the same merges write the same bytes
    with open(folder / MERGES, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as handle:
        # no newline after the last merge: SimpleTokenizer would read an empty merge there
        handle.write("\n".join(["#version: 0.2 (open_clip's merges the toy model's texts use)"]
                               + [f"{left} {right}" for left, right in merges]).encode())
    save_weights(module, folder / "open_clip_model.safetensors", recipe(steps, seed, films), half=True)


HELD_OUT = 10_000_000    # seeds of held-out films start here (training uses seed * 1e6 + 0 .. films)
UNSEEN = 20_000_000      # held-out films that played no part in choosing the recipe's seed (chosen on the first
                         # 100 from HELD_OUT)


def check_toy_model(folder: Path, count: int = 60, size: int = 192, device: str = "cpu",
                    first_seed: int = HELD_OUT, random_seed: int | None = None) -> dict[str, float]:
    """What the toy model's gScoreCAM maps show on `count` held-out films (seeds from `first_seed`; fp32), each map
    from the prompt of the film's caption:

    retrieval: share of films whose own caption scores highest of all captions;
    named_side: share of maps whose peak is on the side the caption names;
    energy_ratio: mean share of the map's mass inside the lesion box over the box's share of the film;
    pointing / pointing_cell: share of maps whose peak is inside the box / within one patch cell of it;
    other_side: on films with the same lesion in both lungs, share of prompts naming one side that put the peak
      on that side;
    randomized_ssim: mean structural similarity (SSIM) of the maps, each scaled to [0, 1] at film size, with those
      of the same architecture at the model's initial random weights (the sanity check of Adebayo et al., 2018;
      `random_seed`: those of another seed instead).
      A mean, not a median: the random model's maps follow the body's outline or its inverse, film by film, and the
      median of such a two-peaked distribution jumps between seeds.
    """
    from skimage.metrics import structural_similarity

    from ..cams import GScoreCAM
    from ..evaluate import Boxes, heatmap_scores
    from ..maps import grid_to_image
    from ..synthetic import captions, make_chest
    from . import load_model

    device = torch.device(device)
    model = load_model(str(folder), device)
    with tempfile.TemporaryDirectory() as initial:     # the same architecture at the recipe's initial weights
        seed = _seed(folder) if random_seed is None else random_seed
        random_model = load_model(str(train_toy_model(Path(initial), steps=0, seed=seed, films=0)), device)
    cam, random_cam = GScoreCAM(model, topk=300), GScoreCAM(random_model, topk=300)
    names = captions()
    texts = model.encode_text(names)
    cell = size / (CONFIG["model_cfg"]["vision_cfg"]["image_size"] / CONFIG["model_cfg"]["vision_cfg"]["patch_size"])
    figures: dict[str, list[float]] = {key: [] for key in ("retrieval", "named_side", "energy_ratio", "pointing",
                                                           "pointing_cell", "other_side", "randomized_ssim")}
    for seed in range(first_seed, first_seed + count):
        film, (lesion,) = make_chest(seed, size)
        pixels = model.prepare(film)
        with torch.no_grad():
            figures["retrieval"].append(float(names[int((model.encode_image(pixels) @ texts.T).argmax())]
                                              == lesion.caption))
        grid = cam.explain(pixels, [lesion.caption])[0].cam
        heat = grid_to_image(grid, (size, size))
        bx, by, bw, bh = lesion.box
        figures["named_side"].append(_peak_on_side(heat, lesion.side))
        scores = heatmap_scores(heat, Boxes(((bx, by, bx + bw, by + bh),)).mask(size, size), top_percent=15)
        figures["energy_ratio"].append(scores["energy_ratio"])
        figures["pointing"].append(scores["hit"])
        near = Boxes(((bx - cell, by - cell, bx + bw + cell, by + bh + cell),)).mask(size, size)
        figures["pointing_cell"].append(heatmap_scores(heat, near, top_percent=15)["hit"])
        random_heat = grid_to_image(random_cam.explain(random_model.prepare(film), [lesion.caption])[0].cam,
                                    (size, size))
        figures["randomized_ssim"].append(structural_similarity(_unit(heat), _unit(random_heat), data_range=1.0))
        both, lesions = make_chest(seed, size, kind=lesion.kind, sides=("right", "left"), zone=lesion.zone)
        # both prompts in one call: their masked images are the same, so the film's forwards are made once
        sides = cam.explain(model.prepare(both), [named.caption for named in lesions])
        for named, side in zip(lesions, sides):
            figures["other_side"].append(_peak_on_side(grid_to_image(side.cam, (size, size)), named.side))
    return {key: float(np.mean(values)) for key, values in figures.items()}


def _unit(heat: np.ndarray) -> np.ndarray:
    """A map scaled to [0, 1] (a flat map to zeros)."""
    low, high = float(heat.min()), float(heat.max())
    return (heat - low) / (high - low) if high > low else np.zeros_like(heat)


def _peak_on_side(heat: np.ndarray, side: str) -> float:
    """1.0 when the map's peak is in the patient's `side` of the film (the patient's left is the image's right)."""
    x = np.unravel_index(int(heat.argmax()), heat.shape)[1]
    return float((x >= heat.shape[1] / 2) == (side == "left"))
