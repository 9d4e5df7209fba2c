"""HER2+ leave-one-section-out benchmark over seeds: baselines, PGL (plain and regularised), AGL-all, top-k, DkGSB.

Reads the five HER2+ sections (patient C) with :func:`agl_scverse.io.read_legacy_st`, embeds 224-px patches of
160 µm (about the native 0.71-0.74 µm/px of these scans) with ImageNet DenseNet-121
(:func:`agl_scverse.pp.embed_patches`, local weights), caches the embedded AnnData under ``benchmarks/out/``, then
runs :func:`agl_scverse.tl.cross_validate` once per seed (targets = top-50 HVG of the four training sections, log1p
counts, validation = the next section; every method and baseline trains on the same spots: with ``--refit`` (the
default) the networks are refitted on train + validation for their selected epochs and the baselines fit on the
same spots).

Methods: ``pgl``, ``pgl:reg`` (PGL with dropout 0.5: is an AGL gain just regularisation?), ``agl``, ``topk``
(``--topk-k``), ``topk:auto`` (k chosen on validation), ``dkgsb`` (defaults), ``dkgsb:legacy`` (the previous default:
SGD look-ahead, detached normaliser, beta 3e-3), plus the baselines ``pca_ridge`` and ``rrr`` (reduced-rank ridge
with auxiliaries). Reported: mean ± sd over seeds of the mean target PCC over sections, per-section means, k per
fold, fit time ratio to AGL-all, and paired differences (per seed) against PGL, regularised PGL and AGL-all.

Run::

    python -m benchmarks.accuracy.bench_her2st_loso [--seeds 0 1 2 3 4] [--methods pgl pgl:reg agl topk:auto dkgsb]
        [--no-refit] [--data ../shared/data/her2st] [--weights ../shared/weights/...pth]

Writes ``benchmarks/results/her2st_loso.json`` and ``.csv`` (per seed x fold x method; rewritten after every seed)
and prints a Markdown table for ``benchmarks/RESULTS.md``.

**Nested selection** (``--nested``): a choice among candidate configurations (``--candidates``, method names as in
``--methods``, e.g. ``dkgsb dkgsb:hybrid agl``) made without looking at the test section. For each held-out
section, every candidate is scored by an inner leave-one-section-out over the four *training* sections only (the
same protocol one level down: each inner fold trains on two sections, validates on the next, is scored on the
fourth; ``--inner-n-seeds`` networks per fit, default 1), the candidate with the best inner mean target PCC is
chosen, and its score is that of the candidate fitted on the four training sections (three train + one
validation, refit) and scored on the held-out section -- the same fit the outer leave-one-section-out makes, so the
outer fits are made once for all candidates and the choice only picks one. Reported per fold: the inner scores,
the chosen candidate, its test PCC, and every candidate's test PCC (the oracle choice is *not* a result). The
held-out section is never read by the inner loop (it is dropped from the AnnData the inner loop sees).
``--embedding-key`` takes any ``.obsm`` key of the cache (e.g. a context key such as
``X_agl_densenet121_context``, computed beforehand and saved in the cache h5ad)::

    OMP_NUM_THREADS=1 python -m benchmarks.accuracy.bench_her2st_loso --nested --cache ../cache/her2st_densenet121.h5ad \
        --candidates dkgsb dkgsb:mlp --n-seeds 1 --seeds 0 [--groups C2 C3] [--embedding-key X_...]

Writes ``benchmarks/results/her2st_nested.json`` (``--stem``), rewritten after every outer fold.
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
import pandas as pd

import agl_scverse as agl
from agl_scverse._utils import sha256_file
from benchmarks._common import DENSENET_WEIGHTS, HER2ST, OUT, RESULTS, git_state

LABELS = {
    "mean": "mean predictor",
    "pca_ridge": "PCA+Ridge (z-scored, LOO alpha)",
    "rrr": "reduced-rank ridge + auxiliaries",
    "pgl": "PGL",
    "pgl:reg": "PGL, dropout 0.5",
    "agl": "AGL-all",
    "topk": "top-k",
    "topk:auto": "top-k, k chosen on validation",
    "dkgsb": "DkGSB",
    "dkgsb:legacy": "DkGSB, previous default",
    "pgl:ens5": "PGL, 5-seed ensemble",
    "agl:ens5": "AGL-all, 5-seed ensemble",
    "dkgsb:ens5": "DkGSB, 5-seed ensemble",
    "topk:300": "top-300",
    "topk:1000": "top-1000",
    "topk:3000": "top-3000",
    "topk:rrr": "agl_fit(head='rrr', method='topk', k='auto')",
    "agl:hybrid": "AGL-all, agl_fit(head='hybrid')",
    "dkgsb:hybrid": "DkGSB, agl_fit(head='hybrid')",
    "agl:norefit": "AGL-all, no refit",
    "dkgsb:norefit": "DkGSB, no refit",
    "dkgsb:seed1": "DkGSB, one network (n_seeds=1)",
    "dkgsb:authors": "DkGSB, the authors' look-ahead (lookahead='authors')",
    "pgl:mlp": "PGL, agl_fit(head='mlp')",
    "agl:mlp": "AGL-all, agl_fit(head='mlp')",
    "dkgsb:mlp": "DkGSB, agl_fit(head='mlp')",
}
#: The agl_fit configs (as dicts of their fields) each variant changes; cross_validate merges them field by field
#: into the shared ones of :func:`fit_arguments`.
VARIANTS = {
    "pgl:reg": {"network": {"dropout": 0.5}},
    "topk:auto": {"dkgsb": {"k": "auto"}},
    "dkgsb:legacy": {"dkgsb": {"meta_normalizer": "detached", "lookahead": "sgd", "beta": 3e-3}},
    "pgl:ens5": {"training": {"n_seeds": 5}},
    "agl:ens5": {"training": {"n_seeds": 5}},
    "dkgsb:ens5": {"training": {"n_seeds": 5}},
    "topk:300": {"dkgsb": {"k": 300}},  # the top-k sweep (k = 0 is PGL, all is AGL-all)
    "topk:1000": {"dkgsb": {"k": 1000}},
    "topk:3000": {"dkgsb": {"k": 3000}},
    "topk:rrr": {"dkgsb": {"k": "auto"}, "network": {"head": "rrr"}},  # the closed-form linear head as a model
    "agl:hybrid": {"network": {"head": "hybrid"}},  # the MLP ensemble with the linear head's targets averaged in
    "dkgsb:hybrid": {"network": {"head": "hybrid"}},
    "agl:norefit": {"training": {"refit": False}},  # candidates for --nested: a refit choice without the test section
    "dkgsb:norefit": {"training": {"refit": False}},
    "dkgsb:seed1": {"training": {"n_seeds": 1}},  # the n_seeds choice for --nested (with --inner-n-seeds 5)
    "dkgsb:authors": {"dkgsb": {"lookahead": "authors"}},
    "pgl:mlp": {"network": {"head": "mlp"}},  # the networks alone (the default head is "hybrid" since dc94db3)
    "agl:mlp": {"network": {"head": "mlp"}},
    "dkgsb:mlp": {"network": {"head": "mlp"}},
}
EMB_KEY = "X_agl_densenet121"


def fit_arguments(args: argparse.Namespace) -> dict:
    """The agl_fit configs every method shares (the variants of :data:`VARIANTS` change some of their fields)."""
    training = {"refit": not args.no_refit, "n_seeds": args.n_seeds, "epochs": args.epochs}
    out = {"training": agl.TrainingConfig(**{k: v for k, v in training.items() if v is not None})}
    if "topk" in args.methods:
        out["dkgsb"] = agl.DkGSBConfig(k=args.topk_k)
    return out


def genes_of(args: argparse.Namespace) -> agl.GeneConfig:
    """Targets per fold (top ``--n-targets`` HVG of the training sections) and the auxiliaries' ``--prior``."""
    return agl.GeneConfig(n_targets=args.n_targets, prior=args.prior)


def load_embedded(data: Path, weights: Path, cache: Path, patch_um: float, patch_px: int) -> agl.AnnData:  # type: ignore[name-defined]
    """Read the sections and embed them, or read the cached result (checked against the weights hash)."""
    import anndata as ad

    sha = sha256_file(weights)
    if cache.exists():
        adata = ad.read_h5ad(cache)
        rec = adata.uns.get("agl_embeddings", {}).get(EMB_KEY, {})
        if (
            EMB_KEY in adata.obsm
            and rec.get("weights_sha256") == sha
            and float(rec.get("patch_um", -1)) == patch_um
            and int(rec.get("patch_px", -1)) == patch_px
        ):
            print(f"cached embeddings: {cache}")
            return adata
        print("cache does not match the weights / patch settings: re-embedding")
    t0 = time.perf_counter()
    adata = agl.io.read_legacy_st(data)
    agl.pp.embed_patches(
        adata,
        agl.EncoderConfig("densenet121", weights=weights, patch_px=patch_px, patch_um=patch_um),
        library_key="library_id",
        device="cpu",
    )
    print(f"read + embedded {adata.n_obs} spots in {time.perf_counter() - t0:.0f} s")
    cache.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(cache)
    return adata


def summarise(summ: pd.DataFrame) -> dict:
    """Per method: mean ± sd over seeds of the LOSO mean PCC, per-section means, k, time; paired differences."""
    per_seed = summ.groupby(["method", "seed"])["mean_pearson"].mean().unstack("seed")  # mean over folds
    secs = summ.groupby(["method", "fold"])["fit_seconds"].median().unstack("fold")
    out: dict = {"methods": {}, "paired": {}, "seeds": [int(v) for v in per_seed.columns]}
    for m in [m for m in LABELS if m in per_seed.index]:
        sec = summ[summ.method == m].groupby("fold")["mean_pearson"].mean()
        ks = summ[summ.method == m].groupby("fold")["k"].median()
        ratio = float(np.median(secs.loc[m] / secs.loc["agl"])) if "agl" in secs.index else None
        v = per_seed.loc[m].to_numpy(dtype=float)
        out["methods"][m] = {
            "label": LABELS[m],
            "mean_pcc": float(np.mean(v)),
            "sd_pcc": float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"),
            "per_seed_pcc": [float(x) for x in v],
            "per_section_pcc": {str(f): float(x) for f, x in sec.items()},
            "median_k_per_fold": {str(f): (None if np.isnan(x) else int(x)) for f, x in ks.items()},
            "median_fit_seconds": float(np.median(secs.loc[m])),
            "fit_time_ratio_to_agl_all": ratio,
        }
    for ref in ("pgl", "pgl:reg", "agl", "dkgsb"):
        if ref not in per_seed.index:
            continue
        for m in per_seed.index:
            if m == ref or m == "mean":
                continue
            d = (per_seed.loc[m] - per_seed.loc[ref]).to_numpy(dtype=float)
            out["paired"][f"{m} - {ref}"] = {
                "mean": float(np.mean(d)), "sd": float(np.std(d, ddof=1)) if len(d) > 1 else float("nan"),
                "wins": int((d > 0).sum()), "n": len(d),
            }  # fmt: skip
    return out


def markdown(res: dict, cmd: str) -> str:
    sections = list(next(iter(res["methods"].values()))["per_section_pcc"])
    n = len(res["seeds"])
    head = (
        f"| method | mean target PCC (± sd, {n} seeds) | "
        + " | ".join(sections)
        + " | median k per fold | fit time / AGL-all |"
    )
    lines = [head, "|" + "---|" * (len(sections) + 4)]
    for r in res["methods"].values():
        ks = list(r["median_k_per_fold"].values())
        k = "-" if all(v is None for v in ks) else ", ".join(str(v) for v in ks)
        ratio = "-" if r["fit_time_ratio_to_agl_all"] is None else f"{r['fit_time_ratio_to_agl_all']:.2f}"
        per = " | ".join(f"{r['per_section_pcc'][s]:.3f}" for s in sections)
        lines.append(f"| {r['label']} | **{r['mean_pcc']:.3f}** ± {r['sd_pcc']:.3f} | {per} | {k} | {ratio} |")
    lines += ["", "| paired difference (per seed) | mean | sd | wins |", "|---|---|---|---|"]
    for name, d in res["paired"].items():
        lines.append(f"| {name} | {d['mean']:+.4f} | {d['sd']:.4f} | {d['wins']}/{d['n']} |")
    return "\n".join(lines) + f"\n\nCommand: `{cmd}`\n"


def nested_selection(adata, args, fit_kwargs: dict, seed: int, outer: pd.DataFrame, done: list[dict], write) -> list:
    """Per held-out section: candidates scored by an inner leave-one-section-out on the training sections only.

    ``outer``: the outer summary (fold x method) of this seed, whose test scores the chosen candidate is read from.
    ``done`` collects one record per fold; ``write(done)`` is called after each fold.
    """
    lib = adata.obs["library_id"].astype(str).to_numpy()
    cands = list(args.candidates)
    inner_kwargs = {**fit_kwargs, "training": replace(fit_kwargs["training"], n_seeds=args.inner_n_seeds)}
    for fold in sorted(outer["fold"].astype(str).unique()):
        t0 = time.perf_counter()
        inner = adata[lib != fold].copy()  # the held-out section is not in the data the choice is made on
        agl.tl.cross_validate(
            inner, "library_id", methods=tuple(cands), embedding_key=args.embedding_key, genes=genes_of(args),
            baselines=False, seed=seed, key_added="agl_cv_inner", progress=False,
            method_kwargs={m: VARIANTS[m] for m in cands if m in VARIANTS}, **inner_kwargs,
        )  # fmt: skip
        isumm = pd.DataFrame(inner.uns["agl_cv_inner"]["summary"])
        inner_score = isumm.groupby("method")["mean_pearson"].mean()
        inner_folds = {
            m: {str(f): float(v) for f, v in zip(g["fold"], g["mean_pearson"])} for m, g in isumm.groupby("method")
        }
        chosen = max(cands, key=lambda m: (inner_score[m], -cands.index(m)))  # ties: the earlier candidate
        test = outer[outer["fold"].astype(str) == fold].set_index("method")["mean_pearson"]
        rec = {
            "seed": seed, "fold": fold, "chosen": chosen, "test_pcc_chosen": float(test[chosen]),
            "inner_mean_pcc": {m: float(inner_score[m]) for m in cands}, "inner_per_fold": inner_folds,
            "test_pcc": {m: float(v) for m, v in test.items()}, "inner_seconds": time.perf_counter() - t0,
        }  # fmt: skip
        done.append(rec)
        print(
            f"seed {seed} test {fold}: inner " + ", ".join(f"{m} {inner_score[m]:.4f}" for m in cands)
            + f" -> {chosen}; test {rec['test_pcc_chosen']:.4f} ("
            + ", ".join(f"{m} {test[m]:.4f}" for m in cands) + f"); {rec['inner_seconds']:.0f} s", flush=True,
        )  # fmt: skip
        write(done)
    return done


def nested_summary(records: list[dict], cands: list[str]) -> dict:
    """Mean over folds (and seeds) of the nested choice's test PCC beside each fixed candidate and baseline."""
    df = pd.DataFrame(records)
    out = {"nested_mean_pcc": float(df["test_pcc_chosen"].mean()), "n_folds": len(df)}
    tests = pd.DataFrame(list(df["test_pcc"]))
    out["fixed_mean_pcc"] = {m: float(tests[m].mean()) for m in tests.columns}
    out["chosen_per_fold"] = {f"{r['seed']}:{r['fold']}": r["chosen"] for r in records}
    out["times_chosen"] = {m: int((df["chosen"] == m).sum()) for m in cands}
    return out


def nested_markdown(summary: dict, records: list[dict], cands: list[str], cmd: str) -> str:
    lines = ["| seed:section | " + " | ".join(f"inner {m}" for m in cands) + " | chosen | test PCC (chosen) | "
             + " | ".join(f"test {m}" for m in cands) + " |", "|" + "---|" * (2 * len(cands) + 3)]  # fmt: skip
    for r in records:
        inner = " | ".join(f"{r['inner_mean_pcc'][m]:.4f}" for m in cands)
        test = " | ".join(f"{r['test_pcc'][m]:.4f}" for m in cands)
        lines.append(f"| {r['seed']}:{r['fold']} | {inner} | {r['chosen']} | **{r['test_pcc_chosen']:.4f}** | {test} |")
    fixed = ", ".join(f"{m} {v:.4f}" for m, v in summary["fixed_mean_pcc"].items())
    lines.append(f"\nnested choice: mean test PCC {summary['nested_mean_pcc']:.4f} over {summary['n_folds']} folds; "
                 f"fixed configurations (same folds): {fixed}")  # fmt: skip
    return "\n".join(lines) + f"\n\nCommand: `{cmd}`\n"


def summarise_nested(paths: list[Path]) -> None:
    """Print the nested table of several ``--nested`` result files (e.g. outer folds run as parallel processes)."""
    runs = [json.loads(p.read_text()) for p in paths]
    cands = runs[0]["candidates"]
    if any(r["candidates"] != cands for r in runs):
        raise SystemExit(f"--summarise: the files have different --candidates: {[r['candidates'] for r in runs]}")
    records = sorted((f for r in runs for f in r["folds"]), key=lambda f: (f["seed"], f["fold"]))
    for r in runs:
        print(f"{r['git']} {r['started']} {r['total_seconds']:.0f} s: {r['command']}")
    print(nested_markdown(nested_summary(records, cands), records, cands, " ".join(map(str, paths))))
    base = pd.DataFrame([f.get("test_pcc_baselines", {}) for f in records]).mean()
    print("baselines (same folds): " + ", ".join(f"{m} {v:.4f}" for m, v in base.items()))


def run_nested_fold(adata, args, fit_kwargs: dict, seed: int, fold: str, records: list, cmd, git, started, t0):
    """Outer fit of every candidate (and the baselines) on one held-out section, then its nested choice."""
    ts = time.perf_counter()
    agl.tl.cross_validate(
        adata, "library_id", methods=tuple(args.candidates), embedding_key=args.embedding_key,
        genes=genes_of(args), baselines=True, seed=seed, key_added="agl_cv", progress=False,
        method_kwargs={m: VARIANTS[m] for m in args.candidates if m in VARIANTS}, groups=[fold], **fit_kwargs,
    )  # fmt: skip
    summ = pd.DataFrame(adata.uns["agl_cv"]["summary"])
    print(f"seed {seed} test {fold}: outer fits {time.perf_counter() - ts:.0f} s", flush=True)
    baselines = summ[~summ.method.isin(args.candidates)].set_index("method")["mean_pearson"]

    def write(done):
        res = {
            "command": cmd, "git": git, "started": started, "total_seconds": time.perf_counter() - t0,
            "candidates": args.candidates, "embedding_key": args.embedding_key,
            "fit_kwargs": {k: str(v) for k, v in fit_kwargs.items()}, "inner_n_seeds": args.inner_n_seeds,
            "variants": {m: VARIANTS.get(m, {}) for m in args.candidates},
            "summary": nested_summary(done, args.candidates), "folds": done,
            "machine": f"{platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}",
        }  # fmt: skip
        (args.results / f"{args.stem or 'her2st_nested'}.json").write_text(json.dumps(res, indent=2, default=str))

    before = len(records)
    nested_selection(adata, args, fit_kwargs, seed, summ[summ.method.isin(args.candidates)], records, write)
    for r in records[before:]:
        r["test_pcc_baselines"] = {m: float(v) for m, v in baselines.items()}
    write(records)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=HER2ST)
    p.add_argument("--weights", type=Path, default=DENSENET_WEIGHTS)
    p.add_argument("--cache", type=Path, default=OUT / "her2st_densenet121.h5ad")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--methods", nargs="+", default=["pgl", "pgl:reg", "agl", "topk:auto", "dkgsb"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--no-refit", action="store_true", help="networks train on the training split only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-seeds", type=int, default=None, help="networks per fit (default: agl_fit's, 5)")
    p.add_argument("--stem", default=None, help="results file name (default: her2st_loso[_norefit])")
    p.add_argument("--n-targets", type=int, default=50)
    p.add_argument("--prior", default="hvg", help="auxiliary ranking: hvg, coexpression, moran (default: hvg)")
    p.add_argument("--epochs", type=int, default=None, help="max epochs per fit (default: agl_fit's)")
    p.add_argument("--topk-k", type=int, default=1000, help="auxiliary genes used by top-k")
    p.add_argument("--patch-um", type=float, default=160.0)
    p.add_argument("--patch-px", type=int, default=224)
    p.add_argument("--embedding-key", default=EMB_KEY, help=".obsm key the fits use (e.g. a context key)")
    p.add_argument("--groups", nargs="+", default=None, help="held-out sections (default: all five)")
    p.add_argument("--nested", action="store_true", help="choose among --candidates by inner LOSO (see above)")
    p.add_argument("--combine", nargs="+", metavar="CSV", help="one table from the CSVs of runs split by seed")
    p.add_argument("--candidates", nargs="+", default=["dkgsb", "dkgsb:mlp"], help="configurations (--nested)")
    p.add_argument("--inner-n-seeds", type=int, default=1, help="networks per fit in the inner loop (--nested)")
    p.add_argument("--summarise", nargs="+", type=Path, default=None, metavar="JSON",
                   help="print one table from --nested result files of the same candidates (folds run apart)")  # fmt: skip
    args = p.parse_args()
    if args.summarise:
        summarise_nested(args.summarise)
        return
    if args.nested:
        args.methods = list(args.candidates)

    import torch

    git = git_state()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    torch.set_num_threads(args.threads)
    if args.combine:
        summ = pd.concat([pd.read_csv(f, dtype={"fold": str}) for f in args.combine], ignore_index=True)
        print(
            markdown(
                summarise(summ), "python -m benchmarks.accuracy.bench_her2st_loso --combine " + " ".join(args.combine)
            )
        )
        return
    adata = load_embedded(args.data, args.weights, args.cache, args.patch_um, args.patch_px)
    if args.embedding_key not in adata.obsm:
        raise SystemExit(f"--embedding-key {args.embedding_key!r} is not in the cache's .obsm ({list(adata.obsm)}).")
    fit_kwargs = fit_arguments(args)
    cmd = " ".join(["python -m benchmarks.accuracy.bench_her2st_loso", *sys.argv[1:]])
    args.results.mkdir(parents=True, exist_ok=True)
    frames, records = [], []
    t0 = time.perf_counter()
    if args.nested:  # one outer fold at a time, each followed by its inner loop (results after every fold)
        groups = args.groups or sorted(adata.obs["library_id"].astype(str).unique())
        for seed in args.seeds:
            for g in groups:
                run_nested_fold(adata, args, fit_kwargs, seed, g, records, cmd, git, started, t0)
        print(nested_markdown(nested_summary(records, args.candidates), records, args.candidates, cmd))
        print(f"total {time.perf_counter() - t0:.0f} s")
        return
    for seed in args.seeds:
        ts = time.perf_counter()
        agl.tl.cross_validate(
            adata, "library_id", methods=tuple(args.methods), embedding_key=args.embedding_key,
            genes=genes_of(args), baselines=True, seed=seed, key_added="agl_cv", progress=False,
            method_kwargs={m: VARIANTS[m] for m in args.methods if m in VARIANTS}, groups=args.groups, **fit_kwargs,
        )  # fmt: skip
        summ = pd.DataFrame(adata.uns["agl_cv"]["summary"])
        summ["seed"] = seed
        frames.append(summ)
        print(
            f"seed {seed}: {time.perf_counter() - ts:.0f} s; "
            + ", ".join(f"{m} {v:.3f}" for m, v in summ.groupby("method", sort=False)["mean_pearson"].mean().items())
        )
        all_summ = pd.concat(frames, ignore_index=True)
        res = summarise(all_summ)
        res.update(
            {
                "command": cmd, "git": git, "started": started, "total_seconds": time.perf_counter() - t0,
                "n_spots": int(adata.n_obs), "n_genes": int(adata.n_vars),
                "embedding": {
                    k: v for k, v in adata.uns["agl_embeddings"][EMB_KEY].items()
                    if k in ("encoder", "weights_sha256", "patch_px", "patch_um", "feature_dim")
                },
                "fit_kwargs": {k: str(v) for k, v in fit_kwargs.items()}, "variants": VARIANTS,
                "n_targets": args.n_targets, "prior": args.prior,
                "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
                "versions": {"agl_scverse": agl.__version__, "torch": torch.__version__},
            }
        )  # fmt: skip
        stem = args.stem or "her2st_loso" + ("_norefit" if args.no_refit else "")
        (args.results / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str))
        all_summ.to_csv(args.results / f"{stem}.csv", index=False)
    print(markdown(res, cmd))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
