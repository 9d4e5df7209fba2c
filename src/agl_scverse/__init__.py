"""agl-scverse: Auxiliary Gene Learning for predicting spatial gene expression from H&E.

Examples
--------
>>> import agl_scverse as agl
>>> adata = agl.datasets.synthetic_slide(seed=0)  # doctest: +SKIP
>>> model = agl.tl.agl_fit(adata)  # doctest: +SKIP
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("agl-scverse")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
    __version__ = "0.0.0"

from . import datasets, io, model, pl, pp, tl

__all__ = ["io", "pp", "tl", "pl", "datasets", "model", "__version__"]
