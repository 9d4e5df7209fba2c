"""Whole-slide prediction at scale: a synthetic 60k x 60k px pyramidal TIFF, a grid of ~50k pseudo-spots, peak RSS.

Writes a synthetic H&E-like pyramidal BigTIFF (``write_synthetic_wsi``), trains a small model on the built-in
synthetic slide (ResNet-18 with random weights on 64-px patches of 55 µm: the cost of the encoder is not what is
measured here), saves it, then runs ``agl-scverse predict-slide`` on the TIFF in a fresh process (tissue mask, hex
grid, embedding, prediction, chunks on disk, the ``.h5ad``) and reports its peak RSS (``getrusage`` of the child),
seconds, the number of grid spots and spots/s. The target of issue 22: <= 2 GB peak RSS for ~50k spots.

    python -m benchmarks.speed.bench_slide_scale [--image-px 60000] [--pitch-um 50] [--patch-px 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad

import agl_scverse as agl
from benchmarks._common import RESULTS, command, git_state
from benchmarks.speed._scale_images import write_synthetic_wsi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-px", type=int, default=60000)
    ap.add_argument("--pitch-um", type=float, default=50.0)
    ap.add_argument("--patch-px", type=int, default=64)
    ap.add_argument("--patch-um", type=float, default=55.0)
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--work", default=None, help="folder for the slide, model and outputs (default: a temporary one)")
    ap.add_argument("--out", default=str(RESULTS / "slide_scale.json"))
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="agl_slide_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    tif = work / f"synthetic_wsi_{args.image_px}.tif"
    t0 = time.perf_counter()
    info = {}
    if not tif.exists():
        info = write_synthetic_wsi(tif, size_px=args.image_px)
    write_s = time.perf_counter() - t0

    model_dir = work / "model"
    if not model_dir.exists():
        train = agl.datasets.synthetic_slide(seed=0)
        agl.pp.embed_patches(train, agl.EncoderConfig("resnet18", patch_px=args.patch_px, patch_um=args.patch_um))
        agl.tl.agl_fit(
            train, embedding_key="X_agl_resnet18", training=agl.TrainingConfig(n_seeds=1), save_dir=model_dir, seed=0
        )

    out = work / "grid_pred.h5ad"
    chunks = work / "chunks"
    cmd = [
        sys.executable,
        "-m",
        "agl_scverse.cli",
        "predict-slide",
        str(model_dir),
        str(tif),
        "--out",
        str(out),
        "--overwrite",
        "--pitch-um",
        str(args.pitch_um),
        "--chunk-dir",
        str(chunks),
        "--chunk-size",
        str(args.chunk_size),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t1 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t1
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(proc.returncode)
    pred = ad.read_h5ad(out, backed="r")
    res = {
        "command": command(),
        "commit": git_state(),
        "image_px": args.image_px,
        "tif_mb": round(tif.stat().st_size / 2**20, 1),
        "write_s": round(write_s, 1),
        "n_grid_spots": int(pred.n_obs),
        "n_genes": int(pred.n_vars),
        "predict_slide_s": round(seconds, 1),
        "spots_per_s": round(pred.n_obs / seconds, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "peak_rss_valid": peak_kb > before,
        "chunks": len(list(chunks.glob("part_*.npy"))),
        "load": list(os.getloadavg()),
        "wsi": {k: v for k, v in info.items() if isinstance(v, int | float | str)},
    }
    print(json.dumps(res, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
