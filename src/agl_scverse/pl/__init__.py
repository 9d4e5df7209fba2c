"""Plots: selected genes, spatial predictions, training history, per-gene performance."""

from ._plots import *  # noqa: F403
from ._plots import __all__  # noqa: F401
