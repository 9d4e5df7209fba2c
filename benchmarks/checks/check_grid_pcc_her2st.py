"""A bare H&E slide predicted on a spot grid against the same model at the measured spots (issue 22's target).

Trains one model on four HER2+ sections (their cached embeddings), then predicts the fifth section two ways:

- the spot route: at its measured spots, from the same cached embedding (`agl.tl.predict_anndata`);
- the grid route: from its H&E image alone (`agl.io.read_he_image` -> `agl.pp.spot_grid` -> `agl.tl.predict_anndata`,
  which embeds every grid patch with the model's encoder), reading for each measured spot the grid point nearest to it.

Both are scored against the measured expression of the test section (log1p counts, mean Pearson over the model's
target genes; a constant prediction scores 0). The target: grid >= 0.9 x spot.

    python -m benchmarks.checks.check_grid_pcc_her2st [--cache ../cache/her2st_densenet121.h5ad] [--test C6]
        [--pitch-um 100] [--n-seeds 1]

The cache is the five HER2+ sections embedded with DenseNet-121 (``benchmarks.speed.bench_embed`` writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

import agl_scverse as agl
from benchmarks._common import DENSENET_WEIGHTS, HER2ST, HER2ST_H5AD, RESULTS, command, expression, git_state, pcc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=str(HER2ST_H5AD), help="h5ad with HER2+ counts, library_id and the embedding")
    ap.add_argument("--embedding-key", default="X_agl_densenet121")
    ap.add_argument("--data", default=str(HER2ST))
    ap.add_argument("--weights", default=str(DENSENET_WEIGHTS))
    ap.add_argument("--test", default="C6")
    ap.add_argument("--pitch-um", type=float, default=100.0)
    ap.add_argument("--microns-per-pixel", type=float, default=0.71)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-seeds", type=int, default=None, help="networks in the ensemble (default: agl_fit's)")
    ap.add_argument("--out", default=str(RESULTS / "grid_pcc_her2st.json"))
    args = ap.parse_args()

    adata = ad.read_h5ad(args.cache)
    lib = adata.obs["library_id"].astype(str)
    train = adata[lib != args.test].copy()
    test = adata[lib == args.test].copy()
    t0 = time.perf_counter()
    kw = {} if args.n_seeds is None else {"training": agl.TrainingConfig(n_seeds=args.n_seeds)}
    with tempfile.TemporaryDirectory() as tmp:
        model = agl.tl.agl_fit(
            train,
            embedding_key=args.embedding_key,
            library_key="library_id",
            seed=args.seed,
            save_dir=Path(tmp) / "model",
            **kw,
        )
        fit_s = time.perf_counter() - t0
        targets = list(model.targets)
        obs = expression(test, targets)

        t1 = time.perf_counter()
        spot = agl.tl.predict_anndata(test, model, embedding_key=args.embedding_key)
        spot_pred = np.asarray(spot[:, targets].X)
        spot_s = time.perf_counter() - t1

        t2 = time.perf_counter()
        folder = Path(args.data) / args.test
        slide = agl.io.read_he_image(folder / "he.jpg", microns_per_pixel=args.microns_per_pixel, library_id=args.test)
        grid = agl.pp.spot_grid(slide, pitch_um=args.pitch_um, model=model)
        grid_pred_ad = agl.tl.predict_anndata(grid, model, encoder={"weights": args.weights})
        grid_s = time.perf_counter() - t2
    spots = pd.read_csv(folder / "spots.tsv", sep=None, engine="python")
    # the measured spots in the order of the test AnnData: their full-resolution centres
    xy = np.asarray(test.obsm["spatial"], dtype=float)
    dist, nearest = cKDTree(np.asarray(grid.obsm["spatial"], float)).query(xy)
    grid_pred = np.asarray(grid_pred_ad[:, targets].X)[nearest]
    pitch_px = args.pitch_um / args.microns_per_pixel
    res = {
        "command": command(),
        "commit": git_state(),
        "test": args.test,
        "n_train_spots": int(train.n_obs),
        "n_test_spots": int(test.n_obs),
        "n_spots_tsv": int(len(spots)),
        "n_grid": int(grid.n_obs),
        "pitch_um": args.pitch_um,
        "n_targets": len(targets),
        "method": model.method,
        "n_members": model.n_members,
        "pcc_spot_route": pcc(obs, spot_pred),
        "pcc_grid_route": pcc(obs, grid_pred),
        "median_distance_to_grid_px": float(np.median(dist)),
        "within_one_pitch": float(np.mean(dist <= pitch_px)),
        "seconds": {"fit": round(fit_s, 1), "spot_route": round(spot_s, 1), "grid_route": round(grid_s, 1)},
        "load": list(os.getloadavg()),
    }
    res["ratio_grid_to_spot"] = res["pcc_grid_route"] / res["pcc_spot_route"]
    print(json.dumps(res, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
