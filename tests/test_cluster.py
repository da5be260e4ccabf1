"""The cluster entry points against the real things: sbatch job arrays on a local Slurm, and the Docker image.

`.ci/run` installs slurm-wlm, munge, docker.io and debootstrap (scripts/install_system_tools.sh). Elsewhere these
tests skip, naming what is missing; under CI=true a missing tool fails them instead.
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from local_cluster import ImageBuild, LocalSlurm, require

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    require("slurmctld", "slurmd", "sbatch", "munged")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def _manifest(folder: Path) -> list[dict]:
    with open(folder / "vqa_manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _raw_maps(folder: Path, rows: list[dict]) -> list[np.ndarray]:
    return [cv2.imread(str(folder / row["raw_map"]), cv2.IMREAD_UNCHANGED) / 65535.0 for row in rows]


def _experiment(tmp_path: Path, model: Path, **settings) -> Path:
    """An experiment file on the real GEMeX-style records, as a user would write one. TOPK=8: a BiomedCLIP heatmap
    still takes seconds (the array test preempts a task between its first heatmap and its second), and the array
    test took 169 CPU-seconds of the machine instead of 216 at 16 (its local run on one thread: 38 against 67), at the
    start of CI, when the cores are shared most."""
    lines = [f'source "{REPO}/configs/gemex/exp_01_vqa.conf"', f'MODEL="{model}"', "STOP_AFTER=4", "TOPK=8",
             "DEVICE=cpu", "SAVE_RAW_CAM=true"] + [f'{k}="{v}"' for k, v in settings.items()]
    conf = tmp_path / "experiment.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def test_a_killed_array_task_resubmitted_gives_what_one_local_run_gives(tmp_path, slurm, biomedclip_model, cxr):
    conf = _experiment(tmp_path, biomedclip_model)
    local = subprocess.run(["bash", "submit_heatmap_gen.sh", str(conf), f"OUTPUT_DIR={tmp_path / 'local'}"], cwd=REPO,
                           capture_output=True, text=True, timeout=900)
    assert local.returncode == 0, local.stderr

    out = tmp_path / "array"
    name = f"am-test-{os.getpid()}"
    # the script asks for a GPU, 8 CPUs and 32 GB; options on the command line override that for this node
    sbatch = ["sbatch", "--parsable", f"--job-name={name}", "--gres=none", "--cpus-per-task=1", "--mem=3G",
              f"--output={tmp_path}/%x-%A_%a.out"]
    submitted = slurm.run(*sbatch, "--array=0-1", "submit_heatmap_gen.sh", str(conf), f"OUTPUT_DIR={out}", cwd=REPO)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    journal = out / "shards" / "progress-0001-of-0002.jsonl"
    deadline = time.monotonic() + 600
    while not (journal.exists() and journal.read_bytes().count(b"\n") >= 1) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert slurm.run("scancel", f"{job}_1", cwd=REPO).returncode == 0   # preempted after its first heatmap
    slurm.wait_idle()

    merge_logs = sorted((REPO / "logs").glob(f"{name}-merge-*.out"))
    assert len(merge_logs) == 1
    assert "1 of 2 shards have not finished (1)" in merge_logs[0].read_text()
    assert not (out / "vqa_manifest.csv").exists()

    again = slurm.run(*sbatch, "--array=1", "--wait", "submit_heatmap_gen.sh", str(conf), f"OUTPUT_DIR={out}",
                      cwd=REPO)
    assert again.returncode == 0, again.stderr + "".join(p.read_text() for p in tmp_path.glob(f"{name}-*_1.out"))
    slurm.wait_idle()
    merge_logs = sorted((REPO / "logs").glob(f"{name}-merge-*.out"))
    assert "Merged 2 shards: 4 heatmaps" in merge_logs[-1].read_text()
    log = (tmp_path / f"{name}-{again.stdout.strip()}_1.out").read_text()
    assert "already done" in log and ", 0 already done" not in log   # the resubmitted task resumed

    assert _manifest(out) == _manifest(tmp_path / "local")
    for got, want in zip(_raw_maps(out, _manifest(out)), _raw_maps(tmp_path / "local", _manifest(out))):
        assert np.abs(got - want).max() <= 1e-6
    for row in _manifest(out):
        assert (out / row["image_path"]).read_bytes() == (tmp_path / "local" / row["image_path"]).read_bytes()
    for path in merge_logs:
        path.unlink()


def test_the_pipeline_runs_in_docker_offline_and_outputs_belong_to_the_user(tmp_path, docker_image, tiny_model, cxr):
    import pwd

    user = "attention-test"
    if subprocess.run(["id", user], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--groups", "docker", user], check=True)
    uid = pwd.getpwnam(user).pw_uid
    work = Path(f"/tmp/attention-docker-{os.getpid()}")   # not under pytest's private tmp: the user must read it
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o755)
    model = Path(shutil.copytree(tiny_model, work / "model"))
    out = work / "out"
    conf = _experiment(work, model, OUTPUT_DIR=out, CONTAINER="docker", CONTAINER_IMAGE=docker_image, OFFLINE="true",
                       HF_HOME=work / "hf")
    for path in [work, *work.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    os.chown(work, uid, -1)        # the user's own folder, as on a cluster

    as_user = ["runuser", "-u", user, "--"]
    command = [*as_user, "scripts/run_heatmap_gen.sh", str(conf), "run", "--config", str(conf)]
    dry = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "DRY_RUN": "true"})
    assert f"--user {uid}:" in dry.stdout and "--network none" in dry.stdout, dry.stdout + dry.stderr
    assert f"--volume {model}:{model}:ro" in dry.stdout and f"--volume {out}:{out}:rw" in dry.stdout

    # Slurm's scancel, preemption and time limit signal the job's processes, the Docker client among them, which passes
    # SIGTERM on to the container's first process: the run. (With no handler of its own it ignored SIGTERM there, and
    # the container ran on after its job had ended.)
    stopped = work / "stopped"      # every film, with the CRF: seconds of work left when the first heatmap is written
    stopping = subprocess.Popen([*command, f"OUTPUT_DIR={stopped}", "STOP_AFTER=", "SKIP_CRF=false"], cwd=REPO,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    journal = stopped / "shards" / "progress-0000-of-0001.jsonl"
    deadline = time.monotonic() + 600
    while not (journal.exists() and journal.read_bytes().count(b"\n")) and stopping.poll() is None:
        assert time.monotonic() < deadline, "the run in the container wrote no heatmap in 10 minutes"
        time.sleep(0.01)
    client = subprocess.run(["pgrep", "--parent", str(stopping.pid)], capture_output=True, text=True).stdout.split()
    assert len(client) == 1 and subprocess.run(["kill", "-TERM", client[0]]).returncode == 0, stopping.communicate()
    said = stopping.communicate(timeout=120)[0]
    assert "attention-map: stopped by SIGTERM; what was finished is kept" in said, said[-2000:]
    assert stopping.returncode == 143
    running = ["docker", "ps", "--quiet", "--filter", f"ancestor={docker_image}"]
    deadline = time.monotonic() + 60
    while subprocess.run(running, capture_output=True, text=True).stdout.strip() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not subprocess.run(running, capture_output=True, text=True).stdout.strip()

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Done: 4 images, 4 heatmaps written, 0 failed" in result.stdout
    # the base image's torch, the pinned one, is the image's: not installed a second time in its venv (located, not
    # imported: importing torch takes seconds)
    torch_file = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "python", docker_image,
                                 "-c", "import importlib.util; print(importlib.util.find_spec('torch').origin)"],
                                capture_output=True, text=True)
    assert torch_file.stdout.startswith(f"/{ImageBuild.SITE}/" if ImageBuild.base_carries_torch() else "/opt/venv/"), (
        torch_file.stdout + torch_file.stderr)
    files = [p for p in out.rglob("*")]
    assert len([p for p in files if p.name.endswith("_cam.png")]) == 4
    assert all(p.stat().st_uid == uid for p in files), [(p, p.stat().st_uid) for p in files if p.stat().st_uid != uid]

    host = subprocess.run(["bash", "submit_heatmap_gen.sh", str(conf), "CONTAINER=none", f"OUTPUT_DIR={work / 'host'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert host.returncode == 0, host.stderr
    assert _manifest(out) == _manifest(work / "host")
    shutil.rmtree(work, ignore_errors=True)
