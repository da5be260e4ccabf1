"""How robust a VLM is to paraphrase (`attention-map robustness OUTPUT_DIR [--compare OTHER]`): for each study (one
film and finding asked about in several paraphrased variants), the accuracy of the answers against `answer_gt` (of
the generated answer, and of P(yes) > 0.5 for a yes/no question), their consistency across the variants (the share
of pairs of variants answered alike), and the agreement of the variants' maps (mean pairwise Spearman correlation,
IoU of the top 15%).

The variants of a study are not independent, so every interval is a cluster bootstrap over studies (a study's
variants resampled together). Two runs (two models on the same records) are compared study by study: the paired
differences and their intervals. Written as robustness.csv (a row per study), robustness.json and robustness.md.

The run's records (its DATA_FILE) carry `study_id`, `variant_id`, `finding`, `question` and `answer_gt` (or
`answer`; `--records` names them where the run's DATA_FILE has moved); the run must have SAVE_RAW_CAM=true.
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import cv2
import numpy as np

from . import outputs
from .evaluate import EvaluationError, cluster_bootstrap, read_raw_map
from .records import DataFileError, q_id_of, read_items
from .saliency import spearman
from .shards import read_run_config
from .timing import progress

METRICS = ("accuracy", "accuracy_p_yes", "consistency", "map_spearman", "map_iou_top")
MAP_SIDE = 64   # maps are compared on a 64 x 64 grid: films differ in size, and the maps are smooth


def normalise_answer(text: str) -> str:
    """An answer as compared: lower case, words only; a yes/no answer as its first word."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    if words and words[0] in ("yes", "no"):
        return words[0]
    return " ".join(words)


def _run_records(output_dir: Path, records: Path | None = None) -> dict[str, dict]:
    """The run's records by q_id, as the manifest names them: `records`, or the run's DATA_FILE (from
    run_config.conf; a relative path is read from the current folder, as the run read it)."""
    data_file = records or read_run_config(output_dir).get("DATA_FILE")
    if not data_file:
        raise EvaluationError(f"{output_dir / outputs.RUN_CONFIG}: not found or names no DATA_FILE; robustness "
                              f"reads a finished run's OUTPUT_DIR")
    data_file = Path(data_file)
    try:
        items = read_items(data_file)
    except (DataFileError, OSError) as error:
        raise EvaluationError(f"{data_file}: the run's records cannot be read ({error}); give them with "
                              f"--records") from None
    return {q_id_of(item, index): item for index, (_, item) in enumerate(items) if isinstance(item, dict)}


def _map(output_dir: Path, name: str) -> np.ndarray:
    return cv2.resize(read_raw_map(output_dir, name), (MAP_SIDE, MAP_SIDE), interpolation=cv2.INTER_AREA)


def _pairwise(values: list, agree) -> float:
    pairs = list(itertools.combinations(values, 2))
    return float(np.mean([agree(a, b) for a, b in pairs])) if pairs else float("nan")


def _top_iou(a: np.ndarray, b: np.ndarray, top_percent: float) -> float:
    masks = [m >= np.quantile(m, 1 - top_percent / 100) for m in (a, b)]
    union = np.logical_or(*masks).sum()
    return float(np.logical_and(*masks).sum() / union) if union else 0.0


def study_scores(output_dir: Path, top_percent: float = 15.0, records: Path | None = None) -> list[dict]:
    """A row per study: its finding, variants, accuracy, consistency and map agreement."""
    output_dir = Path(output_dir)
    rows = outputs.read_manifest(output_dir, "score the robustness of")
    records = _run_records(output_dir, records)
    studies: dict[str, list[tuple[dict, dict]]] = {}
    for row in rows:
        record = records.get(row["q_id"])
        if record is None or not str(record.get("study_id", "")).strip():
            raise EvaluationError(f"{output_dir / outputs.MANIFEST}: the heatmap {row['image_path']} has no study_id "
                                  f"in the run's records (a robustness CSV has study_id,image_path,finding,"
                                  f"variant_id,question,answer_gt)")
        if not row["raw_map"]:
            raise EvaluationError(f"{output_dir}: the run has no raw maps; run it with SAVE_RAW_CAM=true")
        studies.setdefault(str(record["study_id"]).strip(), []).append((row, record))
    scored = []
    for study, members in progress(studies.items(), f"robustness of {output_dir.name}", unit="study"):
        truths = [normalise_answer(str(record.get("answer_gt", record.get("answer", "")))) for _, record in members]
        answers = [normalise_answer(row["model_answer"]) for row, _ in members]
        maps = [_map(output_dir, row["raw_map"]) for row, _ in members]
        # a yes/no question read from P(yes) at the first answer token, however the answer goes on
        by_p_yes = [(float(row["p_yes"]) > 0.5) == (truth == "yes") for (row, _), truth in zip(members, truths)
                    if truth in ("yes", "no") and row.get("p_yes")]
        scored.append(dict(
            study_id=study, finding=str(members[0][1].get("finding", "")), variants=len(members),
            accuracy=float(np.mean([a == t for a, t in zip(answers, truths)])),
            accuracy_p_yes=float(np.mean(by_p_yes)) if by_p_yes else float("nan"),
            consistency=_pairwise(answers, lambda a, b: float(a == b)),
            map_spearman=_pairwise(maps, spearman),
            map_iou_top=_pairwise(maps, lambda a, b: _top_iou(a, b, top_percent))))
    return scored


def _interval(values: list[float], resamples: int, seed: int) -> dict:
    """Mean and 95% interval of one value per study, studies resampled (a study's variants together)."""
    values = np.asarray(values, float)
    return dict(zip(("mean", "low", "high"), cluster_bootstrap(values, np.arange(len(values)), resamples, seed)))


def robustness(output_dir: Path, compare: Path | None = None, top_percent: float = 15.0, resamples: int = 2000,
               seed: int = 0, records: Path | None = None) -> dict:
    """Score a run (and `compare`, another run on the same records) and write robustness.csv/json/md into
    `output_dir`; returns the summary."""
    output_dir = Path(output_dir)
    scored = study_scores(output_dir, top_percent, records)
    summary = {"run": str(output_dir), "studies": len(scored), "heatmaps": sum(s["variants"] for s in scored),
               "top_percent": top_percent, "bootstrap_resamples": resamples,
               "metrics": {name: _interval([s[name] for s in scored], resamples, seed) for name in METRICS}}
    if compare is not None:
        other = {s["study_id"]: s for s in study_scores(Path(compare), top_percent, records)}
        paired = [(s, other[s["study_id"]]) for s in scored if s["study_id"] in other]
        if not paired:
            raise EvaluationError(f"{compare}: no study in common with {output_dir}")
        summary["compared_with"] = {
            "run": str(compare), "studies": len(paired),
            "metrics": {name: _interval([b[name] for _, b in paired], resamples, seed) for name in METRICS},
            "difference": {name: _interval([a[name] - b[name] for a, b in paired], resamples, seed)
                           for name in METRICS}}
    columns = list(scored[0]) if scored else ["study_id"]
    outputs.write_atomic(output_dir / "robustness.csv", outputs.csv_bytes(
        columns, [[f"{s[c]:.6g}" if isinstance(s[c], float) else str(s[c]) for c in columns] for s in scored]))
    outputs.write_atomic(output_dir / "robustness.json", (json.dumps(summary, indent=2) + "\n").encode())
    outputs.write_atomic(output_dir / "robustness.md", markdown(summary).encode())
    return summary


def markdown(summary: dict) -> str:
    def interval(value: dict) -> str:
        return f"{value['mean']:.3f} ({value['low']:.3f} to {value['high']:.3f})"

    compared = summary.get("compared_with")
    lines = [f"# Paraphrase robustness of {summary['run']}", "",
             f"{summary['studies']} studies, {summary['heatmaps']} questions. Means with 95% confidence intervals "
             f"(cluster bootstrap over studies, {summary['bootstrap_resamples']} resamples). Map agreement: mean "
             f"pairwise Spearman correlation and IoU of the top {summary['top_percent']:g}% between a study's "
             f"variants.", ""]
    if compared is None:
        lines += ["| metric | mean (95% CI) |", "|---|---|"]
        lines += [f"| {name} | {interval(value)} |" for name, value in summary["metrics"].items()]
    else:
        lines += [f"Compared with {compared['run']} on the {compared['studies']} studies of both; the difference is "
                  f"this run's minus the other's, paired by study.", "",
                  "| metric | this run | other run | difference |", "|---|---|---|---|"]
        lines += [f"| {name} | {interval(value)} | {interval(compared['metrics'][name])} | "
                  f"{interval(compared['difference'][name])} |" for name, value in summary["metrics"].items()]
    return "\n".join(lines) + "\n"
