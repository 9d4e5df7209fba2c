"""HER2+ C6 predicted through three input routes (legacy ST, Space Ranger folder, SpatialData) gives one PCC.

Trains one model on the other four HER2+ sections (C2-C5, read with :func:`agl_scverse.io.read_legacy_st`;
embedding mode, DenseNet-121 ImageNet features of 160-µm patches in 112 px by default (``--patch-px 224`` for
the native ~0.71 µm/px; 4x the CPU time), DkGSB, a fixed seed, few epochs),
then predicts the held-out section C6 read three ways, each embedded by :func:`agl_scverse.tl.agl_predict` itself
from its own image source:

- ``legacy``: the C6 folder (``he.jpg`` at full resolution);
- ``visium``: a Space Ranger-style ``outs`` folder built from C6 in a temporary folder (10x h5 counts,
  ``tissue_positions.csv``, scale factors, 2000-px hires PNG), read with ``read_visium(fullres_image=he.jpg)``;
- ``spatialdata``: a SpatialData built from C6 (an image pyramid, circle shapes in µm, one table), written to a
  temporary zarr store and read back, predicted directly (the predictions land in its table).

Also, for contrast: ``visium_hires_only``, the same folder without the full-resolution image, which is refused
unless ``allow_lowres=True`` (patches upsampled from the 2000-px thumbnail).

Prints the mean target Pearson r of each route and writes ``benchmarks/results/routes.json``. Nothing is written
into the repository besides that file; the folders are temporary. Run::

    OMP_NUM_THREADS=2 python -m benchmarks.checks.check_routes [--data ../shared/data/her2st] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tests.helpers.builders import spatialdata_from, visium_folder_from  # the shared route builders

import agl_scverse as agl
from benchmarks._common import DENSENET_WEIGHTS, HER2ST, OUT, RESULTS

TEST = "C6"


def mean_target_pcc(adata, model, layer: str = "agl_pred") -> float:
    """Mean over the model's targets of Pearson r between predictions and log1p counts (all spots of the slide)."""
    X = adata[:, model.targets].X
    obs = np.log1p(np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float64))
    pred = np.asarray(adata[:, model.targets].layers[layer], dtype=np.float64)
    r = []
    for j in range(obs.shape[1]):
        a, b = obs[:, j] - obs[:, j].mean(), pred[:, j] - pred[:, j].mean()
        den = np.sqrt((a * a).sum() * (b * b).sum())
        r.append(float((a * b).sum() / den) if den > 0 else np.nan)
    return float(np.nanmean(r))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=HER2ST)
    p.add_argument("--weights", type=Path, default=DENSENET_WEIGHTS)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patch-px", type=int, default=112, help="patch side in pixels (160 µm patches)")
    p.add_argument("--model-dir", type=Path, default=OUT / "routes_model",
                   help="trained model, reused by a rerun with the same settings (git-ignored)")  # fmt: skip
    p.add_argument("--results", type=Path, default=RESULTS / "routes.json")
    args = p.parse_args()
    if not (args.data / TEST).exists() or not args.weights.exists():
        sys.exit(f"needs the HER2+ sections ({args.data}) and the DenseNet-121 weights ({args.weights})")
    t0 = time.perf_counter()
    enc = agl.EncoderConfig("densenet121", weights=args.weights, patch_px=args.patch_px, patch_um=160.0)

    sections = sorted(d.name for d in args.data.iterdir() if (d / "counts.tsv.gz").exists())
    settings = {"method": "dkgsb", "mode": "embedding", "epochs": args.epochs, "seed": args.seed, "n_targets": 50,
                "encoder": "densenet121 (ImageNet, local weights)", "patch_px": args.patch_px, "patch_um": 160.0}  # fmt: skip
    stamp = args.model_dir.with_name(args.model_dir.name + "_settings.json")  # beside it: the folder holds a model only
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        model = agl.model.AGLModel.load(args.model_dir)
        print(f"reusing the model in {args.model_dir}")
    else:
        train = agl.io.read_legacy_st(args.data, sections=[s for s in sections if s != TEST])
        model = agl.tl.agl_fit(
            train, method="dkgsb", genes=agl.GeneConfig(n_targets=50), training=agl.TrainingConfig(epochs=args.epochs),
            encoder=enc, seed=args.seed, device="cpu", progress=False, save_dir=args.model_dir, overwrite=True,
        )  # fmt: skip
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(settings))
        print(f"trained on {train.n_obs} spots of {sections[:-1]}: {time.perf_counter() - t0:.0f} s")

    pcc, notes = {}, {}
    legacy = agl.io.read_legacy_st(args.data, sections=[TEST])
    agl.tl.agl_predict(legacy, model, encoder={"weights": args.weights})
    pcc["legacy"] = mean_target_pcc(legacy, model)
    print(f"legacy route done: {time.perf_counter() - t0:.0f} s")
    notes["legacy"] = legacy.uns["agl_embeddings"][model.config["embedding_key"]]["source_um_per_px"]

    he = legacy.uns["spatial"][TEST]["metadata"]["source_image_path"]
    with tempfile.TemporaryDirectory() as tmp:
        outs = visium_folder_from(legacy, TEST, Path(tmp) / "outs")
        vis = agl.io.read_visium(outs, library_id=TEST, fullres_image=he)
        agl.tl.agl_predict(vis, model, encoder={"weights": args.weights})
        pcc["visium"] = mean_target_pcc(vis, model)
        print(f"visium route done: {time.perf_counter() - t0:.0f} s")

        thumb = agl.io.read_visium(outs, library_id=TEST)  # no full-resolution image
        try:
            agl.tl.agl_predict(thumb.copy(), model, encoder={"weights": args.weights})
            notes["visium_hires_only_refused"] = False
        except ValueError as e:
            notes["visium_hires_only_refused"] = True
            print(f"without the full-res image: refused ({str(e)[:120]}...)")
        agl.tl.agl_predict(thumb, model, encoder={"weights": args.weights, "allow_lowres": True})
        pcc["visium_hires_only"] = mean_target_pcc(thumb, model)

    import spatialdata as sd

    with tempfile.TemporaryDirectory() as tmp:  # written and read back: a stored pyramid, as users have them
        spatialdata_from(legacy).write(Path(tmp) / "c6.zarr")  # counts only, shapes in µm, an image pyramid
        sdata = sd.read_zarr(Path(tmp) / "c6.zarr")
        agl.tl.agl_predict(sdata, model, encoder={"weights": args.weights})
        print(f"spatialdata route done: {time.perf_counter() - t0:.0f} s")
    table = sdata.tables["table"]
    pcc["spatialdata"] = mean_target_pcc(table, model)
    notes["spatialdata"] = table.uns["agl_embeddings"][model.config["embedding_key"]]["source_um_per_px"]

    same = len({round(pcc[k], 3) for k in ("legacy", "visium", "spatialdata")}) == 1
    for k, v in pcc.items():
        print(f"{k:>18}: mean target PCC on {TEST} = {v:.4f}")
    print(f"legacy, Visium folder and SpatialData equal to 3 decimals: {same}")
    res = {
        "test_section": TEST,
        "train_sections": [s for s in sections if s != TEST],
        "mean_target_pcc": pcc,
        "equal_to_3_decimals": same,
        "source_um_per_px": notes,
        "settings": settings,
        "seconds": round(time.perf_counter() - t0, 1),
        "python": platform.python_version(),
        "agl_scverse": agl.__version__,
        "command": "python -m benchmarks.checks.check_routes " + " ".join(sys.argv[1:]),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
