"""Built-in datasets: a synthetic H&E slide with known informative auxiliary genes."""

from ._synthetic import synthetic_slide

__all__ = ["synthetic_slide"]
