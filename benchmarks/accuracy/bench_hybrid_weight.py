"""The weight of the linear head in ``agl_fit(head="hybrid")``: HER2+ leave-one-section-out over a grid of weights.

Per fold, one five-seed MLP ensemble (``method``, refit) and one ``agl_fit(head="rrr", method="topk", k="auto")``
linear head are fitted once on the same spots, and their target predictions are blended with weights 0 (the
ensemble alone) to 1 (the linear head alone); ``cross_validate`` scores each blend on the held-out section beside
its baselines. These are scores of the held-out (test) sections, so they must not choose the weight: an earlier
``agl_fit(head="hybrid")`` fixed it at 0.5 from this script, a choice made on the test sections. ``agl_fit`` now
chooses the weight on the validation spots of each fit (``metrics["hybrid_weight"]``), and
``bench_her2st_loso.py --nested`` chooses between configurations without the test section; this script only shows
how sensitive the test score is to the weight.

    python -m benchmarks.accuracy.bench_hybrid_weight --cache <embedded h5ad> --method dkgsb --seed 0

Writes ``benchmarks/results/hybrid_weight_<method>_seed<seed>.json`` (mean PCC per weight, per section).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import agl_scverse as agl
import agl_scverse.tl._cross_validate as cv
from agl_scverse.tl._config import merge_configs
from benchmarks._common import DENSENET_WEIGHTS, HER2ST, OUT, RESULTS, git_state
from benchmarks.accuracy import bench_her2st_loso as B

WEIGHTS = (0.0, 0.25, 0.4, 0.5, 0.6, 1.0)
#: The linear head's agl_fit arguments (merged into the shared configs): one closed-form fit, k chosen on validation.
LINEAR = {"method": "topk", "dkgsb": {"k": "auto"}, "network": {"head": "rrr"}, "training": {"n_seeds": 1}}


class Blend:
    """Target predictions ``(1 - w) * ensemble + w * linear`` of two fitted models (what cross_validate scores)."""

    def __init__(self, ens, lin, w: float):
        self.ens, self.lin, self.w = ens, lin, w
        self.targets, self.k = ens.targets, ens.k

    def predict(self, X: np.ndarray) -> np.ndarray:
        n = len(self.targets)
        return (1 - self.w) * self.ens.predict(X)[:, :n] + self.w * self.lin.predict(X)[:, :n]


def blending_fit(real_fit):
    """An ``agl_fit`` for cross_validate that fits the two models once per fold and returns a :class:`Blend`."""
    cache: dict = {}

    def fit(sub, **kw):
        w, method = kw.pop("blend_w"), kw.pop("blend_method")
        key = (id(sub), kw["seed"])
        if key not in cache:
            ens = real_fit(sub, **merge_configs(kw, {"method": method, "network": {"head": "mlp"}}))
            lin = real_fit(sub, **merge_configs(kw, LINEAR | {"key_added": kw["key_added"] + "_rrr"}))
            cache.clear()
            cache[key] = (ens, lin, kw["key_added"])
        ens, lin, first = cache[key]
        if first != kw["key_added"]:  # cross_validate reads the split and the record of every method's key
            sub.obs[kw["key_added"] + "_split"] = sub.obs[first + "_split"]
            sub.uns[kw["key_added"]] = sub.uns[first]
        return Blend(ens, lin, w)

    return fit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=HER2ST)
    p.add_argument("--weights", type=Path, default=DENSENET_WEIGHTS)
    p.add_argument("--cache", type=Path, default=OUT / "her2st_densenet121.h5ad")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--method", default="dkgsb", choices=["pgl", "agl", "dkgsb"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    adata = B.load_embedded(args.data, args.weights, args.cache, 160.0, 224)
    names = [f"{args.method}:w{w}" for w in WEIGHTS]
    cv.agl_fit = blending_fit(cv.agl_fit)
    t0 = time.perf_counter()
    df = agl.tl.cross_validate(
        adata, "library_id", methods=tuple(names), embedding_key=B.EMB_KEY, genes=agl.GeneConfig(n_targets=50),
        baselines=True, seed=args.seed, progress=False, training=agl.TrainingConfig(refit=True, n_seeds=5),
        method_kwargs={n: {"blend_w": w, "blend_method": args.method} for n, w in zip(names, WEIGHTS)},
    )  # fmt: skip
    per = df.groupby(["method", "fold"]).pearson.mean().unstack()
    print(per.round(4))
    print(per.mean(axis=1).round(4))
    out = {
        "command": " ".join(["python -m benchmarks.accuracy.bench_hybrid_weight", *sys.argv[1:]]), "git": git_state(), "seconds": time.perf_counter() - t0,
        "mean_pcc": {m: float(v) for m, v in per.mean(axis=1).items()},
        "per_section_pcc": {m: {str(f): float(v) for f, v in row.items()} for m, row in per.iterrows()},
    }  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"hybrid_weight_{args.method}_seed{args.seed}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
