"""Fixtures shared by the test modules: embedding stores that training builds go to a temporary cache, not the
user's ~/.cache; the tiny random Stable Diffusion and DeepFloyd IF folders. Plain helpers are in fixtures.py."""

import os
from pathlib import Path

import pytest

from amortized3d.priors.tiny import make_tiny_deepfloyd_if, make_tiny_stable_diffusion


@pytest.fixture(autouse=True, scope="session")
def _store_cache(tmp_path_factory):
    previous = os.environ.get("AMORTIZED3D_CACHE")
    os.environ["AMORTIZED3D_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("AMORTIZED3D_CACHE", None)
    else:
        os.environ["AMORTIZED3D_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion folder (amortized3d.priors.tiny), written once per session."""
    return make_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd") / "sd")


@pytest.fixture(scope="session")
def tiny_if(tmp_path_factory) -> Path:
    """A tiny random DeepFloyd IF stage I folder (amortized3d.priors.tiny), written once per session."""
    return make_tiny_deepfloyd_if(tmp_path_factory.mktemp("tiny_if") / "if")
