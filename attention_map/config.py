"""Settings of a run: read from a bash-sourced `.conf` file, typed and validated in one place.

A `.conf` file is bash. It is sourced by bash itself, so `${RESULTS_ROOT}/exp_01` and `$(date)` mean exactly
what they mean under `sbatch`. Upper-case names are settings and must be known keys; lower-case names are the
file's own helper variables and are ignored.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
COLORMAPS = ("jet", "turbo", "inferno", "hot", "custom_purple_red")
# the names of attention_map.cams.CAM_METHODS (not imported: reading a config must not import torch)
CAM_VERSIONS = ("gScoreCAM", "ScoreCAM", "GradCAM", "GradCAM++", "XGradCAM", "HiResCAM", "LayerCAM", "EigenCAM",
                "attention")
RENAMED_KEYS = {"CAM_METHOD": "CAM_VERSION"}
# the names of attention_map.body_mask.BODY_MASKS, and none
BODY_MASKS = ("air", "otsu", "none")
CLASSIFIER_PREFIXES = ("timm:", "torchvision:", "xrv:")
CLASSIFIER_CONFIG = "classifier_config.json"   # a local classifier folder (see attention_map.models.classifier)
DETECTOR_PREFIXES = ("torchvision-det:", "yolo:")
DETECTOR_CONFIG = "detector_config.json"       # a local detector folder (see attention_map.models.detector)
VLM_PREFIX = "hf:"                             # a transformers VLM on the hub (see attention_map.models.vlm)
VLM_CONFIG = "config.json"                     # a local transformers VLM folder, as the hub has it
LAYER_RANGE = r"\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?"   # one part of ATTENTION_LAYERS: an index, or a range a-b


def model_kind(model: str) -> str:
    """'classifier' (a map explains an output of the model), 'detector' (its detections), 'vlm' (a generative
    vision-language model: a map is its attention while it reads a question) or 'vision-text' (CLIP-like: a map
    explains a prompt), from MODEL alone, before anything is loaded: the records a run reads depend on it."""
    folder = Path(model.removeprefix("local-dir:")).expanduser()
    if model.startswith(CLASSIFIER_PREFIXES) or (folder / CLASSIFIER_CONFIG).is_file():
        return "classifier"
    if model.startswith(DETECTOR_PREFIXES) or (folder / DETECTOR_CONFIG).is_file():
        return "detector"
    if model.startswith(VLM_PREFIX) or ((folder / VLM_CONFIG).is_file()
                                        and not (folder / "open_clip_config.json").is_file()):
        return "vlm"
    return "vision-text"


class ConfigError(ValueError):
    """One or more settings are wrong; each line names the file, the key and what is wrong. `notes`: what the log
    would have said of the settings, as (logging level, line) (a value from the environment, a variable expanded to
    nothing), which may explain a problem."""

    def __init__(self, problems: list[str], notes: list[tuple[int, str]] = ()):
        self.problems, self.notes = problems, list(notes)
        super().__init__("\n".join(problems))


def _key(default, help: str, kind: str = "str", choices: tuple = (), low=None, high=None, optional=False):
    return field(default=default, metadata=dict(help=help, kind=kind, choices=choices, low=low, high=high,
                                                optional=optional))


@dataclass(frozen=True)
class Settings:
    """Every key a run understands. The order here is the order of `configs/default.conf` and the README."""

    # Data
    RESULTS_ROOT: Path = _key(Path("results"), "root of all results; other paths may be written as ${RESULTS_ROOT}/...",
                              "path")
    DATA_FILE: Path | None = _key(None, "records: GEMeX JSONL/JSON, or CSV with image_path,question,answer[,prompt] "
                                  "(a classifier's CSV: image_path[,target])", "file")
    IMAGE_ROOT: Path | None = _key(None, "folder the records' image paths are relative to (empty: DATA_FILE's folder)",
                                   "dir", optional=True)
    OUTPUT_DIR: Path = _key(Path("results/default"), "where overlays, vqa_manifest.csv and run_config.conf go",
                            "outdir")
    PROMPT_SOURCE: str = _key("question", "question: one map per question; regions: one per visual_region; both",
                              "choice", ("question", "regions", "both"))
    STOP_AFTER: int | None = _key(None, "process only the first N images (empty: all)", "int", low=1, optional=True)
    MAX_IMAGE_PIXELS: int = _key(50_000_000, "larger images are refused before decoding (decompression-bomb guard)",
                                 "int", low=1)
    DICOM_FRAME: str = _key("first", "of a multi-frame DICOM: first or middle frame, or all (one map per frame, "
                            "named _f<frame>, as for a video clip)", "choice", ("first", "middle", "all"))
    FRAME_STRIDE: int = _key(1, "of a video clip (or a multi-frame DICOM under DICOM_FRAME=all): every n-th frame "
                             "gets maps", "int", low=1)
    MAX_FRAMES: int | None = _key(None, "at most this many frames per clip (empty: all)", "int", low=1, optional=True)
    ALLOW_OUTSIDE_IMAGE_ROOT: bool = _key(False, "true: image paths may point outside IMAGE_ROOT (absolute or ..)",
                                          "bool")
    # Runs
    RESUME: bool = _key(True, "skip heatmaps that OUTPUT_DIR already holds complete, made with the same settings",
                        "bool")
    OVERWRITE: bool = _key(False, "redo every heatmap, replacing what OUTPUT_DIR holds", "bool")
    FAIL_FAST: bool = _key(False, "stop at the first failed record or image instead of going on", "bool")
    SHARD_INDEX: int | None = _key(None, "this task's shard, 0..SHARD_COUNT-1 (empty: SLURM_ARRAY_TASK_ID, else 0)",
                                   "int", low=0, optional=True)
    SHARD_COUNT: int | None = _key(None, "shards the images are split into (empty: from the Slurm array, else 1)",
                                   "int", low=1, optional=True)
    # Model
    MODEL: str = _key(DEFAULT_MODEL, "hf-hub:<id> or a local model folder (see `attention-map fetch-model`); a "
                      "classifier: timm:<name>, torchvision:<name>, xrv:<weights name> or a folder with "
                      f"{CLASSIFIER_CONFIG}; a detector: torchvision-det:<name>, yolo:<file.pt or name.yaml> or a "
                      f"folder with {DETECTOR_CONFIG}; a generative VLM (LLaVA-style, Gemma-3-style): hf:<id> or "
                      f"its folder (with {VLM_CONFIG})", "model")
    MODEL_WEIGHTS: Path | None = _key(None, "a classifier's or detector's weights: a state_dict or a checkpoint "
                                      "holding one (.pt, .pth, .safetensors); empty: the library's own weights",
                                      "file", optional=True)
    DEVICE: str = _key("auto", "auto (cuda when available), cuda or cpu (which GPU: CUDA_VISIBLE_DEVICES)", "choice",
                       ("auto", "cuda", "cpu"))
    PRECISION: str = _key("auto", "arithmetic of the masked forwards: auto (fp32), fp32, tf32, bf16, fp16; all "
                          "but fp32 on cuda only; a VLM's weights: auto is bf16 on cuda", "choice",
                          ("auto", "fp32", "tf32", "bf16", "fp16"))
    # CAM
    CAM_VERSION: str = _key("gScoreCAM", "class-activation method (any case): gScoreCAM, ScoreCAM (gScoreCAM over "
                            "every channel), GradCAM, GradCAM++, XGradCAM, HiResCAM, LayerCAM, EigenCAM; a VLM's "
                            "maps: attention",
                            "choice", CAM_VERSIONS)
    FALLBACK_CAM: str | None = _key(None, "method used for an item where CAM_VERSION cannot run (the manifest says "
                                    "so); empty: the item fails into errors.csv", "choice", CAM_VERSIONS,
                                    optional=True)
    TARGET_LAYER: str = _key("auto", "auto (the last spatial layer found by a dry forward; a ViT's last block's "
                             "norm1; a detector's finest feature map read by its head), or a dotted module path such "
                             "as visual.trunk.blocks[-1].norm1; several, comma-separated, are averaged")
    TARGETS: tuple = _key((), "a classifier's outputs to explain, comma-separated indices or names; empty: the "
                          "predicted class, or every output named by TARGET_NAMES", "list")
    TARGET_NAMES: tuple = _key((), "names of a classifier's outputs in order (of the zones of a [batch, zones, "
                               "classes] output), e.g. right_sup,left_sup,right_mid,left_mid,right_inf,left_inf",
                               "list")
    TOPK: int = _key(300, "gScoreCAM: channels kept per prompt, ranked by mean gradient", "int", low=1)
    COMPILE: bool = _key(False, "gScoreCAM, ScoreCAM: true: the masked forwards run the model through torch.compile "
                         "(one shape: a short last batch is padded to BATCH_SIZE; needs a C/C++ compiler); it did not "
                         "pay on the CPU (docs/benchmarks.md)", "bool")
    DETECTION_TARGET: str = _key("topk", "a detector's maps explain: topk (the strongest class scores of the head), "
                                 "sum (every score: diffuse maps) or box (one map per detection, <name>_det<j>_<class>"
                                 ".png)", "choice", ("topk", "sum", "box"))
    TOPK_OUTPUTS: int | None = _key(None, "DETECTION_TARGET=topk: class scores summed (empty: max(50, 1% of them))",
                                    "int", low=1, optional=True)
    SCORE_THRESHOLD: float = _key(0.5, "a detector's detections: class score above this (after per-class NMS)",
                                  "float", low=0.0, high=1.0)
    ATTENTION_LAYERS: str = _key("auto", "CAM_VERSION=attention: the language model's layers read, auto (the last "
                                 "half) or indices and ranges such as 16-31 or -4,-1", "layers")
    ATTENTION_HEADS: str = _key("mean", "CAM_VERSION=attention: heads combined by mean or max", "choice",
                                ("mean", "max"))
    ATTENTION_QUERY: str = _key("question", "CAM_VERSION=attention: the attention of the question's tokens, the "
                                "last prompt token (last) or the generated answer's tokens (generated)", "choice",
                                ("question", "last", "generated"))
    ATTENTION_NORMALIZE: str = _key("none", "CAM_VERSION=attention: none, or relative (divided token by token by the "
                                    "attention the same layers give a generic prompt: fewer attention sinks)",
                                    "choice", ("none", "relative"))
    MAX_NEW_TOKENS: int = _key(32, "a VLM's answer: at most this many tokens, greedy (0: no answer)", "int", low=0)
    BATCH_SIZE: int | None = _key(None, "images per forward pass: masked images (gScoreCAM, ScoreCAM; empty: 256 on "
                                  "cuda, 64 on cpu; the masked images of 8 films on cuda, 1 on cpu, share full "
                                  "forwards), or films (the gradient methods, EigenCAM; empty: 64 on cuda, 4 on cpu)",
                                  "int", low=1, optional=True)
    WORKERS: int | None = _key(None, "post-processing processes (and up to 4 film decoders) working beside the "
                               "model (empty: the usable CPUs less one on cuda, 0 on cpu)", "int", low=0, optional=True)
    # Post-processing
    BODY_MASK: str = _key("air", "zero the map outside the body: air (drops the air around the body, keeps every "
                          "lung it can tell), otsu (the earlier mask, to reproduce older runs) or none", "choice",
                          BODY_MASKS)
    ENABLE_BODY_MASK: bool = _key(True, "false: no body mask, whatever BODY_MASK says (older experiment files)",
                                  "bool")
    SKIP_CRF: bool | None = _key(None, "false: refine the map with a dense CRF against the film; empty: true for "
                                 "OUTPUT_KIND=heatmap, false where boxes are made", "bool", optional=True)
    CRF_ITERATIONS: int = _key(1, "CRF mean-field iterations (MedCLIP-SAM: 1)", "int", low=1, high=100)
    CRF_TAU: float = _key(1.05, "CRF unary temperature (MedCLIP-SAM: 1.05)", "float", low=1e-6)
    CRF_GAUSSIAN_SXY: float = _key(3.0, "CRF smoothness kernel width in pixels (MedCLIP-SAM: 3)", "float", low=1e-6)
    CRF_GAUSSIAN_COMPAT: float = _key(3.0, "CRF smoothness kernel weight (MedCLIP-SAM: 3)", "float", low=0.0)
    CRF_BILATERAL_SXY: float = _key(60.0, "CRF appearance kernel width in pixels (MedCLIP-SAM: 60)", "float",
                                    low=1e-6)
    CRF_BILATERAL_SRGB: float = _key(5.0, "CRF appearance kernel intensity width (MedCLIP-SAM: 5)", "float",
                                     low=1e-6)
    CRF_BILATERAL_COMPAT: float = _key(5.0, "CRF appearance kernel weight (MedCLIP-SAM: 5)", "float", low=0.0)
    # Rendering
    COLORMAP: str = _key("jet", "jet, turbo, inferno, hot or custom_purple_red; red = high attention", "choice",
                         COLORMAPS)
    ALPHA: float = _key(0.5, "heatmap weight in the blend: 0 = film only, 1 = heatmap only", "float", low=0.0,
                        high=1.0)
    SAVE_RAW_CAM: bool = _key(False, "also write the map as a 16-bit grey PNG (<name>_cam.png, 0..65535 = 0..1)",
                              "bool")
    RENORMALIZE_IN_BOXES: bool = _key(False, "a detector's map rescaled to [0, 1] inside each detection's box and "
                                      "zeroed outside", "bool")
    DRAW_BOXES: bool = _key(False, "a detector's detections drawn on the overlay with class and score", "bool")
    # Boxes
    OUTPUT_KIND: str = _key("heatmap", "heatmap: overlays; boxes: boxes drawn on the film (<name>_boxes.png) and "
                            "boxes.jsonl; both", "choice", ("heatmap", "boxes", "both"))
    BOX_THRESHOLD: str = _key("otsu", "a box's region: the map above Otsu's threshold (otsu), or above this fraction "
                              "of the map's peak (e.g. 0.5)", "threshold")
    BOX_MIN_AREA: float = _key(0.005, "regions smaller than this share of the film get no box", "float", low=0.0,
                               high=1.0)
    BOX_PADDING: float = _key(0.1, "margin added on each side of a box, as a share of the box's own width and height",
                              "float", low=0.0, high=1.0)
    # Cluster (read by scripts/run_heatmap_gen.sh; OFFLINE also by the run)
    CONTAINER: str = _key("none", "run inside a container: none, docker, podman or apptainer", "choice",
                          ("none", "docker", "podman", "apptainer"))
    CONTAINER_IMAGE: str = _key("attention-map:latest", "docker/podman image, or apptainer .sif file or URI")
    OFFLINE: bool = _key(False, "true: never touch the network (hub models must be cached; containers: --network none)",
                         "bool")

    @property
    def crf(self) -> bool:
        """Whether the dense CRF runs: SKIP_CRF where set, else only where boxes are made (they need its edges)."""
        return not self.SKIP_CRF if self.SKIP_CRF is not None else self.makes_boxes

    @property
    def makes_boxes(self) -> bool:
        return self.OUTPUT_KIND != "heatmap"

    @property
    def body_mask(self) -> str | None:
        """The body mask a run applies (a name of attention_map.body_mask.BODY_MASKS), or None."""
        return self.BODY_MASK if self.ENABLE_BODY_MASK and self.BODY_MASK != "none" else None

    def to_conf(self) -> str:
        """The settings as a sourceable `.conf` text (one KEY=value line each)."""
        lines = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            lines.append(f"{f.name}={shlex.quote(_format(value))}")
        return "\n".join(lines) + "\n"


KEYS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Settings)}

# Variables bash itself sets or changes while sourcing a file.
_BASH_VARIABLES = {"BASH_ARGC", "BASH_ARGV", "BASH_LINENO", "BASH_SOURCE", "BASH_COMMAND", "BASH_SUBSHELL",
                   "BASHPID", "FUNCNAME", "LINENO", "PIPESTATUS", "RANDOM", "SRANDOM", "SECONDS", "EPOCHSECONDS",
                   "EPOCHREALTIME", "OLDPWD", "PWD", "OPTIND", "OPTARG", "COLUMNS", "LINES", "HISTCMD", "_"}

_DUMP = r'''__am_dump() { local __am_n; for __am_n in $(compgen -v); do printf '%s\0%s\0' "$__am_n" "${!__am_n-}"; done; }
__am_dump; printf '__AM_SPLIT__\0\0'
source "$1" >&2 || exit $?
__am_dump'''


_BASH_ERROR = re.compile(r"^(.+?): line (\d+): (.+)$")
# $NAME or ${NAME}, not ${NAME:-default} and its kin; in a line without its comment and its single-quoted text
_REFERENCE = re.compile(r"\$(?:\{([A-Za-z_]\w*)\}|([A-Za-z_]\w*))")
_NOT_EXPANDED = re.compile(r"'[^']*'|(?:^|\s)#.*$")


def _bash_error(said: re.Match, path: Path) -> str:
    """One line of bash's (`_BASH_ERROR` matched), as a problem: named by the config file, a carriage return shown, a
    hint where the mistake is a common one."""
    file, number, message = said.groups()
    problem = f"{file}: line {number}: {message}".replace("\r", "\\r")
    if file != str(path):
        problem = f"{path}: {problem}"
    command = re.match(r"(.+): command not found$", message)
    if command and command.group(1) in KEYS:
        problem += f" (bash takes no spaces around '=': {command.group(1)}=value)"
    if "\r" in said.group(0) or "$'\\r'" in message:     # bash names a blank line's lone \r as $'\r'
        problem += " (the file has Windows line endings: convert it with dos2unix)"
    return problem


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def source_conf(path: Path) -> tuple[dict[str, str], set[str], list[str]]:
    """Source `path` with bash; return (every variable set afterwards, names the file itself set or changed, warnings:
    bash's, and the variables it expanded unset)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: config file not found"])
    proc = subprocess.run(["bash", "-c", _DUMP, "attention-map-conf", str(path)], capture_output=True)
    # bash goes on after a failed command, so a file that sources a missing file or writes `KEY = value` still
    # exits 0, its settings silently unset: bash's own error lines (`FILE: line N: ...`) stop the run instead. Its
    # warnings (a locale the node lacks, say) are the log's.
    lines = proc.stderr.decode(errors="replace").strip().split("\n")     # not at a \r, which bash may print
    said = [match for match in map(_BASH_ERROR.match, lines) if match]
    errors = [_bash_error(match, path) for match in said if not match.group(3).startswith("warning: ")]
    if errors:
        raise ConfigError(errors)
    warnings = [_bash_error(match, path) for match in said if match.group(3).startswith("warning: ")]
    if proc.returncode != 0:
        raise ConfigError([f"{path}: bash could not source it: its last command exited {proc.returncode}"])
    before_raw, after_raw = proc.stdout.split(b"__AM_SPLIT__\0\0", 1)

    def parse(raw: bytes) -> dict[str, str]:
        parts = raw.decode(errors="replace").split("\0")
        return {parts[i]: parts[i + 1] for i in range(0, len(parts) - 1, 2)}

    before, after = parse(before_raw), parse(after_raw)
    changed = {k for k, v in after.items() if before.get(k) != v and k not in _BASH_VARIABLES
               and not k.startswith("__am")}
    return after, changed, warnings + _unset_references(path, after)


def _unset_references(path: Path, variables: dict[str, str]) -> list[str]:
    """A line for each variable the file expands that is set neither by it nor by the environment: bash expands it
    to nothing, so `OUTPUT_DIR=results/${EXPERIMENT}` with EXPERIMENT unset (or misspelt) writes into results/."""
    said = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        for match in _REFERENCE.finditer(_NOT_EXPANDED.sub("", line)):
            name = match.group(1) or match.group(2)
            if name not in variables:
                said.append(f"{path}: line {number}: ${name} is not set, so it expands to nothing (set it, or write "
                            f"${{{name}:-default}})")
    return said


def _check_writable_folder(folder: Path, what: str) -> None:
    """Raise ValueError unless `folder` is a folder this process can write in, or can be made as one: checked when
    the settings are read, so that a run does not load its model only to find it cannot write."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: {existing} is not writable by this user" + (
            "" if existing == folder.absolute() else " (the folder would be made in it)"))


def _parse_value(name: str, raw: str, where: str):
    """Return the typed value of one key, or raise ValueError with a one-line reason."""
    meta = KEYS[name].metadata
    kind = meta["kind"]
    raw = raw.strip()
    if "\r" in raw:        # stripped at the ends, so a helper variable of a file with Windows line endings brought it
        raise ValueError(f"{where}: {name}={raw!r} holds a carriage return (\\r): the file has Windows line endings; "
                         "convert it with dos2unix")
    if kind == "list":
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    if raw == "":
        if meta["optional"]:
            return None
        raise ValueError(f"{where}: {name} is empty")
    if kind == "bool":
        lowered = raw.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{where}: {name}={raw!r} is not a boolean (true/false)")
    if kind in ("int", "float"):
        try:
            value = int(raw) if kind == "int" else float(raw)
        except ValueError:
            raise ValueError(f"{where}: {name}={raw!r} is not {'an integer' if kind == 'int' else 'a number'}") from None
        if meta["low"] is not None and value < meta["low"]:
            raise ValueError(f"{where}: {name}={raw} is below the minimum {meta['low']}")
        if meta["high"] is not None and value > meta["high"]:
            raise ValueError(f"{where}: {name}={raw} is above the maximum {meta['high']}")
        return value
    if kind == "threshold":
        if raw.lower() == "otsu":
            return "otsu"
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not 0 < value <= 1:
            raise ValueError(f"{where}: {name}={raw!r} is neither otsu nor a fraction of the peak in (0, 1]")
        return raw
    if kind == "choice":
        spelled = {choice.lower(): choice for choice in meta["choices"]}   # any case, stored as the choice is written
        if raw.lower() not in spelled:
            gpu = re.fullmatch(r"cuda:(\d+)", raw.strip().lower()) if name == "DEVICE" else None
            raise ValueError(f"{where}: {name}={raw!r} is not one of {', '.join(meta['choices'])}" + (
                f" (for GPU {gpu.group(1)}, set CUDA_VISIBLE_DEVICES={gpu.group(1)} and DEVICE=cuda; a Slurm job sees "
                f"its own GPUs only)" if gpu else ""))
        return spelled[raw.lower()]
    if kind in ("path", "file", "dir", "outdir"):
        value = Path(raw).expanduser()
        if kind == "file" and not value.is_file():
            raise ValueError(f"{where}: {name}={raw} does not exist or is not a file")
        if kind == "dir" and not value.is_dir():
            raise ValueError(f"{where}: {name}={raw} does not exist or is not a folder")
        if kind == "outdir":
            _check_writable_folder(value, f"{where}: {name}={raw}")
        return value
    if kind == "model":
        if not raw.startswith(("hf-hub:", VLM_PREFIX) + CLASSIFIER_PREFIXES + DETECTOR_PREFIXES):
            local = Path(raw.removeprefix("local-dir:")).expanduser()
            if not any((local / name).is_file() for name in ("open_clip_config.json", CLASSIFIER_CONFIG,
                                                             DETECTOR_CONFIG, VLM_CONFIG)):
                raise ValueError(f"{where}: MODEL={raw} is none of hf-hub:<id>, {VLM_PREFIX}<id>, "
                                 f"{', '.join(CLASSIFIER_PREFIXES + DETECTOR_PREFIXES)}<name> or a model folder with "
                                 f"open_clip_config.json, {CLASSIFIER_CONFIG}, {DETECTOR_CONFIG} or {VLM_CONFIG} "
                                 f"(make one with `attention-map fetch-model` or `make-test-model`)")
        return raw
    if kind == "layers":
        if raw != "auto" and not all(re.fullmatch(LAYER_RANGE, part) for part in raw.split(",")):
            raise ValueError(f"{where}: {name}={raw!r} is neither auto nor layer indices and ranges (e.g. 16-31 or "
                             f"-4,-1)")
        return raw
    return raw


# Upper-case names a .conf may set that are not settings: the environment of the tools the run uses.
_ENVIRONMENT_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH_", "PYTORCH_", "CUDA_", "NCCL_", "OMP_",
                         "MKL_", "OPENBLAS_", "SLURM_", "SBATCH_", "APPTAINER", "SINGULARITY", "PYTHON", "LC_")
_ENVIRONMENT_NAMES = {"PATH", "HOME", "TMPDIR", "LANG", "TZ", "USER", "LD_LIBRARY_PATH"}


def _is_environment_name(name: str) -> bool:
    return name in _ENVIRONMENT_NAMES or name.startswith(_ENVIRONMENT_PREFIXES)


def _unknown_key_message(name: str, where: str) -> str:
    close = ([RENAMED_KEYS[name]] if name in RENAMED_KEYS else [name.upper()] if name.upper() in KEYS
             else difflib.get_close_matches(name, KEYS, n=1, cutoff=0.6))
    hint = (f"; did you mean {close[0]}?" if close else
            "; lower-case names are free for helper variables (environment such as HF_HOME or OMP_* is allowed too)")
    return f"{where}: unknown key {name}{hint}"


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`KEY=VALUE` command-line arguments as a dict (unknown keys are reported by `load_settings`)."""
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError([f"command line: {item!r} is not KEY=VALUE"])
        overrides[name.strip()] = value
    return overrides


def load_settings(conf: Path | None = None,
                  overrides: dict[str, str] | None = None) -> tuple[Settings, list[tuple[int, str]]]:
    """Read `conf` (if any) and apply `overrides`; return the validated Settings and notes for the log, as (logging
    level, line): warnings for what is likely a mistake (bash's warnings, a variable expanded unset, a key in lower
    case), the rest information.

    Raises ConfigError listing every problem, one line each, before anything is loaded or written.
    """
    overrides = overrides or {}
    raw: dict[str, tuple[str, str]] = {}  # key -> (value, where it came from)
    problems, notes = [], []
    if conf is not None:
        values, set_by_file, warnings = source_conf(conf)
        notes += [(logging.WARNING, warning) for warning in warnings]
        for name in sorted(set_by_file):
            if name[0].isupper() and name not in KEYS and not _is_environment_name(name):
                problems.append(_unknown_key_message(name, str(conf)))
            elif name.upper() in KEYS and name.upper() not in set_by_file:     # a helper, or a key in lower case?
                notes.append((logging.WARNING, f"{conf}: {name} is lower case, so a helper variable of the file, "
                                               f"not the key {name.upper()}"))
        for name in KEYS:
            if name in values:
                raw[name] = (values[name], str(conf))
                if name not in set_by_file:
                    notes.append((logging.INFO, f"{name} taken from the environment"))
    for name, value in overrides.items():
        if name not in KEYS:
            problems.append(_unknown_key_message(name, "command line"))
        else:
            raw[name] = (value, "command line")

    typed = {}
    for name in KEYS:
        if name not in raw:
            continue
        value, where = raw[name]
        try:
            typed[name] = _parse_value(name, value, where)
        except ValueError as error:
            problems.append(str(error))
    settings = Settings(**typed)
    if settings.DATA_FILE is None and "DATA_FILE" not in raw:
        problems.append(f"{conf}: DATA_FILE is not set" if conf is not None else
                        "DATA_FILE is not set: give an experiment file that sets it (`--config configs/demo.conf`, "
                        "say) or DATA_FILE=<records file> on the command line")
    kind = model_kind(settings.MODEL)
    if kind in ("vision-text", "vlm"):
        where = {name: raw[name][1] for name in ("MODEL_WEIGHTS", "TARGETS", "TARGET_NAMES") if name in raw}
        what = "CLIP-like" if kind == "vision-text" else "a generative VLM"
        problems += [f"{where[name]}: {name} applies to classifiers; MODEL={settings.MODEL} is {what} (its maps "
                     f"explain the records' prompts)" for name in where if getattr(settings, name)]
    for name in ("CAM_VERSION", "FALLBACK_CAM"):
        method, where = getattr(settings, name), raw.get(name, ("", str(conf or "command line")))[1]
        if method and (kind == "vlm") != (method == "attention"):
            problems.append(f"{where}: {name}={method}: " + (
                f"MODEL={settings.MODEL} is a generative VLM, whose maps are CAM_VERSION=attention" if kind == "vlm"
                else f"attention maps read a generative VLM (MODEL={VLM_PREFIX}<id> or a LLaVA-style or "
                     f"Gemma-3-style folder)"))
    if kind == "vlm" and settings.TARGET_LAYER != "auto":
        problems.append(f"{raw['TARGET_LAYER'][1]}: TARGET_LAYER applies to the CAM methods; a VLM's attention maps "
                        f"read ATTENTION_LAYERS")
    if model_kind(settings.MODEL) == "detector" and settings.TARGETS:
        problems.append(f"{raw['TARGETS'][1]}: TARGETS applies to classifiers; a detector's maps explain "
                        f"DETECTION_TARGET (topk, sum or box)")
    if problems:
        raise ConfigError(problems, notes)
    if settings.IMAGE_ROOT is None:
        settings = dataclasses.replace(settings, IMAGE_ROOT=settings.DATA_FILE.parent)
    return settings, notes


def default_conf_text() -> str:
    """The text of `configs/default.conf`: every key with its default and one comment line."""
    out = ["# shellcheck shell=bash disable=SC2034  # the settings are read by the program that sources this file",
           "# attention-map: every key with its default. Copy this file to start an experiment.",
           "# The file is bash: it is sourced, so ${RESULTS_ROOT}/name works as under sbatch.",
           "# Upper-case names must be known keys; lower-case names are free for helper variables.", ""]
    for name, f in KEYS.items():
        out.append(f"# {f.metadata['help']}")
        default = f.default
        text = "${RESULTS_ROOT}/default" if name == "OUTPUT_DIR" else _format(default)
        out.append(f'{name}="{text}"')
    return "\n".join(out) + "\n"


def key_table_markdown() -> str:
    """The README's table of every key (a test keeps the README equal to it)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name, f in KEYS.items():
        default = "${RESULTS_ROOT}/default" if name == "OUTPUT_DIR" else _format(f.default)
        rows.append(f"| `{name}` | {f'`{default}`' if default else '(empty)'} | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"
