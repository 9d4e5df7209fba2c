"""Fine-tune data path and precision: spots/s of embedding and of fine-tune training, peak RSS.

Rows written to ``benchmarks/results/finetune.json`` (one run, so the ratios compare like with like):

- ``embed``: :func:`agl_scverse.pp.embed_patches` end to end on one HER2+ section (DenseNet-121 with the local
  ImageNet weights when present, else a random-init ResNet-18; a synthetic slide without the data) with
  ``precision="fp32"`` (float32, default layout: the computation of earlier versions, checked bit for bit in
  ``tests/model/test_precision.py``) and the default ``precision="auto"``, with 0 and 2 DataLoader workers; the
  speed-up of the default over fp32; the cosine similarity of each precision's features to fp32 (bf16 on a subset
  of spots when the CPU has no native bf16, where it is emulated and slow);
- ``finetune``: ``agl_fit(method="agl", mode="finetune")`` (AGL-all, ResNet-18, 224 px patches) for one short epoch
  on the first spots of the section, fp32 vs auto: training spots/s of the epoch (training steps + validation);
- GPU rows: "not measured" unless a CUDA device is present (then the same rows run on it).

Peak RSS is ``resource.getrusage`` (this process, and its finished DataLoader workers) after each row.

Usage::

    python benchmarks/bench_finetune.py [--data ../shared/data/her2st] [--section C6] [--weights <densenet .pth>]
        [--threads 2] [--bf16-spots 48] [--ft-spots 64] [--out benchmarks/results/finetune.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_embed import DENSENET_FILE, REPO, _default  # the shared data / weights lookup of the embedding benchmark


def _rss_mb() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own, 1), "peak_rss_workers_mb": round(kids, 1)}


def _cpu_flags() -> list[str]:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
    except (OSError, IndexError):
        return []
    return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2")))


def _cosine(a: np.ndarray, b: np.ndarray) -> dict:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"min": float(cos.min()), "mean": float(cos.mean())}


def load_slide(data: Path, section: str):
    import agl_scverse as agl

    if (data / section / "spots.tsv").exists():
        return agl.io.read_legacy_st(data / section, load_images=False), f"HER2+ section {section}"
    slide = agl.datasets.synthetic_slide(seed=0)
    return slide, "synthetic slide (HER2+ data not found)"


def bench_embed(adata, encoder, weights, device, args) -> tuple[list[dict], dict]:
    import agl_scverse as agl
    from agl_scverse.model._precision import native_bf16, resolve_precision

    kw = {"encoder": encoder, "weights": weights, "batch_size": args.batch_size, "device": device, "copy": True,
          "patch_px": 224, "patch_um": args.patch_um}  # fmt: skip
    agl.pp.embed_patches(adata[:4].copy(), precision="fp32", **kw)  # decode the image once (cached), warm up
    rows, feats = [], {}
    n = adata.n_obs
    for precision, workers in (("fp32", 0), ("auto", 0), ("fp32", 2), ("auto", 2)):
        t = time.perf_counter()
        out = agl.pp.embed_patches(adata, precision=precision, num_workers=workers, prefetch_factor=2, **kw)
        dt = time.perf_counter() - t
        key = next(iter(out.uns["agl_embeddings"]))
        rec = out.uns["agl_embeddings"][key]
        feats[(precision, workers)] = np.asarray(out.obsm[key])
        rows.append({
            "what": "embed_patches", "device": str(device), "precision": precision, "ran_as": rec["precision"],
            "channels_last": bool(rec["channels_last"]), "num_workers": workers, "n_spots": n,
            "seconds": round(dt, 2), "spots_per_s": round(n / dt, 3), **_rss_mb(),
        })  # fmt: skip
        print(rows[-1], flush=True)
    ref = feats[("fp32", 0)]
    summary = {
        "speedup_auto_vs_fp32_0_workers": rows[1]["spots_per_s"] / rows[0]["spots_per_s"],
        "speedup_auto_vs_fp32_2_workers": rows[3]["spots_per_s"] / rows[2]["spots_per_s"],
        "speedup_auto_2_workers_vs_fp32_0_workers": rows[3]["spots_per_s"] / rows[0]["spots_per_s"],
        "cosine_auto_vs_fp32": _cosine(feats[("auto", 0)], ref),
        "identical_0_vs_2_workers": bool(np.array_equal(feats[("fp32", 0)], feats[("fp32", 2)])),
        "auto_runs_as": rows[1]["ran_as"],
        "native_bf16": native_bf16(device),
    }
    # bf16 explicitly (emulated on a CPU without AVX512-BF16/AMX: slow, so on a subset of spots there)
    m = n if native_bf16(device) else min(n, args.bf16_spots)
    sub = adata[:m].copy()
    resolve_precision("bf16", device)  # warns when emulated
    t = time.perf_counter()
    out = agl.pp.embed_patches(sub, precision="bf16", **kw)
    dt = time.perf_counter() - t
    key = next(iter(out.uns["agl_embeddings"]))
    fb = np.asarray(out.obsm[key])
    rows.append({
        "what": "embed_patches", "device": str(device), "precision": "bf16", "ran_as": "bf16", "channels_last": True,
        "num_workers": 0, "n_spots": m, "seconds": round(dt, 2), "spots_per_s": round(m / dt, 3),
        "bf16_native": native_bf16(device), **_rss_mb(),
    })  # fmt: skip
    print(rows[-1], flush=True)
    summary["cosine_bf16_vs_fp32"] = _cosine(fb, ref[:m])
    summary["bf16_spots"] = m
    summary["speedup_bf16_vs_fp32"] = rows[-1]["spots_per_s"] / rows[0]["spots_per_s"]
    return rows, summary


def bench_finetune(adata, device, args) -> list[dict]:
    import agl_scverse as agl

    sub = adata[: args.ft_spots].copy()
    rows = []
    for precision in ("fp32", "auto"):
        work = sub.copy()
        t = time.perf_counter()
        model = agl.tl.agl_fit(
            work, method="agl", mode="finetune", encoder="resnet18", patch_px=224, patch_um=args.patch_um,
            n_targets=20, min_cells=3, epochs=1, batch_size=16, val_fraction=0.25, precision=precision,
            device=str(device), progress=False, seed=0,
        )  # fmt: skip
        dt = time.perf_counter() - t
        n_train = int(work.uns["agl"]["metrics"]["n_train"])
        epoch_s = float(work.uns["agl"]["history"]["seconds"][0])
        rows.append({
            "what": "finetune agl_fit (AGL-all, resnet18, 1 epoch)", "device": str(device), "precision": precision,
            "ran_as": (model.config.get("precision") or {}).get("precision"), "n_train": n_train,
            "n_genes": len(model.genes), "steps": int(np.ceil(n_train / 16)), "epoch_seconds": round(epoch_s, 2),
            "train_spots_per_s": round(n_train / epoch_s, 3), "fit_seconds": round(dt, 2), **_rss_mb(),
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=_default("data/her2st"))
    ap.add_argument("--section", default="C6")
    ap.add_argument("--weights", type=Path, default=_default(f"weights/{DENSENET_FILE}"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--patch-um", type=float, default=160.0, help="HER2+: a 224 px patch covers ~160 µm")
    ap.add_argument("--bf16-spots", type=int, default=48)
    ap.add_argument("--ft-spots", type=int, default=64)
    ap.add_argument("--spots", type=int, default=None, help="only the first N spots (a quick check)")
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "finetune.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adata, source = load_slide(args.data, args.section)
    if args.spots:
        adata = adata[: args.spots].copy()
    weights = args.weights if args.weights.exists() else None
    encoder = "densenet121" if weights is not None else "resnet18"
    print(f"{source}: {adata.n_obs} spots; encoder {encoder} ({'local weights' if weights else 'random init'})")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    result = {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "when_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "data": source, "n_spots": int(adata.n_obs), "encoder": encoder,
        "weights": str(weights) if weights else "not present (random-init resnet18)",
        "torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "cpu_flags": _cpu_flags(), "load_average_start": os.getloadavg(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not measured (no CUDA device)",
        "embed": [], "embed_summary": {}, "finetune": [],
    }  # fmt: skip
    for dev in devices:
        rows, summary = bench_embed(adata, encoder, weights, dev, args)
        result["embed"] += rows
        result["embed_summary"][str(dev)] = summary
        if not args.skip_finetune:
            result["finetune"] += bench_finetune(adata, dev, args)
    if len(devices) == 1:
        result["embed"].append({"what": "embed_patches", "device": "cuda", "spots_per_s": "not measured"})
        result["finetune"].append({"what": "finetune agl_fit", "device": "cuda", "train_spots_per_s": "not measured"})
    if len(result["finetune"]) >= 2 and isinstance(result["finetune"][0].get("train_spots_per_s"), float):
        result["finetune_speedup_auto_vs_fp32_cpu"] = (
            result["finetune"][1]["train_spots_per_s"] / result["finetune"][0]["train_spots_per_s"]
        )
    result["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("embed", "finetune")}, indent=2))


if __name__ == "__main__":
    main()
