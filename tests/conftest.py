from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Real third-party test files live beside the checkout, never inside it.
ASSETS = Path(os.environ.get("DIGI2REAL_ASSETS", REPO.parent / "shared" / "assets"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow")
    skip_assets = pytest.mark.skip(reason=f"real assets absent ({ASSETS})")
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    has_gpu = False
    if any("gpu" in item.keywords for item in items):
        import torch

        has_gpu = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "assets" in item.keywords and not ASSETS.is_dir():
            item.add_marker(skip_assets)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def assets() -> Path:
    return ASSETS
