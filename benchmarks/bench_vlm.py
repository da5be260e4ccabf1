"""Seconds per (film, question) and peak memory of a VLM's attention map: the project's way (scaled-dot-product
attention everywhere, explicit weights only for the chosen layers' query rows) against the naive way (eager attention
and `output_attentions=True` on every layer, then the same rows sliced out).

Models, all with random weights, built here offline:
- the tiny LLaVA and Gemma 3 of the tests;
- `llava-7b-shape` and `gemma3-4b-shape`: the language model's depth, heads, kv heads and sequence length of a 7B
  LLaVA-1.5 (32 layers, 32 heads, 576 image tokens) and of Gemma 3 4B (34 layers, 8 heads, 4 kv heads, 5 sliding to
  1 full, 256 image tokens), with the hidden size cut (256) so that they run on a CPU. The attention weights, which
  the naive way keeps, have the real shapes; the hidden states are smaller than the real ones;
- a depth sweep of the LLaVA shape (8, 16, 32 layers, the last 4 read): memory against the layers not chosen.
- `--real-size` (GPU): the real widths, a 7B LLaVA-style and a 4B Gemma-3-style config, in bf16.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` above what was allocated before the call; on the CPU the
process's peak resident memory (VmHWM, reset through /proc/self/clear_refs) above its resident memory before the call,
with glibc's mmap threshold fixed so that freed tensors leave the process at once.

    python benchmarks/bench_vlm.py [--device cpu|cuda] [--repeats 3] [--real-size] [--models tiny-llava,...]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np
import torch

from attention_map.models import vlm
from attention_map.models.tiny_vlm import build_vlm

QUESTION = "Is there evidence of a pleural effusion in the left lung?"
SHAPES = {
    "tiny-llava": ("llava", {}),
    "tiny-gemma3": ("gemma3", {}),
    "llava-7b-shape": ("llava", dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                     hidden_size=256, intermediate_size=512)),
    "gemma3-4b-shape": ("gemma3", dict(num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
                                       head_dim=32, hidden_size=256, intermediate_size=512, sliding_window=1024,
                                       layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 5
                                       + ["sliding_attention"] * 4)),
}
REAL_SIZE = {
    "llava-7b": ("llava", dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                               hidden_size=4096, intermediate_size=11008, vocab_size=32064)),
    "gemma3-4b": ("gemma3", dict(num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                 hidden_size=2560, intermediate_size=10240, sliding_window=1024,
                                 layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 5
                                 + ["sliding_attention"] * 4)),
}


def _resident(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def _peak(call, device: torch.device) -> tuple[float, int]:
    """(seconds, peak bytes above the memory in use before) of `call()`."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = _resident("VmRSS")
    started = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _resident("VmHWM")
    return seconds, peak - before


def _naive(model: vlm.VisionLanguageModel, image: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """Eager attention and output_attentions=True on every layer, the question's rows over the image tokens sliced
    out of the chosen layers' weights."""
    inputs, queries = model.encode(image, QUESTION, 0)
    keys = (inputs["input_ids"][0] == model.image_token_id).nonzero()[:, 0]
    with torch.no_grad():
        attentions = model.module(**inputs, output_attentions=True, use_cache=False).attentions
    return torch.stack([attentions[i][0][:, queries.to(keys.device)][..., keys].float() for i in layers]).cpu()


def measure(name: str, arch: str, text: dict, device: torch.device, dtype: torch.dtype, repeats: int,
            layers_read: str = "auto") -> dict:
    from attention_map.cams.attention import parse_layers

    model, processor = build_vlm(arch, 0, **text)
    model = vlm.adapter(model.to(dtype), processor, name, device)
    layers = parse_layers(layers_read, model.depth)
    image = torch.from_numpy(np.random.default_rng(0).random((3, *model.image_size), dtype=np.float32))
    ours = lambda: model.read(image, QUESTION, layers, "question", 0).attention   # noqa: E731
    figures = {"model": name, "layers": model.depth, "layers_read": len(layers), "dtype": str(dtype)[6:]}
    for way, call in (("ours", ours), ("naive", lambda: _naive(model, image, layers))):
        if way == "naive":
            model.module.set_attn_implementation({"text_config": "eager"})
        call()   # warm-up
        runs = [_peak(call, device) for _ in range(repeats)]
        figures[f"{way}_s"] = float(np.median([s for s, _ in runs]))
        figures[f"{way}_peak_mib"] = max(p for _, p in runs) / 2 ** 20
    naive = _naive(model, image, layers)
    model.module.set_attn_implementation({"text_config": vlm.ATTENTION})
    difference = (ours() - naive).abs().max().item()
    figures["max_abs_difference"] = difference
    figures["memory_ratio"] = figures["naive_peak_mib"] / max(figures["ours_peak_mib"], 1e-9)
    return figures


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:   # freed tensors go back to the system: RSS tracks the tensors
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real-size", action="store_true", help="the real widths, bf16 (a GPU with 40 GB)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", help="comma-separated names of the models to run (default: all, and the sweep)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    runs = [(name, *shape, "auto") for name, shape in (REAL_SIZE if args.real_size else SHAPES).items()]
    if args.models:
        runs = [run for run in runs if run[0] in args.models.split(",")]
    elif not args.real_size:
        runs += [(f"llava-7b-shape, {depth} layers", "llava", dict(SHAPES["llava-7b-shape"][1],
                                                                   num_hidden_layers=depth), "-4--1")
                 for depth in (8, 16, 32)]
    print(f"device {device}, {args.threads} CPU threads, {dtype}, median of {args.repeats} runs; peak memory "
          f"above the memory in use before the call")
    print("| model | layers (read) | ours s | naive s | ours peak MiB | naive peak MiB | naive / ours memory |")
    print("|---|---|---|---|---|---|---|")
    for name, arch, text, layers_read in runs:
        f = measure(name, arch, text, device, dtype, args.repeats, layers_read)
        print(f"| {f['model']} | {f['layers']} ({f['layers_read']}) | {f['ours_s']:.3f} | {f['naive_s']:.3f} | "
              f"{f['ours_peak_mib']:.1f} | {f['naive_peak_mib']:.1f} | {f['memory_ratio']:.1f}x |", flush=True)
        print(json.dumps(f), file=sys.stderr)


if __name__ == "__main__":
    main()
