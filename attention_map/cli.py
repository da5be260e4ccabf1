"""Command line: run | merge | evaluate | robustness | report | fetch-model | make-test-model | train-toy-model |
train-zone-model | train-lesion-detector | make-demo-data | default-conf.

Exit status: 0 all done; 1 the file system refused a read or write (the file named, -v for the traceback); 2 the
run could not start (settings, data file, model; nothing written); 3 finished, but some records or images failed
(OUTPUT_DIR/errors.csv); 4 FAIL_FAST=true stopped at a failure; 5 merge found shards that have not finished; 130
interrupted (Ctrl-C); 143 stopped by SIGTERM (scancel, preemption, a time limit, `kill`, `docker stop`).
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import traceback
from pathlib import Path

from .config import DEFAULT_MODEL, ConfigError, default_conf_text, load_settings, parse_overrides
from .outputs import DamagedFileError

EXIT_FILE_SYSTEM = 1
EXIT_CONFIG = 2
EXIT_SHARDS_MISSING = 5
EXIT_INTERRUPTED = 130    # as a shell reports a command that Ctrl-C stopped (128 + SIGINT)
EXIT_TERMINATED = 143     # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm's scancel, preemption or time limit, `kill`, `docker stop`), raised where Ctrl-C raises
    KeyboardInterrupt so that the run stops the same way: finished outputs kept, worker processes shut down. Left to
    its default, SIGTERM killed this process alone, and its decoders and post-processing workers lived on; as a
    container's first process it ignored SIGTERM."""


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)     # a second SIGTERM, during the shutdown, stops at once
    raise Terminated


def _number(text: str, kind, check, wanted: str):
    """`text` as a number of `kind` that passes `check`, else argparse's one-line error saying what is `wanted`."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not check(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
    return value


def _whole(minimum: int):
    """An argparse type: a whole number of at least `minimum` (a count of steps or films)."""
    return lambda text: _number(text, int, lambda value: value >= minimum, f"a whole number of at least {minimum}")


def _percent(text: str) -> float:
    """An argparse type: a share of a map's pixels."""
    return _number(text, float, lambda value: 0 < value <= 100, "a percentage above 0 and at most 100")


def _pixels(text: str) -> float:
    """An argparse type: a length in pixels."""
    return _number(text, float, lambda value: 0 < value < float("inf"), "a length in pixels above 0")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attention-map", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="make heatmaps and vqa_manifest.csv for a config")
    run.add_argument("--config", type=Path, help="shell-sourced .conf file (see configs/default.conf)")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings that replace the file's")

    merge = commands.add_parser("merge", help="join the shard manifests of an array run into vqa_manifest.csv")
    merge.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", nargs="?",
                       help="the run's OUTPUT_DIR (or give the run's --config)")
    merge.add_argument("--config", type=Path, help="the run's .conf: merge its OUTPUT_DIR")
    merge.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings that replace the file's")

    evaluate = commands.add_parser("evaluate", help="score a run's heatmaps against expert boxes and/or "
                                                    "clinicians' eye-gaze or attention maps")
    evaluate.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", help="a finished run (SAVE_RAW_CAM=true)")
    evaluate.add_argument("--truth", type=Path,
                          help="GEMeX records with visual_locations (JSONL/JSON), or a CSV image_path,x,y,w,h,label")
    evaluate.add_argument("--top-percent", type=_percent, default=15.0, help="top-p%% threshold for IoU/Dice (15)")
    evaluate.add_argument("--truth-maps", type=Path, help="clinicians' attention: a fixations CSV "
                          "image_path,x,y,duration[,frame][,reader], or a folder of PNG maps named like the films")
    evaluate.add_argument("--gaze-sigma", type=_pixels, help="pixels of the Gaussian per fixation (default: 3%% of "
                          "the film's larger side)")
    evaluate.add_argument("--baseline", help="for the information gain: centre (a centre-bias Gaussian) or a PNG map")

    robust = commands.add_parser("robustness", help="a VLM's paraphrase robustness: per study, answer accuracy and "
                                 "consistency and the agreement of the variants' maps, with cluster-bootstrap "
                                 "intervals; paired with another run by --compare")
    robust.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", help="a finished run (SAVE_RAW_CAM=true) on "
                        "records with study_id,image_path,finding,variant_id,question,answer_gt")
    robust.add_argument("--compare", type=Path, metavar="OTHER_OUTPUT_DIR", help="another run (another model) on the "
                        "same records: paired differences by study")
    robust.add_argument("--top-percent", type=_percent, default=15.0, help="top-p%% of a map for the IoU (15)")
    robust.add_argument("--records", type=Path, help="the runs' records (default: the run's DATA_FILE, from its "
                        "run_config.conf)")

    report = commands.add_parser("report", help="write OUTPUT_DIR/index.html, a gallery of the run's heatmaps")
    report.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR")
    report.add_argument("--per-page", type=_whole(1), help="heatmaps per page: index.html, then index-2.html, ... "
                        "(default 500)")

    fetch = commands.add_parser("fetch-model", help="download a hub model into a self-contained folder")
    fetch.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"hf-hub:<id> of a CLIP-like model (default "
                       f"{DEFAULT_MODEL}) or hf:<id> of a generative VLM")
    fetch.add_argument("folder", type=Path)

    make = commands.add_parser("make-test-model", help="write a model folder with random weights, offline")
    make.add_argument("folder", type=Path)
    make.add_argument("--arch", default="tiny", help="CLIP-like: biomedclip, tiny, tiny-resnet; classifiers: "
                      "timm-resnet, timm-vit, torchvision-densenet, xrv-densenet, zone-resnet (six zones x 4 classes); "
                      "detectors: fcos, retinanet, fasterrcnn, ssdlite, tiny-fcos, yolo (needs ultralytics); "
                      "generative VLMs: llava, llava-next, gemma3")
    make.add_argument("--seed", type=int, default=0)

    toy = commands.add_parser("train-toy-model", help="train the toy CLIP on synthetic films (CPU, minutes), "
                                                      "then print what its maps show on held-out films")
    toy.add_argument("folder", type=Path)
    toy.add_argument("--steps", type=_whole(0), help="training steps (default: the recipe's, see models/toy.py)")
    toy.add_argument("--seed", type=int, help="seed of the weights and the training films (default: the recipe's)")
    toy.add_argument("--films", type=_whole(1), help="training films drawn (default: the recipe's)")
    toy.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to train and check (the "
                     "figures depend on it, as on the number of CPU threads)")
    toy.add_argument("--check-films", type=_whole(0), default=60, help="held-out films to check it on (0: none)")
    toy.add_argument("--force", action="store_true", help="train even if FOLDER holds a model of this recipe")

    zones = commands.add_parser("train-zone-model", help="train the six-zone classifier on synthetic films (CPU, "
                                "minutes), then print its AUROC and where each method's maps point")
    zones.add_argument("folder", type=Path)
    zones.add_argument("--steps", type=_whole(0), help="training steps (default: the recipe's, see models/zones.py)")
    zones.add_argument("--seed", type=int, default=0, help="seed of the weights and the training films")
    zones.add_argument("--check-films", type=_whole(0), default=200, help="held-out films to check it on (0: none)")

    lesions = commands.add_parser("train-lesion-detector", help="train the tiny lesion detector on synthetic films "
                                  "(CPU, minutes), then print its recall and where each method's maps put their energy")
    lesions.add_argument("folder", type=Path)
    lesions.add_argument("--steps", type=_whole(0), help="training steps (default: the recipe's, see "
                         "models/lesion_detector.py)")
    lesions.add_argument("--seed", type=int, default=0, help="seed of the weights and the training films")
    lesions.add_argument("--check-films", type=_whole(0), default=200, help="held-out films to check it on (0: none)")

    demo = commands.add_parser("make-demo-data", help="write synthetic chest films, records (GEMeX fields), "
                                                      "boxes.csv and gaze.csv (synthetic readers' fixations) for the demo")
    demo.add_argument("folder", type=Path)
    demo.add_argument("--count", type=_whole(1), default=24)
    demo.add_argument("--clips", action="store_true", help="short synthetic clips (MP4, a breathing chest) with "
                      "records and per-frame gaze instead of films (count default 3)")

    commands.add_parser("default-conf", help="print configs/default.conf (every key with its default)")
    return parser


def _say_whether_shipped(folder: Path, shipped: Path) -> None:
    """After training a shipped model's recipe: whether it wrote the shipped bytes (where a source checkout holds
    them), so that whoever retrains knows whether they reproduced the model or trained a sibling."""
    from .models import holds_shipped_bytes

    log = logging.getLogger("attention_map")
    if not shipped.is_dir():
        return
    if holds_shipped_bytes(folder, shipped):
        log.info("%s holds the shipped model's bytes (every file of %s)", folder, shipped)
    else:
        log.info("%s differs from the shipped model in %s: a sibling of its recipe (the bytes depend on the "
                 "processor, the number of CPU threads and PINNED_NUMERICS; docs/testing.md)", folder, shipped)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    # open_clip logs its routine steps on the root logger: quiet the root and the libraries, not this package
    for noisy in ("httpx", "httpcore", "urllib3", "huggingface_hub", "root", "timm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger("attention_map")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    before = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _command(args, log)
    except OSError as error:        # a folder that is a file, no permission, a full disk: the user's to fix
        return _ended(args, f"{error.filename + ': ' if error.filename else ''}{error.strerror or error}",
                      EXIT_FILE_SYSTEM)
    except DamagedFileError as error:   # a run's CSV cut short or damaged: evaluate, report, robustness read them
        return _ended(args, str(error), EXIT_CONFIG)
    except KeyboardInterrupt as interruption:
        terminated = isinstance(interruption, Terminated)
        return _ended(args, f"{'stopped by SIGTERM' if terminated else 'interrupted'}; what was finished is kept (the "
                            f"same command again resumes a run)", EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)   # main() called in-process


def _ended(args: argparse.Namespace, line: str, status: int) -> int:
    """One line on stderr and the exit status the README gives; with -v the traceback first, causes included, status
    unchanged (a job's script or Slurm reads the status, whoever asked for the traceback)."""
    error = sys.exc_info()[1]
    if args.verbose and error is not None:
        error.__suppress_context__ = False      # the cause that `raise ... from None` keeps off the one line
        traceback.print_exception(error)
    print(f"attention-map: {line}", file=sys.stderr)
    return status


def _refused(error: ConfigError, log: logging.Logger) -> int:
    """The settings' problems, one line each, after what the log would have said of them."""
    for level, note in error.notes:
        log.log(level, note)
    for problem in error.problems:
        print(f"attention-map: {problem}", file=sys.stderr)
    return EXIT_CONFIG


def _command(args: argparse.Namespace, log: logging.Logger) -> int:
    if args.command == "default-conf":
        sys.stdout.write(default_conf_text())
        return 0
    if args.command == "make-demo-data":
        from .synthetic import write_demo_clips, write_demo_data

        log.info("wrote %s", write_demo_clips(args.folder, 3 if args.count == 24 else args.count) if args.clips
                 else write_demo_data(args.folder, args.count))
        return 0
    if args.command == "make-test-model":
        from .models.random_models import make_test_model

        try:
            folder = make_test_model(args.folder, args.arch, args.seed)
        except ValueError as error:
            log.error("make-test-model: %s", error)
            return 2
        log.info("wrote a random-weight %s model to %s (use MODEL=%s)", args.arch, folder, folder)
        return 0
    if args.command == "train-toy-model":
        import torch

        from .models.toy import (FILMS, SEED, SHIPPED, STEPS, TooFewFilms, check_toy_model, is_current,
                                 train_toy_model)

        if args.device == "cuda" and not torch.cuda.is_available():
            return _ended(args, "--device cuda but no CUDA device is visible", EXIT_CONFIG)
        steps = STEPS if args.steps is None else args.steps
        seed = SEED if args.seed is None else args.seed
        films = FILMS if args.films is None else args.films
        if not args.force and is_current(args.folder, steps, seed, films):
            log.info("%s already holds the toy model of this recipe (--force trains it again)", args.folder)
            return 0
        try:
            folder = train_toy_model(args.folder, steps, seed, films, device=args.device)
        except TooFewFilms as error:
            return _ended(args, f"--films: {error}", EXIT_CONFIG)
        log.info("wrote the toy model to %s (use MODEL=%s)", folder, folder)
        if (steps, seed, films, args.device) == (STEPS, SEED, FILMS, "cpu"):
            _say_whether_shipped(folder, SHIPPED)
        if args.check_films:
            figures = check_toy_model(folder, args.check_films, device=args.device)
            print(f"On {args.check_films} held-out synthetic films: " + ", ".join(
                f"{name} {value:.2f}" for name, value in figures.items()))
        return 0
    if args.command in ("train-zone-model", "train-lesion-detector"):
        from .models import lesion_detector, zones

        what, recipe, train, check = (
            ("zone classifier", zones, zones.train_zone_model, zones.check_zone_model)
            if args.command == "train-zone-model" else
            ("lesion detector", lesion_detector, lesion_detector.train_lesion_detector,
             lesion_detector.check_lesion_detector))
        steps = recipe.STEPS if args.steps is None else args.steps
        folder = train(args.folder, steps, args.seed)
        log.info("wrote the %s to %s (use MODEL=%s)", what, folder, folder)
        if (steps, args.seed) == (recipe.STEPS, recipe.SEED):
            _say_whether_shipped(folder, recipe.SHIPPED)
        if args.check_films:
            print(json.dumps(check(folder, args.check_films), indent=2))
        return 0
    if args.command == "fetch-model":
        from .models.fetch import fetch_model

        folder = fetch_model(args.model, args.folder)
        log.info("fetched %s into %s; on compute nodes set MODEL=%s", args.model, folder, folder)
        return 0

    if args.command == "report":
        from .report import PER_PAGE, write_report

        try:
            pages = write_report(args.output_dir, args.per_page or PER_PAGE)
            more = ", " + pages[1].name if len(pages) == 2 else f", index-2.html to {pages[-1].name}"
            log.info("wrote %s%s", pages[0], more if len(pages) > 1 else "")
        except FileNotFoundError as error:
            return _ended(args, str(error), EXIT_CONFIG)
        return 0
    if args.command == "evaluate":
        from .agreement import agreement
        from .evaluate import EvaluationError, evaluate

        if args.truth is None and args.truth_maps is None:
            return _ended(args, "evaluate needs --truth (expert boxes), --truth-maps (clinicians' attention) or both",
                          EXIT_CONFIG)
        try:
            if args.truth is not None:
                result = evaluate(args.output_dir, args.truth, args.top_percent)
                print(result.markdown() + f"\nWritten: evaluation.csv, evaluation.json, evaluation.md in "
                      f"{args.output_dir}")
            if args.truth_maps is not None:
                agreed = agreement(args.output_dir, args.truth_maps, args.gaze_sigma, args.baseline)
                print(agreed.markdown() + f"\nWritten: agreement.csv, agreement.json, agreement.md in "
                      f"{args.output_dir}")
        except EvaluationError as error:
            return _ended(args, str(error), EXIT_CONFIG)
        return 0
    if args.command == "robustness":
        from .evaluate import EvaluationError
        from .robustness import markdown, robustness

        try:
            summary = robustness(args.output_dir, args.compare, args.top_percent, records=args.records)
        except (EvaluationError, FileNotFoundError) as error:
            return _ended(args, str(error), EXIT_CONFIG)
        print(markdown(summary) + f"\nWritten: robustness.csv, robustness.json, robustness.md in {args.output_dir}")
        return 0
    if args.command == "merge":
        from .pipeline import EXIT_ITEMS_FAILED
        from .shards import IncompleteError, merge

        if args.config is not None and args.output_dir is not None and "=" in str(args.output_dir):
            args.overrides.insert(0, str(args.output_dir))   # `merge --config CONF KEY=VALUE ...`
            args.output_dir = None
        if args.output_dir is None and args.config is None:
            return _ended(args, "merge needs OUTPUT_DIR or --config CONF", EXIT_CONFIG)
        if args.output_dir is None:
            try:
                args.output_dir = load_settings(args.config, parse_overrides(args.overrides))[0].OUTPUT_DIR
            except ConfigError as error:
                return _refused(error, log)
        try:
            merged = merge(args.output_dir)
        except IncompleteError as error:
            return _ended(args, str(error), EXIT_SHARDS_MISSING)
        failed = f"{len(merged.errors)} failed (see {args.output_dir / 'errors.csv'})" if merged.errors else "0 failed"
        print(f"Merged {merged.shards} shards: {merged.heatmaps} heatmaps in {args.output_dir / 'vqa_manifest.csv'}, "
              f"{failed}.")
        return EXIT_ITEMS_FAILED if merged.errors else 0

    from .models import ModelLoadError
    from .pipeline import run
    from .records import DataFileError

    try:
        settings, notes = load_settings(args.config, parse_overrides(args.overrides))
    except ConfigError as error:
        return _refused(error, log)
    for level, note in notes:
        log.log(level, note)
    try:
        summary = run(settings)
    except ConfigError as error:
        return _refused(error, log)
    except (DataFileError, ModelLoadError) as error:
        return _ended(args, str(error), EXIT_CONFIG)
    print(summary.text())
    return summary.exit_status
