"""Command line: ``agl-scverse demo | fit | predict | benchmark``.

Examples
--------
.. code-block:: bash

    agl-scverse demo --out agl_demo_output
    agl-scverse fit path/to/her2st --reader legacy_st --weights densenet121.pth --encoder densenet121 --out model
    agl-scverse predict model path/to/new_section --reader legacy_st --out predicted.h5ad
    agl-scverse benchmark path/to/her2st --reader legacy_st --group-key library_id --out cv.csv
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ._constants import METHODS

DEMO_METHODS = ("pgl", "agl", "dkgsb")
METHOD_LABELS = {"pgl": "PGL (targets only)", "agl": "AGL-all", "topk": "AGL top-k", "dkgsb": "AGL + DkGSB"}
READERS = ("auto", "h5ad", "legacy_st", "visium", "hest")


def _read(path: str, reader: str = "auto"):
    """Read a slide with one of agl.io's readers (``auto``: .h5ad file, else legacy ST or Visium folder)."""
    import anndata as ad

    from . import io

    p = Path(path)
    if not p.exists():
        raise SystemExit(f"error: {p} does not exist.")
    if reader == "auto":
        if p.suffix == ".h5ad":
            reader = "h5ad"
        elif p.is_dir() and (any(p.glob("spatial")) or any(p.glob("*filtered_feature_bc_matrix*"))):
            reader = "visium"
        else:
            reader = "legacy_st"
    if reader == "h5ad":
        return ad.read_h5ad(p)
    if reader == "legacy_st":
        return io.read_legacy_st(p)
    if reader == "visium":
        return io.read_visium(p)
    if reader == "hest":
        return io.read_hest(p)
    raise SystemExit(f"error: unknown reader {reader!r}; choose one of {READERS}.")


def _print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    widths = [max(len(title), *(len(str(r[key])) for r in rows)) for key, title in columns]
    print("  ".join(title.ljust(w) for (_, title), w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(r[key]).ljust(w) for (key, _), w in zip(columns, widths)))


def demo(out: str = "agl_demo_output", seed: int = 0, epochs: int | None = None, patch_px: int = 112) -> Path:
    """The synthetic slide end to end: embed, fit PGL / AGL-all / AGL+DkGSB, evaluate on held-out spots, plot.

    A seeded 25% of the spots is held out of every fit (``.obs["agl_<method>_split"] == "unused"``); each method
    trains on the rest (20% of it for validation, early stopping and DkGSB's bi-level step) and is scored on the
    held-out spots beside the mean predictor and PCA+Ridge on the same embedding. Writes the AnnData, the DkGSB
    model, a results table and figures to ``out``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    import pandas as pd

    from . import datasets, pl, pp, tl
    from ._constants import Keys

    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"agl-scverse demo: outputs go to {out_dir}")

    adata = datasets.synthetic_slide(seed=seed)
    n_inf = int(adata.var["informative"].sum())
    print(
        f"[1/4] synthetic slide: {adata.n_obs} spots x {adata.n_vars} genes "
        f"({n_inf} planted informative auxiliary genes)"
    )
    # The synthetic image is 1 µm/px, so a 112-µm patch holds 112 source pixels: 112-px patches keep every pixel.
    pp.embed_patches(adata, encoder="resnet18", patch_px=patch_px)
    emb_key = "X_agl_resnet18"
    print(f"[2/4] embedded {adata.n_obs} patches with a random-init ResNet-18 -> .obsm[{emb_key!r}]")

    test = np.zeros(adata.n_obs, dtype=bool)
    test[np.random.default_rng(seed).choice(adata.n_obs, size=adata.n_obs // 4, replace=False)] = True
    rows, models = [], {}
    fit_kwargs = {} if epochs is None else {"epochs": epochs}
    for method in DEMO_METHODS:
        key = f"agl_{method}"
        t = time.perf_counter()
        model = tl.agl_fit(
            adata, method=method, embedding_key=emb_key, spots=~test, seed=seed, key_added=key, **fit_kwargs
        )
        fit_s = time.perf_counter() - t
        tl.agl_predict(adata, model, key_added=key)
        tl.evaluate(adata, model, spots=test, key_added=key)
        keys, run = Keys(key), adata.uns[key]
        targets = adata.var_names[adata.var[keys.role] == "target"]
        pcc = adata.var.loc[targets, keys.pcc].to_numpy(dtype=float)
        sel = adata.var[keys.selected].to_numpy(bool) & (adata.var[keys.role] == "auxiliary").to_numpy()
        precision = float(adata.var["informative"].to_numpy(bool)[sel].mean()) if sel.any() else float("nan")
        rows.append(
            {
                "method": METHOD_LABELS[method],
                "pcc": f"{np.nanmean(pcc):.3f}",
                "k": int(run["k"]),
                "informative": "-" if not sel.any() else f"{precision:.0%}",
                "fit_s": f"{fit_s:.1f}",
            }
        )
        models[method] = model
    test_metrics = run["metrics"]["test"]  # baselines: same spots, genes and embedding for every method
    for name, label in (("pca_ridge", "PCA+Ridge baseline"), ("mean_predictor", "mean predictor")):
        if name in test_metrics:
            value = float(test_metrics[name]["pearson"])
            rows.append({"method": label, "pcc": f"{value:.3f}", "k": "-", "informative": "-", "fit_s": "-"})
    print(f"[3/4] {int(test.sum())} held-out spots, mean Pearson r over {len(targets)} target genes:")
    _print_table(
        rows,
        [
            ("method", "method"),
            ("pcc", "target PCC"),
            ("k", "k (aux. used)"),
            ("informative", "informative among selected"),
            ("fit_s", "fit s"),
        ],
    )
    base_rate = adata.var["informative"].to_numpy(bool)[(adata.var["agl_dkgsb_role"] == "auxiliary").to_numpy()].mean()
    print(f"      (informative genes are {base_rate:.0%} of all auxiliaries)")

    pd.DataFrame(rows).to_csv(out_dir / "results.csv", index=False)
    models["dkgsb"].save(out_dir / "model_dkgsb", overwrite=True)
    pl.selected_genes(adata, key="agl_dkgsb", show_history=True, show=False, save=out_dir / "selected_genes.png")
    pl.training_history(adata, key="agl_dkgsb", show=False, save=out_dir / "training_history.png")
    best = adata.var.loc[targets, "agl_dkgsb_pcc"].sort_values(ascending=False).index[:3].tolist()
    pl.spatial_prediction(adata, best, key="agl_dkgsb", show=False, save=out_dir / "spatial_prediction.png")
    adata.write_h5ad(out_dir / "adata.h5ad")
    summary = {"seconds": round(time.perf_counter() - t0, 1), "rows": rows, "seed": seed}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"[4/4] wrote {out_dir}: adata.h5ad, model_dkgsb/, results.csv, summary.json, selected_genes.png, "
        f"training_history.png, spatial_prediction.png ({summary['seconds']} s in all)"
    )
    return out_dir


def _fit(args: argparse.Namespace) -> None:
    from . import tl

    adata = _read(args.data, args.reader)
    model = tl.agl_fit(
        adata,
        method=args.method,
        encoder=args.encoder,
        weights=args.weights,
        n_targets=args.n_targets,
        prior=args.prior,
        split_key=args.split_key,
        val_groups=args.val_groups,
        seed=args.seed,
        save_dir=args.out,
        overwrite=args.overwrite,
    )
    print(f"trained {args.method}: k = {model.k} auxiliary genes; model saved to {args.out}")
    if args.h5ad:
        adata.write_h5ad(args.h5ad)
        print(f"wrote {args.h5ad}")
    del model


def _predict(args: argparse.Namespace) -> None:
    from . import tl
    from .model import AGLModel

    adata = _read(args.data, args.reader)
    model = AGLModel.load(args.model)
    if adata.n_vars and adata.var_names.isin(model.genes).any():  # a slide that measured the model's genes
        tl.agl_predict(adata, model, weights=args.weights)
        result = adata
    else:  # H&E only
        result = tl.predict_anndata(adata, model, weights=args.weights)
    result.write_h5ad(args.out)
    print(f"wrote predictions to {args.out}")


def _benchmark(args: argparse.Namespace) -> None:
    from . import pp, tl

    adata = _read(args.data, args.reader)
    if args.group_key not in adata.obs:
        raise SystemExit(f"error: --group-key {args.group_key!r} is not an .obs column: {list(adata.obs.columns)}")
    pp.embed_patches(adata, encoder=args.encoder, weights=args.weights)
    df = tl.cross_validate(adata, group_key=args.group_key, methods=args.methods, seed=args.seed)
    df.to_csv(args.out, index=False)
    summary = df.groupby(["method", "fold"])["pearson"].mean().unstack("fold")
    summary["mean"] = summary.mean(axis=1)
    print(summary.round(3).to_string())
    print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    """The ``agl-scverse`` argument parser."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="agl-scverse", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"agl-scverse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the whole pipeline on the built-in synthetic slides")
    p.add_argument("--out", default="agl_demo_output", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: the trainer's)")
    p.add_argument("--patch-px", type=int, default=112, help="patch size in pixels (112 µm patches)")

    for name, helptext in (("fit", "train a model on a slide"), ("benchmark", "leave-one-group-out comparison")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("data", help="slide: .h5ad file, legacy ST folder(s), Visium folder or HEST .h5ad")
        p.add_argument("--reader", choices=READERS, default="auto")
        p.add_argument("--encoder", default="resnet18", help="timm model name (default: %(default)s)")
        p.add_argument("--weights", default=None, help="local encoder weights file (default: random init)")
        p.add_argument("--seed", type=int, default=0)
        if name == "fit":
            p.add_argument("--out", required=True, help="model directory to write")
            p.add_argument("--method", default="dkgsb", choices=list(METHODS))
            p.add_argument("--n-targets", type=int, default=50)
            p.add_argument("--prior", default="hvg")
            p.add_argument("--split-key", default=None, help=".obs column for a validation group split")
            p.add_argument("--val-groups", nargs="*", default=None)
            p.add_argument("--overwrite", action="store_true")
            p.add_argument("--h5ad", default=None, help="also write the annotated AnnData here")
        else:
            p.add_argument("--group-key", default="library_id")
            p.add_argument("--methods", nargs="+", default=["pgl", "agl", "dkgsb"])
            p.add_argument("--out", default="cross_validation.csv")

    p = sub.add_parser("predict", help="predict expression on a slide with a saved model")
    p.add_argument("model", help="model directory written by fit / AGLModel.save")
    p.add_argument("data", help="slide: .h5ad file, legacy ST folder, Visium folder or HEST .h5ad")
    p.add_argument("--reader", choices=READERS, default="auto")
    p.add_argument(
        "--weights",
        default=None,
        help="encoder weights file the model was trained with (to embed a slide; its sha256 is checked)",
    )
    p.add_argument("--out", required=True, help=".h5ad file to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``agl-scverse`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        demo(out=args.out, seed=args.seed, epochs=args.epochs, patch_px=args.patch_px)
    elif args.command == "fit":
        _fit(args)
    elif args.command == "predict":
        _predict(args)
    elif args.command == "benchmark":
        _benchmark(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
