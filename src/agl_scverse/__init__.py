"""agl-scverse: Auxiliary Gene Learning for predicting spatial gene expression from H&E.

Examples
--------
>>> import agl_scverse as agl
>>> adata = agl.datasets.synthetic_slide(seed=0)  # doctest: +SKIP
>>> model = agl.tl.agl_fit(adata)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - static analysers see the subpackages; at run time they load on first use
    from . import configs, datasets, io, model, pl, pp, tl
    from .configs import DkGSBConfig, EncoderConfig, GeneConfig, NetworkConfig, TrainingConfig

__all__ = [
    "io",
    "pp",
    "tl",
    "pl",
    "datasets",
    "model",
    "configs",
    "GeneConfig",
    "NetworkConfig",
    "TrainingConfig",
    "DkGSBConfig",
    "EncoderConfig",
    "__version__",
]
_SUBPACKAGES = frozenset({"io", "pp", "tl", "pl", "datasets", "model", "configs"})
#: the configuration classes, at the top (``agl.TrainingConfig``): the objects a user writes most often
_CONFIGS = frozenset({"GeneConfig", "NetworkConfig", "TrainingConfig", "DkGSBConfig", "EncoderConfig"})


def __getattr__(name: str):
    """Import a subpackage (``agl.tl``, ...) on first access, and read ``__version__`` when asked."""
    if name == "__version__":  # importlib.metadata takes a noticeable part of a second: read it when asked
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("agl-scverse")
        except PackageNotFoundError:  # pragma: no cover - a source tree that is not installed
            value = "0.0.0"
        globals()["__version__"] = value
        return value
    if name in _SUBPACKAGES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    if name in _CONFIGS:
        value = getattr(importlib.import_module(f"{__name__}.configs"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
