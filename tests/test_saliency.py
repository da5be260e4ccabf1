"""Agreement with clinicians' attention: each saliency metric against formulas written here and against pysaliency
(a published implementation), fixation maps, retrieval, and `evaluate --truth-maps` on fabricated and real runs."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from attention_map import outputs, saliency
from attention_map.agreement import agreement, retrieval
from attention_map.evaluate import EvaluationError

from test_cli import cli

TOLERANCE = 1e-6


def _pysaliency(module: str):
    """One module of pysaliency, loaded from its file alone: its package imports numba and pkg_resources, which the
    metrics do not need (scripts/install.sh installs it without them)."""
    spec = importlib.util.find_spec("pysaliency")
    assert spec is not None, "pysaliency is not installed: run scripts/install.sh"
    folder = Path(spec.submodule_search_locations[0])
    path = folder / "metrics.py" if module == "metrics" else next(folder.glob("roc_cython*.so"))
    loaded = importlib.util.module_from_spec(importlib.util.spec_from_file_location(module, path))
    loaded.__spec__.loader.exec_module(loaded)
    return loaded


@pytest.fixture(scope="module")
def pys():
    return _pysaliency("metrics")


@pytest.fixture(scope="module")
def roc(monkeypatch_module):
    # pysaliency 0.2.22's compiled ROC calls np.trapz, which numpy 2.4 removed; np.trapezoid is the same function
    monkeypatch_module.setattr(np, "trapz", np.trapezoid, raising=False)
    return _pysaliency("roc_cython")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _case(seed: int):
    """A smooth model map, a clinicians' density and a few fixations (continuous values: no ties)."""
    rng = np.random.default_rng(seed)
    shape = (48, 64)
    heat = saliency.fixation_map(rng.uniform(0, 64, (6, 3)) * [1, 0.75, 1], shape, 5) + rng.uniform(0, 1e-4, shape)
    points = np.c_[rng.uniform(0, 63, 12), rng.uniform(0, 47, 12), rng.uniform(0.1, 1, 12)]
    truth = saliency.fixation_map(points, shape, 4)
    return heat, truth, saliency.fixation_mask(points, shape), points


@pytest.mark.parametrize("seed", range(4))
def test_distribution_metrics_match_the_formulas_and_pysaliency(seed, pys):
    heat, truth, _, _ = _case(seed)
    a, b = heat.ravel(), truth.ravel()
    pearson = np.sum((a - a.mean()) * (b - b.mean())) / np.sqrt(np.sum((a - a.mean()) ** 2) * np.sum((b - b.mean()) ** 2))
    p, q = b / b.sum(), a / a.sum()
    kl = np.sum(p * np.log(2.2204e-16 + p / (q + 2.2204e-16)))
    intersection = np.sum(np.minimum(p, q))
    assert saliency.cc(heat, truth) == pytest.approx(pearson, abs=TOLERANCE)
    assert saliency.cc(heat, truth) == pytest.approx(pys.CC(heat, truth), abs=TOLERANCE)
    assert saliency.kl(heat, truth) == pytest.approx(kl, abs=TOLERANCE)
    assert saliency.kl(heat, truth) == pytest.approx(pys.MIT_KLDiv(heat, truth), abs=TOLERANCE)
    assert saliency.sim(heat, truth) == pytest.approx(intersection, abs=TOLERANCE)
    assert saliency.sim(heat, truth) == pytest.approx(pys.SIM(heat, truth), abs=TOLERANCE)
    assert saliency.cc(truth, truth) == pytest.approx(1) and saliency.kl(truth, truth) == pytest.approx(0, abs=1e-9)
    assert saliency.sim(truth, truth) == pytest.approx(1)


@pytest.mark.parametrize("seed", range(4))
def test_location_metrics_match_the_formulas_and_pysaliency(seed, pys, roc):
    heat, _, fixated, points = _case(seed)
    rows, columns = np.nonzero(fixated)
    standard = (heat - heat.mean()) / heat.std()
    assert saliency.nss(heat, fixated) == pytest.approx(standard[fixated].mean(), abs=TOLERANCE)
    assert saliency.nss(heat, fixated) == pytest.approx(np.mean(pys.NSS(heat, columns, rows)), abs=TOLERANCE)

    # AUC-Judd as the MIT saliency benchmark's code computes it, one threshold per fixated pixel
    values, count = heat.ravel(), int(fixated.sum())
    thresholds = np.sort(heat[fixated])[::-1]
    tp, fp = [0.0], [0.0]
    for i, threshold in enumerate(thresholds, start=1):
        tp.append(i / count)
        fp.append(((values >= threshold).sum() - i) / (values.size - count))
    tp.append(1.0)
    fp.append(1.0)
    judd = sum((fp[i + 1] - fp[i]) * (tp[i + 1] + tp[i]) / 2 for i in range(len(tp) - 1))
    assert saliency.auc_judd(heat, fixated) == pytest.approx(judd, abs=TOLERANCE)
    pys_judd = roc.general_roc(heat[fixated].astype(float), heat[~fixated].astype(float), judd=1)[0]
    assert saliency.auc_judd(heat, fixated) == pytest.approx(pys_judd, abs=TOLERANCE)

    # shuffled AUC: the map at the fixations against the map at other films' fixated places
    other = saliency.fixation_mask(np.random.default_rng(seed + 100).uniform(0, 47, (40, 2)), heat.shape)
    negatives = heat[other & ~fixated]
    pairs = (heat[fixated][:, None] > negatives[None]).mean() + 0.5 * (heat[fixated][:, None] == negatives[None]).mean()
    assert saliency.auc_shuffled(heat, fixated, other) == pytest.approx(pairs, abs=TOLERANCE)
    pys_shuffled = roc.general_roc(heat[fixated].astype(float), negatives.astype(float))[0]
    assert saliency.auc_shuffled(heat, fixated, other) == pytest.approx(pys_shuffled, abs=TOLERANCE)

    # information gain over a baseline, in bits per fixation (Kuemmerer et al.)
    base = saliency.centre_baseline(heat.shape)
    gain = np.mean(np.log2(2.220446049250313e-16 + (heat / heat.sum())[fixated])
                   - np.log2(2.220446049250313e-16 + (base / base.sum())[fixated]))
    assert saliency.information_gain(heat, base, fixated) == pytest.approx(gain, abs=TOLERANCE)
    assert saliency.information_gain(base, base, fixated) == 0


def test_location_metrics_rank_the_map_of_the_fixations_above_chance_and_its_inverse_below():
    heat, truth, fixated, _ = _case(7)
    assert saliency.auc_judd(truth, fixated) > 0.85 and saliency.nss(truth, fixated) > 1.5
    assert saliency.auc_judd(truth.max() - truth, fixated) < 0.15
    assert np.isnan(saliency.nss(heat, np.zeros(heat.shape, bool)))


def test_a_fixation_map_is_a_duration_weighted_gaussian_density():
    density = saliency.fixation_map([(20, 10, 1.0), (60, 30, 3.0)], (40, 80), sigma=3)
    assert density.sum() == pytest.approx(1)
    assert density[30, 60] / density[10, 20] == pytest.approx(3, rel=1e-6)
    single = saliency.fixation_map([(40, 20, 0.5)], (41, 81), sigma=4)
    rows, columns = np.mgrid[:41, :81]
    assert np.sum(single * (columns - 40) ** 2) == pytest.approx(16, rel=0.02)       # the variance is sigma squared
    assert not saliency.fixation_map([(500, 5, 1.0)], (40, 80), 3).any()               # off the film: no map
    assert saliency.fixation_mask([(2.4, 1.6), (-1, 0)], (4, 4)).sum() == 1


def test_retrieval_finds_each_case_when_the_maps_are_the_truth_and_chance_when_shuffled():
    truths = [_case(seed)[1] for seed in range(12)]
    perfect = retrieval(truths, truths, permutations=200)
    assert perfect["model_to_clinician_r@1"]["value"] == 1 and perfect["clinician_to_model_r@1"]["value"] == 1
    assert perfect["model_to_clinician_r@1"]["chance"] == pytest.approx(1 / 12)
    assert perfect["model_to_clinician_r@1"]["p"] == pytest.approx(1 / 201)
    shuffled = retrieval(truths[1:] + truths[:1], truths, permutations=200)
    assert shuffled["model_to_clinician_r@5"]["value"] < 1 and shuffled["model_to_clinician_r@1"]["p"] > 0.05


def _fabricated_run(folder: Path, maps: dict[str, np.ndarray]) -> None:
    """A finished run whose raw maps are `maps` (film name -> map in [0, 1])."""
    header = outputs.MANIFEST_COLUMNS
    rows = []
    for name, heat in maps.items():
        raw = f"{name[:-4]}_idx0_cam.png"
        outputs.write_png(folder / raw, np.round(heat / heat.max() * 65535).astype(np.uint16))
        rows.append(dict.fromkeys(header, "") | dict(image_path=f"{name[:-4]}_idx0.png", source_image=name, q_id="0",
                                                    prompt="where?", raw_map=raw))
    outputs.write_atomic(folder / outputs.MANIFEST, outputs.csv_bytes(header, [[r[c] for c in header] for r in rows]))


def test_evaluate_truth_maps_from_fixations_and_from_a_folder(tmp_path):
    rng = np.random.default_rng(3)
    fixations = {f"f{i}.png": np.c_[rng.uniform(10, 90, 8), rng.uniform(10, 70, 8), rng.uniform(0.2, 1, 8)]
                 for i in range(6)}
    truth = {name: saliency.fixation_map(points, (80, 100), 6) for name, points in fixations.items()}
    _fabricated_run(tmp_path / "run", truth)                 # the model's maps are the clinicians' maps
    gaze = tmp_path / "gaze.csv"
    lines = ["image_path,x,y,duration,reader"] + [f"{name},{x},{y},{d},1" for name, p in fixations.items()
                                                   for x, y, d in p]
    gaze.write_text("\n".join(lines + ["f0.png,abc,3,0.5,1", "f1.png,3,4,-1,1", "f2.png,3,4,0.5,1"]) + "\n")
    with pytest.raises(EvaluationError, match="missing column"):
        (tmp_path / "bad.csv").write_text("image_path,x,y\n")
        agreement(tmp_path / "run", tmp_path / "bad.csv")
    result = cli("evaluate", tmp_path / "run", "--truth-maps", gaze, "--gaze-sigma", "6", "--baseline", "centre")
    assert result.returncode == 0, result.stderr
    assert f"{gaze}:50: x='abc' is not a pixel coordinate" in result.stderr
    assert f"{gaze}:51: duration='-1' is not a duration in seconds" in result.stderr
    summary = json.loads((tmp_path / "run" / "agreement.json").read_text())
    aggregates = summary["aggregates"]
    assert summary["heatmaps"] == 6 and len(summary["skipped_rows"]) == 2
    # f2's extra fixation moves its clinician map a little away from the model's map
    assert 0.95 < aggregates["cc"]["mean"] < 1 and aggregates["sim"]["mean"] > 0.9 and aggregates["kl"]["mean"] < 0.1
    assert aggregates["auc_judd"]["mean"] > 0.9 and aggregates["nss"]["mean"] > 2 and aggregates["info_gain"]["mean"] > 0
    assert summary["retrieval"]["model_to_clinician_r@1"]["value"] == 1
    assert (tmp_path / "run" / "agreement.md").read_text().startswith("# Agreement of 6 heatmaps on 6 films")
    from attention_map.report import write_report
    assert "clinicians: CC 1.00, NSS" in write_report(tmp_path / "run")[0].read_text()     # shown in the gallery

    folder = tmp_path / "maps"                                # the same maps as PNGs, read as they are
    for name, density in truth.items():
        outputs.write_png(folder / name, np.round(density / density.max() * 255).astype(np.uint8))
    from_folder = agreement(tmp_path / "run", folder)
    assert from_folder.aggregates["cc"][0] > 0.99 and "nss" not in from_folder.aggregates
    assert from_folder.retrieval["clinician_to_model_r@1"]["value"] == 1
    assert "Clinicians' maps: PNGs as they are." in from_folder.markdown() and "sigma" not in from_folder.markdown()
    (folder / "f3.png").write_bytes(b"not a png")              # one damaged map costs only its film's heatmaps
    damaged = agreement(tmp_path / "run", folder)
    assert (damaged.heatmaps, damaged.without_truth) == (5, 1)
    assert damaged.skipped_rows == [f"{folder / 'f3.png'}: not a readable PNG; its film's heatmaps are not scored"]
    missing = cli("evaluate", tmp_path / "run", "--truth-maps", tmp_path / "nowhere")
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr


def test_films_no_clinician_looked_at_are_counted_apart_from_the_scored(tmp_path):
    # eye-gaze datasets cover some of a dataset's films; a run on all of them crashed on the first film without any
    rng = np.random.default_rng(5)
    fixations = {f"f{i}.png": np.c_[rng.uniform(10, 90, 6), rng.uniform(10, 70, 6), rng.uniform(0.2, 1, 6)]
                 for i in range(4)}
    maps = {name: saliency.fixation_map(points, (80, 100), 6) for name, points in fixations.items()}
    _fabricated_run(tmp_path / "run", maps | {"unseen.png": maps["f0.png"]})
    gaze = tmp_path / "gaze.csv"
    gaze.write_text("image_path,x,y,duration\n" + "".join(f"{name},{x},{y},{d}\n" for name, points in
                                                          fixations.items() for x, y, d in points))
    result = agreement(tmp_path / "run", gaze, sigma=6, baseline="centre")
    assert (result.heatmaps, result.films, result.without_truth) == (4, 4, 1)
    assert result.aggregates["cc"][0] > 0.99 and result.retrieval["cases"] == 4
    other = tmp_path / "other.csv"                        # fixations named otherwise than the run names its films
    other.write_text("image_path,x,y,duration\nimages/f0.png,10,10,1\n")
    with pytest.raises(EvaluationError, match=r"the run's first film is 'f0.png', the fixations' 'images/f0.png'\)"):
        agreement(tmp_path / "run", other)
    next((tmp_path / "run").glob("f2*")).unlink()           # a run's file gone: the message says how to remake it
    with pytest.raises(EvaluationError, match=r"f2.*cannot read it .*RESUME=true\) remakes the run's missing"):
        agreement(tmp_path / "run", gaze)


def test_inter_reader_agreement_is_the_ceiling_of_two_or_more_readers(tmp_path):
    from attention_map.agreement import read_gaze

    gaze = tmp_path / "gaze.csv"
    same = [f"a.png,{x},{y},0.5,{reader}" for reader in ("r1", "r2") for x, y in ((10, 10), (40, 30))]
    apart = ["b.png,10,10,0.5,r1", "b.png,12,8,0.5,r1", "b.png,50,35,0.5,r2"]
    gaze.write_text("\n".join(["image_path,x,y,duration,reader"] + same + apart + ["c.png,5,5,1,r1"]) + "\n")
    read = read_gaze(gaze)
    assert read.inter_reader_cc("a.png", "", (40, 60), 4) == pytest.approx(1)       # they looked at the same places
    assert read.inter_reader_cc("b.png", "", (40, 60), 4) < 0.1                      # at different places
    assert np.isnan(read.inter_reader_cc("c.png", "", (40, 60), 4))                  # one reader: no ceiling
    assert read.truth_map("a.png", "", (40, 60), 4).sum() == pytest.approx(1)         # the readers pooled
