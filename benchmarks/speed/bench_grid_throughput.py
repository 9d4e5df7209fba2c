"""Grid throughput beside the bare encoder forward on the same patches, in one run (issue 22's 0.9x target).

A synthetic H&E image (pink tissue disk with nuclei on white glass, 1 µm/px, written as a TIFF) is gridded with
``agl.pp.spot_grid`` for a model fitted in seconds on the synthetic slide (random-init ResNet-18 by default;
``--encoder densenet121 --weights FILE --patch-px 224`` times a real encoder). Then, each
``--repeats`` times, in turn:

- **bare**: the model's encoder (rebuilt from its record, as the route does), ``encoder(batch)`` in
  ``torch.inference_mode`` over every grid patch, cut, normalised and put in the
  memory format of ``precision="auto"`` beforehand (not timed; ``channels_last``, and bf16 autocast on a CPU with
  native bf16, as the route runs), in batches of the embedding batch size: the floor of what the grid route can
  cost (after one untimed pass);
- **bare ONNX**: the same patches through the encoder's ONNX Runtime graph (the one the default route runs), when
  ``onnxruntime`` is installed;
- **grid (torch)**: ``agl.tl.predict_anndata(grid, model, encoder=EncoderConfig(..., backend="torch"))``: the
  whole route (encoder rebuilt from the model's record, patches cut from the TIFF by region, normalised,
  encoded, the head's predictions);
- **grid (auto)**: the same with the default ``backend="auto"`` (ONNX Runtime on a CPU when installed and it
  agrees with torch).

Spots per second are medians over the repeats; ratios are to the bare forward of the same run. Writes
``benchmarks/results/grid_throughput.json``::

    python -m benchmarks.speed.bench_grid_throughput --repeats 3 --threads 2
    python -m benchmarks.speed.bench_grid_throughput --encoder densenet121 --patch-px 224 --repeats 3 --threads 2 \
        --weights ../shared/weights/densenet121_keras_imagenet_features_torchvision.pth \
        --out benchmarks/results/grid_throughput_densenet121.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS, command, git_state


def he_image(size: int, seed: int = 0) -> np.ndarray:
    """``size x size`` RGB: white glass, a pink tissue disk (radius 0.45 size) with purple nuclei, pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 3), 244, dtype=np.uint8)
    img[np.hypot(yy - size / 2, xx - size / 2) < 0.45 * size] = (214, 120, 176)
    for r, c in rng.integers(int(0.15 * size), int(0.85 * size), size=(size * size // 4000, 2)):
        img[max(0, r - 5) : r + 5, max(0, c - 5) : c + 5] = (110, 60, 150)
    return np.clip(img.astype(np.int16) + rng.integers(-6, 7, size=img.shape), 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-px", type=int, default=1500, help="side of the synthetic image (1 µm/px)")
    p.add_argument("--pitch-um", type=float, default=56.0, help="grid pitch (half the 112 µm patch)")
    p.add_argument("--patch-px", type=int, default=64, help="encoder input side")
    p.add_argument("--encoder", default="resnet18", help="encoder name (random init unless --weights)")
    p.add_argument("--weights", type=Path, default=None, help="local state-dict file of the encoder")
    p.add_argument("--batch-size", type=int, default=32, help="embedding batch size (grid and bare)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=RESULTS / "grid_throughput.json")
    args = p.parse_args(argv)

    import tifffile
    import torch

    import agl_scverse as agl
    from agl_scverse.encoders._onnx_backend import onnx_backend_available, onnx_encoder
    from agl_scverse.encoders._record import rebuild_encoder
    from agl_scverse.train._precision import resolve_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    t_all = time.perf_counter()
    train = agl.datasets.synthetic_slide(
        n_rows=5, n_cols=5, seed=0, n_tissue_genes=10, n_informative=10, n_noise=20, n_bursty_noise=2
    )
    enc_kw = {"weights": args.weights, "patch_px": args.patch_px, "batch_size": args.batch_size}
    torch_enc = agl.EncoderConfig(args.encoder, backend="torch", **enc_kw)
    model = agl.tl.agl_fit(
        train,
        method="agl",
        encoder=torch_enc,
        genes=agl.GeneConfig(n_targets=3, min_cells=1),
        network=agl.NetworkConfig(hidden=(16,)),
        training=agl.TrainingConfig(epochs=1, batch_size=32),
        progress=False,
    )
    patch_um = float(model.config["encoder"]["patch_um"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "he.tif"
        per_cm = 1e4  # 1 µm/px
        tifffile.imwrite(
            path, he_image(args.image_px), photometric="rgb", resolution=(per_cm, per_cm), resolutionunit="CENTIMETER"
        )
        grid = agl.pp.spot_grid(agl.io.read_he_image(path), pitch_um=args.pitch_um, model=model)
        n = grid.n_obs
        patches = agl.pp.SpotPatches(grid, patch_px=args.patch_px, patch_um=patch_um)
        encoder, info = rebuild_encoder(model.config["encoder"], weights=args.weights)  # the route's module
        x_all = agl.model.normalize(torch.stack([patches[i] for i in range(n)]), info["mean"], info["std"])
        encoder.eval()
        # the same graph ONNX Runtime runs in the default route, on the same float32 patches
        bare_onnx = onnx_encoder(encoder, args.patch_px, x_all[:4]) if onnx_backend_available() else None
        prec = resolve_precision("auto", "cpu", encoder)
        prec.to_layout(encoder)
        x_all = prec.image_batch(x_all)
        with torch.inference_mode(), prec.autocast():
            for a in range(0, n, args.batch_size):  # one untimed pass: the first pass over new shapes is slower
                encoder(x_all[a : a + args.batch_size])
        auto_enc = agl.EncoderConfig(args.encoder, **enc_kw)
        rates: dict[str, list[float]] = {"bare": [], "grid_torch": [], "grid_auto": []}
        if bare_onnx is not None:
            rates["bare_onnx"] = []
            x_onnx = x_all.contiguous()
            bare_onnx(x_onnx[: args.batch_size])  # untimed first pass
        for _ in range(args.repeats):
            if bare_onnx is not None:
                t0 = time.perf_counter()
                for a in range(0, n, args.batch_size):
                    bare_onnx(x_onnx[a : a + args.batch_size])
                rates["bare_onnx"].append(n / (time.perf_counter() - t0))
            with torch.inference_mode(), prec.autocast():
                encoder(x_all[: args.batch_size])  # warm-up
                t0 = time.perf_counter()
                for a in range(0, n, args.batch_size):
                    encoder(x_all[a : a + args.batch_size])
                rates["bare"].append(n / (time.perf_counter() - t0))
            for key, enc in (("grid_torch", torch_enc), ("grid_auto", auto_enc)):
                t0 = time.perf_counter()
                pred = agl.tl.predict_anndata(grid, model, encoder=enc, device="cpu", progress=False)
                rates[key].append(n / (time.perf_counter() - t0))
                assert pred.n_obs == n and np.isfinite(np.asarray(pred.X)).all()
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "command": command(),
        "git": git_state(),
        "machine": f"{os.cpu_count()} CPUs, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the start",
        "torch_threads": torch.get_num_threads(),
        "bare_precision": prec.record(),
        "encoder": args.encoder,
        "weights": None if args.weights is None else args.weights.name,
        "grid_spots": n,
        "image_px": args.image_px,
        "pitch_um": args.pitch_um,
        "patch_um": patch_um,
        "patch_px": args.patch_px,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "spots_per_s": {k: [round(r, 1) for r in v] for k, v in rates.items()},
        "median_spots_per_s": {k: round(v, 1) for k, v in med.items()},
        "ratio_grid_torch_to_bare": round(med["grid_torch"] / med["bare"], 3),
        "ratio_grid_auto_to_bare": round(med["grid_auto"] / med["bare"], 3),
        "ratio_grid_auto_to_bare_onnx": round(med["grid_auto"] / med["bare_onnx"], 3) if "bare_onnx" in med else None,
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    print(
        f"{n} grid spots ({args.patch_px} px / {patch_um:g} µm patches), medians over {args.repeats}: bare forward "
        f"{med['bare']:.1f} spots/s; grid torch {med['grid_torch']:.1f} ({result['ratio_grid_torch_to_bare']:.2f}x); "
        f"grid auto {med['grid_auto']:.1f} ({result['ratio_grid_auto_to_bare']:.2f}x; "
        f"{result['ratio_grid_auto_to_bare_onnx']}x of the bare ONNX forward "
        f"{med.get('bare_onnx', float('nan')):.1f}); {result['machine']}"
    )
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
