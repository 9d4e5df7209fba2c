"""Regenerate the example figures of the documentation (``docs/_static/*.png``).

They come from a real run on the built-in synthetic slides (the same setting as ``agl-scverse demo``): two
slides, a random-init ResNet-18 embedding, DkGSB and PGL fitted on slide ``synthetic_0`` and evaluated on the
held-out slide ``synthetic_1``. Run from the repository root (a few minutes on a CPU)::

    python docs/make_figures.py
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import agl_scverse as agl

STATIC = Path(__file__).resolve().parent / "_static"
DPI = 80  # small files; the pages show them at about this size
SEED = 0


def main() -> None:
    t0 = time.perf_counter()
    adata = agl.datasets.synthetic_slide(n_slides=2, seed=SEED)
    # The synthetic image is 1 µm/px: a 112 µm patch is 112 source pixels, kept as they are.
    agl.pp.embed_patches(adata, {"encoder": "resnet18", "patch_px": 112}, library_key="library_id")
    test = (adata.obs["library_id"] == "synthetic_1").to_numpy()
    for method in ("dkgsb", "pgl"):
        key = f"agl_{method}"
        model = agl.tl.agl_fit(
            adata, method=method, embedding_key="X_agl_resnet18", spots=~test, seed=SEED, key_added=key, progress=False
        )
        agl.tl.agl_predict(adata, model, key_added=key)
        agl.tl.evaluate(adata, model, spots=test, key_added=key)
        print(f"{method}: fitted and evaluated ({time.perf_counter() - t0:.0f} s)")

    matplotlib.rcParams["savefig.dpi"] = DPI
    kw = {"show": False}
    agl.pl.selected_genes(adata, key="agl_dkgsb", show_history=True, save=STATIC / "selected_genes.png", **kw)
    agl.pl.training_history(adata, key="agl_dkgsb", save=STATIC / "training_history.png", **kw)
    agl.pl.gene_performance(
        adata, key="agl_dkgsb", baseline="agl_pgl", n_labels=4, save=STATIC / "gene_performance.png", **kw
    )
    held = adata[test].copy()
    best = held.var["agl_dkgsb_pcc"].sort_values(ascending=False).index[:2].tolist()
    agl.pl.spatial_prediction(held, best, key="agl_dkgsb", save=STATIC / "spatial_prediction.png", **kw)
    for name in ("selected_genes", "training_history", "gene_performance", "spatial_prediction"):
        path = STATIC / f"{name}.png"
        print(f"wrote {path.relative_to(STATIC.parent.parent)} ({path.stat().st_size / 1024:.0f} KiB)")
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
