"""`robustness`: per-study accuracy, consistency and map agreement of a VLM's answers to paraphrases, with intervals
by a cluster bootstrap over studies, and two runs compared study by study."""
import csv
import json

import cv2
import numpy as np
import pytest
from scipy.stats import spearmanr

from attention_map import outputs
from attention_map.config import Settings
from attention_map.robustness import normalise_answer, robustness, study_scores

from test_cli import cli, read_manifest


def _fake_run(folder, studies, copies=1):
    """An OUTPUT_DIR as a run leaves it (manifest, raw maps, run_config.conf naming its DATA_FILE) for `studies`:
    {study_id: [(truth, model answer, p_yes, map), ...]}; each variant written `copies` times."""
    folder.mkdir()
    records, rows = [], []
    for study, variants in studies.items():
        for j, (truth, answer, p_yes, heat) in enumerate(variants * copies):
            q_id = str(len(records))
            raw = f"{study}_{j}_cam.png"
            outputs.write_png(folder / raw, np.round(heat * 65535).astype(np.uint16))
            records.append(dict(study_id=study, image_path=f"{study}.png", finding="nodule", variant_id=j,
                                question=f"Is there a nodule ({j})?", answer_gt=truth, q_id=q_id))
            rows.append(dict(image_path=f"{study}_{j}.png", question=f"Is there a nodule ({j})?", answer=truth,
                             q_id=q_id, raw_map=raw, model_answer=answer, p_yes=str(p_yes)))
    data = folder / "records.csv"
    with open(data, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    columns = outputs.MANIFEST_COLUMNS
    outputs.write_atomic(folder / outputs.MANIFEST, outputs.csv_bytes(
        columns, [[row.get(c, "") for c in columns] for row in rows]))
    (folder / outputs.RUN_CONFIG).write_text(Settings(DATA_FILE=data, OUTPUT_DIR=folder).to_conf())
    return folder


def _blob(x, y, size=32):
    yy, xx = np.mgrid[0:size, 0:size]
    return np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 20.0)


def test_answers_are_compared_by_their_words_and_a_yes_or_no_by_its_first_word():
    assert normalise_answer("Yes, there is a small nodule.") == "yes"
    assert normalise_answer("NO.") == "no"
    assert normalise_answer("The Left  upper lobe!") == "the left upper lobe"


def test_per_study_scores_are_what_the_variants_say(tmp_path):
    rng = np.random.default_rng(0)
    noisy = [(_blob(10, 12) + 0.3 * rng.random((32, 32))) / 1.3 for _ in range(3)]
    run = _fake_run(tmp_path / "run", {
        "same": [("yes", "Yes.", 0.9, _blob(8, 8))] * 3,
        "split": [("no", "No.", 0.2, noisy[0]), ("no", "Yes, there is.", 0.7, noisy[1]),
                  ("no", "no", 0.4, noisy[2])],
    })
    scores = {s["study_id"]: s for s in study_scores(run)}
    same, split = scores["same"], scores["split"]
    assert (same["accuracy"], same["accuracy_p_yes"], same["consistency"]) == (1.0, 1.0, 1.0)
    assert same["map_spearman"] == pytest.approx(1.0) and same["map_iou_top"] == pytest.approx(1.0)
    assert split["accuracy"] == pytest.approx(2 / 3) and split["accuracy_p_yes"] == pytest.approx(2 / 3)
    assert split["consistency"] == pytest.approx(1 / 3)       # of the three pairs, (no, no) agrees
    maps = [np.round(m * 65535) / 65535 for m in noisy]
    small = [cv2.resize(m, (64, 64), interpolation=cv2.INTER_AREA) for m in maps]
    expected = np.mean([spearmanr(small[a].ravel(), small[b].ravel())[0] for a, b in ((0, 1), (0, 2), (1, 2))])
    assert split["map_spearman"] == pytest.approx(expected, abs=1e-6)
    assert 0 < split["map_iou_top"] < 1


def test_intervals_resample_studies_not_variants(tmp_path):
    """Repeating every variant of every study adds no information: a bootstrap over studies gives the same accuracy
    interval, where one over variants would narrow it."""
    rng = np.random.default_rng(1)
    studies = {f"s{i}": [("yes", rng.choice(["yes", "no"]), rng.random(), _blob(*rng.integers(4, 28, 2)))
                         for _ in range(2)] for i in range(12)}
    once = robustness(_fake_run(tmp_path / "once", studies), resamples=500)
    thrice = robustness(_fake_run(tmp_path / "thrice", studies, copies=3), resamples=500)
    for name in ("accuracy", "accuracy_p_yes"):
        assert once["metrics"][name] == pytest.approx(thrice["metrics"][name], abs=1e-9), name
    low, high = once["metrics"]["accuracy"]["low"], once["metrics"]["accuracy"]["high"]
    assert low < once["metrics"]["accuracy"]["mean"] < high


def test_two_runs_are_compared_study_by_study(tmp_path):
    good = {f"s{i}": [("yes", "yes", 0.9, _blob(10, 10)), ("yes", "yes", 0.8, _blob(11, 10))] for i in range(6)}
    poor = {f"s{i}": [("yes", "no", 0.3, _blob(10, 10)), ("yes", "yes" if i < 3 else "no", 0.6, _blob(25, 25))]
            for i in range(6)}
    first, second = _fake_run(tmp_path / "good", good), _fake_run(tmp_path / "poor", poor)
    summary = robustness(first, compare=second, resamples=500)
    difference = summary["compared_with"]["difference"]
    assert difference["accuracy"]["mean"] == pytest.approx(1.0 - 0.25)
    assert difference["consistency"]["mean"] == pytest.approx(1.0 - 0.5)
    assert difference["map_spearman"]["low"] > 0          # the poor run's variants look at different places
    same = robustness(first, compare=first, resamples=200)["compared_with"]["difference"]
    assert all(value == {"mean": 0.0, "low": 0.0, "high": 0.0} for value in same.values())
    written = json.loads((first / "robustness.json").read_text())
    assert written["compared_with"]["run"] == str(first)
    assert "| accuracy |" in (first / "robustness.md").read_text()
    assert len(list(csv.DictReader(open(first / "robustness.csv")))) == 6


def test_a_run_without_study_ids_or_raw_maps_gets_one_line(tmp_path):
    run = _fake_run(tmp_path / "run", {"s": [("yes", "yes", 0.9, _blob(5, 5))] * 2})
    rows = read_manifest(run)
    columns = outputs.MANIFEST_COLUMNS
    outputs.write_atomic(run / outputs.MANIFEST, outputs.csv_bytes(
        columns, [[("" if c == "raw_map" else row[c]) for c in columns] for row in rows]))
    result = cli("robustness", run)
    assert result.returncode == 2 and "run it with SAVE_RAW_CAM=true" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    (run / "records.csv").rename(run / "moved.csv")
    result = cli("robustness", run)
    assert result.returncode == 2 and "records.csv: the run's records cannot be read" in result.stderr
    assert "give them with --records" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "run it with SAVE_RAW_CAM=true" in cli("robustness", run, "--records", run / "moved.csv").stderr
    (run / "moved.csv").write_text("image_path,question,answer\nx.png,Is there a nodule?,yes\n")
    result = cli("robustness", run, "--records", run / "moved.csv")
    assert result.returncode == 2 and "has no study_id" in result.stderr


def test_the_paraphrase_example_runs_end_to_end(tmp_path, cxr):
    """The LLaVA example config on the real films with a tiny random LLaVA: a map, an answer and P(yes) per
    variant, then robustness.md and the report's summary."""
    model = tmp_path / "llava"
    assert cli("make-test-model", model, "--arch", "llava").returncode == 0
    out = tmp_path / "out"
    run = cli("run", "--config", "configs/examples/vlm_llava.conf", f"MODEL={model}", f"OUTPUT_DIR={out}",
              f"IMAGE_ROOT={cxr}", "MAX_NEW_TOKENS=2")
    assert run.returncode == 0, run.stderr
    rows = read_manifest(out)
    assert len(rows) == 30 and all(r["p_yes"] for r in rows)
    scored = cli("robustness", out)
    assert scored.returncode == 0, scored.stderr
    summary = json.loads((out / "robustness.json").read_text())
    assert summary["studies"] == 10 and summary["heatmaps"] == 30
    assert cli("report", out).returncode == 0
    assert "Paraphrase robustness over 10 studies" in (out / "index.html").read_text()
