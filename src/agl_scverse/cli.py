"""Command line: agl-scverse demo | fit | predict | predict-slide | cross-validate."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import _constants as consts
from ._cli_messages import cli_message, command_flags, one_line
from ._cli_output import check_output, write_h5ad
from ._cli_parser import ALL_BASELINES, CV_BASELINES, PROG, READERS, build_parser, check_args  # noqa: F401  (re-exported)

DEMO_METHODS = ("pgl", "agl", "dkgsb")
METHOD_LABELS = {"pgl": "PGL (targets only)", "agl": "AGL-all", "topk": "AGL top-k", "dkgsb": "AGL + DkGSB"}
# Errors in what the user passed (paths, values, files): one line and exit status 2, as argparse does.
USER_ERRORS = (ValueError, KeyError, TypeError, OSError, EOFError)
EXIT_USER_ERROR, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED = 2, 1, 130


def _resolve_reader(p: Path, reader: str) -> str:
    """The reader ``auto`` stands for: .h5ad file, else a Visium folder (``spatial/``), else legacy ST."""
    if reader != "auto":
        return reader
    if p.is_file() and p.suffix != ".h5ad":
        raise ValueError(f"{p} is a file but not .h5ad; pass a .h5ad file or a slide folder, or choose --reader.")
    if p.suffix == ".h5ad":
        return "h5ad"
    if p.is_dir() and (any(p.glob("spatial")) or any(p.glob("*filtered_feature_bc_matrix*"))):
        return "visium"
    return "legacy_st"


def _existing(path: str) -> Path:
    """``path`` as a Path; FileNotFoundError when it does not exist (checked before any slow import)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; pass a .h5ad file or a slide folder.")
    return p


def _read(
    path: str,
    reader: str = "auto",
    microns_per_pixel: float | None = None,
    fullres_image: str | None = None,
    *,
    sections: list[str] | None = None,
    library_key: str | None = None,
    counts_optional: bool = False,
):
    """Read a slide with one of agl.io's readers (``auto``: .h5ad file, else legacy ST or Visium folder)."""
    p = _existing(path)
    reader = _resolve_reader(p, reader)
    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r}; choose one of {READERS}.")
    if fullres_image is not None:
        if reader not in ("visium", "hest"):
            raise ValueError(
                f"--fullres-image applies to --reader visium or hest, not {reader} (legacy ST reads each section's "
                "own image; an .h5ad file names its image in .uns['spatial'])."
            )
        if not Path(fullres_image).is_file():
            raise FileNotFoundError(f"--fullres-image {fullres_image} does not exist; pass the full-resolution H&E.")
    if microns_per_pixel is not None:
        if reader == "h5ad":
            raise ValueError(
                "--microns-per-pixel applies to slide folders (--reader legacy_st, visium, hest); an .h5ad file "
                "records it in .uns['spatial'][library]['scalefactors']."
            )
        if not microns_per_pixel > 0:
            raise ValueError(f"--microns-per-pixel must be positive, got {microns_per_pixel}.")
    if reader == "h5ad":
        return _only_sections(_read_h5ad(p), sections, library_key)
    from . import io
    from .io._legacy_st import has_he_only_sections

    kw: dict[str, Any] = {} if microns_per_pixel is None else {"microns_per_pixel": microns_per_pixel}
    kw |= {} if library_key is None else {"library_key": library_key}
    image: dict[str, Any] = {} if fullres_image is None else {"fullres_image": fullres_image}
    if reader == "legacy_st":
        kw |= {"sections": sections} if sections else {}
        if counts_optional and has_he_only_sections(p):
            kw["counts_file"] = None
        return io.read_legacy_st(p, **kw)
    if reader == "visium":
        if counts_optional and p.is_dir() and not (p / "filtered_feature_bc_matrix.h5").exists():
            kw["counts_file"] = None
        adata = io.read_visium(p, **kw, **image)
    else:
        adata = io.read_hest(p, **kw, **image)
    return _only_sections(adata, sections, library_key)


def _only_sections(adata, sections: list[str] | None, library_key: str | None):
    """The spots of ``sections`` (values of the ``library_key`` column, default ``library_id``)."""
    if not sections:
        return adata
    col = library_key or consts.LIBRARY_KEY
    if col not in adata.obs:
        raise KeyError(
            f"--sections needs the .obs column naming the sections; {col!r} is not one of {list(adata.obs.columns)} "
            "(pass --library-key COLUMN)."
        )
    keep = _groups_mask(adata, col, [str(x) for x in sections], "--sections", key_flag="--library-key")
    out = adata[keep].copy()
    out.obs[col] = out.obs[col].astype(str).astype("category")
    spatial = out.uns.get("spatial")
    if isinstance(spatial, dict) and set(out.obs[col].cat.categories) <= set(spatial):
        out.uns["spatial"] = {lib: spatial[lib] for lib in out.obs[col].cat.categories}
    return out


def _read_h5ad(p: Path):
    import anndata as ad
    import numpy as np

    try:
        adata = ad.read_h5ad(p)
    except Exception as e:  # h5py / anndata on a truncated or corrupt file; their messages do not name it
        raise OSError(f"cannot read {p} as .h5ad ({one_line(e)}); is the file complete?") from e
    n_bad = int((~np.isfinite(np.asarray(adata.obsm.get("spatial", np.zeros((0, 2))), dtype=float))).any(axis=1).sum())
    if n_bad:
        raise ValueError(f"{p}: .obsm['spatial'] holds NaN/inf coordinates for {n_bad} spot(s); fix or drop them.")
    return adata


def _read_slide(args: argparse.Namespace):
    """The slide of a command, read with its reader, section, library-key and resolution flags."""
    return _read(
        args.data, args.reader, args.microns_per_pixel, args.fullres_image, sections=args.sections,
        library_key=args.library_key, counts_optional=args.command == "predict",
    )  # fmt: skip


def _device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; other names are checked (known, available)."""
    from ._utils import resolve_device

    return str(resolve_device(name))


def _groups_mask(adata, key: str, groups: list[str], flag: str, key_flag: str = "--split-key"):
    """Boolean mask of the spots whose ``.obs[key]`` is one of ``groups`` (each must occur)."""
    import numpy as np

    if key not in adata.obs:
        raise KeyError(f"{key_flag} {key!r} is not an .obs column: {list(adata.obs.columns)}")
    col = adata.obs[key].astype(str).to_numpy()
    present = sorted(set(col))
    missing = [g for g in groups if g not in present]
    if missing:
        raise ValueError(f"{flag} {' '.join(missing)}: not in .obs[{key!r}], whose values are {present[:20]}.")
    return np.isin(col, groups)


def _print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    widths = [max(len(title), *(len(str(r[key])) for r in rows)) for key, title in columns]
    print("  ".join(title.ljust(w) for (_, title), w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(r[key]).ljust(w) for (key, _), w in zip(columns, widths)))


def demo(out: str = "agl_demo_output", seed: int = 0, epochs: int | None = None, patch_px: int = 112) -> Path:
    """The synthetic slide end to end: embed, fit PGL / AGL-all / AGL+DkGSB, evaluate on held-out spots, plot."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    import pandas as pd

    from . import datasets, pl, pp, tl
    from ._constants import Keys
    from .configs import TrainingConfig

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
    pp.embed_patches(adata, {"encoder": "resnet18", "patch_px": patch_px})
    emb_key = "X_agl_resnet18"
    print(f"[2/4] embedded {adata.n_obs} patches with a random-init ResNet-18 -> .obsm[{emb_key!r}]")

    test = np.zeros(adata.n_obs, dtype=bool)
    test[np.random.default_rng(seed).choice(adata.n_obs, size=adata.n_obs // 4, replace=False)] = True
    rows, models = [], {}
    fit_kwargs = {} if epochs is None else {"training": TrainingConfig(epochs=epochs)}
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
    write_h5ad(adata, out_dir / "adata.h5ad")
    summary = {"seconds": round(time.perf_counter() - t0, 1), "rows": rows, "seed": seed}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"[4/4] wrote {out_dir}: adata.h5ad, model_dkgsb/, results.csv, summary.json, selected_genes.png, "
        f"training_history.png, spatial_prediction.png ({summary['seconds']} s in all)"
    )
    return out_dir


def _fmt(value, spec: str = ".3f") -> str:
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return "n/a"


def _test_pcc(adata, key: str = "agl") -> tuple[float, int] | None:
    """Mean target Pearson r and number of spots of the last ``tl.evaluate`` (None when there is none)."""
    test = ((adata.uns.get(key) or {}).get("metrics") or {}).get("test") or {}
    if "model" not in test:
        return None
    return float(test["model"]["pearson"]), int(test["n_spots"])


def _fit(args: argparse.Namespace) -> None:
    check_output(args.out, "--out", args.overwrite, folder=True)
    h5ad = check_output(args.h5ad, "--h5ad", args.overwrite) if args.h5ad else None
    _existing(args.data)  # the quick checks first; then the slow imports
    from . import tl
    from .configs import DkGSBConfig, EncoderConfig, GeneConfig, NetworkConfig, TrainingConfig

    mode, scale_out = _scale_out_kwargs(args)  # --distributed is checked before any work
    device = _device(args.device)
    adata = _read_slide(args)
    split_key = args.split_key
    if split_key is None and (args.val_groups or args.test_groups):
        split_key = args.library_key or consts.LIBRARY_KEY
    spots = None
    if args.test_groups:
        test = _groups_mask(adata, split_key, args.test_groups, "--test-groups")
        spots = ~test
    if args.val_groups:
        _groups_mask(adata, split_key, args.val_groups, "--val-groups")
        overlap = sorted(set(args.val_groups) & set(args.test_groups or []))
        if overlap:
            raise ValueError(f"--val-groups and --test-groups share {' '.join(overlap)}; a group is one or the other.")
    model = tl.agl_fit(
        adata,
        method=args.method,
        mode=mode,
        embedding_key=args.embedding_key,
        genes=GeneConfig(n_targets=args.n_targets, prior=args.prior, layer=args.layer),
        network=NetworkConfig(**({"head": args.head} if args.head else {})),
        training=TrainingConfig(
            epochs=args.epochs, refit=args.refit, n_seeds=args.n_seeds, augment=scale_out["augment"],
            checkpoint_every=scale_out["checkpoint_every"], resume=scale_out["resume"],
        ),
        dkgsb=DkGSBConfig(k=args.k, meta_scope=scale_out["meta_scope"]),
        encoder=EncoderConfig(
            args.encoder, weights=args.weights, patch_px=args.patch_px, patch_um=args.patch_um,
            precision=scale_out["precision"], num_workers=scale_out["num_workers"], allow_lowres=args.allow_lowres,
            backend=args.backend,
        ),
        split_key=split_key if args.val_groups else None,
        val_groups=args.val_groups,
        spots=spots,
        seed=args.seed,
        device=device,
        save_dir=args.out,
        overwrite=args.overwrite,
        library_key=args.library_key,
    )  # fmt: skip
    if not _is_main():  # under torchrun, rank 0 reports and writes (agl_fit saved the model from rank 0)
        return
    cfg = model.config
    n_aux = cfg.get("n_auxiliary_candidates", len(model.genes) - len(model.targets))
    summary = (
        f"fit: {METHOD_LABELS[args.method]}, {len(model.targets)} target genes, {model.k} of {n_aux} auxiliary genes "
        f"used, best epoch {cfg.get('best_epoch')}, validation PCC {_fmt(cfg.get('val_pcc'))} "
        f"({cfg.get('n_train')} training / {cfg.get('n_val')} validation spots)"
    )
    if spots is not None:  # the held-out groups: predicted and scored
        tl.evaluate(adata, model, spots=~spots, baselines=True)
        pcc, n = _test_pcc(adata) or (None, 0)  # evaluate wrote the held-out scores
        summary += f"; held-out {' '.join(args.test_groups)}: PCC {_fmt(pcc)} over {n} spots"
        ridge = adata.uns["agl"]["metrics"]["test"].get("pca_ridge")
        if ridge is not None:
            summary += f" (PCA+Ridge {_fmt(ridge['pearson'])})"
    print(f"{summary}; model saved to {args.out}")
    if h5ad is not None:
        write_h5ad(adata, h5ad)
        print(f"wrote {h5ad}")
    del model


def _predict(args: argparse.Namespace) -> None:
    out = check_output(args.out, "--out", args.overwrite)
    _existing(args.data)
    import pandas as pd

    from . import tl
    from .model import AGLModel

    device = _device(args.device)
    model = AGLModel.load(args.model)
    adata = _read_slide(args)
    encoder = {"weights": args.weights, "allow_lowres": args.allow_lowres, "backend": args.backend}
    kwargs = {
        "encoder": encoder,
        "embedding_key": args.embedding_key,
        "device": device,
        "library_key": args.library_key,
    }
    measured = bool(adata.n_vars) and bool(pd.Index(model.targets).isin(adata.var_names).all())
    note = ""
    if measured:  # a slide that measured the model's genes: predictions beside them, then scored
        tl.agl_predict(adata, model, **kwargs)
        result = adata
        try:
            tl.evaluate(adata, model, baselines=False)
        except (ValueError, KeyError) as e:  # e.g. normalised counts: the predictions are still written
            note = f"; not scored: {one_line(e)}"
    else:  # H&E only (or not the model's genes)
        result = tl.predict_anndata(adata, model, **kwargs)
    write_h5ad(result, out)
    from ._constants import Keys

    n_written = int(result.var[Keys().predicted].sum())  # the genes with predictions in the file
    summary = f"predict: {result.n_obs} spots x {n_written} predicted genes -> {out}"
    scored = _test_pcc(result) if measured and not note else None
    if scored is not None:
        summary += f"; PCC {_fmt(scored[0])} over {len(model.targets)} target genes on {scored[1]} spots"
    print(summary + note)


def _predict_slide(args: argparse.Namespace) -> None:
    """A bare H&E image: tissue, a grid of pseudo-spots, their predictions, one .h5ad (or a SpatialData .zarr)."""
    zarr = Path(args.out).suffix == ".zarr"
    out = check_output(args.out, "--out", args.overwrite, folder=zarr)
    if not Path(args.image).is_file():
        raise FileNotFoundError(f"{args.image} does not exist; pass the path of an H&E image file.")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers is {args.num_workers}; pass 0 or more.")
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size is {args.chunk_size}; pass a positive number of spots.")
    from . import io, pp, tl
    from .model import AGLModel

    device = _device(args.device)
    model = AGLModel.load(args.model)
    if model.mode == "embedding":  # the encoder weights it needs, before any image is read
        from .encoders._record import check_weights_file

        check_weights_file(model.config.get("encoder"), args.weights)
    slide = io.read_he_image(args.image, microns_per_pixel=args.microns_per_pixel, library_id=args.library_id)
    grid = pp.spot_grid(
        slide,
        spot_um=args.spot_um,
        pitch_um=args.pitch_um,
        layout=args.layout,
        model=model,
        allow_lowres=args.allow_lowres,
    )
    encoder = {
        "weights": args.weights, "backend": args.backend, "allow_lowres": args.allow_lowres,
        "num_workers": args.num_workers,
    }  # fmt: skip
    if args.chunk_dir is not None:  # chunks saved as they finish: a killed run resumes
        result = tl.predict_chunked(
            grid, model, args.chunk_dir, chunk_size=args.chunk_size, encoder=encoder, device=device
        )
    else:
        result = tl.predict_anndata(grid, model, encoder=encoder, device=device)
    if not _is_main():  # under torchrun every rank embedded a share of the spots; rank 0 writes
        return
    if zarr:
        from .io._sd_slide import slide_to_spatialdata, write_spatialdata

        write_spatialdata(slide_to_spatialdata(result), out, overwrite=args.overwrite)
    else:
        write_h5ad(result, out)
    g = grid.uns["agl_grid"]
    print(
        f"predict-slide: {result.n_obs} {g['layout']} spots ({g['spot_um']:g} µm, pitch {g['pitch_um']:g} µm) on "
        f"{g['tissue_fraction']:.1%} tissue x {result.n_vars} predicted genes -> {out}"
    )


def _cross_validate(args: argparse.Namespace) -> None:
    out = check_output(args.out, "--out", args.overwrite)
    _existing(args.data)
    from . import pp, tl
    from .configs import DkGSBConfig, GeneConfig, NetworkConfig, TrainingConfig

    device = _device(args.device)
    adata = _read_slide(args)
    group_key = args.group_key or args.library_key or consts.LIBRARY_KEY
    if group_key not in adata.obs:
        raise KeyError(f"--group-key {group_key!r} is not an .obs column: {list(adata.obs.columns)}")
    if args.embedding_key is None:
        encoder = {
            "encoder": args.encoder, "weights": args.weights, "patch_px": args.patch_px, "patch_um": args.patch_um,
            "allow_lowres": args.allow_lowres, "backend": args.backend,
        }  # fmt: skip
        pp.embed_patches(adata, encoder, device=device)
    df = tl.cross_validate(
        adata,
        group_key=group_key,
        methods=args.methods,
        embedding_key=args.embedding_key,
        genes=GeneConfig(n_targets=args.n_targets, layer=args.layer),
        baselines=args.baselines or False,
        seed=args.seed,
        device=device,
        network=NetworkConfig(**({"head": args.head} if args.head else {})),
        training=TrainingConfig(epochs=args.epochs, refit=args.refit, n_seeds=args.n_seeds),
        dkgsb=DkGSBConfig(k=args.k),
    )
    df.to_csv(out, index=False)
    summary = df.groupby(["method", "fold"])["pearson"].mean().unstack("fold")
    summary["mean"] = summary.mean(axis=1)
    print(summary.round(3).to_string())
    means = ", ".join(f"{m} {_fmt(v)}" for m, v in summary["mean"].items())
    n_folds = summary.shape[1] - 1
    print(f"cross-validate: {n_folds} held-out {group_key} folds, mean target PCC: {means} -> {out}")


# -- scaling out: the config fields of the scale-out flags (docs/scaling_out.md) ------------------------------
def _scale_out_kwargs(args: argparse.Namespace) -> tuple[str, dict]:
    """The mode and the config fields of the scale-out flags; joins torchrun's process group (--distributed)."""
    from . import _distributed

    if args.distributed and _distributed.env_world_size() <= 1 and not _distributed.is_distributed():
        raise ValueError(
            "--distributed needs torchrun's environment (WORLD_SIZE > 1): start it as "
            "`torchrun --nproc_per_node N -m agl_scverse.cli fit --distributed ...`, or leave --distributed out."
        )
    if args.distributed:
        _distributed.init_from_env()
    return args.mode, {
        "meta_scope": args.meta_scope, "checkpoint_every": args.checkpoint_every, "resume": args.resume,
        "precision": args.precision, "augment": args.augment, "num_workers": args.num_workers,
    }  # fmt: skip


def _is_main() -> bool:
    from . import _distributed

    return _distributed.is_main()


def _run(args: argparse.Namespace) -> None:
    if args.command == "demo":
        demo(out=args.out, seed=args.seed, epochs=args.epochs, patch_px=args.patch_px)
    else:  # cross-validate, benchmark: _cross_validate
        {"fit": _fit, "predict": _predict, "predict-slide": _predict_slide}.get(args.command, _cross_validate)(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``agl-scverse`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        _run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {cli_message(one_line(exc), command_flags(parser, args.command))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"{PROG}: internal error: {type(exc).__name__}: {one_line(exc)} (rerun with --debug for the traceback "
            "and please report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
