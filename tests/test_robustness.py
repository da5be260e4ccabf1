"""Bad inputs, resume, overwrite and fail-fast: one bad item never costs the batch, and reruns redo only what is missing."""
import contextlib
import csv
import dataclasses
import hashlib
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attention_map.synthetic import make_film

from test_cli import cli, read_manifest


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height, with a few bytes of data: what a decompression bomb looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _grey(seed=0, size=96) -> np.ndarray:
    return np.round(make_film(seed, size)[0] * 255).astype(np.uint8)


def make_bad_corpus(folder: Path) -> dict[str, str]:
    """Every image case the run must survive; value: 'ok' (must give a heatmap) or the expected error text."""
    folder.mkdir(parents=True)
    grey = _grey()
    Image.fromarray(grey).save(folder / "good.png")
    (folder / "zero.png").write_bytes(b"")
    full = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    Image.fromarray(grey).save(folder / "full.jpg", quality=90)
    jpeg = (folder / "full.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "folder.png").mkdir()
    Image.fromarray((grey.astype(np.uint16) * 257)).save(folder / "sixteen.png")
    Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 128)]), "RGBA").save(folder / "rgba.png")
    Image.fromarray(grey).convert("P").save(folder / "palette.png")
    Image.fromarray(np.dstack([grey] * 3)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(grey[:1, :1]).save(folder / "one.png")
    Image.fromarray(grey[::12, ::12][:8, :8]).save(folder / "eight.png")
    _png_header_only(folder / "huge.png", 20000, 20000)
    (folder / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x00garbage-garbage")
    return {"good.png": "ok", "zero.png": "unreadable image", "truncated.png": "unreadable image",
            "full.jpg": "ok", "cut.jpg": "unreadable image", "text.png": "unreadable image",
            "folder.png": "not a file", "missing.png": "file not found", "sixteen.png": "ok", "rgba.png": "ok",
            "palette.png": "ok", "cmyk.jpg": "ok", "one.png": "too small", "eight.png": "ok",
            "huge.png": "above MAX_IMAGE_PIXELS", "corrupt.dcm": "DICOM holds no pixel data"}


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _wait_for_heatmaps(process, out: Path, count: int) -> None:
    """Wait until the run `process`, writing `out`, has begun (its run_config.conf) and finished `count` heatmaps; it
    must still be running then."""
    journal = out / "shards" / "progress-0000-of-0001.jsonl"
    deadline = time.monotonic() + 300
    while (not (out / "run_config.conf").exists() or (journal.read_bytes().count(b"\n") if journal.exists() else 0)
           < count) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, f"the run ended before the kill point ({count} heatmaps)"


def _errors(folder: Path) -> list[dict]:
    with open(folder / "errors.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_every_bad_image_lands_in_errors_csv_and_every_good_one_is_drawn(tmp_path, tiny_model):
    images = make_bad_corpus(tmp_path / "images")
    data = tmp_path / "records.jsonl"
    with open(data, "w") as handle:
        for name in images:
            handle.write(json.dumps({"image_path": name, "question": f"Is {name} fine?", "answer": "yes",
                                     "q_id": 0}) + "\n")
        handle.write('{"image_path": "good.png", "question": "broken line\n')
    out = tmp_path / "out"
    result = cli("run", f"DATA_FILE={data}", f"IMAGE_ROOT={tmp_path / 'images'}", f"MODEL={tiny_model}",
                 f"OUTPUT_DIR={out}", "SKIP_CRF=false")
    assert result.returncode == 3, result.stderr
    good = [name for name, expected in images.items() if expected == "ok"]
    bad = {name: expected for name, expected in images.items() if expected != "ok"}
    assert f"{len(good)} heatmaps written, {len(bad) + 1} failed" in result.stdout
    assert [r["source_image"] for r in read_manifest(out)] == good
    errors = {e["image_path"]: e for e in _errors(out)}
    for name, expected in bad.items():
        assert expected in errors[name]["reason"], (name, errors[name])
        assert errors[name]["stage"] == "load" and "\n" not in errors[name]["reason"]
    assert errors[""]["stage"] == "record:json" and errors[""]["row"] == str(len(images) + 1)
    overlays = {Path(name).stem + "_idx0.png" for name in good}
    bookkeeping = {"vqa_manifest.csv", "errors.csv", "run_config.conf", "shards/progress-0000-of-0001.jsonl",
                   "shards/manifest-0000-of-0001.csv", "shards/errors-0000-of-0001.csv", "shards/lock-0000-of-0001"}
    assert _files(out) == overlays | bookkeeping   # nothing else, no temporary files


def test_awkward_csv_rows_work_or_are_reported_one_line_each(tmp_path, tiny_model):
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(3):
        Image.fromarray(_grey(seed)).save(images / f"f{seed}.png")
    rows = [b"image_path,question,answer,q_id",
            b'images/f0.png,"Is there a ""big"", round,\nopacity?",yes,0',
            b'images/f1.png,Caf\xe9 au lait spots?,no,0',              # latin-1, not UTF-8
            b'images/f1.png,,no,1',                                      # empty question
            b'images/f2.png,Same row twice?,no,0',
            b'images/f2.png,Same row twice?,no,0']
    data = tmp_path / "records.csv"
    data.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(rows) + b"\r\n")    # with a BOM and CRLF line ends
    out = tmp_path / "out"
    result = cli("run", f"DATA_FILE={data}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}")
    assert result.returncode == 3, result.stderr
    manifest = read_manifest(out)
    assert [(r["image_path"], r["question"]) for r in manifest] == [
        ("images/f0_idx0.png", 'Is there a "big", round,\nopacity?'), ("images/f2_idx0.png", "Same row twice?")]
    errors = sorted((e["row"], e["stage"], e["reason"]) for e in _errors(out))
    # rows are named by the line they start on: the first record spans lines 2 and 3
    assert errors == [("4", "record:question", "not UTF-8 text (byte 0xE9); save records.csv as UTF-8"),
                      ("5", "record:question", "empty prompt"),
                      ("7", "record:q_id", "output images/f2_idx0.png is already made by the record on line 6")]


def test_a_second_run_on_a_shard_being_written_stops_and_names_the_first(tmp_path, tiny_model):
    """Two runs writing one shard at once would spoil its progress file; the second stops before it loads its model,
    naming the first (here a process that holds the shard, as a run does), and a killed holder lets go."""
    import subprocess
    import sys

    import pytest

    from attention_map.config import ConfigError
    from attention_map.shards import Shard, held
    from attention_map.synthetic import write_demo_data

    data = write_demo_data(tmp_path / "data", count=2, size=96)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from attention_map.shards import Shard, held; "
                               "hold = held(Path(sys.argv[1]), Shard(0, 1)); hold.__enter__(); "
                               "print('held', flush=True); time.sleep(300)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        run = ("run", f"DATA_FILE={data}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}", "SKIP_CRF=true")
        refused = cli(*run)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip().splitlines()[-1].startswith(
            f"attention-map: {out}: shard 0000-of-0001 is being written by another run (pid {holder.pid} on "), (
            refused.stderr)
        assert sorted(p.name for p in out.rglob("*")) == ["lock-0000-of-0001", "shards"]   # nothing else written
        assert f"model {tiny_model} on" not in refused.stderr      # found before the model loads
        busy = f"shard 0000-of-0001 is being written by another run \\(pid {holder.pid} "
        with pytest.raises(ConfigError, match=busy):
            with held(out, Shard(0, 1)):      # where the run takes the shard, had the holder come after that check
                pass
    finally:
        holder.kill()
        holder.wait()
    result = cli(*run)
    assert result.returncode == 0, result.stderr
    assert len(read_manifest(out)) == 2 and (out / "shards" / "lock-0000-of-0001").read_text() == ""


@pytest.mark.parametrize("signal_name, status, said_first", [("SIGINT", 130, "interrupted"),
                                                             ("SIGTERM", 143, "stopped by SIGTERM")])
def test_ctrl_c_or_sigterm_stops_a_run_in_one_line_and_the_same_command_resumes_it(tmp_path, tiny_model, signal_name,
                                                                                   status, said_first):
    """Ctrl-C; SIGTERM to the run alone, as `kill`, `timeout` and `docker stop` (to a container's first process, which
    ignores a signal it has no handler for) send it."""
    import signal
    import subprocess
    import sys

    from attention_map.synthetic import write_demo_data

    data = write_demo_data(tmp_path / "data", count=12, size=192)
    out = tmp_path / "out"
    run = ("run", f"DATA_FILE={data}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}", "SKIP_CRF=false")
    with open(tmp_path / "stderr.txt", "w+") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "attention_map", *map(str, run)], stderr=stderr,
                                   stdout=subprocess.DEVNULL)
        _wait_for_heatmaps(process, out, 1)
        process.send_signal(getattr(signal, signal_name))
        assert process.wait(timeout=120) == status
        stderr.seek(0)
        said = stderr.read()
    assert "Traceback" not in said and said.strip().splitlines()[-1] == (
        f"attention-map: {said_first}; what was finished is kept (the same command again resumes a run)"), said
    again = cli(*run)
    assert again.returncode == 0 and "already done" in again.stdout and ", 0 already done" not in again.stdout
    assert len(read_manifest(out)) == 12


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_a_signalled_run_with_workers_leaves_no_process_behind(tmp_path, tiny_model, signal_name):
    """Slurm's scancel, preemption and time limit send SIGTERM to every process of a job; the kernel's out-of-memory
    killer sends SIGKILL to the run alone. The run, with decoders and post-processing workers, stops (SIGTERM: one
    line, status 143, no film counted as failed) and no process of it is left. (That a rerun resumes: the Ctrl-C test
    above, the killed-runs test below.)"""
    import os
    import signal
    import subprocess
    import sys

    from attention_map.synthetic import write_demo_data

    data = write_demo_data(tmp_path / "data", count=8, size=192)
    out = tmp_path / "out"
    run = ("run", f"DATA_FILE={data}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}", "WORKERS=2")
    number = getattr(signal, signal_name)
    with open(tmp_path / "stderr.txt", "w+") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "attention_map", *map(str, run)], stderr=stderr,
                                   stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            _wait_for_heatmaps(process, out, 1)
            if number == signal.SIGTERM:
                os.killpg(process.pid, number)
            else:
                process.kill()
            status = process.wait(timeout=120)
            deadline = time.monotonic() + 60
            while _group_alive(process.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            left = _group_alive(process.pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        stderr.seek(0)
        said = stderr.read()
    assert not left, f"processes of the run outlived it: {left}"
    if number == signal.SIGTERM:
        assert status == 143, said
        assert "Traceback" not in said and " ERROR " not in said and said.strip().splitlines()[-1] == (
            "attention-map: stopped by SIGTERM; what was finished is kept (the same command again resumes a run)"), said
    else:
        assert status == -number


def _group_alive(group: int) -> list[str]:
    """The command lines of the processes of process group `group` still running (zombies are not)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            fields = text[text.rindex(")") + 2:].split()
            if int(fields[2]) == group and fields[0] != "Z":
                alive.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        except (OSError, ValueError):   # gone meanwhile
            pass
    return alive


def test_a_wrong_image_root_names_the_paths_looked_at_and_says_what_to_check(tmp_path, tiny_model):
    from attention_map.synthetic import write_demo_data

    data = write_demo_data(tmp_path / "data", count=2, size=96)
    out = tmp_path / "out"
    result = cli("run", f"DATA_FILE={data}", f"IMAGE_ROOT={tmp_path}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}")
    assert result.returncode == 3, result.stderr
    assert [e["reason"] for e in _errors(out)] == [f"file not found: {tmp_path / 'films'}/synthetic_00{i}.png"
                                                   for i in range(2)]
    assert (f"no image of the records was found under IMAGE_ROOT={tmp_path}: is it the folder their image_path is "
            f"relative to?") in result.stderr


def test_an_output_never_replaces_a_film_the_records_read(tmp_path, tiny_model):
    """OUTPUT_DIR = IMAGE_ROOT, and a film named as another film's overlay would be: that overlay fails, the film
    stays as it was and still gets its own heatmap."""
    for seed, name in ((0, "a.png"), (1, "a_idx0.png")):
        Image.fromarray(_grey(seed)).save(tmp_path / name)
    film = (tmp_path / "a_idx0.png").read_bytes()
    data = tmp_path / "records.csv"
    data.write_text("image_path,question,answer\na.png,Is it?,yes\na_idx0.png,Is it?,no\n")
    result = cli("run", f"DATA_FILE={data}", f"MODEL={tiny_model}", f"OUTPUT_DIR={tmp_path}", "SKIP_CRF=true")
    assert result.returncode == 3, result.stderr
    assert (tmp_path / "a_idx0.png").read_bytes() == film
    assert [r["image_path"] for r in read_manifest(tmp_path)] == ["a_idx0_idx1.png"]     # q_id: the row's index
    assert [(e["row"], e["reason"]) for e in _errors(tmp_path)] == [
        ("2", "output a_idx0.png would replace a film that the records read: choose an OUTPUT_DIR apart from "
              "IMAGE_ROOT")]


def test_a_data_file_without_an_answer_column_stops_before_anything_is_written(tmp_path, tiny_model):
    data = tmp_path / "records.csv"
    data.write_text("image_path,question\nf0.png,Is it?\n")
    out = tmp_path / "out"
    result = cli("run", f"DATA_FILE={data}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (f"attention-map: {data}:1: missing column(s) answer "
                                                      f"(a CSV needs image_path,question,answer)")
    assert not out.exists()


def _digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(_files(folder))}


def test_rerun_skips_finished_heatmaps_and_overwrite_or_new_settings_redo_them(tmp_path, tiny_model):
    from attention_map.synthetic import write_demo_data

    data = write_demo_data(tmp_path / "data", count=3, size=96)
    out = tmp_path / "out"
    args = ("run", f"DATA_FILE={data}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}", "PROMPT_SOURCE=both")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    assert "6 heatmaps written, 0 failed, 0 already done" in first.stdout
    assert all(row["boxes"] == "" for row in read_manifest(out)) and not (out / "boxes.jsonl").exists()
    before = _digests(out)
    (out / "films" / "synthetic_001_idx0_r0.png").write_bytes(b"\x89PNG\r\n\x1a\ncut")   # damaged: made again
    again = cli(*args)
    assert "2 heatmaps written, 0 failed, 4 already done" in again.stdout, again.stdout
    assert _digests(out) == before
    shard = out / "shards" / "manifest-0000-of-0001.csv"
    shard.write_bytes(shard.read_bytes()[:-30])                     # cut short: the same run writes it again
    assert "0 heatmaps written, 0 failed, 6 already done" in cli(*args).stdout
    assert _digests(out) == before
    assert "6 heatmaps written, 0 failed, 0 already done" in cli(*args, "OVERWRITE=true").stdout
    overwritten = _digests(out)
    assert overwritten.pop("run_config.conf") != before["run_config.conf"]        # it records OVERWRITE=true
    assert overwritten == {k: v for k, v in before.items() if k != "run_config.conf"}
    changed = cli(*args, "COLORMAP=hot")
    assert "6 heatmaps written, 0 failed, 0 already done" in changed.stdout
    assert "6 heatmaps in" in changed.stderr and "made with other settings" in changed.stderr
    assert "are made again: COLORMAP was jet, now hot\n" in changed.stderr      # what changed, from run_config.conf
    refused = cli(*args, "RESUME=false")
    assert refused.returncode == 2 and "holds an earlier run and RESUME=false" in refused.stderr


def test_fail_fast_stops_at_the_first_failure(tmp_path, tiny_model):
    from attention_map.synthetic import write_demo_data

    data = write_demo_data(tmp_path / "data", count=3, size=96)
    (tmp_path / "data" / "films" / "synthetic_001.png").write_bytes(b"")
    out = tmp_path / "out"
    result = cli("run", f"DATA_FILE={data}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}", "FAIL_FAST=true")
    assert result.returncode == 4, result.stderr
    assert "1 heatmaps written, 1 failed" in result.stdout and "Stopped at the first failure" in result.stdout
    assert not (out / "vqa_manifest.csv").exists()       # the run is not complete
    assert [e["image_path"] for e in _errors(out)] == ["films/synthetic_001.png"]
    (tmp_path / "data" / "films" / "synthetic_001.png").unlink()
    from attention_map.outputs import write_png
    write_png(tmp_path / "data" / "films" / "synthetic_001.png", _grey(1))
    resumed = cli("run", f"DATA_FILE={data}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}", "FAIL_FAST=true")
    assert resumed.returncode == 0 and "2 heatmaps written, 0 failed, 1 already done" in resumed.stdout
    assert len(read_manifest(out)) == 3 and not (out / "errors.csv").exists()


def test_long_prompts_are_truncated_with_a_warning_in_the_manifest(tmp_path, tiny_model):
    data = tmp_path / "records.csv"
    Image.fromarray(_grey()).save(tmp_path / "f.png")
    long_question = "Is there " + "a very small nodule and " * 40 + "an effusion?"
    data.write_text(f"image_path,question,answer\nf.png,{long_question},yes\nf.png,Short?,no\n")
    out = tmp_path / "out"
    result = cli("run", f"DATA_FILE={data}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}")
    assert result.returncode == 0, result.stderr
    warnings = [r["warning"] for r in read_manifest(out)]
    assert warnings[0].startswith("prompt truncated to the model's 77 tokens (") and warnings[1] == ""


def test_killed_runs_resume_to_byte_identical_outputs(tmp_path, tiny_model, cxr, request):
    """SIGKILL a run at several points, resume each time: the end result equals an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys

    from test_cli import REPO

    def command(out):
        return [sys.executable, "-m", "attention_map", "run", "--config", str(REPO / "configs/gemex/exp_01_vqa.conf"),
                f"MODEL={tiny_model}", f"OUTPUT_DIR={out}", "STOP_AFTER=8", "PROMPT_SOURCE=both", "SAVE_RAW_CAM=true",
                "SKIP_CRF=false"]

    # the uninterrupted run beside the killed ones: each is mostly one core's work (the CRF), and the machine has two
    reference = tmp_path / "reference"
    with (tmp_path / "reference.log").open("w") as log:
        uninterrupted = subprocess.Popen(command(reference), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    request.addfinalizer(uninterrupted.kill)        # a failed assertion below does not leave it running

    out = tmp_path / "killed"
    heatmaps = 18       # the first 8 films' questions and region prompts (PROMPT_SOURCE=both); checked below

    # kill points: as soon as the run has written its config, then after a few, about half, and most heatmaps
    for target in (0, 3, heatmaps // 2, heatmaps - 2):
        process = subprocess.Popen(command(out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_heatmaps(process, out, target)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert not (out / "vqa_manifest.csv").exists()
    final = subprocess.run(command(out), cwd=REPO, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert "already done" in final.stdout and ", 0 already done" not in final.stdout
    assert uninterrupted.wait() == 0, (tmp_path / "reference.log").read_text()[-2000:]
    assert len(read_manifest(reference)) == heatmaps
    expected = _digests(reference)
    got = _digests(out)
    assert got.pop("run_config.conf") and expected.pop("run_config.conf")    # they differ by OUTPUT_DIR only:
    configs = [(folder / "run_config.conf").read_text().replace(str(folder), "OUT") for folder in (out, reference)]
    assert configs[0] == configs[1]
    assert got == expected
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_worker_threads_and_processes_give_the_same_outputs_as_none(tmp_path, tiny_model):
    from attention_map.synthetic import write_demo_data

    data = write_demo_data(tmp_path / "data", count=5, size=96)
    (tmp_path / "data" / "films" / "synthetic_002.png").write_bytes(b"broken")
    results = {}
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        result = cli("run", f"DATA_FILE={data}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}", "PROMPT_SOURCE=both",
                     "SKIP_CRF=false", "SAVE_RAW_CAM=true", f"WORKERS={workers}")
        assert result.returncode == 3, result.stderr
        assert "8 heatmaps written, 2 failed" in result.stdout and "Seconds per stage: decode" in result.stdout
        digests = _digests(out)
        digests.pop("run_config.conf")
        results[workers] = digests
    assert results[0] == results[2]


def _finish_or_die(settings, film, jobs, *rest):
    """heatmaps.finish, except that the worker process dies on film 001, as one killed for memory would."""
    import os

    from attention_map import heatmaps

    if "synthetic_001" in jobs[0].overlay:
        os._exit(9)
    return heatmaps.finish(settings, film, jobs, *rest)


def test_a_dead_worker_process_fails_its_films_not_the_run(tmp_path, tiny_model, monkeypatch):
    from attention_map import pipeline
    from attention_map.config import Settings
    from attention_map.synthetic import write_demo_data

    data = write_demo_data(tmp_path / "data", count=6, size=96)
    settings = Settings(DATA_FILE=data, IMAGE_ROOT=data.parent, MODEL=str(tiny_model), OUTPUT_DIR=tmp_path / "out",
                        WORKERS=2)
    # the workers import this module to find the function, and attention_map.heatmaps unpatched
    monkeypatch.setattr(pipeline.heatmaps, "finish", _finish_or_die)
    summary = pipeline.run(settings)
    assert summary.exit_status == 3 and summary.heatmaps + summary.failures == 6
    reasons = {row[1]: row[3] for row in summary.errors}
    assert "films/synthetic_001.png" in reasons
    assert all("post-processing worker process died" in reason for reason in reasons.values())
    assert summary.heatmaps >= 1    # films after the death went to a new pool
    monkeypatch.undo()
    again = pipeline.run(dataclasses.replace(settings, RESUME=True))
    assert again.exit_status == 0 and again.skipped == summary.heatmaps and again.heatmaps == summary.failures
    assert len(read_manifest(tmp_path / "out")) == 6


def test_a_full_disk_stops_the_run_in_one_line_and_the_same_command_resumes_it(tmp_path, tiny_model, monkeypatch):
    """Every film after the first write refused for room would fail too: the run stops there (status 1, one line
    naming the file), rather than fail the films one by one and list them all in errors.csv."""
    import errno

    from attention_map import outputs
    from attention_map.synthetic import write_demo_data

    data = write_demo_data(tmp_path / "data", count=4, size=96)
    out = tmp_path / "out"
    args = ("run", f"DATA_FILE={data}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}", "WORKERS=0")
    write_png, refused = outputs.write_png, []

    def full_after_two_overlays(path, image):
        if len(list((out / "films").glob("*_idx0.png"))) == 2:
            refused.append(path)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_png(path, image)

    monkeypatch.setattr(outputs, "write_png", full_after_two_overlays)
    full = cli(*args)
    assert full.returncode == 1 and len(refused) == 1, full.stderr
    assert full.stderr.splitlines()[-1] == (f"attention-map: {refused[0]}: No space left on device; the run stops "
                                            f"here, what was finished is kept, and the same command resumes it")
    assert " ERROR " not in full.stderr and not (out / "errors.csv").exists()
    monkeypatch.setattr(outputs, "write_png", write_png)      # room again
    again = cli(*args)
    assert again.returncode == 0 and "2 heatmaps written, 0 failed, 2 already done" in again.stdout, again.stderr
    assert len(read_manifest(out)) == 4


def test_a_write_failure_in_a_worker_process_names_the_stage(tmp_path, tiny_model):
    from attention_map.synthetic import write_demo_data

    data = write_demo_data(tmp_path / "data", count=4, size=96)
    out = tmp_path / "out"
    (out / "films" / "synthetic_002_idx0.png").mkdir(parents=True)   # the overlay cannot be written there
    result = cli("run", f"DATA_FILE={data}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}", "WORKERS=2",
                 "RESUME=true")
    assert result.returncode == 3, result.stderr
    with open(out / "errors.csv", newline="") as handle:
        errors = list(csv.DictReader(handle))
    assert [(e["image_path"], e["stage"]) for e in errors] == [("films/synthetic_002.png", "write")]
    # the reason names the output in the way, not the temporary file it was written to first
    assert errors[0]["reason"] == f"[Errno 21] Is a directory: '{out / 'films' / 'synthetic_002_idx0.png'}'"
    assert len(read_manifest(out)) == 3
