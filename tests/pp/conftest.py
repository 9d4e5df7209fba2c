"""Fixtures shared by the patch tests."""

import pytest

from agl_scverse._images import tile_cache


@pytest.fixture
def _own_caches(tmp_path, monkeypatch):
    """A private JPEG cache folder and an empty tile cache for the test."""
    monkeypatch.setenv("AGL_SCVERSE_CACHE", str(tmp_path / "cache"))
    tile_cache().clear()
    yield
    tile_cache().clear()
