import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test session builds its own zoo models and calibrations: nothing from ~/.cache leaks in."""
    if "MOECAP_TEST_CACHE_DIR" in os.environ:  # reuse between local runs when asked to
        path = Path(os.environ["MOECAP_TEST_CACHE_DIR"])
    else:
        path = tmp_path_factory.mktemp("moecap-cache")
    old = os.environ.get("MOECAP_CACHE_DIR")
    os.environ["MOECAP_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MOECAP_CACHE_DIR", None)
    else:
        os.environ["MOECAP_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_moe_dir(_isolated_cache):
    from moecap.zoo.tiny_moe import ensure_tiny_moe

    return ensure_tiny_moe()


@pytest.fixture
def artifacts_dir():
    """Where tests leave files worth looking at after a CI run."""
    d = REPO / "test-artifacts"
    d.mkdir(exist_ok=True)
    return d


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


PYTHON = sys.executable
