"""Overlay of the HER2+ spot centres on the H&E thumbnails read by :func:`agl_scverse.io.read_legacy_st`.

Writes ``docs/_static/her2st_overlay.png`` (one panel per section) and prints, per section, the mean grayscale
intensity of 64 px full-resolution crops at the spot centres and at background positions far from every spot.

Run: ``python -m benchmarks.checks.her2st_overlay [--data ../shared/data/her2st] [--out docs/_static/her2st_overlay.png]``
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

import agl_scverse as agl
from agl_scverse import _spatial
from benchmarks._common import HER2ST, REPO


def crop_means(img: np.ndarray, xy: np.ndarray, half: int = 32) -> np.ndarray:
    """Mean grayscale intensity of square crops (side ``2 * half``) of an RGB image centred at ``xy``."""
    out = []
    for x, y in np.round(xy).astype(int):
        crop = img[max(y - half, 0) : y + half, max(x - half, 0) : x + half]
        out.append(crop.mean())
    return np.asarray(out)


def background_positions(xy: np.ndarray, shape: tuple[int, int], min_dist: float, n: int, seed: int = 0) -> np.ndarray:
    """``n`` random positions of the image at least ``min_dist`` pixels from every spot and 64 px from the border."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    h, w = shape
    cand = rng.uniform([64, 64], [w - 64, h - 64], size=(20 * n, 2))
    d, _ = cKDTree(xy).query(cand)
    return cand[d > min_dist][:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(HER2ST))
    p.add_argument("--out", default=str(REPO / "docs" / "_static" / "her2st_overlay.png"))
    args = p.parse_args()

    t0 = time.perf_counter()
    adata = agl.io.read_legacy_st(args.data)
    t_read = time.perf_counter() - t0
    print(f"read {adata.n_obs} spots x {adata.n_vars} genes in {t_read:.1f} s")

    libs = adata.obs["library_id"].cat.categories.tolist()
    fig, axes = plt.subplots(1, len(libs), figsize=(3.0 * len(libs), 3.4), dpi=100)
    for ax, lib in zip(np.atleast_1d(axes), libs):
        mask = (adata.obs["library_id"] == lib).to_numpy()
        xy = adata.obsm["spatial"][mask]
        entry = adata.uns["spatial"][lib]
        s = entry["scalefactors"]["tissue_hires_scalef"]
        ax.imshow(entry["images"]["hires"])
        ax.scatter(xy[:, 0] * s, xy[:, 1] * s, s=6, c="yellow", edgecolors="black", linewidths=0.3)
        mpp = entry["scalefactors"]["microns_per_pixel"]
        ax.set_title(f"{lib}: {mask.sum()} spots, {mpp:.3f} µm/px", fontsize=8)
        pitch = 200.0 / mpp
        lo, hi = (xy.min(0) - 2 * pitch) * s, (xy.max(0) + 2 * pitch) * s
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(hi[1], lo[1])
        ax.set_axis_off()

        full = _spatial.get_image(adata, lib)[0]
        bg = background_positions(xy, full.shape[:2], min_dist=3 * pitch, n=200)
        print(
            f"{lib}: spots {crop_means(full, xy).mean():.1f}, background {crop_means(full, bg).mean():.1f} "
            f"(mean grayscale of 64 px crops, {len(bg)} background positions)"
        )
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", pad_inches=0.05)
    buf.seek(0)
    with Image.open(buf) as im:  # a 256-colour palette keeps the PNG small
        im.convert("RGB").quantize(colors=256).save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
