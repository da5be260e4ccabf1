"""The command line as a user runs it, on the real GEMeX-style records and films."""
import contextlib
import csv
import hashlib
import importlib
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from attention_map.cli import main
from attention_map.images import load_film
from attention_map.models import load_model

from reference_gscorecam import reference_gscorecam

REPO = Path(__file__).resolve().parents[1]


def cli(*args, env=None, cwd=REPO, process=False):
    """`attention-map ARGS` run from `cwd` with `env` added to the environment: its exit status, stdout and stderr
    (the log lines included, as the command writes them).

    It runs in this process, through the same `main` that the installed command calls, so that PyTorch and the
    libraries are imported once for the session rather than once per call (seconds each, some 80 calls). Where
    what is tested is read when a library is imported (the hub's address) or the command's own process matters,
    `process=True` starts `python -m attention_map` instead; test_the_installed_command_runs_in_its_own_process
    checks the two agree."""
    args = [str(arg) for arg in args]
    if process:
        return subprocess.run([sys.executable, "-m", "attention_map", *args], cwd=cwd, capture_output=True,
                              text=True, env={**os.environ, **(env or {})}, timeout=900)
    stdout, stderr = io.StringIO(), io.StringIO()
    log = logging.StreamHandler(stderr)
    log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    environ, folder = dict(os.environ), os.getcwd()
    os.environ.update(env or {})
    os.chdir(cwd)
    logging.getLogger().addHandler(log)   # pytest's own handlers on the root stop main's basicConfig adding one
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                status = main(args)
            except SystemExit as stop:    # argparse's usage errors
                status = stop.code if isinstance(stop.code, int) else 1
            except Exception:             # as the interpreter would: the traceback, exit status 1
                traceback.print_exc()
                status = 1
    finally:
        logging.getLogger().removeHandler(log)
        os.chdir(folder)
        os.environ.clear()
        os.environ.update(environ)
    return subprocess.CompletedProcess(["attention-map", *args], status, stdout.getvalue(), stderr.getvalue())


def read_manifest(folder):
    with open(folder / "vqa_manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_run_on_gemex_records_writes_one_overlay_per_manifest_row(tmp_path, tiny_model, cxr):
    out = tmp_path / "out"
    result = cli("run", "--config", REPO / "configs/gemex/exp_01_vqa.conf", f"MODEL={tiny_model}",
                 f"OUTPUT_DIR={out}", "PROMPT_SOURCE=both", "SAVE_RAW_CAM=true")
    assert result.returncode == 0, result.stderr
    assert "Done: 20 images, 47 heatmaps written, 0 failed" in result.stdout
    # the plan and the model line reach the log; open_clip's own routine lines do not
    assert "47 heatmaps on 20 images planned" in result.stderr and " masked forwards, " in result.stderr
    assert "Attempting to load config" not in result.stderr
    rows = read_manifest(out)
    assert len(rows) == 47 and list(rows[0])[:3] == ["image_path", "question", "answer"]
    assert rows[0]["image_path"] == "nih/00000820_000_idx0.png"
    assert [r["image_path"] for r in rows[1:3]] == ["nih/00000820_000_idx0_r0.png", "nih/00000820_000_idx0_r1.png"]
    overlays = {p.relative_to(out).as_posix() for p in out.rglob("*.png") if not p.name.endswith("_cam.png")}
    assert overlays == {r["image_path"] for r in rows}
    for row in rows[:5]:
        image = cv2.imread(str(out / row["image_path"]))
        raw = cv2.imread(str(out / row["raw_map"]), cv2.IMREAD_UNCHANGED)
        film = load_film(cxr / row["source_image"])
        assert image.shape[:2] == film.shape and raw.dtype == np.uint16 and raw.shape == film.shape
    assert (out / "run_config.conf").read_text().count("=") >= 20
    assert not (out / "errors.csv").exists()


def test_raw_map_of_a_run_equals_the_reference_on_a_real_film(tmp_path, tiny_model, cxr):
    """The CLI end to end, from the GEMeX config to the raw maps on disk, against the reference steps (the engine on
    BiomedCLIP's architecture is checked in test_gscorecam.py and, end to end under Slurm, in test_cluster.py)."""
    out = tmp_path / "out"
    topk = 24
    result = cli("run", "--config", REPO / "configs/gemex/exp_01_vqa.conf", f"MODEL={tiny_model}",
                 f"OUTPUT_DIR={out}", "STOP_AFTER=1", f"TOPK={topk}", "ENABLE_BODY_MASK=false", "PROMPT_SOURCE=both",
                 "SAVE_RAW_CAM=true", "DEVICE=cpu")
    assert result.returncode == 0, result.stderr
    rows = read_manifest(out)
    assert len(rows) == 3
    model = load_model(str(tiny_model), torch.device("cpu"))
    film = load_film(cxr / rows[0]["source_image"])
    union = set()
    for row in rows:
        raw = cv2.imread(str(out / row["raw_map"]), cv2.IMREAD_UNCHANGED) / 65535.0
        expected, kept = reference_gscorecam(model, model.prepare(film), row["prompt"], topk, film.shape[::-1])
        union |= kept
        assert np.abs(raw - expected).max() <= 1e-3
    # 3 prompts (two of them the same text) cost one masked forward per channel of their union
    assert f"{len(union)} masked forwards" in result.stdout and len(union) < 3 * topk


def test_config_errors_stop_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    result = cli("run", "--config", REPO / "configs/gemex/exp_01_vqa.conf", f"OUTPUT_DIR={out}", "TOPK=-1",
                 "COLOURMAP=jet")
    assert result.returncode == 2
    assert "TOPK=-1 is below the minimum 1" in result.stderr
    assert "unknown key COLOURMAP; did you mean COLORMAP?" in result.stderr
    assert not out.exists()
    bare = cli("run", f"OUTPUT_DIR={out}")      # a first try without an experiment file says what to give
    assert bare.returncode == 2 and bare.stderr.splitlines()[-1] == (
        "attention-map: DATA_FILE is not set: give an experiment file that sets it (`--config configs/demo.conf`, "
        "say) or DATA_FILE=<records file> on the command line")


def test_a_run_refused_for_its_settings_says_which_variable_expanded_to_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("AM_TEST_DATA_ROOT", raising=False)
    conf = tmp_path / "exp.conf"
    conf.write_text(f'DATA_FILE="$AM_TEST_DATA_ROOT/records.jsonl"\nOUTPUT_DIR="{tmp_path}/out"\n')
    result = cli("run", "--config", conf)
    assert result.returncode == 2
    said = result.stderr.splitlines()
    assert said[-2].endswith(f"WARNING {conf}: line 1: $AM_TEST_DATA_ROOT is not set, so it expands to nothing (set "
                             "it, or write ${AM_TEST_DATA_ROOT:-default})"), said
    assert said[-1] == f"attention-map: {conf}: DATA_FILE=/records.jsonl does not exist or is not a file", said


@pytest.mark.parametrize("args, message", [
    (("make-demo-data", "{tmp}/demo", "--count", "0"), "argument --count: '0' is not a whole number of at least 1"),
    (("train-toy-model", "{tmp}/toy", "--steps", "-1"), "argument --steps: '-1' is not a whole number of at least 0"),
    (("train-lesion-detector", "{tmp}/det", "--check-films", "-3"),
     "argument --check-films: '-3' is not a whole number of at least 0"),
    (("evaluate", "{tmp}", "--truth", "b.csv", "--top-percent", "150"),
     "argument --top-percent: '150' is not a percentage above 0 and at most 100"),
    (("evaluate", "{tmp}", "--truth-maps", "g.csv", "--gaze-sigma", "-1"),
     "argument --gaze-sigma: '-1' is not a length in pixels above 0"),
    (("robustness", "{tmp}", "--top-percent", "nan"), "argument --top-percent: 'nan' is not a percentage above 0"),
])
def test_a_number_out_of_range_on_the_command_line_stops_before_any_work(tmp_path, args, message):
    # before, these trained for -1 steps, divided by zero, or failed deep inside NumPy or OpenCV with a traceback
    result = cli(*(arg.format(tmp=tmp_path) for arg in args))
    assert result.returncode == 2 and message in result.stderr.splitlines()[-1], result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


def test_default_hub_model_offline_fails_fast_with_advice(tmp_path):
    out = tmp_path / "out"
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}  # empty cache, nothing listening
    env.pop("HF_HUB_OFFLINE", None)
    # a guard against the hub client's retries (minutes), not a speed goal: the run stops at its first refusal
    result = cli("run", "--config", REPO / "configs/gemex/exp_01_vqa.conf", f"OUTPUT_DIR={out}", env=env,
                 process=True)
    assert result.returncode == 2
    assert "fetch-model" in result.stderr and "MODEL=" in result.stderr
    assert not out.exists()


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_make_test_model_is_deterministic(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert cli("make-test-model", tmp_path / name, "--arch", "tiny", "--seed", seed).returncode == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_a_path_the_file_system_refuses_is_one_line_naming_it(tmp_path):
    (tmp_path / "a-file").write_text("")
    for command in (("make-demo-data", tmp_path / "a-file" / "demo"), ("make-test-model", tmp_path / "a-file")):
        refused = cli(*command)
        assert refused.returncode == 1 and refused.stderr.strip().count("\n") == 0, refused.stderr
        assert refused.stderr.startswith(f"attention-map: {tmp_path / 'a-file'}"), refused.stderr
    verbose = cli("-v", "make-test-model", tmp_path / "a-file")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr and "FileExistsError" in verbose.stderr


@pytest.mark.parametrize("signum, status, line",
                         [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "stopped by SIGTERM")])
def test_verbose_adds_the_traceback_and_keeps_the_exit_status(monkeypatch, capsys, signum, status, line):
    """-v shows where the run was; the status stays the README's, which a job's script and Slurm read."""
    import os
    import signal
    import time

    from attention_map import cli as command_line

    def stopped_from_outside(args, log):
        os.kill(os.getpid(), getattr(signal, signum))
        time.sleep(30)                  # the signal's handler raises here

    monkeypatch.setattr(command_line, "_command", stopped_from_outside)
    try:
        got = command_line.main(["-v", "default-conf"])
    except KeyboardInterrupt:       # left to escape, it would stop pytest's session, not fail this test
        pytest.fail(f"{signum} with -v escaped main() instead of ending with status {status}")
    assert got == status
    err = capsys.readouterr().err
    assert "Traceback" in err and "stopped_from_outside" in err, err
    assert err.splitlines()[-1].startswith(f"attention-map: {line}; what was finished is kept"), err


def test_verbose_shows_the_cause_that_a_refusals_one_line_sums_up(tmp_path):
    """A weights file that cannot be read stops the run in one line; -v puts the traceback before it, down to
    torch.load's own error, and keeps the line and the status."""
    from attention_map.synthetic import write_demo_data

    records = write_demo_data(tmp_path / "data", count=1, size=96)
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    args = ("run", f"DATA_FILE={records}", "MODEL=timm:resnet10t", f"MODEL_WEIGHTS={tmp_path / 'notes.pt'}",
            f"OUTPUT_DIR={tmp_path / 'out'}")
    plain, verbose = cli(*args), cli("-v", *args)
    assert plain.returncode == verbose.returncode == 2, (plain.stderr, verbose.stderr)
    line = plain.stderr.splitlines()[-1]
    assert line.startswith(f"attention-map: MODEL_WEIGHTS={tmp_path / 'notes.pt'}: ")
    assert "Traceback" not in plain.stderr
    assert verbose.stderr.splitlines()[-1] == line
    assert "Traceback" in verbose.stderr and f"torch{os.sep}serialization.py" in verbose.stderr, verbose.stderr


def test_in_a_terminal_the_log_goes_above_the_progress_bar(tmp_path, tiny_model):
    """A film that fails while the bar is drawn: its ERROR line is a line of its own, not appended to the bar's."""
    import fcntl
    import struct
    import termios

    from attention_map.synthetic import write_demo_data

    records = write_demo_data(tmp_path / "data", count=3, size=96)
    (tmp_path / "data" / "films" / "synthetic_001.png").unlink()
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))     # 40 rows, 120 columns
    run = subprocess.Popen([sys.executable, "-m", "attention_map", "run", f"DATA_FILE={records}",
                            f"MODEL={tiny_model}", f"OUTPUT_DIR={tmp_path / 'out'}"], cwd=REPO,
                           stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    said = b""
    with contextlib.suppress(OSError):      # EIO once the run has closed the terminal
        while chunk := os.read(leader, 65536):
            said += chunk
    os.close(leader)
    assert run.wait(timeout=300) == 3, said
    pieces = re.split(r"[\r\n]", said.decode())     # what a terminal shows on one line, at one time
    assert any(piece.startswith("heatmaps:") for piece in pieces), said
    assert any("ERROR" in piece and "synthetic_001.png" in piece for piece in pieces), said
    assert not [piece for piece in pieces if "heatmaps:" in piece and "ERROR" in piece], said


def test_fetch_model_writes_a_self_contained_folder(tmp_path, biomedclip_model):
    """fetch-model against a stand-in hub laid out like BiomedCLIP's two repositories."""
    import json
    import shutil

    from attention_map.models.fetch import fetch_model

    hub = {"microsoft/BiomedCLIP": biomedclip_model, "microsoft/BiomedBERT": biomedclip_model / "text"}
    config = json.loads((biomedclip_model / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"].update(hf_model_name="microsoft/BiomedBERT", hf_tokenizer_name="microsoft/BiomedBERT")
    hub_config = tmp_path / "hub_config.json"
    hub_config.write_text(json.dumps(config))

    def list_files(repo_id):
        return [p.name for p in hub[repo_id].iterdir() if p.is_file()]

    def snapshot(repo_id, local_dir, allow_patterns):
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for name in allow_patterns:
            source = hub_config if name == "open_clip_config.json" and repo_id == "microsoft/BiomedCLIP" \
                else hub[repo_id] / name
            if source.is_file():
                shutil.copy(source, Path(local_dir) / name)

    folder = fetch_model("hf-hub:microsoft/BiomedCLIP", tmp_path / "fetched", snapshot, list_files)
    text_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == "text"
    assert (folder / "text" / "vocab.txt").is_file() and (folder / "open_clip_model.safetensors").is_file()
    moved = shutil.move(str(folder), str(tmp_path / "elsewhere"))     # relative paths: the folder can move
    original = load_model(str(biomedclip_model), torch.device("cpu"))
    fetched = load_model(moved, torch.device("cpu"))
    prompts = ["nodule in the left upper lung"]
    assert torch.allclose(original.encode_text(prompts), fetched.encode_text(prompts))


def test_a_bad_image_or_record_costs_only_itself(tmp_path, tiny_model):
    from attention_map.synthetic import write_demo_data

    records = write_demo_data(tmp_path / "data", count=2, size=128)
    (tmp_path / "data" / "films" / "broken.png").write_text("not a png")
    with open(records, "a") as handle:
        handle.write('{"image_path": "films/broken.png", "question": "q?", "answer": "a", "q_id": 0}\n'
                     '{"image_path": "films/missing.png", "question": "q?", "answer": "a", "q_id": 0}\n'
                     '{"image_path": "../outside.png", "question": "q?", "answer": "a", "q_id": 0}\n'
                     '{"image_path": \n')
    out = tmp_path / "out"
    result = cli("run", f"DATA_FILE={records}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}")
    assert result.returncode == 3, result.stderr
    assert "2 heatmaps written, 4 failed" in result.stdout
    assert [r["image_path"] for r in read_manifest(out)] == ["films/synthetic_000_idx0.png",
                                                            "films/synthetic_001_idx0.png"]
    with open(out / "errors.csv", newline="") as handle:
        errors = {(e["row"], e["stage"]): e["reason"] for e in csv.DictReader(handle)}
    assert errors.keys() == {("3", "load"), ("4", "load"), ("5", "record:image_path"), ("6", "record:json")}
    # the column of the record cut short, on its own line, and that the line ends there
    assert errors["6", "record:json"] == "not valid JSON (Expecting value at column 16, where the line ends)"
    bar = [line for line in result.stderr.splitlines() if line.startswith("heatmaps: 100%")]
    assert bar and bar[-1].endswith("failed=4, heatmaps=2]"), result.stderr    # the films that failed to load too
    assert "Traceback" not in result.stderr
    again = cli("-v", "run", f"DATA_FILE={records}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}", "WORKERS=0")
    assert again.returncode == 3 and "0 heatmaps written, 4 failed" in again.stdout, again.stderr
    # -v: below a film's ERROR line, where it failed (the reader of images), down to the decoder's own error
    failure = again.stderr.split("films/broken.png: load failed: ", 1)[-1]
    assert "Traceback" in failure and f"attention_map{os.sep}images.py" in failure, again.stderr
    assert "PIL.UnidentifiedImageError" in failure.split("films/missing.png")[0], again.stderr
    decoded = cli("-v", "run", f"DATA_FILE={records}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}", "WORKERS=1")
    failure = decoded.stderr.split("films/broken.png: load failed: ", 1)[-1].split("films/missing.png")[0]
    assert "PIL.UnidentifiedImageError" in failure, decoded.stderr      # from the decoding worker process too


def test_cam_version_picks_the_method_and_the_manifest_says_which(tmp_path, tiny_model, cxr):
    out = tmp_path / "out"
    result = cli("run", "--config", REPO / "configs/gemex/exp_01_vqa.conf", f"MODEL={tiny_model}",
                 f"OUTPUT_DIR={out}", "CAM_VERSION=hirescam", "STOP_AFTER=3", "SAVE_RAW_CAM=true")
    assert result.returncode == 0, result.stderr
    assert "HiResCAM at visual.transformer.resblocks[-1].ln_1" in result.stderr
    assert "0 masked forwards" in result.stdout             # a gradient method: one forward and backward per film
    rows = read_manifest(out)
    assert rows and {row["cam_method"] for row in rows} == {"HiResCAM"}


def test_the_installed_command_runs_in_its_own_process_as_in_the_tests(tmp_path, tiny_model):
    """The tests call the command's `main` in their own process (see cli); the installed `attention-map` must give
    the same exit status, outputs, summary and log lines (figures aside) on a run with a failing record, and the same
    one-line errors on a bad config."""
    from attention_map.synthetic import write_demo_data

    records = write_demo_data(tmp_path / "data", count=2, size=128)
    with open(records, "a") as handle:
        handle.write('{"image_path": "films/missing.png", "question": "q?", "answer": "a", "q_id": 0}\n')
    command = Path(sys.executable).with_name("attention-map")

    def masked(way, text):    # the output folders differ, and clock times, durations, rates and progress bars
        return [re.sub(r"\d+(\.\d+)?", "N", line) for line in text.replace(str(tmp_path / way), "OUT").splitlines()
                if "%|" not in line]

    results = {}
    for way in ("process", "tests"):
        out = tmp_path / way
        args = ("run", f"DATA_FILE={records}", f"MODEL={tiny_model}", f"OUTPUT_DIR={out}")
        if way == "process":     # bytes: text mode would turn a carriage return into a line break
            done = subprocess.run([command, *args], cwd=REPO, capture_output=True)
            results[way] = subprocess.CompletedProcess(done.args, done.returncode, *map(bytes.decode, (done.stdout,
                                                                                                      done.stderr)))
        else:
            results[way] = cli(*args)
        assert results[way].returncode == 3, results[way].stderr
        assert "2 heatmaps written, 1 failed" in results[way].stdout
    for stream in ("stdout", "stderr"):
        assert masked("process", getattr(results["process"], stream)) == masked("tests", getattr(results["tests"], stream))
    # in a log (no terminal) the progress bar is whole lines, the first and the last at least, not redraws joined by
    # carriage returns
    log = results["process"].stderr
    bars = [line for line in log.splitlines() if line.startswith("heatmaps:")]
    assert "\r" not in log and bars[0].startswith("heatmaps:   0%") and bars[-1].startswith("heatmaps: 100%"), log
    assert (tmp_path / "process" / "vqa_manifest.csv").read_text() == (tmp_path / "tests" / "vqa_manifest.csv").read_text()

    bad = ("run", f"DATA_FILE={records}", "TOPK=0", "OUTPT_DIR=x")
    refused = subprocess.run([command, *bad], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == cli(*bad).returncode == 2
    assert refused.stderr == cli(*bad).stderr and "did you mean OUTPUT_DIR?" in refused.stderr


@pytest.mark.parametrize("command, module, train", [("train-toy-model", "toy", "train_toy_model"),
                                                    ("train-zone-model", "zones", "train_zone_model"),
                                                    ("train-lesion-detector", "lesion_detector",
                                                     "train_lesion_detector")])
def test_a_retrain_of_a_shipped_recipe_says_whether_it_wrote_the_shipped_bytes(tmp_path, monkeypatch, command, module,
                                                                                train):
    """Whoever retrains a shipped model learns whether they reproduced it or trained a sibling. Training is replaced
    by a copy of the shipped folder (the bytes a retrain writes where the model was trained), then by that copy with
    one byte of its weights changed (a sibling); another seed is another recipe, and nothing is said."""
    recipe = importlib.import_module(f"attention_map.models.{module}")
    changed = {}

    def copy_shipped(folder, *recipe_arguments, **device):
        shutil.copytree(recipe.SHIPPED, folder)
        if changed.get("one byte"):
            weights = max(folder.iterdir(), key=lambda path: path.stat().st_size)
            data = bytearray(weights.read_bytes())
            data[-1] ^= 1
            weights.write_bytes(bytes(data))
        return folder

    monkeypatch.setattr(recipe, train, copy_shipped)
    same = cli(command, tmp_path / "same", "--check-films", "0")
    assert same.returncode == 0, same.stderr
    assert f"holds the shipped model's bytes (every file of {recipe.SHIPPED})" in same.stderr
    changed["one byte"] = True
    sibling = cli(command, tmp_path / "sibling", "--check-films", "0")
    assert sibling.returncode == 0 and f"differs from the shipped model in {recipe.SHIPPED}: a sibling" in sibling.stderr
    other = cli(command, tmp_path / "seed1", "--seed", "1", "--check-films", "0")
    assert other.returncode == 0 and "shipped model" not in other.stderr
