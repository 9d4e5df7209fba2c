"""Built-in datasets: a synthetic H&E slide with known informative auxiliary genes."""

from .synthetic import *  # noqa: F403
from .synthetic import __all__  # noqa: F401
