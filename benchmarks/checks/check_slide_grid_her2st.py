"""How well a spot grid laid over a bare H&E image covers the spots that were measured on it (issue 22).

Reads each HER2+ section's he.jpg alone (µm/px 0.71, the README's geometry), finds the tissue
(agl.pp.tissue_mask), lays a hexagonal grid (agl.pp.spot_grid) and counts the measured spots (spots.tsv pixel_x,
pixel_y) with a grid centre within one pitch. Writes benchmarks/results/slide_grid_her2st.json.

    python -m benchmarks.checks.check_slide_grid_her2st --sections C6 --pitch-um 100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
from scipy.spatial import cKDTree

import agl_scverse as agl
from benchmarks._common import HER2ST as DATA
from benchmarks._common import RESULTS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--sections", nargs="+", default=["C6"])
    ap.add_argument("--pitch-um", type=float, default=100.0)
    ap.add_argument("--spot-um", type=float, default=55.0)
    ap.add_argument("--microns-per-pixel", type=float, default=0.71)
    ap.add_argument("--out", default=str(RESULTS / "slide_grid_her2st.json"))
    args = ap.parse_args()
    rows = []
    for sec in args.sections:
        folder = Path(args.data) / sec
        t0 = time.perf_counter()
        slide = agl.io.read_he_image(folder / "he.jpg", microns_per_pixel=args.microns_per_pixel, library_id=sec)
        grid = agl.pp.spot_grid(slide, spot_um=args.spot_um, pitch_um=args.pitch_um)
        seconds = time.perf_counter() - t0
        spots = pd.read_csv(folder / "spots.tsv", sep=None, engine="python")
        xy = spots[["pixel_x", "pixel_y"]].to_numpy(float)
        d, _ = cKDTree(grid.obsm["spatial"]).query(xy)
        pitch_px = args.pitch_um / args.microns_per_pixel
        row = {
            "section": sec,
            "n_measured": len(xy),
            "n_grid": grid.n_obs,
            "tissue_fraction": round(grid.uns["agl_grid"]["tissue_fraction"], 4),
            "covered_within_one_pitch": round(float((d <= pitch_px).mean()), 4),
            "covered_within_half_pitch": round(float((d <= pitch_px / 2).mean()), 4),
            "seconds_read_mask_grid": round(seconds, 2),
        }
        rows.append(row)
        print(json.dumps(row))
    out = {"command": "python -m benchmarks.checks.check_slide_grid_her2st " + " ".join(
        [f"--sections {' '.join(args.sections)}", f"--pitch-um {args.pitch_um:g}", f"--spot-um {args.spot_um:g}",
         f"--microns-per-pixel {args.microns_per_pixel:g}"]), "rows": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
