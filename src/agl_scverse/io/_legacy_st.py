"""Reader for the legacy Spatial Transcriptomics layout (HER2+ breast cancer, cSCC, ...)."""

from __future__ import annotations

import csv
import gzip
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg
from tqdm.auto import tqdm

from agl_scverse import _constants as consts
from agl_scverse import _validate
from agl_scverse._docs import d
from agl_scverse._utils import show_progress

from ._common import (
    as_csr_float32,
    check_in_image,
    finalize,
    image_size,
    nearest_neighbour_px,
    positive_number,
    spatial_entry,
    thumbnail_from_file,
)

__all__ = ["read_legacy_st", "has_he_only_sections"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


@d.dedent
def read_legacy_st(
    path: str | Path | Sequence[str | Path],
    sections: Sequence[str] | None = None,
    library_key: str = consts.LIBRARY_KEY,
    microns_per_pixel: float | None = None,
    spot_diameter_um: float = 100.0,
    spot_pitch_um: float = 200.0,
    hires_max_px: int = 2000,
    load_images: bool = True,
    counts_file: str | None = "counts.tsv.gz",
    spots_file: str = "spots.tsv",
    image_file: str | None = "he.jpg",
    progress: bool | None = None,
) -> AnnData:
    """Read legacy Spatial Transcriptomics sections (one folder per section) into one AnnData.

    Each section folder holds ``counts.tsv.gz`` (spots x genes, first column the spot id ``"XxY"``),
    ``spots.tsv`` (columns ``x y pixel_x pixel_y``) and ``he.jpg`` (the full-resolution H&E image). Spots are
    matched on the id (unmatched ones dropped with a warning); sections are joined on the union of their genes.

    Parameters
    ----------
    path
        One section folder, a parent folder of several section folders, or a list of section folders.
        The folder name is the library id.
    sections
        Names of the section folders to read under a parent ``path`` (default: all that hold ``counts_file``, or
        ``spots_file`` with ``counts_file=None``).
    library_key
        ``.obs`` column naming the section of each spot (categorical).
    microns_per_pixel
        µm per full-resolution pixel; default ``spot_pitch_um`` over the median nearest-neighbour spot distance.
    spot_diameter_um
        Spot diameter in µm (100 on the legacy ST array); sets ``spot_diameter_fullres``.
    spot_pitch_um
        Centre-to-centre distance of neighbouring spots in µm (200 on the legacy ST array).
    hires_max_px
        Longest side of the downscaled ``"hires"`` image kept in memory.
    load_images
        Build the ``"hires"`` thumbnail (the full-resolution image path is recorded either way).
    counts_file
        Counts file name inside each section folder; ``None``: no counts (H&E-only sections, an AnnData of 0 genes).
    spots_file
        Spot positions file name inside each section folder (tab- or comma-separated).
    image_file
        Image file name inside each section folder; ``None`` takes the only image file in the folder.
    %(progress)s

    Returns
    -------
    AnnData in the agl-scverse layout (:doc:`/data_layouts`), obs names ``"<section>_<XxY>"``, with
    ``.obs["array_x"]`` and ``.obs["array_y"]``.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> adata = agl.io.read_legacy_st("data/her2st", sections=["C2", "C3"])  # doctest: +SKIP
    >>> adata.obs["library_id"].cat.categories.tolist()  # doctest: +SKIP
    ['C2', 'C3']
    """
    if microns_per_pixel is not None:
        microns_per_pixel = positive_number(microns_per_pixel, "microns_per_pixel", "Pass µm per pixel, e.g. 0.71.")
    spot_diameter_um = positive_number(spot_diameter_um, "spot_diameter_um", "Legacy ST spots are 100 µm.")
    spot_pitch_um = positive_number(spot_pitch_um, "spot_pitch_um", "Legacy ST spots are 200 µm apart.")
    folders = _section_folders(path, sections, counts_file, spots_file)

    adatas, entries = [], {}
    for folder in tqdm(folders, desc="legacy ST sections", disable=len(folders) < 2 or not show_progress(progress)):
        a, entries[folder.name] = _read_section(
            folder,
            library_key,
            microns_per_pixel,
            spot_diameter_um,
            spot_pitch_um,
            hires_max_px,
            load_images,
            counts_file,
            spots_file,
            image_file,
        )
        adatas.append(a)

    adata = adatas[0] if len(adatas) == 1 else ad.concat(adatas, join="outer", fill_value=0, merge="same")
    adata.uns[consts.SPATIAL_KEY] = entries
    finalize(adata, library_key, he_only=counts_file is None)
    logg.info(
        f"read {adata.n_obs} spots x {adata.n_vars} genes from {len(folders)} legacy ST section(s): "
        f"{', '.join(entries)}"
    )
    return adata


def _section_folders(path, sections, counts_file: str | None, spots_file: str) -> list[Path]:
    """The section folders to read: those holding ``counts_file`` (``spots_file`` when it is None)."""
    marker = counts_file or spots_file
    if isinstance(path, str | Path):
        root = Path(path)
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist; pass a legacy ST section folder or a parent folder.")
        if (root / marker).is_file():
            folders = [root]
        else:
            folders = sorted(p for p in root.iterdir() if p.is_dir() and (p / marker).is_file())
    else:
        folders = [Path(p) for p in path]
    if sections is not None:
        sections = [str(s) for s in sections]
        by_name = {f.name: f for f in folders}
        unknown = [s for s in sections if s not in by_name]
        if unknown:
            raise ValueError(f"Sections {unknown} not found under {path}; available sections are {sorted(by_name)}.")
        folders = [by_name[s] for s in sections]
    if not folders:
        he_only = counts_file is not None and has_he_only_sections(path, spots_file, counts_file)
        raise FileNotFoundError(
            f"No legacy ST section under {path}: no folder holds {marker!r}. "
            + (
                f"Folders there hold {spots_file!r} and an image but no counts: pass counts_file=None to read them "
                "as H&E-only slides (to predict)."
                if he_only
                else f"Pass a section folder (with counts.tsv.gz, {spots_file} and he.jpg) or its parent folder."
            )
        )
    for f in folders:
        if not (f / marker).is_file():
            hint = " (or counts_file=None to read it as an H&E-only slide)" if counts_file is not None else ""
            raise FileNotFoundError(f"{f / marker} does not exist; every section folder needs {marker!r}{hint}.")
    names = [f.name for f in folders]
    if len(set(names)) != len(names):
        raise ValueError(f"Section folder names must be unique (they become library ids), got {names}.")
    return folders


def has_he_only_sections(
    path: str | Path | Sequence, spots_file: str = "spots.tsv", counts_file: str = "counts.tsv.gz"
) -> bool:
    """Whether ``path`` (a section folder or a parent of several) holds spot tables and images but no counts."""
    if not isinstance(path, str | Path) or not Path(path).is_dir():
        return False
    root = Path(path)
    folders = [root] if (root / spots_file).is_file() else [p for p in root.iterdir() if p.is_dir()]
    folders = [f for f in folders if (f / spots_file).is_file()]
    if not folders:
        return False
    has_counts = any((f / counts_file).is_file() for f in folders)
    has_image = all(any(p.suffix.lower() in IMAGE_SUFFIXES for p in f.iterdir()) for f in folders)
    return has_image and not has_counts


#: What reading a damaged text table raises (truncated gzip, undecodable bytes, no delimiter, no rows).
_TABLE_ERRORS = (EOFError, OSError, UnicodeDecodeError, csv.Error, pd.errors.ParserError, pd.errors.EmptyDataError)


def _read_header(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as fh:
            line = fh.readline().rstrip("\r\n")
    except _TABLE_ERRORS as e:
        raise ValueError(f"{path} cannot be read as a counts table ({type(e).__name__}: {e}).") from e
    return line.split("\t")[1:]


def _read_table(path: Path, what: str, **kwargs) -> pd.DataFrame:
    """``pd.read_csv(path, **kwargs)``; a truncated, empty or undecodable file is a ValueError naming it."""
    try:
        return pd.read_csv(path, **kwargs)
    except _TABLE_ERRORS as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path} cannot be read as a {what} table ({type(e).__name__}: {e}); is it truncated?") from e


def _find_image(folder: Path, image_file: str | None) -> Path:
    if image_file is not None:
        p = folder / image_file
        if p.is_file():
            return p
    candidates = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if image_file is None and len(candidates) == 1:
        return candidates[0]
    raise FileNotFoundError(
        f"No image for library {folder.name!r}: {folder / (image_file or '<image>')} does not exist"
        + (f" (image files there: {[c.name for c in candidates]})" if candidates else "")
        + ". Put the full-resolution H&E image in the section folder or pass image_file=<its name>."
    )


def _read_section(
    folder: Path,
    library_key: str,
    microns_per_pixel: float | None,
    spot_diameter_um: float,
    spot_pitch_um: float,
    hires_max_px: int,
    load_images: bool,
    counts_file: str | None,
    spots_file: str,
    image_file: str | None,
) -> tuple[AnnData, dict]:
    lib, spots_path = folder.name, folder / spots_file
    if not spots_path.is_file():
        raise FileNotFoundError(f"{spots_path} does not exist; legacy ST sections need a spots file ({spots_file!r}).")
    image_path = _find_image(folder, image_file)
    counts = _read_counts(folder / counts_file, lib) if counts_file is not None else None

    spots = _read_table(spots_path, "spots", sep=None, engine="python")
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in spots.columns]
    if missing:
        raise ValueError(
            f"{spots_path} lacks columns {missing} (has {list(spots.columns)}); the legacy ST spots file needs "
            "x, y (array position) and pixel_x, pixel_y (spot centre in full-resolution pixels)."
        )
    xy = spots[["x", "y"]].apply(pd.to_numeric, errors="coerce")
    if len(spots) == 0 or not np.all(np.isfinite(xy.to_numpy(dtype=float))):
        raise ValueError(f"{spots_path} has no spots or non-numeric/NaN array positions (x, y); fix the spots file.")
    spot_ids = xy["x"].round().astype(int).astype(str) + "x" + xy["y"].round().astype(int).astype(str)
    spots = spots.set_index(pd.Index(spot_ids, name=None))
    if not spots.index.is_unique:
        d = spots.index[spots.index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"Duplicate spot barcodes {d} in {spots_path}; each array position must appear once.")
    pix = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=float)
    if not np.all(np.isfinite(pix)):
        raise ValueError(f"{spots_path} holds NaN/inf pixel coordinates; fix the spots file.")

    if counts is None:  # H&E only: every spot of the spots file
        counts, values = pd.DataFrame(index=spots.index), np.zeros((len(spots), 0), dtype=np.float32)
    else:
        counts, values = counts
    common = counts.index[counts.index.isin(spots.index)]
    n_only_counts = int((~counts.index.isin(spots.index)).sum())
    n_only_spots = int((~spots.index.isin(counts.index)).sum())
    if n_only_counts or n_only_spots:
        logg.warning(
            f"section {lib!r}: {n_only_counts} spot(s) of {counts_file} have no position in {spots_file} and "
            f"{n_only_spots} position(s) of {spots_file} have no counts; keeping the {len(common)} matched spots."
        )
    if len(common) == 0:
        raise ValueError(
            f"The slide {lib!r} is empty: no spot id of {counts_file} (e.g. {counts.index[:3].tolist()}) matches "
            f"the x, y columns of {spots_file} (e.g. {spots.index[:3].tolist()}). Check both files are of one section."
        )

    width, height = image_size(image_path)
    xy = spots.loc[common, ["pixel_x", "pixel_y"]].to_numpy(dtype=float)
    check_in_image(xy, width, height, lib, image=str(image_path))

    if microns_per_pixel is None:
        nn = nearest_neighbour_px(pix)
        mpp = spot_pitch_um / nn
        mpp_source = f"estimated: median nearest-neighbour spot distance {nn:.1f} px = {spot_pitch_um:g} µm pitch"
        logg.info(f"section {lib!r}: {mpp:.4f} µm/px ({mpp_source})")
    else:
        mpp, mpp_source = microns_per_pixel, "given"

    hires, scalef = thumbnail_from_file(image_path, hires_max_px) if load_images else (None, None)

    row = counts.index.get_indexer(common)
    arr = spots.loc[common, ["x", "y"]].round().astype(int).to_numpy()
    names = pd.Index([f"{lib}_{c}" for c in common])
    obs = pd.DataFrame({"array_x": arr[:, 0], "array_y": arr[:, 1], library_key: lib}, index=names)
    var = pd.DataFrame(index=pd.Index(counts.columns.astype(str)))
    adata = AnnData(X=as_csr_float32(values[row]), obs=obs, var=var)
    adata.obsm[consts.SPATIAL_KEY] = xy
    entry = spatial_entry(
        hires,
        scalef,
        spot_diameter_fullres=spot_diameter_um / mpp,
        microns_per_pixel=mpp,
        source_image_path=image_path,
        microns_per_pixel_source=mpp_source,
        image_width=width,
        image_height=height,
        reader="read_legacy_st",
    )
    return adata, entry


def _read_counts(counts_path: Path, lib: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The counts table of a section (spot ids as index) and its values as float32, checked."""
    genes = _read_header(counts_path)  # a truncated or unreadable file is a ValueError naming it
    dup = pd.Index(genes)[pd.Index(genes).duplicated()].unique().tolist()
    if dup:
        raise ValueError(
            f"Duplicate gene names {dup[:5]} in {counts_path}; gene names must be unique. Merge or rename the "
            "duplicated columns of the counts file."
        )
    counts = _read_table(counts_path, "counts", sep="\t", index_col=0)
    if counts.shape[0] == 0 or counts.shape[1] == 0:
        raise ValueError(
            f"The slide {lib!r} is empty: {counts_path} holds {counts.shape[0]} spots x {counts.shape[1]} genes."
        )
    counts.index = counts.index.astype(str).str.strip()
    if not counts.index.is_unique:
        d = counts.index[counts.index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"Duplicate spot barcodes {d} in {counts_path}; each spot id must appear once.")
    try:
        values = counts.to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{counts_path} holds non-numeric counts ({e}); counts must be numbers.") from e
    _validate.check_counts(values, what=str(counts_path))
    return counts, values
