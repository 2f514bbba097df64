"""Shared test fixtures: real media from ``$AVATAR_TEST_DATA`` (default ``../shared/data``)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("AVATAR_TEST_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Root of the real test media; skips the test with a reason when absent."""
    if not DATA.is_dir():
        pytest.skip(f"real test media not found at {DATA}; set AVATAR_TEST_DATA")
    return DATA


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
