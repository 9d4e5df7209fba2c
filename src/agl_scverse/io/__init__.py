"""Readers: legacy ST, 10x Visium, HEST-1k and SpatialData into the AnnData layout of agl-scverse."""

from .readers import *  # noqa: F403
from .readers import __all__  # noqa: F401
