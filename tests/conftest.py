"""Shared fixtures: the real chest X-rays beside the checkout, and random-weight model folders built offline."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CXR = REPO.parent / "shared" / "data" / "cxr"

# Retrains the toy model, the zone classifier and the lesion detector (those named in argv[2:]) from their recipes on
# one CPU thread, or on the default number from a SIGUSR1 on (see _retrained), and checks them, writing the figures as
# JSON to toy.json, zones.json and lesions.json in the folder argv[1]
_RETRAIN = """
import json, signal, sys, torch
from pathlib import Path
from attention_map.models.lesion_detector import check_lesion_detector, train_lesion_detector
from attention_map.models.toy import check_toy_model, train_toy_model
from attention_map.models.zones import check_zone_model, train_zone_model
every_core = torch.get_num_threads()
signal.signal(signal.SIGUSR1, lambda *_: torch.set_num_threads(every_core))
torch.set_num_threads(1)
work = Path(sys.argv[1])
(work / "listening").touch()
if "toy_retrain" in sys.argv:
    (work / "toy.json").write_text(json.dumps(check_toy_model(train_toy_model(work / "toy"), count=60)))
if "zone_retrain" in sys.argv:
    zones = train_zone_model(work / "zones")
    (work / "zones.json").write_text(json.dumps(check_zone_model(zones, count=40, methods=["GradCAM", "HiResCAM"])))
if "lesion_retrain" in sys.argv:
    lesions = train_lesion_detector(work / "lesions")
    (work / "lesions.json").write_text(json.dumps(check_lesion_detector(
        lesions, count=40, methods=["HiResCAM", "LayerCAM"], targets=("topk", "sum"))))
"""
RETRAINS = ("toy_retrain", "zone_retrain", "lesion_retrain")
_retrain: dict = {}


def _retrains(item) -> bool:
    return any(name in getattr(item, "fixturenames", ()) for name in RETRAINS)


def pytest_collection_modifyitems(items):
    """The cluster tests (a Slurm array, the Docker image) run first: much of their time is spent waiting on the
    scheduler, the network and the disk, which at the end of the session (the retrain done) would leave a core idle,
    and at the start overlaps the retrain. The tests of the retrained models run last (see below)."""
    items.sort(key=lambda item: (_retrains(item), item.path.name != "test_cluster.py"))


def pytest_collection_finish(session):
    """When a retrain is among the tests that will run (after -k or -m have deselected theirs), it starts now (the
    toy model's, then the zone classifier's and the lesion detector's) in a process of its own on one thread, so that
    its minutes overlap the other tests, and the tests go on at a lower priority (nice 5), so that the retrain, the
    longest single piece, keeps its core; its tests run last and wait for it.

    While it runs, the tests and the processes they start use one thread as well: two threads of PyTorch's OpenMP
    pool sharing the one core the retrain leaves spin on each other (a convolution took 3x as long as on one thread),
    which had made the tests' first half twice as slow. Once the retrain has finished, the next test gets the
    default back (see pytest_runtest_setup)."""
    wanted = sorted({name for item in session.items for name in RETRAINS
                     if name in getattr(item, "fixturenames", ())})
    if wanted:
        work = Path(tempfile.mkdtemp(prefix="attention-map-retrain-"))
        _retrain.update(work=work, process=subprocess.Popen(
            [sys.executable, "-c", _RETRAIN, str(work), *wanted], cwd=REPO,
            stdout=(work / "log.txt").open("w"), stderr=subprocess.STDOUT))
        os.nice(5)
        _retrain.update(threads=torch.get_num_threads(), omp=os.environ.get("OMP_NUM_THREADS"))
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


def pytest_runtest_setup(item):
    """The default number of threads again, for the test process and its children, once the retrain is done."""
    if "threads" in _retrain and _retrain["process"].poll() is not None:
        torch.set_num_threads(_retrain.pop("threads"))
        omp = _retrain.pop("omp")
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


def pytest_sessionfinish():
    if _retrain:
        _retrain["process"].kill()        # a session that ends early does not wait for it
        _retrain["process"].wait()
        shutil.rmtree(_retrain["work"], ignore_errors=True)


def _retrained(name: str) -> dict:
    """The figures of one retrained model. Its tests run last, so the rest of the retrain gets every core (its
    figures move a little with the number of threads, as between machines; the thresholds are the recipe's)."""
    process, work = _retrain["process"], _retrain["work"]
    while process.poll() is None and not (work / "listening").exists():   # a signal before the handler would kill it
        time.sleep(0.1)
    if process.poll() is None:
        process.send_signal(signal.SIGUSR1)
    if process.wait() != 0:
        pytest.fail(f"retraining the shipped models failed: {(work / 'log.txt').read_text()[-2000:]}")
    return json.loads((work / name).read_text())


@pytest.fixture(scope="session")
def toy_retrain() -> dict:
    """The figures of the toy model retrained from its recipe (started at collection, see above)."""
    return _retrained("toy.json")


@pytest.fixture(scope="session")
def zone_retrain() -> dict:
    """The figures of the zone classifier retrained from its recipe (after the toy model, in the same process)."""
    return _retrained("zones.json")


@pytest.fixture(scope="session")
def lesion_retrain() -> dict:
    """The figures of the lesion detector retrained from its recipe (after the zone classifier, in the same process)."""
    return _retrained("lesions.json")


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
