"""Command line: agl-scverse demo | fit | predict | predict-slide | cross-validate.

Errors in the input (a missing file, a bad value, an output that exists) print one line
"agl-scverse: error: <message>" and exit with status 2; --debug shows the traceback instead. Ctrl-C exits with
status 130. Every output path is checked before any work starts. Each command ends with a one-line summary of
its results. Heavy libraries (torch, scanpy, anndata) are imported inside the commands, so --help is quick.

Examples
--------
.. code-block:: bash

    agl-scverse demo --out agl_demo_output
    agl-scverse fit path/to/her2st --reader legacy_st --weights densenet121.pth --encoder densenet121 --out model
    agl-scverse predict model path/to/new_section --reader legacy_st --out predicted.h5ad
    agl-scverse predict-slide model slide.ome.tif --out slide_predicted.h5ad
    agl-scverse cross-validate path/to/her2st --reader legacy_st --group-key library_id --out cv.csv
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from . import _constants as K
from ._constants import METHODS, MODES

DEMO_METHODS = ("pgl", "agl", "dkgsb")
METHOD_LABELS = {"pgl": "PGL (targets only)", "agl": "AGL-all", "topk": "AGL top-k", "dkgsb": "AGL + DkGSB"}
READERS = ("auto", "h5ad", "legacy_st", "visium", "hest")
#: Baselines of ``cross-validate`` (``--baselines``) and the default ones (the slow ``rrr`` only when named).
ALL_BASELINES, CV_BASELINES = ("mean", "pca_ridge", "rrr"), ("mean", "pca_ridge")
PROG = "agl-scverse"
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
    """Read a slide with one of agl.io's readers (``auto``: .h5ad file, else legacy ST or Visium folder).

    ``microns_per_pixel`` (µm per full-resolution pixel) goes to the legacy ST, Visium and HEST readers;
    ``fullres_image`` (the full-resolution H&E) to the Visium and HEST readers. ``sections``: only these sections
    (legacy ST section folders, else values of the ``library_key`` column). ``library_key``: the ``.obs`` column
    naming the sections (written by the folder readers, read in an .h5ad file). ``counts_optional``: a legacy ST or
    Visium folder without counts is read as an H&E-only slide (0 genes), as ``predict`` needs.
    """
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

    kw = {} if microns_per_pixel is None else {"microns_per_pixel": microns_per_pixel}
    kw |= {} if library_key is None else {"library_key": library_key}
    image = {} if fullres_image is None else {"fullres_image": fullres_image}
    if reader == "legacy_st":
        he_only = counts_optional and has_he_only_sections(p)
        kw |= {"sections": sections} if sections else {}
        return io.read_legacy_st(p, **kw, **({"counts_file": None} if he_only else {}))
    if reader == "visium":
        he_only = counts_optional and p.is_dir() and not (p / "filtered_feature_bc_matrix.h5").exists()
        adata = io.read_visium(p, **kw, **image, **({"counts_file": None} if he_only else {}))
    else:
        adata = io.read_hest(p, **kw, **image)
    return _only_sections(adata, sections, library_key)


def _only_sections(adata, sections: list[str] | None, library_key: str | None):
    """The spots of ``sections`` (values of the ``library_key`` column, default ``library_id``)."""
    if not sections:
        return adata
    col = library_key or K.LIBRARY_KEY
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
        raise OSError(f"cannot read {p} as .h5ad ({_one_line(e)}); is the file complete?") from e
    xy = adata.obsm.get("spatial")
    if xy is not None and not np.all(np.isfinite(np.asarray(xy, dtype=float))):
        n_bad = int((~np.isfinite(np.asarray(xy, dtype=float))).any(axis=1).sum())
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


def check_output(path: str | Path, flag: str, overwrite: bool = False, folder: bool = False) -> Path:
    """Check an output path before any work: where it goes exists and is writable, and it is new or ``overwrite``.

    A file's parent folder must exist; a model folder (``folder=True``) may be created, in the nearest existing
    ancestor. Raises FileNotFoundError, PermissionError, FileExistsError or IsADirectoryError with a message that
    names ``flag``.
    """
    p = Path(path)
    parent = p.absolute().parent
    if not folder and not parent.is_dir():
        raise FileNotFoundError(f"{flag} {p}: the folder {parent} does not exist; create it or choose another path.")
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{flag} {p}: {ancestor} is a file, not a folder; choose another path.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {p}: cannot write in {ancestor}; choose another path.")
    if p.exists():
        if folder and not p.is_dir():
            raise FileExistsError(f"{flag} {p} exists and is a file, not a model folder; choose another path.")
        if not folder and p.is_dir():
            raise IsADirectoryError(f"{flag} {p} is a folder; pass a file path.")
        if not overwrite:
            raise FileExistsError(f"{flag} {p} already exists; pass --overwrite to replace it or choose another path.")
    return p


def _write_h5ad(adata, path: Path) -> None:
    """Write through a temporary file beside ``path``, so a failed write leaves an existing file as it was.

    The temporary has a name of its own (two runs writing one path do not share it). On POSIX the write runs in a
    forked child: HDF5 can crash (SIGSEGV) after a failed write, e.g. a full disk or a file-size limit, and the
    child's crash is reported as a clean ``OSError`` here, with the temporary removed.
    """
    import uuid

    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.h5ad")
    try:
        if hasattr(os, "fork"):
            _write_in_child(adata, tmp, path)
        else:  # pragma: no cover - Windows
            adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_in_child(adata, tmp: Path, path: Path) -> None:
    """``adata.write_h5ad(tmp)`` in a forked process; its failure (an error or a crash) raises ``OSError`` here."""
    import signal
    import warnings

    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded process": the child only writes
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child (its coverage is not collected)
        code = 1
        try:
            os.close(r)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # HDF5's own error dumps: the parent says it in one line
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over a file-size limit: an error, not a kill
            adata.write_h5ad(tmp)
            code = 0
        except BaseException as e:
            os.write(w, _one_line(e).encode(errors="replace")[:2000])
        finally:
            os._exit(code)  # no interpreter teardown: HDF5 objects are not flushed again
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        message = fh.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        why = message or (f"the writer died of signal {-code}" if code < 0 else f"the writer exited with {code}")
        raise OSError(
            f"could not write {path} ({why}); check the free space and the file-size limit (ulimit -f) there. "
            "Nothing was written."
        )


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
    _write_h5ad(adata, out_dir / "adata.h5ad")
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
        split_key = args.library_key or K.LIBRARY_KEY
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
        pcc, n = _test_pcc(adata)
        summary += f"; held-out {' '.join(args.test_groups)}: PCC {_fmt(pcc)} over {n} spots"
        ridge = adata.uns["agl"]["metrics"]["test"].get("pca_ridge")
        if ridge is not None:
            summary += f" (PCA+Ridge {_fmt(ridge['pearson'])})"
    print(f"{summary}; model saved to {args.out}")
    if h5ad is not None:
        _write_h5ad(adata, h5ad)
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
            note = f"; not scored: {_one_line(e)}"
    else:  # H&E only (or not the model's genes)
        result = tl.predict_anndata(adata, model, **kwargs)
    _write_h5ad(result, out)
    from ._constants import Keys

    n_written = int(result.var[Keys().predicted].sum())  # the genes with predictions in the file
    summary = f"predict: {result.n_obs} spots x {n_written} predicted genes -> {out}"
    scored = _test_pcc(result) if measured and not note else None
    if scored is not None:
        summary += f"; PCC {_fmt(scored[0])} over {len(model.targets)} target genes on {scored[1]} spots"
    print(summary + note)


def _predict_slide(args: argparse.Namespace) -> None:
    """A bare H&E image: tissue, a grid of pseudo-spots, their predictions, one .h5ad."""
    out = check_output(args.out, "--out", args.overwrite)
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
    slide = io.read_he_image(args.image, microns_per_pixel=args.microns_per_pixel, library_id=args.library_id)
    grid = pp.spot_grid(slide, spot_um=args.spot_um, pitch_um=args.pitch_um, layout=args.layout, model=model)
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
    _write_h5ad(result, out)
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
    group_key = args.group_key or args.library_key or K.LIBRARY_KEY
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


# -- scaling out (fine-tuning, torchrun, checkpoints; docs/scaling_out.md) -----------------------------------
def _add_scale_out_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mode",
        default="embedding",
        choices=list(MODES),
        help="embedding: a head on cached features; finetune: the encoder end to end (default: embedding)",
    )
    p.add_argument(
        "--meta-scope",
        default=K.META_SCOPE_AUTO,
        choices=[K.META_SCOPE_AUTO, *K.META_SCOPES],
        help="DkGSB: parameters the look-ahead moves; all, or last (the output layer and the encoder's last block); "
        "auto: the mode's default, all at present (default: auto)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="run as one of torchrun's processes: torchrun --nproc_per_node N -m agl_scverse.cli fit "
        "--distributed DATA --out MODEL (rank 0 writes the outputs)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="write a checkpoint to OUT.checkpoint/ every N epochs (default: 0, none)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out, if there is one")
    p.add_argument(
        "--precision",
        default="auto",
        choices=list(K.PRECISIONS),
        help="how the encoder runs: auto (bf16 where the device computes it natively, fp16 on older CUDA GPUs, "
        "else fp32), fp32, bf16 or fp16 (default: auto)",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fine-tune mode: random flips and quarter turns of the training patches (default: on in fine-tune "
        "mode, off in embedding mode)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=0,
        metavar="N",
        help="data-loader processes reading patches in fine-tune mode (default: 0, in the training process)",
    )


def _scale_out_kwargs(args: argparse.Namespace) -> tuple[str, dict]:
    """The mode and the config fields of :func:`_add_scale_out_args`; joins torchrun's process group (--distributed)."""
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


def _add_debug(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("--debug", action="store_true", default=default, help="show the traceback of an error")


def _add_resolution_args(p: argparse.ArgumentParser, device: str = "auto") -> None:
    p.add_argument(
        "--microns-per-pixel",
        type=float,
        default=None,
        metavar="UM",
        help="µm per full-resolution image pixel of a slide folder (default: the reader's, from its metadata)",
    )
    p.add_argument(
        "--fullres-image",
        default=None,
        metavar="FILE",
        help="full-resolution H&E image of a Visium or HEST slide (patches are cut from it, not the thumbnail)",
    )
    p.add_argument(
        "--allow-lowres",
        action="store_true",
        help="accept patches from an image coarser than the model was trained on (otherwise refused)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=list(K.BACKENDS),
        help="what runs the frozen image encoder when patches are embedded: auto (ONNX Runtime on a CPU when it is "
        "installed and agrees with torch, else torch), torch, onnx (default: auto)",
    )
    why = {"auto": "CUDA when available", "cpu": "bit-for-bit reproducible"}[device]
    p.add_argument("--device", default=device, help=f"torch device: auto, cpu, cuda, cuda:1 (default: {device}, {why})")


def _add_slide_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="slide: .h5ad file, legacy ST folder(s), Visium folder or HEST .h5ad")
    p.add_argument("--reader", choices=READERS, default="auto", help="how to read DATA (default: by its type)")
    p.add_argument("--encoder", default="resnet18", help="timm model name (default: %(default)s)")
    p.add_argument("--weights", default=None, help="local encoder weights file (default: random init)")
    p.add_argument("--embedding-key", default=None, help=".obsm key of cached features (default: embed patches)")
    p.add_argument("--seed", type=int, default=0, help="seed of splits, initialisation and batches (default: 0)")
    p.add_argument("--n-targets", type=int, default=50, help="highly variable target genes (default: 50)")
    p.add_argument("--k", type=int, default=None, help="auxiliary genes of --method topk (required with it)")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: the trainer's)")
    p.add_argument(
        "--patch-px", type=int, default=K.DEFAULT_PATCH_PX, help="patch side in pixels, to embed (default: %(default)s)"
    )
    p.add_argument(
        "--patch-um", type=float, default=K.DEFAULT_PATCH_UM, help="patch side in µm, to embed (default: %(default)s)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--layer", default=None, metavar="LAYER", help="layer of DATA holding the raw counts (default: .X)")
    p.add_argument(
        "--head",
        default=None,
        choices=list(K.HEADS),
        help="embedding-mode network: mlp, rrr (closed-form reduced-rank ridge) or hybrid (default: mlp)",
    )
    _add_section_args(p)
    _add_resolution_args(p)


def _add_ensemble_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after early stopping, retrain on training + validation spots (default: on in embedding mode)",
    )
    p.add_argument(
        "--n-seeds",
        type=int,
        default=None,
        help="embedding mode: average this many networks, one per seed (default: 5 in embedding mode, else 1)",
    )


def _add_cross_validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--baselines",
        nargs="*",
        default=list(CV_BASELINES),
        choices=list(ALL_BASELINES),
        metavar="NAME",
        help="baseline rows beside the methods: mean, pca_ridge, rrr (reduced-rank ridge with auxiliaries, slow); "
        "--baselines with no name: none (default: mean pca_ridge)",
    )
    _add_ensemble_args(p)


def _add_section_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sections",
        nargs="+",
        default=None,
        metavar="SECTION",
        help="read only these sections: section folders under a legacy ST parent folder, else values of the "
        "--library-key column (default: every section)",
    )
    p.add_argument(
        "--library-key",
        default=None,
        metavar="COLUMN",
        help=".obs column naming the sections (slides) of DATA: written by the folder readers, read from an "
        ".h5ad file; the default group of --sections, --val-groups, --test-groups and cross-validate "
        "(default: library_id)",
    )


_EXAMPLE = "example:\n"


def _examples(*lines: str) -> str:
    return _EXAMPLE + "\n".join(f"  {line}" for line in lines)


class _Formatter(argparse.HelpFormatter):
    """Wraps descriptions to the terminal; keeps the lines of an example epilog as written."""

    def _fill_text(self, text, width, indent):
        if text.startswith(_EXAMPLE):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    """The ``agl-scverse`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Predict spatial gene expression from H&E with Auxiliary Gene Learning (AGL, DkGSB).",
        epilog="Errors in the input print one line and exit with status 2 (--debug: the traceback). "
        f"Run '{PROG} <command> --help' for a command's options and an example.",
    )
    parser.add_argument("--version", action=_Version, help="show the version and exit")
    _add_debug(parser, False)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{demo,fit,predict,predict-slide,cross-validate}"
    )

    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on the built-in synthetic slide",
        description="Embed, fit PGL / AGL-all / AGL + DkGSB and score them on held-out spots of a synthetic slide; "
        "writes the AnnData, a model, a results table and figures.",
        epilog=_examples(f"{PROG} demo --out agl_demo_output --epochs 20"),
        formatter_class=_Formatter,
    )
    p.add_argument("--out", default="agl_demo_output", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: the trainer's)")
    p.add_argument("--patch-px", type=int, default=112, help="patch size in pixels (112 µm patches; default: 112)")
    _add_debug(p, argparse.SUPPRESS)  # after the command too; SUPPRESS keeps a --debug given before it

    p = sub.add_parser(
        "fit",
        help="train a model on one or several slides",
        description="Train an AGL model and save it to --out. Validation spots (early stopping, DkGSB's "
        "bi-level step) are a seeded 20% of the spots, or the --val-groups sections; --test-groups sections are "
        "held out of training and scored after it. Ends with one line: method, genes, best epoch, validation "
        "(and held-out) Pearson r.",
        epilog=_examples(
            f"{PROG} fit her2st/ --reader legacy_st --encoder resnet18 --method dkgsb \\",
            "    --val-groups B1 --test-groups C1 --epochs 50 --out model --h5ad fitted.h5ad",
        ),
        formatter_class=_Formatter,
    )
    _add_slide_args(p)
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--method", default="dkgsb", choices=list(METHODS), help="training method (default: dkgsb)")
    p.add_argument("--prior", default="hvg", help="auxiliary ranking: hvg, coexpression, moran (default: hvg)")
    p.add_argument(
        "--split-key",
        default=None,
        help=".obs column of the groups (sections) that --val-groups and --test-groups name (default: library_id)",
    )
    p.add_argument(
        "--val-groups", nargs="+", default=None, metavar="GROUP", help="groups whose spots validate (not trained on)"
    )
    p.add_argument(
        "--test-groups",
        nargs="+",
        default=None,
        metavar="GROUP",
        help="groups held out of the fit, predicted and scored after it",
    )
    p.add_argument("--h5ad", default=None, help="also write the annotated AnnData here")
    _add_ensemble_args(p)
    _add_scale_out_args(p)
    _add_debug(p, argparse.SUPPRESS)

    p = sub.add_parser(
        "cross-validate",
        aliases=["benchmark"],
        help="leave-one-group-out comparison of methods",
        description="Hold out each group (section) in turn, fit every method on the others and score it on the "
        "held-out one beside a mean predictor and PCA + Ridge. Writes one row per method, fold and gene.",
        epilog=_examples(f"{PROG} cross-validate her2st/ --reader legacy_st --methods pgl dkgsb --out cv.csv"),
        formatter_class=_Formatter,
    )
    _add_slide_args(p)
    p.add_argument(
        "--group-key", default=None, help=".obs column of the groups (default: --library-key, else library_id)"
    )
    p.add_argument(
        "--methods", nargs="+", default=["pgl", "agl", "dkgsb"], choices=list(METHODS), help="methods to compare"
    )
    _add_cross_validate_args(p)
    p.add_argument("--out", default="cross_validation.csv", help="CSV file to write (default: %(default)s)")
    _add_debug(p, argparse.SUPPRESS)

    p = sub.add_parser(
        "predict",
        help="predict expression on a slide with a saved model",
        description="Predict every gene the model was trained on for each spot of a slide and write an .h5ad. "
        "A slide that measured the model's target genes gets the predictions as a layer beside them and is "
        "scored (Pearson r); an H&E-only slide gets an AnnData of predictions.",
        epilog=_examples(
            f"{PROG} predict model visium_outs/ --reader visium --fullres-image tissue.tif --out predicted.h5ad"
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("model", help="model directory written by fit / AGLModel.save")
    p.add_argument("data", help="slide: .h5ad file, legacy ST folder, Visium folder or HEST .h5ad")
    p.add_argument("--reader", choices=READERS, default="auto", help="how to read DATA (default: by its type)")
    p.add_argument(
        "--weights",
        default=None,
        help="encoder weights file the model was trained with (to embed a slide; its sha256 is checked)",
    )
    p.add_argument("--embedding-key", default=None, help=".obsm key of cached features (default: the model's)")
    p.add_argument("--out", required=True, help=".h5ad file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_section_args(p)
    _add_resolution_args(p)
    _add_debug(p, argparse.SUPPRESS)
    _add_predict_slide(sub)
    return parser


def _add_predict_slide(sub) -> None:
    p = sub.add_parser(
        "predict-slide",
        help="predict expression over the tissue of a bare H&E image (no spots)",
        description="Read an H&E image (JPEG, PNG, TIFF, pyramidal OME-TIFF, SVS), find its tissue, lay a grid of "
        "pseudo-spots over it and predict them with a saved model. The .h5ad holds the predictions in .X (gene "
        "names as var_names) and the spot centres in full-resolution image pixels in .obsm['spatial'].",
        epilog=_examples(
            f"{PROG} predict-slide model slide.ome.tif --out slide_predicted.h5ad",
            f"{PROG} predict-slide model he.jpg --microns-per-pixel 0.5 --pitch-um 100 --spot-um 55 --out p.h5ad",
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("model", help="model directory written by fit / AGLModel.save")
    p.add_argument("image", help="H&E image file: .jpg, .png, .tif, .ome.tif, .svs")
    p.add_argument("--out", required=True, help=".h5ad file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument(
        "--microns-per-pixel",
        type=float,
        default=None,
        metavar="UM",
        help="µm per full-resolution pixel (default: from the file's OME / SVS / TIFF metadata; needed for JPEG/PNG)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="encoder weights file the model was trained with (its sha256 is checked)",
    )
    p.add_argument(
        "--spot-um", type=float, default=None, metavar="UM", help="spot diameter (default: the model's patch side)"
    )
    p.add_argument(
        "--pitch-um",
        type=float,
        default=None,
        metavar="UM",
        help="centre-to-centre spot distance (default: the model's patch side, so patches tile the tissue)",
    )
    p.add_argument("--layout", choices=["hex", "square"], default="hex", help="grid layout (default: %(default)s)")
    p.add_argument("--library-id", default=None, help="name of the slide (default: the image file's name)")
    p.add_argument(
        "--num-workers",
        type=int,
        default=0,
        metavar="N",
        help="data-loader processes cutting patches while the encoder runs (default: 0, in this process)",
    )
    p.add_argument(
        "--allow-lowres",
        action="store_true",
        help="accept an image coarser than the model was trained on (otherwise refused)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=list(K.BACKENDS),
        help="what runs the frozen image encoder: auto (ONNX Runtime on a CPU when installed and it agrees with "
        "torch, else torch), torch, onnx (default: auto)",
    )
    p.add_argument(
        "--chunk-dir",
        default=None,
        metavar="DIR",
        help="save the predictions in chunks here as they finish; rerun the same command to resume a killed run",
    )
    p.add_argument(
        "--chunk-size", type=int, default=4096, metavar="N", help="spots per chunk of --chunk-dir (default: 4096)"
    )
    p.add_argument(
        "--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1 (default: auto, CUDA when available)"
    )
    _add_debug(p, argparse.SUPPRESS)


class _Version(argparse.Action):
    """``--version``: the package version, read only when asked (importlib.metadata is slow to import)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from . import __version__

        parser.exit(message=f"{PROG} {__version__}\n")


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations argparse cannot check alone (exit status 2 with the usage, as argparse does)."""
    methods = [args.method] if args.command == "fit" else getattr(args, "methods", [])
    k = getattr(args, "k", None)
    if "topk" in methods and k is None:
        parser.error("--method topk needs --k, the number of auxiliary genes to use (e.g. --k 500)")
    if k is not None and "topk" not in methods:
        parser.error(f"--k applies to the topk method only (methods: {', '.join(methods)})")
    if args.command == "fit" and args.split_key is not None and not (args.val_groups or args.test_groups):
        parser.error("--split-key names the column of --val-groups / --test-groups; pass one of them too")


def _one_line(exc: BaseException) -> str:
    """The message of an exception on one line (a KeyError's message without its quotes)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        msg = exc.args[0]
    else:
        msg = str(exc)
    msg = " ".join(msg.split())
    return msg or type(exc).__name__


#: ``name=value`` in an error of the Python API (a parameter, as the API's messages name them: ``weights=<path>``).
_PARAM = re.compile(r"(?<![\w.\-])([a-z][a-z0-9_]*)=(<[^>]*>|'[^']*'|\"[^\"]*\"|[^\s,;)]*)")
#: A Python call quoted in a message (``agl.tl.agl_fit(adata, key_added=...)``): its arguments stay as written.
_CALL = re.compile(r"\b[\w.]+\([^()]*\)")


def command_flags(
    parser: argparse.ArgumentParser, command: str | None
) -> dict[str, tuple[str, str | None, str | None]]:
    """The flags of ``command`` by the parameter they set, e.g. ``{"weights": ("--weights", None, "WEIGHTS")}``.

    The second is the negative flag of a ``--x/--no-x`` switch (``"refit": ("--refit", "--no-refit", None)``), the
    third the placeholder of the flag's value (None for a switch).
    """
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            parsers.append(action.choices[command])
    out: dict[str, tuple[str, str | None, str | None]] = {}
    for p in parsers:
        for action in p._actions:
            longs = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
            if longs and action.dest not in ("help", "version"):
                neg = next((o for o in action.option_strings if o.startswith("--no-")), None)
                takes = action.nargs != 0 and neg is None
                metavar = (action.metavar or action.dest.upper()) if takes else None
                out[action.dest] = (longs[0], neg, metavar)
    return out


def cli_message(message: str, flags: dict[str, tuple[str, str | None, str | None]]) -> str:
    """An error of the Python API in the command line's words: ``Pass weights=<path>`` -> ``Pass --weights <path>``.

    Every ``name=value`` whose ``name`` is a parameter the command has a flag for becomes the flag (``x=True`` ->
    ``--x``, ``x=False`` -> ``--no-x``, ``x=<v>`` -> ``--x <v>``); a Python call quoted in the message
    (``agl.tl.evaluate(adata, key_added=...)``) and names without a flag are left as written.

    Examples
    --------
    >>> cli_message("Pass weights=<path>.", {"weights": ("--weights", None, "FILE")})
    'Pass --weights <path>.'
    """
    calls = [m.span() for m in _CALL.finditer(message)]

    def flag(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        if name not in flags or any(a <= m.start() < b for a, b in calls):
            return m.group(0)
        pos, neg, metavar = flags[name]
        tail = ""
        while value and value[-1] in ".:" and not value.startswith(("<", "'", '"')):
            value, tail = value[:-1], value[-1] + tail
        value = value.strip("'\"")
        if value in ("True", "true"):
            return pos + tail
        if value in ("False", "false") and neg:
            return neg + tail
        value = value or metavar
        return (f"{pos} {value}" if value else pos) + tail

    return _PARAM.sub(flag, message)


def _run(args: argparse.Namespace) -> None:
    if args.command == "demo":
        demo(out=args.out, seed=args.seed, epochs=args.epochs, patch_px=args.patch_px)
    elif args.command == "fit":
        _fit(args)
    elif args.command == "predict":
        _predict(args)
    elif args.command == "predict-slide":
        _predict_slide(args)
    else:  # cross-validate, benchmark
        _cross_validate(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``agl-scverse`` console script; returns the exit status.

    0: done; 2: an error in the input (one line on stderr; argparse's usage errors exit 2 as well); 1: an
    unexpected error (a bug: please report it with the traceback of ``--debug``); 130: interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
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
        print(f"{PROG}: error: {cli_message(_one_line(exc), command_flags(parser, args.command))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"{PROG}: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback "
            "and please report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
