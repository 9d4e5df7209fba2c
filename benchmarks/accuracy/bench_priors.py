"""Priors compared at a fixed k on the synthetic slide: HVG dispersion, co-expression with the targets, Moran's I.

Same slide and fit settings as ``bench_synthetic_methods.py`` (clean informative auxiliaries, noisy targets, a
simulated encoder). For each prior, a top-k fit with ``k`` auxiliaries (default 300, about the number of truly
informative ones) and ``k="auto"``; reported per prior (medians over seeds): held-out target PCC and the precision
of the selected auxiliaries (fraction truly informative; base rate ~0.15).

Run::

    python -m benchmarks.accuracy.bench_priors [--seeds 0 1 2] [--k 300]

Writes ``benchmarks/results/bench_priors.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

import agl_scverse as agl
from benchmarks._common import RESULTS
from benchmarks.accuracy.bench_synthetic_methods import FIT, make_slide

PRIORS = ("hvg", "coexpression", "moran")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--k", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "bench_priors.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        adata, key, targets = make_slide(seed, "latent", None)
        names = [f"topk:{p}" for p in PRIORS] + [f"topk:{p}:auto" for p in PRIORS]
        kw = {f"topk:{p}": {"genes": {"prior": p}, "dkgsb": {"k": args.k}} for p in PRIORS}
        kw.update({f"topk:{p}:auto": {"genes": {"prior": p}, "dkgsb": {"k": "auto"}} for p in PRIORS})
        df = agl.tl.compare_methods(
            adata, names, seed=seed, embedding_key=key, genes=agl.GeneConfig(targets=targets), method_kwargs=kw, **FIT
        )
        df["seed"] = seed
        rows.append(df)
        print(f"seed {seed}")
        print(df[["method", "test_pcc", "k", "precision", "base_rate"]].round(4).to_string(index=False))
    all_df = pd.concat(rows, ignore_index=True)
    med = all_df.groupby("method", sort=False)[["test_pcc", "k", "precision", "base_rate"]].median()
    print("\nmedians over seeds")
    print(med.round(4))
    out = {
        "command": "python -m benchmarks.accuracy.bench_priors --seeds "
        + " ".join(map(str, args.seeds))
        + f" --k {args.k}",
        "per_seed": all_df.to_dict(orient="records"),
        "median": med.reset_index().to_dict(orient="records"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
