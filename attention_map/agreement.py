"""A run's maps against where clinicians looked: eye-gaze fixations (a CSV) or clinicians' attention maps (a folder of
PNGs), scored per heatmap by the saliency metrics (attention_map.saliency) with cluster-bootstrap intervals over
films, and by retrieval (does a case's model map pick out its own clinician map among all cases'?).

Fixations CSV: image_path, x, y, duration (film pixels, seconds), optional frame (of a clip or multi-frame DICOM;
fixations without one hold for every frame that has none of its own) and reader. A film's fixations, all readers
together, become a map by a Gaussian of `sigma` pixels per fixation weighted by its duration. A folder holds one
grey PNG per film, at the film's path with the extension .png (a frame's: `<name>_f<frame>.png`, else the clip's
`<name>.png`), read as is.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from . import outputs, saliency
from .evaluate import (EvaluationError, cluster_bootstrap, metric_table, png_size, read_raw_map,
                       write_results)
from .timing import progress

log = logging.getLogger(__name__)

MAP_METRICS = ("cc", "kl", "sim")                                  # map against map
LOCATION_METRICS = ("nss", "auc_judd", "auc_shuffled")             # map against the fixated pixels
RETRIEVAL_GRID = 64       # maps are compared for retrieval on a 64 x 64 grid (films differ in size)
PERMUTATIONS = 1000


@dataclass
class Gaze:
    """Where clinicians looked: fixations (x, y, duration) per (image_path, frame) from a CSV, or a folder of maps."""
    fixations: dict = field(default_factory=dict)
    readers: dict = field(default_factory=dict)    # the `reader` of each fixation, in the same order
    folder: Path | None = None
    skipped: list = field(default_factory=list)    # one-line reasons for the CSV rows that could not be read

    def _key(self, image_path: str, frame: str) -> tuple[str, str]:
        """Fixations recorded for a frame, else for the whole clip or object (no `frame`): those hold for every frame."""
        return (image_path, frame) if (image_path, frame) in self.fixations else (image_path, "")

    def points(self, image_path: str, frame: str) -> list | None:
        return self.fixations.get(self._key(image_path, frame)) if self.folder is None else None

    def inter_reader_cc(self, image_path: str, frame: str, shape: tuple[int, int], sigma: float) -> float:
        """How well the readers of a film agree: the mean over readers of the CC between one reader's map and the
        map of all the others (a ceiling for a model's CC); NaN where fewer than two readers looked."""
        key = self._key(image_path, frame)
        points, readers = self.fixations.get(key, []), self.readers.get(key, [])
        names = sorted(set(readers))
        if self.folder is not None or len(names) < 2:
            return float("nan")
        agreement = []
        for name in names:
            mine = [point for point, reader in zip(points, readers) if reader == name]
            others = [point for point, reader in zip(points, readers) if reader != name]
            agreement.append(saliency.cc(saliency.fixation_map(mine, shape, sigma),
                                         saliency.fixation_map(others, shape, sigma)))
        return float(np.mean(agreement))

    def truth_map(self, image_path: str, frame: str, shape: tuple[int, int], sigma: float) -> np.ndarray | None:
        """The clinicians' map of a film (or frame) at `shape`, or None where there is none."""
        if self.folder is None:
            points = self.points(image_path, frame)
            return None if not points else saliency.fixation_map(points, shape, sigma)
        relative = PurePosixPath(image_path)
        path = self.folder / relative.parent / (relative.stem + (f"_f{frame}" if frame else "") + ".png")
        if not path.is_file():       # a frame without its own map takes the clip's
            path = self.folder / relative.parent / (relative.stem + ".png")
        if not path.is_file():
            return None
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:            # one damaged map costs only its film's heatmaps
            reason = f"{path}: not a readable PNG; its film's heatmaps are not scored"
            if reason not in self.skipped:
                log.warning("%s", reason)
                self.skipped.append(reason)
            return None
        return _resized(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image, shape)


def _resized(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A map as float64 at `shape` (height, width), averaged down or interpolated up where it has another size."""
    image = image.astype(np.float64)
    return image if image.shape == shape else cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def read_gaze(path: Path) -> Gaze:
    """A fixations CSV or a folder of clinicians' maps. A CSV row that cannot be read is skipped and named in
    `skipped` (file, row, field and why); a CSV without the needed columns raises EvaluationError."""
    path = Path(path)
    if path.is_dir():
        return Gaze(folder=path)
    if not path.is_file():
        raise EvaluationError(f"{path}: no such file or folder (--truth-maps takes a fixations CSV or a folder of PNGs)")
    gaze = Gaze()
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {"image_path", "x", "y", "duration"} - set(reader.fieldnames or [])
        if missing:
            raise EvaluationError(f"{path}:1: missing column(s) {', '.join(sorted(missing))} (a fixations CSV needs "
                                  f"image_path,x,y,duration[,frame][,reader])")
        for row in reader:
            line = reader.line_num     # the file's line (blank lines are skipped, not counted out)
            values = {}
            for name in ("x", "y", "duration"):
                try:
                    values[name] = float(row[name])
                except (TypeError, ValueError):
                    values[name] = None
                if values[name] is None or not np.isfinite(values[name]) or (name == "duration" and values[name] < 0):
                    gaze.skipped.append(f"{path}:{line}: {name}={row[name]!r} is not a "
                                        f"{'duration in seconds' if name == 'duration' else 'pixel coordinate'}")
                    break
            else:
                frame = (row.get("frame") or "").strip()
                if frame and not frame.isdigit():
                    gaze.skipped.append(f"{path}:{line}: frame={frame!r} is not a frame number")
                    continue
                key = ((row["image_path"] or "").strip(), frame)
                gaze.fixations.setdefault(key, []).append((values["x"], values["y"], values["duration"]))
                gaze.readers.setdefault(key, []).append((row.get("reader") or "").strip())
    return gaze


def _grid(image: np.ndarray) -> np.ndarray:
    return cv2.resize(image.astype(np.float32), (RETRIEVAL_GRID, RETRIEVAL_GRID), interpolation=cv2.INTER_AREA)


def retrieval(model_maps: list[np.ndarray], truth_maps: list[np.ndarray], ks=(1, 5), permutations=PERMUTATIONS,
              seed: int = 0) -> dict:
    """R@k both ways for cases whose model map i and clinician map i belong together: model -> clinician is the share
    of cases whose own clinician map is among the k clinician maps most correlated (CC) with its model map, and
    clinician -> model the same the other way. Chance is k / cases; `p` is the share of random pairings of the maps
    (and the observed one) that reach at least the observed R@k."""
    count = len(model_maps)
    similarity = np.array([[saliency.cc(m, t) for t in truth_maps] for m in model_maps])

    def recall(matrix: np.ndarray, k: int) -> float:
        own = np.diagonal(matrix)[:, None]
        return float(np.mean((matrix > own).sum(axis=1) < k))

    rng = np.random.default_rng(seed)
    orders = [rng.permutation(count) for _ in range(permutations)]
    result = {"cases": count}
    for direction, matrix in (("model_to_clinician", similarity), ("clinician_to_model", similarity.T)):
        for k in ks:
            observed = recall(matrix, k)
            shuffled = np.array([recall(matrix[:, order], k) for order in orders])
            result[f"{direction}_r@{k}"] = dict(value=observed, chance=min(k, count) / count,
                                                p=float((1 + (shuffled >= observed).sum()) / (1 + permutations)))
    return result


@dataclass
class Agreement:
    heatmaps: int
    films: int
    without_truth: int
    sigma: str             # of the fixations' Gaussian; empty for a folder of maps
    baseline: str
    aggregates: dict
    retrieval: dict
    clips: dict            # per clip (or multi-frame object): frames scored and each metric's mean over them
    skipped_rows: list

    def markdown(self) -> str:
        lines = [f"# Agreement of {self.heatmaps} heatmaps on {self.films} films with the clinicians' maps", "",
                 "Means with 95% confidence intervals (cluster bootstrap over films). " +
                 (f"Fixation maps: Gaussian sigma {self.sigma}. " if self.sigma else
                  "Clinicians' maps: PNGs as they are. ") +
                 f"{self.without_truth} heatmaps had no clinician map and are not counted." +
                 (f" {len(self.skipped_rows)} rows of the fixations file or maps of the folder could not be read (see "
                  f"agreement.json)." if self.skipped_rows else ""), ""] + metric_table(self.aggregates)
        if self.retrieval.get("cases", 0) > 1:
            lines += ["", f"Retrieval over {self.retrieval['cases']} films or clips (a clip's frames together; CC on "
                      f"a {RETRIEVAL_GRID} x {RETRIEVAL_GRID} grid; p from {PERMUTATIONS} random pairings):", "",
                      "| direction | R@k | chance | p |",
                      "|---|---|---|---|"]
            for name, value in self.retrieval.items():
                if name != "cases":
                    lines.append(f"| {name} | {value['value']:.3f} | {value['chance']:.3f} | {value['p']:.4f} |")
        if self.clips:
            names = [name for name in next(iter(self.clips.values())) if name != "frames"]
            lines += ["", "Over each clip (means over its frames):", "", f"| clip | frames | {' | '.join(names)} |",
                      "|---|---|" + "---|" * len(names)]
            for clip, values in self.clips.items():
                lines.append(f"| {clip} | {values['frames']} | " + " | ".join(f"{values[n]:.3f}" for n in names) + " |")
        return "\n".join(lines) + "\n"


def agreement(output_dir: Path, truth_path: Path, sigma: float | None = None, baseline: str | None = None,
              resamples: int = 2000, seed: int = 0) -> Agreement:
    """Score every heatmap of a finished run (SAVE_RAW_CAM=true) against the clinicians' maps; writes
    agreement.csv, agreement.json and agreement.md. `sigma`: pixels (None: 3% of the film's larger side);
    `baseline`: 'centre' or a PNG, for the information gain of the model's map over it."""
    output_dir, truth_path = Path(output_dir), Path(truth_path)
    manifest = output_dir / outputs.MANIFEST
    try:
        rows = outputs.read_manifest(output_dir, "compare")
    except FileNotFoundError as error:
        raise EvaluationError(str(error)) from None
    if rows and not rows[0]["raw_map"]:
        raise EvaluationError(f"{manifest}: the run kept no raw maps; run it again with SAVE_RAW_CAM=true "
                              f"(RESUME makes only the missing files)")
    gaze = read_gaze(truth_path)
    for reason in gaze.skipped:
        log.warning("%s", reason)
    baseline_map = None
    if baseline not in (None, "centre", "center"):
        if not Path(baseline).is_file():
            raise EvaluationError(f"{baseline}: no such file (--baseline takes 'centre' or a PNG map)")
        baseline_map = cv2.imread(str(baseline), cv2.IMREAD_GRAYSCALE)
        if baseline_map is None:
            raise EvaluationError(f"{baseline}: the baseline is neither 'centre' nor a readable PNG")

    shapes = {}                  # (film, frame) -> (height, width), from the raw maps' headers
    for row in rows:
        key = (row["source_image"], row.get("frame", ""))
        if key not in shapes:
            width, height = png_size(output_dir / row["raw_map"])
            shapes[key] = (height, width)
    # shuffled AUC: every film's fixated places, as fractions of its width and height, and whose they are
    number = {film: i for i, film in enumerate(sorted({key[0] for key in shapes}))}
    spots = [(number[key[0]], x / shape[1], y / shape[0]) for key, shape in shapes.items()
             for x, y, _ in gaze.points(*key) or []]
    places = np.array(spots, np.float64).reshape(-1, 3)

    readers = {}          # (film, frame) -> the readers' agreement with each other

    def film_truth(key: tuple[str, str]) -> dict:
        """What every map of one film (or frame) is scored against, made once for all its prompts."""
        shape = shapes[key]
        film_sigma = sigma if sigma else 0.03 * max(shape)
        truth = dict(map=gaze.truth_map(*key, shape, film_sigma))
        if key not in readers:
            readers[key] = gaze.inter_reader_cc(*key, shape, film_sigma)
        if truth["map"] is None:      # no clinician looked at this film: its heatmaps are not scored
            return truth
        if gaze.folder is None:       # location metrics need the fixated pixels themselves
            elsewhere = places[places[:, 0] != number[key[0]]]
            truth |= dict(fixated=saliency.fixation_mask(gaze.points(*key), shape),
                          others=saliency.fixation_mask(np.c_[elsewhere[:, 1] * shape[1],
                                                              elsewhere[:, 2] * shape[0]], shape))
            if baseline is not None:
                truth["base"] = (saliency.centre_baseline(shape) if baseline_map is None
                                 else _resized(baseline_map, shape))
        return truth

    table, without = [], 0
    grids: dict = {}      # film or clip -> [sum of its model maps, their count, {frame: clinician map}], retrieval grid
    current = (None, {})  # the last film's key and what it is scored against (a film's rows are usually together)
    for row in progress(rows, "agreement"):
        key = (row["source_image"], row.get("frame", ""))
        if current[0] != key:
            current = (key, film_truth(key))
        film = current[1]
        truth = film["map"]
        if truth is None or truth.max() <= 0:
            without += 1
            continue
        heat = read_raw_map(output_dir, row["raw_map"])
        scores = dict(image_path=row["image_path"], source_image=row["source_image"], frame=row.get("frame", ""),
                      prompt=row["prompt"], cc=saliency.cc(heat, truth), kl=saliency.kl(heat, truth),
                      sim=saliency.sim(heat, truth))
        if "fixated" in film:
            scores |= dict(nss=saliency.nss(heat, film["fixated"]), auc_judd=saliency.auc_judd(heat, film["fixated"]),
                           auc_shuffled=saliency.auc_shuffled(heat, film["fixated"], film["others"]))
        if "base" in film:
            scores["info_gain"] = saliency.information_gain(heat, film["base"], film["fixated"])
        table.append(scores)
        # retrieval is by film or clip: a clip's frames (and prompts) together, their model and clinician maps summed
        entry = grids.setdefault(key[0], [np.zeros((RETRIEVAL_GRID,) * 2, np.float32), 0, {}])
        entry[0] += _grid(heat)
        entry[1] += 1
        entry[2].setdefault(key[1], _grid(truth / truth.sum()))
    if not table:
        first = rows[0]["source_image"] if rows else None
        if gaze.folder is not None:
            theirs = f"looked for at {truth_path / Path(first).with_suffix('.png')}" if first else "an empty run"
        elif gaze.fixations:
            theirs = f"the fixations' {next(iter(gaze.fixations))[0]!r}"
        else:
            theirs = "the fixations file has no row it could read"
        raise EvaluationError(f"no heatmap of {manifest} has a clinician map in {truth_path} (matched by the film's "
                              f"image_path and frame; the run's first film is {first!r}, {theirs})")

    films = np.array([s["source_image"] for s in table])
    names = [name for name in MAP_METRICS + LOCATION_METRICS + ("info_gain",) if name in table[0]]
    aggregates = {name: cluster_bootstrap(np.array([s[name] for s in table]), films, resamples, seed) for name in names}
    if any(np.isfinite(list(readers.values()))):
        aggregates["inter_reader_cc"] = cluster_bootstrap(np.array(list(readers.values())),
                                                          np.array([key[0] for key in readers]), resamples, seed)
    found = retrieval([total / count for total, count, _ in grids.values()],
                      [sum(truths.values()) for *_, truths in grids.values()], seed=seed) if len(grids) > 1 else {}
    by_clip: dict[str, list[dict]] = {}
    for scores in table:
        if scores["frame"]:
            by_clip.setdefault(scores["source_image"], []).append(scores)
    clips = {clip: {"frames": len({s["frame"] for s in members})} |
             {name: _mean_of_values([s[name] for s in members]) for name in names}
             for clip, members in by_clip.items()}
    result = Agreement(len(table), len(set(films)), without,
                       "" if gaze.folder is not None else f"{sigma:g} px" if sigma else "3% of each film's larger side",
                       "" if baseline is None else str(baseline), aggregates, found, clips, gaze.skipped)
    write_results(output_dir, "agreement", table, result, truth=str(truth_path), bootstrap_resamples=resamples,
                  seed=seed)
    return result


def _mean_of_values(values: list[float]) -> float:
    """The mean of a clip's frames where a metric has a value; NaN (no value) where no frame has one."""
    values = [value for value in values if not np.isnan(value)]
    return float(np.mean(values)) if values else float("nan")
