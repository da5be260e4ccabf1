import csv
import os
from pathlib import Path, PurePosixPath

import numpy as np
import pytest

from attention_map import outputs, shards


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


def test_outside_paths_go_under_outside_when_allowed(tmp_path):
    relative = outputs.relative_image_path("../elsewhere/a.png", tmp_path / "root", allow_outside=True)
    assert relative.parts[0] == "outside" and ".." not in relative.parts
    assert outputs.overlay_name(relative, "0", None).endswith("elsewhere/a_idx0.png")


@pytest.mark.parametrize("parts", [("..", ".."), ("a", ".", ".."), ("...",)])
def test_output_names_never_leave_output_dir(parts):
    name = outputs.overlay_name(PurePosixPath(*parts, "x.png"), "..", None)
    assert ".." not in PurePosixPath(name).parts and not name.startswith("/")


def _row(name, question="q"):
    return outputs.ManifestRow(name, question, '["A", "B"]', "a.png", "p", "", "gscorecam", "0", "row_1", "", "", "")


def test_shards_merge_in_input_order_and_quote_commas_quotes_and_newlines(tmp_path):
    tricky = 'Is it "big",\nreally?'
    # keys: (the planned job's place, the part: a detector's second detection of film c is (2, 2))
    for index, rows in ((1, {(1, 0): _row("b.png"), (3, 0): _row("d.png", tricky)}),
                        (0, {(0, 0): _row("a.png"), (2, 2): _row("c2.png"), (2, 1): _row("c1.png")})):
        shards.write_shard(tmp_path, shards.Shard(index, 2), rows, [(str(index + 5), f"{index}.png", "load", "bad")])
    (tmp_path / ".vqa_manifest.csv.x1y2.am-tmp").write_text("left by a kill")
    merged = shards.merge(tmp_path, 2)
    assert merged.heatmaps == 5 and len(merged.errors) == 2
    with open(tmp_path / outputs.MANIFEST, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:3] == ["image_path", "question", "answer"] and rows[0] == outputs.MANIFEST_COLUMNS
    assert [r[0] for r in rows[1:]] == ["a.png", "b.png", "c1.png", "c2.png", "d.png"]
    assert rows[5][1] == tricky and rows[5][2] == '["A", "B"]'
    with open(tmp_path / outputs.ERRORS, newline="") as handle:
        assert [e["row"] for e in csv.DictReader(handle)] == ["5", "6"]
    assert not list(tmp_path.rglob("*.am-tmp"))


def test_merge_names_the_shards_that_have_not_finished(tmp_path):
    shards.write_shard(tmp_path, shards.Shard(1, 4), {}, [])
    with pytest.raises(shards.IncompleteError, match=r"3 of 4 shards have not finished \(0,2,3\).*--array=0,2,3"):
        shards.merge(tmp_path, 4)
    assert not (tmp_path / outputs.MANIFEST).exists()


def test_a_shard_or_manifest_cut_short_is_named_not_merged_as_empty_fields(tmp_path):
    shards.write_shard(tmp_path, shards.Shard(0, 1), {(0, 0): _row("a.png"), (1, 0): _row("b.png")}, [])
    written = shards.Shard(0, 1).path(tmp_path, "manifest")
    whole = written.read_bytes()
    written.write_bytes(whole[:whole.rindex(b"b.png") + 9])        # the last row cut inside its question
    with pytest.raises(shards.IncompleteError, match=rf"{written.name}:3: \d+ fields where the header has "
                                                     rf"{len(outputs.MANIFEST_COLUMNS) + 1}: the file is cut short .*"
                                                     rf"run shard 0 again"):
        shards.merge(tmp_path, 1)
    written.write_bytes(b"order,image_path\n\xff\n")
    with pytest.raises(shards.IncompleteError, match="not UTF-8 .* the file is damaged"):
        shards.merge(tmp_path, 1)
    assert not (tmp_path / outputs.MANIFEST).exists()
    written.write_bytes(whole)
    shards.merge(tmp_path, 1)
    manifest = (tmp_path / outputs.MANIFEST).read_bytes()
    (tmp_path / outputs.MANIFEST).write_bytes(manifest[:-20])
    with pytest.raises(outputs.DamagedFileError, match=r"vqa_manifest.csv:3: .*`attention-map merge .*` writes it"):
        outputs.read_manifest(tmp_path, "evaluate")


def test_png_completeness(tmp_path):
    path = tmp_path / "a.png"
    outputs.write_png(path, np.zeros((4, 4, 3), np.uint8))
    assert outputs.png_is_complete(path)
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask     # readable by the group like any new file
    path.write_bytes(path.read_bytes()[:-5])
    assert not outputs.png_is_complete(path) and not outputs.png_is_complete(tmp_path / "missing.png")


def test_shard_comes_from_the_slurm_array_and_keeps_the_first_split(tmp_path):
    from attention_map.config import ConfigError, Settings

    settings = Settings(OUTPUT_DIR=tmp_path)
    assert shards.resolve_shard(settings, {}) == shards.Shard(0, 1)
    array = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MAX": "7"}
    assert shards.resolve_shard(settings, array) == shards.Shard(3, 8)
    (tmp_path / outputs.RUN_CONFIG).write_text("SHARD_COUNT=8\n")
    resubmitted = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MAX": "3"}   # sbatch --array=3
    assert shards.resolve_shard(settings, resubmitted) == shards.Shard(3, 8)
    assert shards.resolve_shard(Settings(OUTPUT_DIR=tmp_path, SHARD_INDEX=1, SHARD_COUNT=2), array) == shards.Shard(1, 2)
    with pytest.raises(ConfigError, match="SHARD_INDEX=9 is not below 8"):
        shards.resolve_shard(settings, {"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_MAX": "9"})
    films = [n for n in range(20) if shards.Shard(3, 8).owns(n)]
    assert films == [3, 11, 19]


def test_a_damaged_run_config_is_named_and_costs_a_rerun_only_the_reasons_of_a_redo(tmp_path):
    from attention_map.config import Settings

    settings = Settings(OUTPUT_DIR=tmp_path)
    (tmp_path / outputs.RUN_CONFIG).write_text('SHARD_COUNT=8\nMODEL="models/a quote left open\n')
    with pytest.raises(outputs.DamagedFileError, match=r"run_config.conf: line 2: No closing quotation: the file is "
                                                       r"damaged; delete it"):
        shards.resolve_shard(settings, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MAX": "3"})
    assert shards.changed_settings(tmp_path, settings) == []
    (tmp_path / outputs.RUN_CONFIG).write_bytes(b"\xff\xfeSHARD_COUNT=8\n")
    with pytest.raises(outputs.DamagedFileError, match="can't decode byte 0xff in position 0"):
        shards.read_run_config(tmp_path)
    (tmp_path / outputs.RUN_CONFIG).write_text(Settings(OUTPUT_DIR=tmp_path, COLORMAP="hot").to_conf())
    assert shards.changed_settings(tmp_path, settings) == ["COLORMAP was hot, now jet"]


@pytest.mark.parametrize("shape, dtype", [((37, 53, 3), np.uint8), ((64, 41), np.uint8), ((29, 70), np.uint16),
                                          ((1, 1), np.uint16), ((1, 5, 3), np.uint8)])
def test_written_pngs_decode_to_the_same_pixels_in_two_independent_readers(tmp_path, shape, dtype):
    import cv2
    from PIL import Image

    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    image.flat[:3] = [0, np.iinfo(dtype).max, 1][: image.size]    # the extremes, and the Sub filter's wrap-around
    path = tmp_path / "image.png"
    outputs.write_png(path, image)
    read = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert read.dtype == dtype and np.array_equal(read[..., ::-1] if image.ndim == 3 else read, image)
    with Image.open(path) as pil:
        pil.load()
        assert np.array_equal(np.asarray(pil).astype(dtype), image)
    assert outputs.png_is_complete(path) and outputs.encode_png(image) == path.read_bytes()   # deterministic


def test_png_of_an_unsupported_image_is_refused():
    for image in (np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.uint16)):
        with pytest.raises(ValueError, match="cannot write"):
            outputs.encode_png(image)
