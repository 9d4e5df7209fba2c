"""Torch parts of AGL: heads, Pearson loss, DkGSB mask, bi-level step, trainer, checkpoints."""
