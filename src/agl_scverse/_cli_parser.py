"""The ``agl-scverse`` argument parser: commands, their flags, help with examples, checks across flags."""

from __future__ import annotations

import argparse

from . import _constants as consts
from ._constants import METHODS, MODES

READERS = ("auto", "h5ad", "legacy_st", "visium", "hest")
#: Baselines of ``cross-validate`` (``--baselines``) and the default ones (the slow ``rrr`` only when named).
ALL_BASELINES, CV_BASELINES = ("mean", "pca_ridge", "rrr"), ("mean", "pca_ridge")
PROG = "agl-scverse"


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
        default=consts.META_SCOPE_AUTO,
        choices=[consts.META_SCOPE_AUTO, *consts.META_SCOPES],
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
        choices=list(consts.PRECISIONS),
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
    _add_engine_args(p, device)


def _add_engine_args(p: argparse.ArgumentParser, device: str = "auto") -> None:
    """How a model's encoder runs on a slide: image resolution check, backend, device."""
    p.add_argument(
        "--allow-lowres",
        action="store_true",
        help="accept patches from an image coarser than the model was trained on (otherwise refused)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=list(consts.BACKENDS),
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
        "--patch-px",
        type=int,
        default=consts.DEFAULT_PATCH_PX,
        help="patch side in pixels, to embed (default: %(default)s)",
    )
    p.add_argument(
        "--patch-um",
        type=float,
        default=consts.DEFAULT_PATCH_UM,
        help="patch side in µm, to embed (default: %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--layer", default=None, metavar="LAYER", help="layer of DATA holding the raw counts (default: .X)")
    p.add_argument(
        "--head",
        default=None,
        choices=list(consts.HEADS),
        help="embedding-mode network: hybrid (default: the MLP blended with a closed-form ridge), mlp or rrr",
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
        "names as var_names) and the spot centres in full-resolution image pixels in .obsm['spatial']; a .zarr "
        "--out is a SpatialData: the image, the grid's circles and that table annotating them.",
        epilog=_examples(
            f"{PROG} predict-slide model slide.ome.tif --out slide_predicted.h5ad",
            f"{PROG} predict-slide model he.jpg --microns-per-pixel 0.5 --pitch-um 100 --spot-um 55 --out p.h5ad",
            f"{PROG} predict-slide model slide.svs --out slide_predicted.zarr",
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("model", help="model directory written by fit / AGLModel.save")
    p.add_argument("image", help="H&E image file: .jpg, .png, .tif, .ome.tif, .svs")
    p.add_argument(
        "--out", required=True, help=".h5ad file, or .zarr SpatialData store (image, grid circles, table), to write"
    )
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
        "--chunk-dir",
        default=None,
        metavar="DIR",
        help="save the predictions in chunks here as they finish; rerun the same command to resume a killed run",
    )
    p.add_argument(
        "--chunk-size", type=int, default=4096, metavar="N", help="spots per chunk of --chunk-dir (default: 4096)"
    )
    _add_engine_args(p)
    _add_debug(p, argparse.SUPPRESS)


class _Version(argparse.Action):
    """``--version``: the package version, read only when asked (importlib.metadata is slow to import)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from . import __version__

        parser.exit(message=f"{PROG} {__version__}\n")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations argparse cannot check alone (exit status 2 with the usage, as argparse does)."""
    methods = [args.method] if args.command == "fit" else getattr(args, "methods", [])
    k = getattr(args, "k", None)
    if "topk" in methods and k is None:
        parser.error("--method topk needs --k, the number of auxiliary genes to use (e.g. --k 500)")
    if k is not None and "topk" not in methods:
        parser.error(f"--k applies to the topk method only (methods: {', '.join(methods)})")
    if args.command == "fit" and args.split_key is not None and not (args.val_groups or args.test_groups):
        parser.error("--split-key names the column of --val-groups / --test-groups; pass one of them too")
