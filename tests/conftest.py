"""Shared fixtures: the real chest X-rays beside the checkout, and random-weight model folders built offline."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CXR = REPO.parent / "shared" / "data" / "cxr"


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
