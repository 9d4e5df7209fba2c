"""DkGSB with the live-Adam look-ahead (default) vs the authors' look-ahead: k, target PCC and seconds.

``lookahead="adam"``: the network's live Adam optimiser's next step, ``H = 1``, a new meta batch per step, eval
mode. ``lookahead="authors"``: a copy of the network, a fresh Adam (lr 3e-5), ``H`` steps (``--authors-h``,
default 12 as in their code) on one meta batch, train mode. Everything else is ``agl_fit``'s defaults
(``method="dkgsb"``, refit) with one network per fit (``n_seeds=1``: the look-ahead is what is compared).

- ``--data synthetic``: the slide of ``agl-scverse demo`` (seed 0: 400 spots, random-init ResNet-18 features at
  112 px), a seeded quarter of the spots held out, scored with :func:`agl_scverse.tl.evaluate`; one row per seed.
- ``--data her2st``: patient C leave-one-section-out (:func:`agl_scverse.tl.cross_validate`, the protocol of
  ``bench_her2st_loso.py``) on the cached DenseNet-121 embeddings, held-out sections ``--groups``.

Run::

    OMP_NUM_THREADS=1 python -m benchmarks.accuracy.bench_lookahead --data synthetic --seeds 0 1 2
    OMP_NUM_THREADS=1 python -m benchmarks.accuracy.bench_lookahead --data her2st --cache ../cache/her2st_densenet121.h5ad \
        --groups C2 C3 --seeds 0

Writes ``benchmarks/results/lookahead_<data>.json`` (rewritten after every fit) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import agl_scverse as agl
from benchmarks._common import HER2ST_H5AD, RESULTS, git_state


def settings(authors_h: list[int]) -> dict[str, dict]:
    """The look-aheads compared, as fields of ``agl_fit``'s ``dkgsb`` config (:class:`agl_scverse.DkGSBConfig`)."""
    out = {"adam": {"lookahead": "adam"}}
    for h in authors_h:
        out[f"authors:H{h}"] = {"lookahead": "authors", "inner_steps": h}
    return out


def run_synthetic(args, looks: dict, write) -> list[dict]:
    a = agl.datasets.synthetic_slide(seed=0)
    agl.pp.embed_patches(a, agl.EncoderConfig("resnet18", patch_px=112))
    test = np.zeros(a.n_obs, dtype=bool)
    test[np.random.default_rng(0).choice(a.n_obs, size=a.n_obs // 4, replace=False)] = True
    rows = []
    for seed in args.seeds:
        for name, kw in looks.items():
            t = time.perf_counter()
            model = agl.tl.agl_fit(
                a, method="dkgsb", embedding_key="X_agl_resnet18", spots=~test, seed=seed, training=agl.TrainingConfig(n_seeds=1),
                progress=False, dkgsb=agl.DkGSBConfig(**kw),
            )  # fmt: skip
            secs = time.perf_counter() - t
            meta = float(a.uns["agl"]["metrics"]["meta_seconds"])
            agl.tl.agl_predict(a, model)
            agl.tl.evaluate(a, model, spots=test)
            pcc = float(a.uns["agl"]["metrics"]["test"]["model"]["pearson"])
            rows.append({"seed": seed, "fold": "synthetic", "lookahead": name, "k": int(model.k), "pcc": pcc,
                         "fit_seconds": secs, "meta_seconds": meta})  # fmt: skip
            print(f"seed {seed} {name:12s} k {model.k:5d}  PCC {pcc:.4f}  fit {secs:.1f} s (meta {meta:.1f} s)")
            write(rows)
    return rows


def run_her2st(args, looks: dict, write) -> list[dict]:
    import anndata as ad

    adata = ad.read_h5ad(args.cache)
    rows = []
    for seed in args.seeds:
        for name, kw in looks.items():
            agl.tl.cross_validate(
                adata, "library_id", methods=(f"dkgsb:{name}",), embedding_key=args.embedding_key,
                genes=agl.GeneConfig(n_targets=50), baselines=False, seed=seed, key_added="agl_cv", progress=False,
                groups=args.groups, training=agl.TrainingConfig(n_seeds=1),
                method_kwargs={f"dkgsb:{name}": {"dkgsb": kw}},
            )  # fmt: skip
            summ = pd.DataFrame(adata.uns["agl_cv"]["summary"])
            for r in summ.itertuples():
                rows.append({"seed": seed, "fold": str(r.fold), "lookahead": name, "k": int(r.k),
                             "pcc": float(r.mean_pearson), "fit_seconds": float(r.fit_seconds)})  # fmt: skip
                print(
                    f"seed {seed} {r.fold} {name:12s} k {int(r.k):5d}  PCC {r.mean_pearson:.4f}  fit {r.fit_seconds:.0f} s"
                )
            write(rows)
    return rows


def table(rows: list[dict]) -> str:
    df = pd.DataFrame(rows)
    lines = ["| look-ahead | mean target PCC | k per fold/seed | median fit seconds |", "|---|---|---|---|"]
    for name, g in df.groupby("lookahead", sort=False):
        ks = ", ".join(str(v) for v in g["k"])
        lines.append(f"| {name} | {g['pcc'].mean():.4f} | {ks} | {g['fit_seconds'].median():.1f} |")
    if df["lookahead"].nunique() > 1:
        wide = df.pivot_table(index=["seed", "fold"], columns="lookahead", values="pcc")
        for name in wide.columns:
            if name != "adam":
                d = (wide[name] - wide["adam"]).dropna()
                lines.append(f"\npaired {name} - adam: mean {d.mean():+.4f}, {int((d > 0).sum())}/{len(d)} above")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("synthetic", "her2st"), default="synthetic")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--authors-h", type=int, nargs="+", default=[12], help="inner steps of the authors' look-ahead")
    ap.add_argument("--cache", type=Path, default=HER2ST_H5AD)
    ap.add_argument("--embedding-key", default="X_agl_densenet121")
    ap.add_argument("--groups", nargs="+", default=None, help="held-out HER2+ sections (default: all five)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = args.out or RESULTS / f"lookahead_{args.data}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(["python -m benchmarks.accuracy.bench_lookahead", *sys.argv[1:]])
    looks = settings(args.authors_h)
    t0 = time.perf_counter()

    def write(rows):
        out.write_text(json.dumps({
            "command": cmd, "git": git_state(), "settings": looks, "rows": rows, "total_seconds": time.perf_counter() - t0,
            "machine": f"{platform.machine()}, torch threads {torch.get_num_threads()}, load {_load()}",
        }, indent=2))  # fmt: skip

    rows = (run_synthetic if args.data == "synthetic" else run_her2st)(args, looks, write)
    print(table(rows))
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:  # pragma: no cover
        return "?"


if __name__ == "__main__":
    main()
