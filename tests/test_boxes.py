"""Boxes from maps: the arithmetic on maps with a known answer, detection scoring, and runs that make them
(OUTPUT_KIND=boxes|both: files, manifest, boxes.jsonl, resume; against the real expert boxes: test_evaluate.py)."""
import json

import numpy as np
import pytest

from attention_map.boxes import box_scores, boxes_from_map, iou
from attention_map.config import load_settings
from attention_map.evaluate import evaluate
from attention_map.synthetic import write_demo_data

from test_cli import cli, read_manifest
from test_robustness import _digests


def _blob(shape, centre, sigma, height=1.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return height * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma ** 2))


def test_one_box_per_region_padded_by_its_own_size_and_ranked_by_mass():
    heat = np.zeros((200, 300), np.float32)
    heat[20:60, 30:110] = 1.0          # 80 x 40, the most mass
    heat[150:170, 250:270] = 0.9       # 20 x 20 near the corner: its padding is clipped
    heat[100:102, 150:152] = 1.0       # 4 pixels: below BOX_MIN_AREA
    boxes = boxes_from_map(heat, threshold=0.5, min_area=0.001, padding=0.1)
    assert [box[:4] for box in boxes] == [(22, 16, 118, 64), (248, 148, 272, 172)]
    assert boxes[0][4] > boxes[1][4] > 0
    assert boxes[0][4] == pytest.approx(3200 / heat.sum(), rel=1e-6)
    tight = boxes_from_map(heat, threshold=0.5, min_area=0.0, padding=0.0)
    assert [box[:4] for box in tight] == [(30, 20, 110, 60), (250, 150, 270, 170), (150, 100, 152, 102)]
    assert boxes_from_map(heat, threshold=0.95, min_area=0.001, padding=0.0)[0][:4] == (30, 20, 110, 60)
    assert len(boxes_from_map(heat, threshold=0.95, min_area=0.001, padding=0.0)) == 1   # 0.9 is below 0.95
    edge = np.zeros((50, 50), np.float32)
    edge[40:50, 0:20] = 1
    assert boxes_from_map(edge, "otsu", 0.0, 0.5)[0][:4] == (0, 35, 30, 50)


def test_otsu_splits_two_blobs_and_flat_maps_give_no_box():
    heat = _blob((128, 128), (40, 40), 6) + _blob((128, 128), (90, 100), 8, height=0.8)
    boxes = boxes_from_map(heat, "otsu", 0.001, 0.0)
    assert len(boxes) == 2
    (u0, v0, u1, v1, _), (x0, y0, x1, y1, _) = boxes      # the wider blob holds more mass: first
    assert x0 < 40 < x1 and y0 < 40 < y1 and u0 < 100 < u1 and v0 < 90 < v1
    assert boxes_from_map(np.zeros((64, 64)), "otsu") == []
    assert boxes_from_map(np.full((64, 64), 0.3), 0.5) == []


def test_detection_scoring_matches_each_true_box_once():
    truth = [(0, 0, 10, 10), (20, 20, 30, 30)]
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    perfect = box_scores([(0, 0, 10, 10, 0.6), (20, 20, 30, 30, 0.4)], truth)
    assert perfect == dict(box_precision=1.0, box_recall=1.0, box_best_iou=1.0, boxes_predicted=2.0)
    # two boxes on the first true box: only one may take it
    twice = box_scores([(0, 0, 10, 10, 0.6), (0, 0, 10, 11, 0.3)], truth)
    assert twice["box_precision"] == 0.5 and twice["box_recall"] == 0.5
    assert twice["box_best_iou"] == pytest.approx((1.0 + 0.0) / 2)
    shifted = box_scores([(5, 0, 15, 10, 1.0)], truth)        # IoU 1/3: no hit at 0.5
    assert shifted["box_precision"] == 0 and shifted["box_recall"] == 0
    assert shifted["box_best_iou"] == pytest.approx(50 / 150 / 2)
    none = box_scores([], truth)
    assert np.isnan(none["box_precision"]) and none["box_recall"] == 0 and none["box_best_iou"] == 0


def test_the_crf_is_on_for_boxes_unless_skip_crf_is_set(tmp_path):
    data = tmp_path / "r.csv"
    data.write_text("image_path,question,answer\n")

    def settings(*items):
        return load_settings(None, dict(item.split("=", 1) for item in (f"DATA_FILE={data}",) + items))[0]

    assert not settings().crf and settings("OUTPUT_KIND=boxes").crf and settings("OUTPUT_KIND=both").crf
    assert not settings("OUTPUT_KIND=boxes", "SKIP_CRF=true").crf and settings("SKIP_CRF=false").crf
    assert settings("BOX_THRESHOLD=OTSU").BOX_THRESHOLD == "otsu" and settings("BOX_THRESHOLD=0.4").BOX_THRESHOLD == "0.4"
    for bad in ("0", "1.5", "half"):
        result = cli("run", f"DATA_FILE={data}", f"BOX_THRESHOLD={bad}")
        assert result.returncode == 2 and f"BOX_THRESHOLD={bad!r} is neither otsu nor a fraction" in result.stderr


def test_boxes_runs_write_box_images_boxes_jsonl_and_resume(tmp_path, tiny_model):
    data = write_demo_data(tmp_path / "data", count=3, size=96)
    out = tmp_path / "boxes"
    args = ("run", f"DATA_FILE={data}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}", "OUTPUT_KIND=boxes")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    rows = read_manifest(out)
    assert len(rows) == 3 and all(row["image_path"].endswith("_idx0_boxes.png") for row in rows)
    pngs = sorted(p.name for p in (out / "films").iterdir())
    assert pngs == [f"synthetic_00{i}_idx0_boxes.png" for i in range(3)]      # no heatmap overlay, no raw map
    lines = [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]
    assert [line["image_path"] for line in lines] == [row["source_image"] for row in rows]
    for line, row in zip(lines, rows):
        assert line["boxes"] == json.loads(row["boxes"]) and line["overlay"] == row["image_path"]
        assert line["q_id"] == row["q_id"] and line["prompt"] == row["prompt"]
        for x0, y0, x1, y1, score in line["boxes"]:
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96 and 0 < score <= 1
    before = _digests(out)
    (out / "films" / "synthetic_001_idx0_boxes.png").unlink()
    again = cli(*args)
    assert "1 heatmaps written, 0 failed, 2 already done" in again.stdout, again.stdout
    assert _digests(out) == before

    both = tmp_path / "both"
    assert cli(*args[:-2], f"OUTPUT_DIR={both}", "OUTPUT_KIND=both", "SAVE_RAW_CAM=true").returncode == 0
    names = sorted(p.name for p in (both / "films").iterdir())
    assert names[:3] == ["synthetic_000_idx0.png", "synthetic_000_idx0_boxes.png", "synthetic_000_idx0_cam.png"]
    rows_both = read_manifest(both)
    assert [row["boxes"] for row in rows_both] == [row["boxes"] for row in rows]    # the same maps, the same boxes
    assert rows_both[0]["image_path"] == "films/synthetic_000_idx0.png"


def test_box_evaluation_scales_gemex_boxes_to_the_film(tmp_path):
    """Boxes equal to the truth score 1; shifted by their own width they score 0 (a fabricated finished run)."""
    out = tmp_path / "run"
    (out / "films").mkdir(parents=True)
    from attention_map import outputs
    outputs.write_png(out / "films" / "a_boxes.png", np.zeros((448, 224, 3), np.uint8))   # film 224 wide, 448 high
    truth = tmp_path / "truth.jsonl"
    truth.write_text(json.dumps({"image_path": "a.png", "q_id": 0, "question": "q", "answer": "a",
                                 "visual_locations": [[10, 20, 60, 80]]}) + "\n")
    header = outputs.MANIFEST_COLUMNS
    for boxes, expected in (([[10, 40, 60, 160, 0.9]], 1.0), ([[60, 40, 110, 160, 0.9]], 0.0)):
        row = dict.fromkeys(header, "") | dict(image_path="films/a_boxes.png", source_image="a.png", q_id="0",
                                              prompt="q", boxes=json.dumps(boxes))
        outputs.write_atomic(out / outputs.MANIFEST, outputs.csv_bytes(header, [[row[c] for c in header]]))
        result = evaluate(out, truth, resamples=10)
        assert result.aggregates["box_recall"][0] == expected
        assert result.aggregates["box_precision"][0] == expected
        assert "hit" not in result.aggregates        # no raw map: no map metrics
