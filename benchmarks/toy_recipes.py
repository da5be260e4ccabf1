"""Train and check toy models of several recipes in parallel: how the toy model's figures move with its recipe and
its seed (README, "The toy model").

    .venv/bin/python benchmarks/toy_recipes.py benchmarks/toy_seeds.json --workers 8 --device cuda --films 100

Each recipe in the JSON list has a "name" and any of: steps, seed, films (train_toy_model's arguments); layers,
patch_size, width, image_size, mlp_ratio (the vision config); occluded, mask_grid, initial_logit_scale, per_caption,
learning_rate, patch_dropout (constants of attention_map/models/toy.py); nodule, opacity (lesion radii in
attention_map/synthetic.py). Each runs in a fresh process (the constants are set there) under PINNED_NUMERICS of
attention_map.models, as the tests retrain, trains with `train_toy_model` and prints one JSON line of
`check_toy_model`'s figures on `--films` held-out films; the lines are also appended to `--results`. Trained models
go under `--work` (a temporary folder unless given). A model's bytes also depend on its threads: each worker has
the CPUs divided by `--workers`.
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from attention_map.models import PINNED_NUMERICS

CONSTANTS = ("occluded", "mask_grid", "initial_logit_scale", "per_caption", "learning_rate", "patch_dropout")
VISION = ("layers", "patch_size", "width", "image_size", "mlp_ratio")


def train_and_check(recipe: dict, work: str, device: str, films: int, threads: int) -> dict:
    import torch

    from attention_map import synthetic
    from attention_map.models import toy

    torch.set_num_threads(threads)
    for kind in ("nodule", "opacity"):
        synthetic.RADIUS[kind] = recipe.get(kind, synthetic.RADIUS[kind])
    for key in CONSTANTS:
        if key in recipe:
            setattr(toy, key.upper(), recipe[key])
    config = copy.deepcopy(toy.CONFIG)
    config["model_cfg"]["vision_cfg"].update({key: recipe[key] for key in VISION if key in recipe})
    toy.CONFIG = config
    folder = Path(work) / recipe["name"]
    started = time.perf_counter()
    toy.train_toy_model(folder, steps=recipe.get("steps", toy.STEPS), seed=recipe.get("seed", toy.SEED),
                        films=recipe.get("films", toy.FILMS), device=device)
    trained = time.perf_counter() - started
    figures = toy.check_toy_model(folder, count=films, device=device)
    return {"recipe": recipe, "figures": {key: round(value, 3) for key, value in figures.items()},
            "train_s": round(trained), "check_s": round(time.perf_counter() - started - trained)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", type=Path, help="JSON list of recipes")
    parser.add_argument("--workers", type=int, default=1, help="recipes trained at once (processes)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the figures depend on it)")
    parser.add_argument("--films", type=int, default=60, help="held-out films each model is checked on")
    parser.add_argument("--work", type=Path, help="where the models go (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=Path("toy_recipes.jsonl"), help="JSON lines appended here")
    args = parser.parse_args()
    recipes = json.loads(args.recipes.read_text())
    names = [recipe["name"] for recipe in recipes]
    if len(set(names)) != len(names):
        parser.error(f"{args.recipes}: recipe names must be distinct")
    work = str(args.work or tempfile.mkdtemp(prefix="toy-recipes-"))
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    # a fresh process per recipe: the constants one recipe sets must not leak into the next
    os.environ.update(PINNED_NUMERICS)       # the workers' PyTorch starts with it
    context = multiprocessing.get_context("spawn")
    failed = 0
    with ProcessPoolExecutor(args.workers, mp_context=context, max_tasks_per_child=1) as pool, \
            args.results.open("a") as results:
        futures = {pool.submit(train_and_check, recipe, work, args.device, args.films, threads): recipe["name"]
                   for recipe in recipes}
        for future in as_completed(futures):
            try:
                line = json.dumps(future.result())
            except Exception as error:       # one recipe's failure is reported, the others go on
                failed += 1
                print(f"{futures[future]}: failed: {error!r}", flush=True)
                continue
            print(line, flush=True)
            results.write(line + "\n")
            results.flush()
    print(f"{len(recipes) - failed} recipes checked, {failed} failed; models under {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
