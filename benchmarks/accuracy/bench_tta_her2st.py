"""Test-time augmentation (``embed_patches(tta=8)``) on HER2+: PCC gain and cost, in one run.

Reads HER2+ sections with :func:`agl_scverse.io.read_legacy_st`, embeds 224-px / 160 µm patches with an encoder
(``--patch-px``, default 224) twice, as cut (``tta=False``) and averaged over the 8 dihedral views (``tta=8``), timing both in the same process
(the cost ratio), then scores PCA(256)+Ridge (:func:`agl_scverse.tl.pca_ridge`, z-scored targets, LOO alpha) by
leave-one-section-out on the chosen sections (targets: top-50 HVG of the training sections, log1p counts), with and
without the default spatial context (:func:`agl_scverse.pp.spatial_context`). A CPU-sized setup: EfficientNet-Lite0
(ImageNet, local weights; ~7x fewer FLOPs than DenseNet-121) by default.

Run::

    python -m benchmarks.accuracy.bench_tta_her2st [--sections C2 C3 C4 C5 C6] [--encoder tf_efficientnet_lite0]
        [--weights ../shared/weights/efficientnet-lite0-57934424.pth] [--threads 2]

Writes ``benchmarks/results/tta_her2st.json`` and prints the figures. ``--cost-only N`` only times ``tta=1`` against
``tta=8`` on the first N spots, interleaved, and writes ``benchmarks/results/tta_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import agl_scverse as agl
from benchmarks._common import RESULTS, SHARED, expression, pcc, targets_on


def loso(adata, key: str) -> dict[str, float]:
    lib = adata.obs["library_id"].astype(str).to_numpy()
    F = np.asarray(adata.obsm[key], dtype=np.float32)
    out = {}
    for sec in sorted(set(lib)):
        train = lib != sec
        Y = expression(adata, targets_on(adata, train))
        out[sec] = pcc(Y[~train], agl.tl.pca_ridge(F[train], Y[train], F[~train]))
    return out


def cost_only(adata, kw: dict, args) -> None:
    """Seconds of tta=1 and tta=8 on the same spots after a warm-up, interleaved (load drifts hit both), medians."""
    times: dict[int, list[float]] = {1: [], 8: []}
    agl.pp.embed_patches(adata[:2].copy(), **kw, key_added="t", copy=True)  # warm-up (imports, image cache), untimed
    for _ in range(args.repeats):
        for tta in (1, 8):
            t = time.perf_counter()
            agl.pp.embed_patches(adata, **{**kw, "encoder": replace(kw["encoder"], tta=tta)}, key_added="t", copy=True)
            times[tta].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    res = {"n_spots": int(adata.n_obs), "encoder": args.encoder, "patch_px": args.patch_px, "times": times,
           "median_seconds": med, "cost_ratio": med[8] / med[1], "command": " ".join(sys.argv),
           "machine": platform.platform(), "load": os.getloadavg()}  # fmt: skip
    print(f"tta=1 {med[1]:.1f} s, tta=8 {med[8]:.1f} s (medians of {args.repeats}); ratio {res['cost_ratio']:.2f}")
    out = Path(args.out).with_name("tta_cost.json")
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED / "data" / "her2st"))
    ap.add_argument("--sections", nargs="*", default=["C2", "C3", "C4", "C5", "C6"])
    ap.add_argument("--encoder", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", default=str(SHARED / "weights" / "efficientnet-lite0-57934424.pth"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--patch-px", type=int, default=224)
    ap.add_argument("--cost-only", type=int, default=0, help="only time tta=1 vs 8 on this many spots (interleaved)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "tta_her2st.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adata = agl.io.read_legacy_st(args.data, sections=args.sections)
    enc = agl.EncoderConfig(
        args.encoder, weights=args.weights, patch_px=args.patch_px, patch_um=160.0, precision="fp32"
    )
    kw = {"encoder": enc, "device": "cpu", "library_key": "library_id"}
    if args.cost_only:
        cost_only(adata[: args.cost_only].copy(), kw, args)
        return
    secs = {}
    for tta in (1, 8):
        t = time.perf_counter()
        agl.pp.embed_patches(adata, **{**kw, "encoder": replace(kw["encoder"], tta=tta)}, key_added=f"tta{tta}")
        secs[tta] = time.perf_counter() - t
        print(f"tta={tta}: {secs[tta]:.0f} s for {adata.n_obs} spots", flush=True)
    res = {"n_spots": int(adata.n_obs), "sections": args.sections, "encoder": args.encoder, "seconds": secs,
           "patch_px": args.patch_px, "patch_um": 160.0,
           "cost_ratio": secs[8] / secs[1], "pcc": {}}  # fmt: skip
    for tta in (1, 8):
        agl.pp.spatial_context(adata, f"tta{tta}", key_added=f"tta{tta}_ctx")
        for key in (f"tta{tta}", f"tta{tta}_ctx"):
            per = loso(adata, key)
            res["pcc"][key] = {"per_section": per, "mean": float(np.mean(list(per.values())))}
            print(f"{key}: {res['pcc'][key]['mean']:.4f} { ({k: round(v, 3) for k, v in per.items()}) }", flush=True)
    for k in ("", "_ctx"):
        a, b = res["pcc"][f"tta1{k}"]["per_section"], res["pcc"][f"tta8{k}"]["per_section"]
        diffs = [b[s] - a[s] for s in a]
        res[f"gain{k or '_plain'}"] = {"mean": float(np.mean(diffs)), "per_section": dict(zip(a, diffs)),
                                       "sections_up": int(sum(d > 0 for d in diffs))}  # fmt: skip
        print(f"tta gain{k}: {np.mean(diffs):+.4f} ({sum(d > 0 for d in diffs)}/{len(diffs)} sections up)")
    print(f"cost ratio tta=8 / tta=1: {res['cost_ratio']:.2f}")
    res.update(command=" ".join(sys.argv), machine=platform.platform(), load=os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
