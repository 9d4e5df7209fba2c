"""Shared fixtures. Tests that need ``../shared`` skip cleanly when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AGL_SHARED", REPO.parent / "shared"))
HER2ST = SHARED / "data" / "her2st"
WEIGHTS = SHARED / "weights"
DENSENET_WEIGHTS = WEIGHTS / "densenet121_keras_imagenet_features_torchvision.pth"


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    """Folder with the five HER2+ sections (C2..C6); skips when ../shared is absent."""
    if not (HER2ST / "C2" / "counts.tsv.gz").exists():
        pytest.skip("../shared/data/her2st not available")
    return HER2ST


@pytest.fixture(scope="session")
def densenet_weights() -> Path:
    """Local DenseNet-121 ImageNet weights; skips when absent."""
    if not DENSENET_WEIGHTS.exists():
        pytest.skip("../shared/weights DenseNet-121 not available")
    return DENSENET_WEIGHTS


@pytest.fixture(scope="session", autouse=True)
def _image_cache(tmp_path_factory):
    """Decoded-image caches (agl_scverse._images) of this test session go to a temporary folder, not the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AGL_SCVERSE_CACHE", str(tmp_path_factory.mktemp("agl_image_cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _torch_threads():
    """One torch thread in every test: engine results are then bit-identical whatever the machine's cores."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def noise():
    """The encoder tests' slide: ten spots on a random RGB image at 1 µm/px (``builders.noise_slide``)."""
    from builders import noise_slide

    return noise_slide()


@pytest.fixture
def graph_cache(tmp_path, monkeypatch):
    """An empty encoder cache for the test (``$AGL_SCVERSE_CACHE`` in ``tmp_path``), and nothing kept from earlier
    calls (built encoders, started ONNX sessions) before or after it. Returns the folder of exported graphs."""
    from agl_scverse.encoders import _onnx_backend as ob
    from agl_scverse.pp import _embed as emb

    monkeypatch.setenv("AGL_SCVERSE_CACHE", str(tmp_path / "c"))
    emb._BUILT.clear()
    ob.clear_started()
    yield tmp_path / "c" / "onnx"
    emb._BUILT.clear()
    ob.clear_started()
