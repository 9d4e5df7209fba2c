"""One HER2+ leave-one-section-out fold in fine-tune mode beside embedding mode: what fine-tuning buys on a CPU.

The fold of :func:`agl_scverse.tl.cross_validate` (held-out section ``--test``, validation = the next section,
targets = top-50 HVG of the four training sections, auxiliaries ranked by their HVG score on those sections).
Fine-tune mode trains DenseNet-121 (ImageNet weights from ``../shared/weights``) and one linear output layer end to
end on ``--px`` patches of ``--um`` µm for a short budget (``--epochs``, ``--lr``; fine-tune mode's default of up to 50 epochs at
3e-5 -- our budget; the authors' code allows up to 1,000 with early stopping -- is out of reach on 2 CPU cores); embedding mode trains the default MLP head on features of the same encoder and
patches. Methods PGL, AGL-all and DkGSB (``--meta-steps`` per epoch: 1 keeps DkGSB's epoch within ~1.5x of
AGL-all's, see the "Cost of the meta step" section of the Method page). Reported: held-out mean target PCC, best
validation PCC, seconds per epoch, peak RSS.

Run::

    python -m benchmarks.accuracy.bench_finetune_loso [--test C6] [--px 112] [--epochs 4] [--methods pgl agl dkgsb]

Writes ``benchmarks/results/finetune_loso.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

import agl_scverse as agl
from agl_scverse.tl._cross_validate import _val_group
from benchmarks._common import DENSENET_WEIGHTS, HER2ST, RESULTS


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _score(adata, train, model, key: str) -> float:
    test = adata[~train].copy()
    agl.tl.evaluate(test, model, key_added=key, baselines=False)
    return float(np.nanmean(test.var.loc[model.targets, f"{key}_pcc"]))


def common_arguments(args: argparse.Namespace, roles, val: str) -> dict:
    """The agl_fit arguments of both modes: the fold's genes, its validation section, the patches, DkGSB's steps."""
    return {
        "genes": agl.GeneConfig(targets=list(roles.targets), auxiliaries=list(roles.auxiliaries), prior="fold_prior"),
        "split_key": "library_id", "val_groups": [val], "seed": 0, "progress": False,
        "encoder": agl.EncoderConfig(patch_px=args.px, patch_um=args.um),  # embedding mode reads the cached features
        "dkgsb": agl.DkGSBConfig(meta_steps=args.meta_steps),
    }  # fmt: skip


def finetune_arguments(args: argparse.Namespace) -> dict:
    """Fine-tune mode's encoder (DenseNet-121, local weights, the same patches) and its short training budget."""
    return {
        "encoder": agl.EncoderConfig("densenet121", weights=args.weights, patch_px=args.px, patch_um=args.um),
        "training": agl.TrainingConfig(
            epochs=args.epochs, patience=args.epochs, lr=args.lr, batch_size=args.batch_size
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=HER2ST)
    ap.add_argument("--weights", type=Path, default=DENSENET_WEIGHTS)
    ap.add_argument("--test", default="C6")
    ap.add_argument("--px", type=int, default=112)
    ap.add_argument("--um", type=float, default=160.0)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--meta-steps", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=["pgl", "agl", "dkgsb"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "finetune_loso.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    adata = agl.io.read_legacy_st(args.data)
    lib = adata.obs["library_id"].astype(str).to_numpy()
    order = list(dict.fromkeys(lib))
    val = _val_group(order, args.test)
    train = lib != args.test
    roles = agl.pp.gene_roles(adata, n_targets=50, train_mask=train, inplace=False)
    adata.var["fold_prior"] = roles.prior.reindex(adata.var_names).to_numpy(dtype=float)
    sub = adata[train].copy()
    common = common_arguments(args, roles, val)
    rows = []
    for method in args.methods:  # fine-tune mode
        t0 = time.perf_counter()
        model = agl.tl.agl_fit(
            sub, method=method, mode="finetune", key_added=f"ft_{method}", **{**common, **finetune_arguments(args)}
        )
        fit_s = time.perf_counter() - t0
        hist = sub.uns[f"ft_{method}"]["history"]
        rows.append(
            {
                "mode": "finetune", "method": method, "test_pcc": _score(adata, train, model, f"ft_{method}"),
                "val_pcc": float(model.config["val_pcc"]), "k": model.k, "best_epoch": model.config["best_epoch"],
                "fit_seconds": fit_s, "median_epoch_seconds": float(np.median(hist["seconds"])),
                "peak_rss_gb": _peak_gb(),
            }
        )  # fmt: skip
        print(rows[-1], flush=True)
    emb_key = "X_agl_densenet121"
    agl.pp.embed_patches(
        adata, agl.EncoderConfig("densenet121", weights=args.weights, patch_px=args.px, patch_um=args.um)
    )
    sub = adata[train].copy()
    for method in args.methods:  # embedding mode, same encoder and patches
        t0 = time.perf_counter()
        model = agl.tl.agl_fit(sub, method=method, embedding_key=emb_key, key_added=f"emb_{method}", **common)
        rows.append(
            {
                "mode": "embedding", "method": method, "test_pcc": _score(adata, train, model, f"emb_{method}"),
                "val_pcc": float(model.config["val_pcc"]), "k": model.k, "best_epoch": model.config["best_epoch"],
                "fit_seconds": time.perf_counter() - t0,
            }
        )  # fmt: skip
        print(rows[-1], flush=True)
    res = {
        "command": "python -m benchmarks.accuracy.bench_finetune_loso " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("data", "weights", "out")
        ),
        "test": args.test, "val": val, "n_train_spots": int((lib != args.test).sum() - (lib == val).sum()),
        "n_val_spots": int((lib == val).sum()), "n_test_spots": int((lib == args.test).sum()),
        "torch_threads": torch.get_num_threads(), "total_seconds": time.perf_counter() - t_all, "rows": rows,
        "when_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=str))
    print(f"| mode | method | held-out {args.test} PCC | val PCC | k | s / epoch |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['method']} | {r['test_pcc']:.3f} | {r['val_pcc']:.3f} | {r['k']} | "
            f"{r.get('median_epoch_seconds', float('nan')):.1f} |"
        )


if __name__ == "__main__":
    main()
