"""Shared fixtures: the real chest X-rays beside the checkout, and random-weight model folders built offline."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CXR = REPO.parent / "shared" / "data" / "cxr"


def pytest_collection_modifyitems(items):
    """Tests that build the Docker image run last: the build needs many GB of disk for a while, and when a machine
    runs short, the other tests have run on a disk with room."""
    items.sort(key=lambda item: "docker_image" in getattr(item, "fixturenames", ()))


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
def toy_model(tmp_path_factory) -> Path:
    """The toy CLIP trained on synthetic films: the one scripts/install.sh trained, when it is there and was made
    by the current recipe, else trained here (minutes on a CPU)."""
    from attention_map.models.toy import is_current, train_toy_model

    installed = REPO / "results" / "models" / "demo-toy"
    if is_current(installed):
        return installed
    return train_toy_model(tmp_path_factory.mktemp("models") / "toy", seed=0)
