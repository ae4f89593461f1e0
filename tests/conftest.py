"""Embedding stores that training builds go to a temporary cache, not the user's ~/.cache."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _store_cache(tmp_path_factory):
    previous = os.environ.get("AMORTIZED3D_CACHE")
    os.environ["AMORTIZED3D_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("AMORTIZED3D_CACHE", None)
    else:
        os.environ["AMORTIZED3D_CACHE"] = previous
