"""Evaluation against expert boxes: the metrics on maps with a known answer, the bootstrap, and real runs."""
import csv
import json

import numpy as np
import pytest

from attention_map.evaluate import Boxes, auroc, cluster_bootstrap, evaluate, heatmap_scores, read_truth

from test_cli import REPO, cli


def _blob(shape, centre, sigma=4.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma ** 2))


def test_a_map_peaked_in_the_box_scores_high_and_one_outside_scores_low():
    box = Boxes(((40, 20, 60, 40),)).mask(100, 100)          # x 40..60, y 20..40
    inside = heatmap_scores(_blob((100, 100), (30, 50)), box, top_percent=4)
    assert inside["hit"] == 1 and inside["energy"] > 0.9 and inside["auroc"] > 0.99
    assert inside["energy_ratio"] == pytest.approx(inside["energy"] / 0.04)
    assert inside["iou_top"] > 0.5 and inside["dice_otsu"] > 0.3
    outside = heatmap_scores(_blob((100, 100), (80, 15)), box, top_percent=4)
    assert outside["hit"] == 0 and outside["energy"] < 0.01 and outside["auroc"] < 0.5
    assert outside["iou_top"] == 0 and outside["iou_otsu"] == 0
    empty = heatmap_scores(np.zeros((100, 100)), box, top_percent=4)
    assert empty["hit"] == 0 and empty["energy"] == 0 and empty["auroc"] == pytest.approx(0.5)


@pytest.mark.parametrize("levels", [40, 65536, None])    # heavy ties, a raw map's 16-bit levels, floats off them
def test_pixel_auroc_is_sklearns_on_raw_maps_and_on_any_map(levels, monkeypatch):
    from sklearn.metrics import roc_auc_score

    from attention_map import evaluate as module

    rng = np.random.default_rng(levels or 1)
    heat = rng.random((120, 90)) if levels is None else rng.integers(0, levels, (120, 90)) / 65535
    inside = np.zeros(heat.shape, bool)
    inside[30:70, 20:60] = True
    heat[inside] = np.minimum(heat[inside] * 1.2, heat.max())       # hotter in the box
    if levels:
        heat = np.rint(heat * 65535) / 65535                          # as read from a raw map: counted, not ranked
        monkeypatch.setattr(module, "rankdata", None)
    assert auroc(heat, inside) == pytest.approx(roc_auc_score(inside.ravel(), heat.ravel()), abs=1e-12)
    assert np.isnan(auroc(heat, np.zeros(heat.shape, bool)))


def test_gemex_grid_boxes_scale_to_the_film():
    mask = Boxes(((56, 112, 112, 224),), grid=224).mask(400, 800)   # quarter-width, lower half
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (200, 399, 200, 399)


def test_boxes_that_cannot_be_read_are_left_out_and_named_by_row_and_field(tmp_path):
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("image_path,x,y,w,h,label\n"
                     "a.png,10,20,30,40,nodule\n"
                     "\n"                            # a blank line: the rows below keep their lines' numbers
                     "b.png,,,,,Normal\n"          # a film without a box: no complaint
                     "c.png,10,20,abc,40,x\n"
                     "d.png,10,20,30,0,x\n"
                     "e.png,inf,20,30,40,x\n"
                     "f.png,10,20\n")
    truth, skipped = read_truth(boxes)
    assert truth == {"a.png": [Boxes(((10.0, 20.0, 40.0, 60.0),))]}
    assert skipped == [f"{boxes}:5: w='abc' is not a size above 0 in pixels of the film",
                       f"{boxes}:6: h='0' is not a size above 0 in pixels of the film",
                       f"{boxes}:7: x='inf' is not a coordinate in pixels of the film",
                       f"{boxes}:8: w='' is not a size above 0 in pixels of the film"]
    records = tmp_path / "records.jsonl"
    located = [[[10, 20, 30, 40]], [[10, 20, 30, 40], ["a", 1, 2, 3]], "10,20,30,40", [[10, 20, 5, 40]],
               [[True, 20, 30, 40]]]
    records.write_text("".join(json.dumps(dict(image_path="a.png", question="q", answer="yes", q_id=i,
                                               visual_locations=boxes)) + "\n" for i, boxes in enumerate(located))
                       + '{"image_path": "b.png", "visual_locations": [[1, 2, 3, 4]\n')
    truth, skipped = read_truth(records)
    assert list(truth) == [("a.png", "0")]     # one bad box leaves out its record's boxes (they go by position)
    assert [reason.split(" is not")[0] for reason in skipped] == [
        f"{records}:2: visual_locations[1]=['a', 1, 2, 3]", f"{records}:3: visual_locations[0]='10,20,30,40'",
        f"{records}:4: visual_locations[0]=[10, 20, 5, 40]", f"{records}:5: visual_locations[0]=[True, 20, 30, 40]",
        f"{records}:6: not valid JSON (Expecting ',' delimiter at column 58, where the line ends)"]
    assert skipped[0].endswith("(the 224 x 224 grid); the record's boxes are left out")


def test_the_bootstrap_resamples_films_not_heatmaps():
    # two films, each with 50 identical heatmaps: as independent samples the interval would be tiny
    values = np.r_[np.zeros(50), np.ones(50)]
    films = np.r_[["a"] * 50, ["b"] * 50]
    mean, low, high = cluster_bootstrap(values, films, resamples=2000, seed=1)
    assert mean == 0.5 and low == 0.0 and high == 1.0
    assert cluster_bootstrap(values, films, seed=1) == cluster_bootstrap(values, films, seed=1)


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, tiny_model, cxr):
    out = tmp_path_factory.mktemp("evaluate") / "out"
    result = cli("run", "--config", REPO / "configs/gemex/exp_01_vqa.conf", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}",
                 "PROMPT_SOURCE=both", "OUTPUT_KIND=both")     # the config's SKIP_CRF=true holds for the boxes too
    assert result.returncode == 0, result.stderr
    return out


def test_random_weights_score_at_chance_on_the_real_expert_boxes(random_run, cxr):
    result = cli("evaluate", random_run, "--truth", cxr / "vqa" / "gemex_style_closed_ended.jsonl")
    assert result.returncode == 0, result.stderr
    summary = json.loads((random_run / "evaluation.json").read_text())
    assert summary["heatmaps"] == 47 and summary["films"] == 20 and summary["without_boxes"] == 0
    aggregates = summary["aggregates"]
    for name, chance in (("energy_ratio", 1.0), ("auroc", 0.5)):     # a sanity bound, not a quality bar
        assert aggregates[name]["low"] <= chance <= aggregates[name]["high"], (name, aggregates[name])
    assert aggregates["hit"]["low"] < aggregates["hit"]["mean"] < aggregates["hit"]["high"]
    # the boxes drawn from maps that know nothing find no expert box
    assert aggregates["box_recall"]["mean"] <= 0.2 and aggregates["box_best_iou"]["mean"] < 0.3
    assert aggregates["boxes_predicted"]["mean"] >= 1
    with open(random_run / "evaluation.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 47 and all(0 <= float(r["energy"]) <= 1 for r in rows)
    assert "| auroc |" in (random_run / "evaluation.md").read_text() and "| auroc |" in result.stdout


def test_pixel_box_csv_truth_and_clear_errors(random_run, cxr, tmp_path):
    boxes = tmp_path / "boxes.csv"
    with open(cxr / "annotations" / "nih_bbox.csv", newline="") as source, open(boxes, "w", newline="") as target:
        writer = csv.writer(target)
        writer.writerow(["image_path", "x", "y", "w", "h", "label"])
        for row in csv.DictReader(source):
            writer.writerow([f"nih/{row['image']}", row["x"], row["y"], row["w"], row["h"], row["label"]])
        writer.writerow(["nih/00000001_000.png", "10", "20", "thirty", "40", "typo"])
    result = evaluate(random_run, boxes)
    assert 0 < result.heatmaps < 47 and result.without_boxes == 47 - result.heatmaps
    assert result.skipped_rows == [f"{boxes}:{sum(1 for _ in open(boxes))}: w='thirty' is not a size above 0 in "
                                   f"pixels of the film"]
    assert "1 rows of the truth file could not be read" in (random_run / "evaluation.md").read_text()
    named_otherwise = tmp_path / "named_otherwise.csv"
    named_otherwise.write_text("image_path,x,y,w,h\n00000001_000.png,1,2,3,4\n")
    unmatched = cli("evaluate", random_run, "--truth", named_otherwise)
    assert unmatched.returncode == 2 and "the run's first film is 'nih/" in unmatched.stderr
    assert "the truth's '00000001_000.png')" in unmatched.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("image,x,y\n")
    failed = cli("evaluate", random_run, "--truth", bad)
    assert failed.returncode == 2 and "missing column(s) h, image_path, w" in failed.stderr
    no_run = cli("evaluate", tmp_path, "--truth", boxes)
    assert no_run.returncode == 2 and "vqa_manifest.csv not found" in no_run.stderr
    no_truth = cli("evaluate", random_run, "--truth", tmp_path / "typo.csv")
    assert no_truth.returncode == 2 and no_truth.stderr.strip().splitlines() == [
        f"attention-map: {tmp_path / 'typo.csv'}: no such file (--truth takes GEMeX records with visual_locations, "
        f"JSONL or JSON, or a box CSV image_path,x,y,w,h[,label])"]
