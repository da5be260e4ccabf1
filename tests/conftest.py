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
# JSON to toy.json, zone.json and lesion.json in the folder argv[1]
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
    (work / "zone.json").write_text(json.dumps(check_zone_model(zones, count=40, methods=["GradCAM", "HiResCAM"])))
if "lesion_retrain" in sys.argv:
    lesions = train_lesion_detector(work / "lesions")
    (work / "lesion.json").write_text(json.dumps(check_lesion_detector(
        lesions, count=40, methods=["HiResCAM", "LayerCAM"], targets=("topk", "sum"))))
"""
RETRAINS = ("toy_retrain", "zone_retrain", "lesion_retrain")
# the toy model's retrain (most of the minutes) on a core of its own; the two short ones in the idle time the tests
# leave on the other core, at the lowest priority
RETRAIN_GROUPS = ((("toy_retrain",), 0), (("zone_retrain", "lesion_retrain"), 19))
_retrains_running: list[dict] = []   # per process: names, process, work folder
_threads: dict = {}                  # the test process's own, while the retrains run


def _retrains(item) -> bool:
    return any(name in getattr(item, "fixturenames", ()) for name in RETRAINS)


def pytest_collection_modifyitems(items):
    """The cluster tests (a Slurm array, the Docker image) run first: much of their time is spent waiting on the
    scheduler, the network and the disk, which at the end of the session (the retrain done) would leave a core idle,
    and at the start overlaps the retrain. The tests of the retrained models run last (see below)."""
    items.sort(key=lambda item: (_retrains(item), item.path.name != "test_cluster.py"))


def pytest_collection_finish(session):
    """When a retrain is among the tests that will run (after -k or -m have deselected theirs), it starts now, in a
    process on one thread, so that its minutes overlap the other tests: the toy model's on a core of its own (the
    tests go on at a lower priority, nice 5, so that it keeps it), the zone classifier's and the lesion detector's
    at the lowest priority (nice 19), in what the tests leave idle. Their tests run last and wait for them.

    While they run, the tests and the processes they start use one thread as well: two threads of PyTorch's OpenMP
    pool sharing the one core the retrain leaves spin on each other (a convolution took 3x as long as on one thread),
    which had made the tests' first half twice as slow. Once the retrains have finished, the next test gets the
    default back (see pytest_runtest_setup)."""
    wanted = {name for item in session.items for name in RETRAINS if name in getattr(item, "fixturenames", ())}
    for names, niceness in RETRAIN_GROUPS:
        names = [name for name in names if name in wanted]
        if names:
            work = Path(tempfile.mkdtemp(prefix="attention-map-retrain-"))
            _retrains_running.append(dict(names=names, work=work, process=subprocess.Popen(
                [sys.executable, "-c", _RETRAIN, str(work), *names], cwd=REPO, preexec_fn=lambda n=niceness: os.nice(n),
                stdout=(work / "log.txt").open("w"), stderr=subprocess.STDOUT)))
    if _retrains_running:
        os.nice(5)
        _threads.update(torch=torch.get_num_threads(), omp=os.environ.get("OMP_NUM_THREADS"))
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


def pytest_runtest_setup(item):
    """The default number of threads again, for the test process and its children, once the retrains are done."""
    if _threads and all(retrain["process"].poll() is not None for retrain in _retrains_running):
        torch.set_num_threads(_threads.pop("torch"))
        omp = _threads.pop("omp")
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


def pytest_sessionfinish():
    for retrain in _retrains_running:
        retrain["process"].kill()        # a session that ends early does not wait for it
        retrain["process"].wait()
        shutil.rmtree(retrain["work"], ignore_errors=True)


def _retrained(name: str) -> dict:
    """The figures of one retrained model. Its tests run last, so while it waits a retrain running alone gets every
    core (its figures move a little with the number of threads, as between machines; the thresholds are the
    recipe's)."""
    retrain = next(r for r in _retrains_running if name in r["names"])
    while retrain["process"].poll() is None:
        running = [r for r in _retrains_running if r["process"].poll() is None]
        alone = running[0] if len(running) == 1 else None
        # a signal before the handler is in place would kill it
        if alone is not None and not alone.get("every_core") and (alone["work"] / "listening").exists():
            alone["process"].send_signal(signal.SIGUSR1)
            alone["every_core"] = True
        time.sleep(0.2)
    if retrain["process"].returncode != 0:
        pytest.fail(f"retraining {name} failed: {(retrain['work'] / 'log.txt').read_text()[-2000:]}")
    return json.loads((retrain["work"] / f"{name.removesuffix('_retrain')}.json").read_text())


@pytest.fixture(scope="session")
def toy_retrain() -> dict:
    """The figures of the toy model retrained from its recipe (started at collection, see above)."""
    return _retrained("toy_retrain")


@pytest.fixture(scope="session")
def zone_retrain() -> dict:
    """The figures of the zone classifier retrained from its recipe (started at collection, see above)."""
    return _retrained("zone_retrain")


@pytest.fixture(scope="session")
def lesion_retrain() -> dict:
    """The figures of the lesion detector retrained from its recipe (after the zone classifier, in the same
    process)."""
    return _retrained("lesion_retrain")


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
