"""Shared fixtures: the real chest X-rays beside the checkout, and random-weight model folders built offline."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from attention_map.models import PINNED_NUMERICS
from local_cluster import ImageBuild, require, unmet

REPO = Path(__file__).resolve().parents[1]
CXR = REPO.parent / "shared" / "data" / "cxr"

# Retrains the models named in argv[2:] (toy_retrain, zone_retrain, lesion_retrain), one after the other, from their
# recipes on two CPU threads, as the shipped models were trained, and checks them, writing the figures as JSON to
# toy.json, zones.json and lesions.json in the folder argv[1] (and its log to log.txt there). Two threads from start
# to end, whatever else runs: a model's bytes depend on the number of threads, and a retrain whose threads changed
# part way (when the other tests ended) gave other bytes, and other figures, on each run.
#
# The processor's part is pinned too (PINNED_NUMERICS of attention_map.models), so that a retrain gives the same
# bytes, and figures, on every processor of one kind (every Intel processor with AVX2; the AMD EPYC that trained the
# shipped toy model); the toy model's training also keeps oneDNN off (toy.py).
# The CNNs keep oneDNN (without it their training took 2 to 3 times as long: the zone classifier's 174 s against
# 91 s). Unpinned, each processor trained its own sibling of a shipped model: one CI machine's retrain of the toy
# recipe before patch dropout missed a threshold. Each retrain says whether it wrote the shipped bytes. Only a toy
# retrain that did not (MKL's own branch on another processor) is checked here, on 60 films that played no part in
# choosing the recipe, as many as the thresholds are set on (README, "The toy model"): the shipped bytes have the
# shipped model's figures. The zone classifier's and the lesion detector's retrains are checked either way, in
# seconds (the shipped zone classifier was trained without the pins, docs/methods.md, so its retrain is a sibling).
_RETRAIN = """
import json, logging, sys, torch
from pathlib import Path
from attention_map.models import holds_shipped_bytes, lesion_detector, toy, zones
torch.set_num_threads(2)
logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
logging.getLogger("attention_map").setLevel(logging.INFO)   # its steps, not open_clip's loading chatter
work = Path(sys.argv[1])
if "toy_retrain" in sys.argv:
    folder = toy.train_toy_model(work / "toy")
    figures = {"shipped_bytes": holds_shipped_bytes(folder, toy.SHIPPED)}
    if not figures["shipped_bytes"]:      # the shipped bytes have the shipped model's figures, which the tests check
        figures["films"] = 60             # the test prints it
        figures["figures"] = toy.check_toy_model(folder, count=figures["films"], first_seed=toy.UNSEEN)
    (work / "toy.json").write_text(json.dumps(figures))
if "zone_retrain" in sys.argv:
    folder = zones.train_zone_model(work / "zones")
    figures = zones.check_zone_model(folder, count=40, methods=["GradCAM", "HiResCAM"])
    (work / "zones.json").write_text(json.dumps({**figures, "shipped_bytes": holds_shipped_bytes(
        folder, zones.SHIPPED)}))
if "lesion_retrain" in sys.argv:
    folder = lesion_detector.train_lesion_detector(work / "lesions")
    figures = lesion_detector.check_lesion_detector(folder, count=40, methods=["HiResCAM", "LayerCAM"],
                                                    targets=("topk", "sum"))
    (work / "lesions.json").write_text(json.dumps({**figures, "shipped_bytes": holds_shipped_bytes(
        folder, lesion_detector.SHIPPED)}))
"""
RETRAINS = ("toy_retrain", "zone_retrain", "lesion_retrain")
DOCKER_TOOLS = ("dockerd", "docker", "debootstrap")
_retrain: dict = {}
_image: dict = {}


def _uses(item, *fixtures: str) -> bool:
    return any(name in getattr(item, "fixturenames", ()) for name in fixtures)


def pytest_collection_modifyitems(items):
    """The Slurm array test runs first: much of its time is spent waiting on the scheduler, which at the end of the
    session (the retrain done) would leave a core idle, and at the start overlaps the retrain. The Docker image is
    built beside the tests (see below), so the test that runs it comes after the others; the tests of the retrained
    models run last."""
    items.sort(key=lambda item: (_uses(item, *RETRAINS), _uses(item, "docker_image"),
                                 item.path.name != "test_cluster.py"))


def pytest_collection_finish(session):
    """When a retrain is among the tests that will run (after -k or -m have deselected theirs), they start now, one
    after the other in one process (the toy model's, the longest single piece, first), so that their minutes overlap
    the other tests, and the tests go on at a lower priority (nice 5), so that the retrain keeps the cores it can;
    the retrain tests run last.

    While a retrain runs, the tests and the processes they start use one thread: two threads of PyTorch's OpenMP
    pool sharing a core with the retrain spin on each other (a convolution took 3x as long as on one thread), which
    had made the tests' first half twice as slow. Once it has ended they take their threads back (below).

    When the Docker image test is among them, the image is built from now on, in a thread beside the tests: most of
    the build's minutes are spent in pip and on the disk, which had held the tests up for four minutes."""
    wanted = sorted({name for item in session.items for name in RETRAINS if _uses(item, name)})
    if wanted:
        work = Path(tempfile.mkdtemp(prefix="attention-map-retrain-"))
        # passive: a thread that waits for the other sleeps rather than spins on the core the tests share
        process = subprocess.Popen([sys.executable, "-c", _RETRAIN, str(work), *wanted], cwd=REPO,
                                   env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **PINNED_NUMERICS},
                                   stdout=(work / "log.txt").open("w"), stderr=subprocess.STDOUT)
        threads = (torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"))      # taken back when it ends
        _retrain.update(process=process, work=work, threads=threads)
        os.nice(5)
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    if any(_uses(item, "docker_image") for item in session.items) and not unmet(*DOCKER_TOOLS):
        # the engine at the tests' priority (nice 5), but the build's containers run in the engine's control group,
        # which shares the CPU with the tests' processes as one; the test that runs the image comes last
        _image["build"] = ImageBuild(Path(tempfile.mkdtemp(prefix="attention-map-docker-"))).start()


def pytest_runtest_setup(item):
    """Once the retrain has ended, the tests take back the threads they had, from the next test on: on one thread the
    tests after it had left a core idle (3 to 4 minutes of CI on the AMD EPYC, docs/testing.md). Between tests, so that
    a test and the processes it starts compute on one number of threads throughout."""
    if "threads" in _retrain and _retrain["process"].poll() is not None:
        threads, variable = _retrain.pop("threads")
        torch.set_num_threads(threads)
        if variable is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = variable


def pytest_sessionfinish():
    if _retrain:
        _retrain["process"].kill()        # a session that ends early does not wait for it
        _retrain["process"].wait()
        shutil.rmtree(_retrain["work"], ignore_errors=True)
    if _image:
        _image["build"].stop()
        shutil.rmtree(_image["build"].folder, ignore_errors=True)


def _retrained(name: str) -> dict:
    """The figures of one retrained model (its file `name`), once the retrain process has made them all."""
    process, work = _retrain["process"], _retrain["work"]
    if process.wait() != 0:
        pytest.fail(f"retraining the shipped models failed: {(work / 'log.txt').read_text()[-2000:]}")
    return json.loads((work / name).read_text())


@pytest.fixture(scope="session")
def toy_retrain() -> dict:
    """The figures of the toy model retrained from its recipe (started at collection, see above)."""
    return _retrained("toy.json")


@pytest.fixture(scope="session")
def zone_retrain() -> dict:
    """The figures of the zone classifier retrained from its recipe (after the toy model's, in its process)."""
    return _retrained("zones.json")


@pytest.fixture(scope="session")
def lesion_retrain() -> dict:
    """The figures of the lesion detector retrained from its recipe (after the zone classifier, in its process)."""
    return _retrained("lesions.json")


@pytest.fixture(scope="session")
def docker_image() -> str:
    """The tag of the image of docker/Dockerfile (built beside the tests since collection, see above)."""
    require(*DOCKER_TOOLS)
    return _image["build"].wait()


@pytest.fixture(scope="session")
def cxr() -> Path:
    """../shared/data/cxr (real NIH films, DICOMs and GEMeX-style records)."""
    if not (CXR / "nih").is_dir():
        pytest.skip(f"real chest X-rays not found at {CXR} (the shared data folder sits beside the checkout)")
    return CXR


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from attention_map.models.random_models import make_test_model

    return make_test_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def biomedclip_model(tmp_path_factory) -> Path:
    """BiomedCLIP's exact architecture with random weights (about 0.8 GB on disk)."""
    from attention_map.models.random_models import make_test_model

    return make_test_model(tmp_path_factory.mktemp("models") / "biomedclip", "biomedclip", seed=0)


@pytest.fixture(scope="session")
def toy_model() -> Path:
    """The toy CLIP trained on synthetic films, as shipped in examples/models/demo-toy."""
    from attention_map.models.toy import SHIPPED

    return SHIPPED
