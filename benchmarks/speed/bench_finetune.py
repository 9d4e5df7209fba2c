"""Fine-tune data path and precision: spots/s of embedding and of fine-tune training, peak RSS.

Rows written to ``benchmarks/results/finetune.json`` (one run, so the ratios compare like with like):

- ``embed``: :func:`agl_scverse.pp.embed_patches` end to end on one HER2+ section (DenseNet-121 with the local
  ImageNet weights when present, else a random-init ResNet-18; a synthetic slide without the data) with
  ``precision="fp32"`` (float32, default layout: the computation of earlier versions, checked bit for bit in
  ``tests/train/test_precision.py``) and the default ``precision="auto"``, with 0 and 2 DataLoader workers; the
  speed-up of the default over fp32; the cosine similarity of each precision's features to fp32 (bf16 on a subset
  of spots when the CPU has no native bf16, where it is emulated and slow);
- ``finetune``: ``agl_fit(method="agl", mode="finetune")`` (AGL-all, ResNet-18, 224 px patches) for one short epoch
  on the first spots of the section, fp32 vs auto: training spots/s of the epoch (training steps + validation);
- GPU rows: "not measured" unless a CUDA device is present (then the same rows run on it);
- ``--meta`` (written to ``--meta-out``, default ``benchmarks/results/finetune_meta.json``): DkGSB's meta step in
  fine-tune mode (:func:`bench_meta`): epoch times of AGL-all and of DkGSB with ``meta_scope="all"`` / ``"last"``
  and fewer meta steps / a smaller meta batch, their ratio to AGL-all's epoch in the same run (medians over the
  epochs that take meta steps and over ``--meta-repeats`` rounds, the configurations interleaved), the agreement of
  the ``"last"`` and ``"all"`` hypergradients on the same meta batches of a real run, and the validation PCC of
  longer runs (``--meta-pcc-epochs``).

Peak RSS is ``resource.getrusage`` (this process, and its finished DataLoader workers) after each row.

Usage::

    python -m benchmarks.speed.bench_finetune [--data ../shared/data/her2st] [--section C6] [--weights <densenet .pth>]
        [--threads 2] [--bf16-spots 48] [--ft-spots 64] [--out benchmarks/results/finetune.json]
        [--meta] [--meta-only] [--meta-encoder resnet18] [--meta-px 112] [--meta-batch 24] [--meta-repeats 2]
        [--meta-rows 0 2 ...] [--meta-agree-epochs 6] [--meta-pcc-epochs 0] [--meta-out benchmarks/results/finetune_meta.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import DENSENET_WEIGHTS, HER2ST, RESULTS, command, git_state


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
    from agl_scverse.train._precision import native_bf16, resolve_precision

    enc = {"encoder": encoder, "weights": weights, "batch_size": args.batch_size, "patch_px": 224,
           "patch_um": args.patch_um}  # fmt: skip
    kw = {"device": device, "copy": True}
    # decode the image once (cached), warm up
    agl.pp.embed_patches(adata[:4].copy(), encoder=agl.EncoderConfig(**enc, precision="fp32"), **kw)
    rows, feats = [], {}
    n = adata.n_obs
    for precision, workers in (("fp32", 0), ("auto", 0), ("fp32", 2), ("auto", 2)):
        t = time.perf_counter()
        cfg = agl.EncoderConfig(**enc, precision=precision, num_workers=workers, prefetch_factor=2)
        out = agl.pp.embed_patches(adata, encoder=cfg, **kw)
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
    out = agl.pp.embed_patches(sub, encoder=agl.EncoderConfig(**enc, precision="bf16"), **kw)
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
            work, method="agl", mode="finetune",
            encoder=agl.EncoderConfig("resnet18", patch_px=224, patch_um=args.patch_um, precision=precision),
            genes=agl.GeneConfig(n_targets=20, min_cells=3), training=agl.TrainingConfig(epochs=1, batch_size=16),
            val_fraction=0.25, device=str(device), progress=False, seed=0,
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


# ------------------------------------------------------------------ DkGSB's meta step in fine-tune mode (--meta)
def _meta_fit(adata, args, method: str, epochs: int, **dkgsb):
    """One fine-tune ``agl_fit`` run of the meta benchmark (``dkgsb``: DkGSBConfig fields); its ``.uns["agl"]``."""
    import agl_scverse as agl

    work = adata.copy()
    weights = args.weights if args.meta_encoder == "densenet121" else None
    agl.tl.agl_fit(
        work, method=method, mode="finetune",
        encoder=agl.EncoderConfig(args.meta_encoder, weights=weights, patch_px=args.meta_px, patch_um=args.patch_um),
        genes=agl.GeneConfig(n_targets=20, min_cells=3),
        training=agl.TrainingConfig(epochs=epochs, patience=epochs, batch_size=args.meta_batch),
        dkgsb=agl.DkGSBConfig(**dkgsb) if dkgsb else None, val_fraction=0.2, device="cpu", progress=False, seed=0,
    )  # fmt: skip
    return work.uns["agl"]


#: (label, method, DkGSBConfig fields) of the epoch-time rows; ``meta_batch_size`` is a fraction of ``--meta-batch``
#: (DkGSB rows without it use ``--meta-batch``, the training batch size)
META_CONFIGS = [
    ("AGL-all", "agl", {}),
    ("DkGSB all, 4 meta steps", "dkgsb", {"meta_scope": "all"}),
    ("DkGSB last, 4 meta steps", "dkgsb", {"meta_scope": "last"}),
    ("DkGSB last, 2 meta steps", "dkgsb", {"meta_scope": "last", "meta_steps": 2}),
    ("DkGSB last, 4 meta steps, half meta batch", "dkgsb", {"meta_scope": "last", "meta_batch_size": 0.5}),
    ("DkGSB all, 2 meta steps", "dkgsb", {"meta_scope": "all", "meta_steps": 2}),
    ("DkGSB all, 1 meta step", "dkgsb", {"meta_scope": "all", "meta_steps": 1}),
    (
        "DkGSB all, 2 meta steps, half meta batch",
        "dkgsb",
        {"meta_scope": "all", "meta_steps": 2, "meta_batch_size": 0.5},
    ),
]


def _meta_kwargs(kw: dict, args) -> dict:
    out = dict(kw)
    if "meta_scope" in out:
        out["meta_batch_size"] = max(2, int(round(out.get("meta_batch_size", 1.0) * args.meta_batch)))
    return out


def _agreement(adata, args) -> dict:
    """A DkGSB ``meta_scope="last"`` run that also computes the ``"all"`` hypergradient at each of its meta steps."""
    from agl_scverse.train import _trainer

    real, rec = _trainer.hypergradient, {"last": [], "all": [], "t_last": [], "t_all": [], "n_scope": 0}
    rec.update({"wider": [], "t_wider": [], "all_fixed": [], "last_fixed": []})

    def both(*a, meta_scope, **kw):
        # the same look-aheads with the normaliser sum(w) held at its value: what is left is the auxiliaries' effect
        fixed = {**kw, "normalizer": float(a[2] + a[1].weights().detach().sum())}
        rec["all_fixed"].append(float(real(*a, meta_scope="all", **fixed)[0]))
        rec["last_fixed"].append(float(real(*a, meta_scope=meta_scope, **fixed)[0]))
        t = time.perf_counter()
        g_all, _ = real(*a, meta_scope="all", **kw)
        rec["t_all"].append(time.perf_counter() - t)
        if args.meta_wider:  # a wider scope for comparison: the output layer and every parameter under a prefix
            names = [n for n, _ in a[0].named_parameters() if n.startswith((args.meta_wider, "out."))]
            t = time.perf_counter()
            rec["wider"].append(float(real(*a, meta_scope=names, **kw)[0]))
            rec["t_wider"].append(time.perf_counter() - t)
        t = time.perf_counter()
        g, lv = real(*a, meta_scope=meta_scope, **kw)
        rec["t_last"].append(time.perf_counter() - t)
        rec["all"].append(float(g_all))
        rec["last"].append(float(g))
        rec["n_scope"] = len(meta_scope)
        return g, lv

    _trainer.hypergradient = both
    try:
        _meta_fit(adata, args, "dkgsb", args.meta_agree_epochs, meta_scope="last", meta_batch_size=args.meta_batch)
    finally:
        _trainer.hypergradient = real
    a, b = np.asarray(rec["all"]), np.asarray(rec["last"])
    af, bf = np.asarray(rec["all_fixed"]), np.asarray(rec["last_fixed"])

    def cos(u, v):
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

    fixed = {
        "fixed_normaliser_sign_agreement_last_vs_all": float(np.mean(np.sign(af) == np.sign(bf))),
        "fixed_normaliser_cosine_last_vs_all": cos(af, bf), "cosine_all_fixed_vs_all_soft": cos(af, a),
        "median_abs_ratio_last_fixed_over_last_soft": float(np.median(np.abs(bf) / np.maximum(np.abs(b), 1e-30))),
        "median_abs_ratio_all_fixed_over_all_soft": float(np.median(np.abs(af) / np.maximum(np.abs(a), 1e-30))),
        "hypergrad_all_fixed": af.tolist(), "hypergrad_last_fixed": bf.tolist(),
    }  # fmt: skip
    wider = {}
    if rec["wider"]:
        c = np.asarray(rec["wider"])
        wider = {"wider_scope": args.meta_wider + "* + out", "wider_sign_agreement": float(np.mean(np.sign(a) == np.sign(c))),
                 "wider_cosine": float(a @ c / (np.linalg.norm(a) * np.linalg.norm(c))),
                 "seconds_per_meta_step_wider": float(np.median(rec["t_wider"])), "hypergrad_wider": c.tolist()}  # fmt: skip
    return {
        "what": "hypergradient of meta_scope='last' vs 'all' on the same meta batches (a 'last' run)",
        "n_meta_steps": len(a), "scope_tensors": rec["n_scope"],
        "sign_agreement": float(np.mean(np.sign(a) == np.sign(b))),
        "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
        "pearson": float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 else None,
        "median_abs_ratio_last_over_all": float(np.median(np.abs(b) / np.maximum(np.abs(a), 1e-30))),
        "seconds_per_meta_step_all": float(np.median(rec["t_all"])),
        "seconds_per_meta_step_last": float(np.median(rec["t_last"])),
        "hypergrad_all": a.tolist(), "hypergrad_last": b.tolist(), **fixed, **wider,
    }  # fmt: skip


def bench_meta(adata, args) -> dict:
    """Epoch times of AGL-all vs DkGSB meta settings (same run), hypergradient agreement, validation PCC."""
    configs = [META_CONFIGS[i] for i in args.meta_rows] if args.meta_rows else META_CONFIGS
    times: dict[str, list[float]] = {label: [] for label, _, _ in configs}
    info: dict[str, dict] = {}
    for r in range(args.meta_repeats):  # interleaved, so that load changes hit every configuration alike
        for label, method, kw in configs:
            u = _meta_fit(adata, args, method, 3, **_meta_kwargs(kw, args))
            sec = [float(s) for s in u["history"]["seconds"]]
            times[label] += sec[1:]  # epochs 1 and 2 take meta steps (epoch 0 never does)
            info[label] = {"n_train": int(u["metrics"]["n_train"]), "meta_scope": u["params"]["meta_scope"],
                           "meta_steps": int(u["params"]["meta_steps"]),
                           "meta_batch_size": int(u["params"]["meta_batch_size"]),
                           "meta_seconds_last_repeat": float(u["metrics"].get("meta_seconds", 0.0))}  # fmt: skip
            print(label, f"round {r}", np.round(sec, 2), flush=True)
    base = float(np.median(times["AGL-all"]))
    rows = []
    for label, method, _ in configs:
        med = float(np.median(times[label]))
        row = {"what": label, "method": method, **info[label], "epoch_seconds_median": round(med, 2),
               "epoch_seconds": [round(t, 2) for t in times[label]], "ratio_to_agl_all": round(med / base, 3)}  # fmt: skip
        if method == "agl":
            for key in ("meta_scope", "meta_steps", "meta_batch_size", "meta_seconds_last_repeat"):
                row.pop(key)
        rows.append(row)
        print(rows[-1], flush=True)
    out = {"epoch_rows": rows}
    if args.meta_agree_epochs:
        out["agreement"] = _agreement(adata, args)
        print(out["agreement"], flush=True)
    if args.meta_pcc_epochs:
        pcc = []
        for label, method, kw in META_CONFIGS[:3]:
            u = _meta_fit(adata, args, method, args.meta_pcc_epochs, **_meta_kwargs(kw, args))
            m = u["metrics"]
            pcc.append({"what": label, "epochs": args.meta_pcc_epochs, "val_pcc": round(float(m["val_pcc"]), 4),
                        "best_epoch": int(m["best_epoch"]), "k": u.get("k"),
                        "k_per_epoch": [int(v) for v in u["history"]["k"]]})  # fmt: skip
            print(pcc[-1], flush=True)
        out["val_pcc"] = pcc
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=HER2ST)
    ap.add_argument("--section", default="C6")
    ap.add_argument("--weights", type=Path, default=DENSENET_WEIGHTS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--patch-um", type=float, default=160.0, help="HER2+: a 224 px patch covers ~160 µm")
    ap.add_argument("--bf16-spots", type=int, default=48)
    ap.add_argument("--ft-spots", type=int, default=64)
    ap.add_argument("--spots", type=int, default=None, help="only the first N spots (a quick check)")
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "finetune.json")
    ap.add_argument("--meta", action="store_true", help="also benchmark DkGSB's meta step in fine-tune mode")
    ap.add_argument("--meta-only", action="store_true", help="only the --meta benchmark (implies --meta)")
    ap.add_argument("--meta-encoder", default="resnet18", choices=["resnet18", "densenet121"])
    ap.add_argument("--meta-px", type=int, default=112, help="patch side of the meta benchmark")
    ap.add_argument("--meta-batch", type=int, default=24, help="batch size and meta batch size of the meta benchmark")
    ap.add_argument("--meta-repeats", type=int, default=2)
    ap.add_argument("--meta-agree-epochs", type=int, default=6, help="epochs of the agreement run (0: none)")
    ap.add_argument("--meta-rows", type=int, nargs="*", default=None, help="only these META_CONFIGS rows (0: AGL-all)")
    ap.add_argument("--meta-wider", default="backbone.layer4.", help="parameter prefix of a wider scope compared")
    ap.add_argument("--meta-pcc-epochs", type=int, default=0, help="epochs of the PCC runs (0: none)")
    ap.add_argument("--meta-out", type=Path, default=RESULTS / "finetune_meta.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adata, source = load_slide(args.data, args.section)
    if args.spots:
        adata = adata[: args.spots].copy()
    if args.meta or args.meta_only:
        _run_meta(adata, source, args)
        if args.meta_only:
            return
    weights = args.weights if args.weights.exists() else None
    encoder = "densenet121" if weights is not None else "resnet18"
    print(f"{source}: {adata.n_obs} spots; encoder {encoder} ({'local weights' if weights else 'random init'})")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    result = {
        "command": command(),
        "git": git_state(),
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


def _run_meta(adata, source: str, args) -> None:
    t0 = time.perf_counter()
    result = {
        "command": command(),
        "git": git_state(),
        "when_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "data": source, "n_spots": int(adata.n_obs), "encoder": args.meta_encoder,
        "weights": str(args.weights) if args.meta_encoder == "densenet121" else "random init",
        "patch_px": args.meta_px, "batch_size": args.meta_batch, "torch": torch.__version__, "threads": args.threads,
        "cpu": platform.processor() or platform.machine(), "load_average_start": os.getloadavg(),
        **bench_meta(adata, args),
    }  # fmt: skip
    result["load_average_end"] = os.getloadavg()
    result["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    args.meta_out.parent.mkdir(parents=True, exist_ok=True)
    args.meta_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
