import csv
from pathlib import Path, PurePosixPath

import pytest

from attention_map import outputs


def test_output_names_mirror_the_input_tree():
    relative = outputs.relative_image_path("files/p10/p10268877/s50042142/abc123.jpg", Path("/data/mimic"))
    assert outputs.overlay_name(relative, "1", None) == "files/p10/p10268877/s50042142/abc123_idx1.png"
    assert outputs.overlay_name(relative, "1", 2) == "files/p10/p10268877/s50042142/abc123_idx1_r2.png"
    assert outputs.raw_map_name("a/b_idx1_r2.png") == "a/b_idx1_r2_cam.png"
    assert outputs.overlay_name(PurePosixPath("x.png"), "a/../b", None) == "x_idxa_.._b.png"


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "a/../../b.png"])
def test_paths_outside_image_root_are_rejected(tmp_path, bad):
    with pytest.raises(ValueError, match="outside IMAGE_ROOT"):
        outputs.relative_image_path(bad, tmp_path)


def test_manifest_quotes_commas_quotes_and_newlines(tmp_path):
    row = outputs.ManifestRow("a_idx0.png", 'Is it "big",\nreally?', '["A", "B"]', "a.png", "p", "", "gscorecam",
                              "0", "row_1", "", "", "")
    path = tmp_path / outputs.MANIFEST
    outputs.write_manifest(path, [row, row])
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:3] == ["image_path", "question", "answer"]
    assert rows[1][:3] == ["a_idx0.png", 'Is it "big",\nreally?', '["A", "B"]'] and len(rows) == 3
    assert [p.name for p in tmp_path.iterdir()] == [outputs.MANIFEST]   # no temporary file left
