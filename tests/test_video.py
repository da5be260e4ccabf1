"""Video clips: frames read as films, one map per (frame, prompt) with FRAME_STRIDE and MAX_FRAMES, an overlay clip
per (clip, prompt), bad clips as one line each in errors.csv, and clinicians' maps scored per frame and per clip."""
import csv
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from attention_map import clips
from attention_map.images import ImageError, frame_count, read_film
from attention_map.synthetic import make_clip, write_demo_clips

from test_cli import REPO, cli, read_manifest


@pytest.fixture(scope="module")
def clip_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    records = write_demo_clips(folder, count=2, frames=6, size=96)
    (folder / "clips" / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 50)
    empty = cv2.VideoWriter(str(folder / "clips" / "empty.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    empty.release()                                               # a container that opens, with no frame in it
    lines = records.read_text().splitlines()
    lines.append(json.dumps({"question": "q?", "answer": "a", "image_path": "clips/garbage.mp4", "q_id": 0}))
    lines.append(json.dumps({"question": "q?", "answer": "a", "image_path": "clips/missing.avi", "q_id": 0}))
    lines.append(json.dumps({"question": "q?", "answer": "a", "image_path": "clips/empty.avi", "q_id": 0}))
    records.write_text("\n".join(lines) + "\n")
    return folder


def test_a_frame_of_a_clip_reads_as_the_same_frame_decoded_in_order(clip_data):
    path = clip_data / "clips" / "clip_100.mp4"
    assert frame_count(path) == 6
    capture = cv2.VideoCapture(str(path))
    for index in range(6):
        ok, image = capture.read()
        film = read_film(path, frame=index)
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2RGB).astype(np.float64) @ [0.299, 0.587, 0.114] / 255
        assert ok and film.frame == index and film.pixels.shape == (96, 96)
        assert np.abs(film.pixels - grey).max() < 1e-6                   # the seek lands on the frame itself
    with pytest.raises(ImageError, match="frame 6 asked of a video with 6 frames"):
        read_film(path, frame=6)
    with pytest.raises(ImageError, match="unreadable video"):
        read_film(clip_data / "clips" / "garbage.mp4")
    shots, lesions = make_clip(100, 6, 96)
    assert lesions[0].box != lesions[3].box and not np.array_equal(shots[0], shots[3])   # the chest moves


def test_clips_give_a_map_per_frame_an_overlay_clip_and_bad_clips_one_line_each(clip_data, tiny_model, tmp_path):
    out = tmp_path / "out"
    result = cli("run", f"DATA_FILE={clip_data / 'records.jsonl'}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}",
                 "SAVE_RAW_CAM=true", "CAM_VERSION=GradCAM")
    assert result.returncode == 3, result.stderr                  # finished, with failed items
    rows = read_manifest(out)
    assert [(row["image_path"], row["frame"]) for row in rows[:6]] == [
        (f"clips/clip_100_idx0_f{i}.png", str(i)) for i in range(6)]
    assert len(rows) == 12 and all(row["source_image"].endswith(".mp4") for row in rows)
    with open(out / "errors.csv", newline="") as handle:
        errors = list(csv.DictReader(handle))
    assert [(e["image_path"], e["stage"]) for e in errors] == [("clips/garbage.mp4", "load"),
                                                                ("clips/missing.avi", "load"),
                                                                ("clips/empty.avi", "load")]
    assert "unreadable video" in errors[0]["reason"] and "file not found" in errors[1]["reason"]
    assert errors[2]["reason"] == "video holds no frames"
    for name in ("clip_100_idx0.mp4", "clip_101_idx0.mp4"):
        capture = cv2.VideoCapture(str(out / "clips" / name))
        assert capture.get(cv2.CAP_PROP_FRAME_COUNT) == 6 and capture.get(cv2.CAP_PROP_FPS) == 10
        ok, first = capture.read()
        overlay = cv2.imread(str(out / "clips" / name.replace(".mp4", "_f0.png")))
        assert ok and np.abs(first.astype(int) - overlay).mean() < 8          # lossy, but the same picture

    strided = tmp_path / "strided"
    again = cli("run", f"DATA_FILE={clip_data / 'records.jsonl'}", f"MODEL={tiny_model}", f"OUTPUT_DIR={strided}",
                "FRAME_STRIDE=2", "MAX_FRAMES=2", "CAM_VERSION=GradCAM")
    assert again.returncode == 3
    assert [row["frame"] for row in read_manifest(strided)] == ["0", "2", "0", "2"]
    capture = cv2.VideoCapture(str(strided / "clips" / "clip_100_idx0.mp4"))
    assert capture.get(cv2.CAP_PROP_FRAME_COUNT) == 2 and capture.get(cv2.CAP_PROP_FPS) == 5   # 10 / stride 2


def test_clinicians_maps_are_scored_per_frame_and_over_each_clip(clip_data, tiny_model, tmp_path):
    out = tmp_path / "out"
    assert cli("run", f"DATA_FILE={clip_data / 'records.jsonl'}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}",
               "SAVE_RAW_CAM=true", "CAM_VERSION=GradCAM").returncode == 3
    result = cli("evaluate", out, "--truth-maps", clip_data / "gaze.csv")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "agreement.json").read_text())
    assert summary["heatmaps"] == 12 and summary["retrieval"]["cases"] == 2
    assert set(summary["clips"]) == {"clips/clip_100.mp4", "clips/clip_101.mp4"}
    assert all(clip["frames"] == 6 for clip in summary["clips"].values())
    with open(out / "agreement.csv", newline="") as handle:
        scored = list(csv.DictReader(handle))
    assert [row["frame"] for row in scored[:6]] == [str(i) for i in range(6)]
    per_clip = np.mean([float(row["cc"]) for row in scored[:6]])
    assert summary["clips"]["clips/clip_100.mp4"]["cc"] == pytest.approx(per_clip, abs=1e-5)
    assert "Over each clip" in result.stdout

    # fixations recorded for a whole clip (no frame) hold for each of its frames
    whole = clip_data / "whole_clip_gaze.csv"
    whole.write_text("image_path,x,y,duration\n" + "".join(f"clips/clip_{seed}.mp4,{x},{y},0.5\n"
                                                           for seed in (100, 101) for x, y in ((30, 40), (60, 50))))
    assert cli("evaluate", out, "--truth-maps", whole).returncode == 0
    summary = json.loads((out / "agreement.json").read_text())
    assert summary["heatmaps"] == 12 and all(clip["frames"] == 6 for clip in summary["clips"].values())


def test_without_an_mp4_encoder_the_clip_is_a_gif(tmp_path, monkeypatch):
    class NoEncoder:
        def __init__(self, *args):
            pass

        def isOpened(self):
            return False

        def release(self):
            pass

    monkeypatch.setattr(clips.cv2, "VideoWriter", NoEncoder)
    frames = [np.full((20, 30, 3), value, np.uint8) for value in (0, 120, 240)]
    written = clips.write_clip(tmp_path / "a_idx0.mp4", frames, fps=5)
    assert written == tmp_path / "a_idx0.gif" and not (tmp_path / "a_idx0.mp4").exists()
    with Image.open(written) as gif:
        assert gif.n_frames == 3 and gif.info["duration"] == 200
    assert clips.clip_name("x/a_idx0_f12.png", "12") == "x/a_idx0.mp4"
    assert clips.clip_name("x/a_f1_idx0_f1_boxes.png", "1") == "x/a_f1_idx0_boxes.mp4"


def test_the_clip_example_config_runs(tmp_path):
    result = cli("run", "--config", REPO / "configs/examples/clips.conf", f"OUTPUT_DIR={tmp_path / 'out'}",
                 "CAM_VERSION=GradCAM")
    assert result.returncode == 0, result.stderr
    assert len(read_manifest(tmp_path / "out")) == 24 and len(list((tmp_path / "out").rglob("*.mp4"))) == 3
