"""Reader for 10x Visium Space Ranger output, through :func:`squidpy.read.visium`."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from anndata import AnnData
from scanpy import logging as logg

from agl_scverse import _constants as consts
from agl_scverse import _spatial

from ._common import check_in_image, finalize, image_size, positive_number

__all__ = ["read_visium"]


def read_visium(
    path: str | Path,
    library_id: str | None = None,
    fullres_image: str | Path | None = None,
    counts_file: str | None = "filtered_feature_bc_matrix.h5",
    library_key: str = consts.LIBRARY_KEY,
    microns_per_pixel: float | None = None,
    spot_diameter_um: float = _spatial.VISIUM_SCALEFACTOR_SPOT_UM,
    var_names_make_unique: bool = True,
) -> AnnData:
    """Read a 10x Visium Space Ranger output folder into the agl-scverse layout.

    Parsing is done by :func:`squidpy.read.visium`; this adds the physical scale, the full-resolution image path
    and the library column, and checks the result.

    Parameters
    ----------
    path
        Space Ranger ``outs`` folder with ``counts_file`` and ``spatial/`` (tissue positions, scale factors, hires and
        lowres images).
    library_id
        Library id; default the ``library_ids`` attribute of the h5 file, else the folder name.
    fullres_image
        The full-resolution H&E image of the spot coordinates (``metadata["source_image_path"]``, read lazily for
        patches); without it patches come from the ``"hires"`` image, upsampled, with a warning.
    counts_file
        Counts file inside ``path``; ``None``: an H&E-only slide to predict, the in-tissue spots and 0 genes.
    library_key
        ``.obs`` column naming the library (categorical).
    microns_per_pixel
        µm per full-resolution pixel; default ``spot_diameter_um / spot_diameter_fullres``.
    spot_diameter_um
        Spot diameter that ``spot_diameter_fullres`` spans (Space Ranger's theoretical 65 µm).
    var_names_make_unique
        Make duplicated gene symbols unique, as scanpy's 10x readers do; with ``False`` they raise an error.

    Returns
    -------
    AnnData in the agl-scverse layout (:doc:`/data_layouts`); ``.obs`` keeps Space Ranger's ``in_tissue``,
    ``array_row`` and ``array_col``.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> adata = agl.io.read_visium("sample/outs", fullres_image="sample/he.tif")  # doctest: +SKIP
    >>> adata.uns["spatial"][adata.obs["library_id"].cat.categories[0]]["scalefactors"]  # doctest: +SKIP
    """
    import squidpy as sq

    path = Path(path)
    _check_visium_folder(path, counts_file)
    if microns_per_pixel is not None:
        microns_per_pixel = positive_number(microns_per_pixel, "microns_per_pixel", "Pass µm per pixel.")
    spot_diameter_um = positive_number(spot_diameter_um, "spot_diameter_um", "Space Ranger's reference spot is 65 µm.")
    if fullres_image is not None:
        fullres_image = Path(fullres_image).resolve()
        width, height = image_size(fullres_image)  # exists, RGB, header only
    if library_id is None:
        library_id = (_h5_library_id(path / counts_file) if counts_file else None) or path.resolve().name
    library_id = str(library_id)

    if counts_file is None:
        adata = _spots_only(path, library_id)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            adata = sq.read.visium(path, counts_file=counts_file, library_id=library_id, load_images=True)
    if var_names_make_unique and not adata.var_names.is_unique:
        logg.warning(f"library {library_id!r}: duplicated gene symbols made unique (var_names_make_unique)")
        adata.var_names_make_unique()

    entry = adata.uns[consts.SPATIAL_KEY][library_id]
    sf = entry.get(consts.SCALEFACTORS, {}) or {}
    fix = f"Fix {path / 'spatial' / 'scalefactors_json.json'}."
    for key in (consts.SPOT_DIAMETER, consts.HIRES_SCALEF):
        if key not in sf:
            raise ValueError(f"Scale factor {key!r} is missing from {path / 'spatial' / 'scalefactors_json.json'}.")
        sf[key] = positive_number(sf[key], f"Scale factor {key!r} of library {library_id!r}", fix)
    if (low := consts.LOWRES_SCALEF) in sf:
        sf[low] = positive_number(sf[low], f"Scale factor {low!r}", fix)
    mpp_source = "given"
    if microns_per_pixel is None:
        microns_per_pixel = spot_diameter_um / sf[consts.SPOT_DIAMETER]
        mpp_source = f"{spot_diameter_um:g} µm / spot_diameter_fullres"
    sf[consts.MICRONS_PER_PIXEL] = float(microns_per_pixel)
    images = entry.get(consts.IMAGES, {}) or {}
    for res in list(images):
        images[res] = _spatial.as_rgb(images[res], name=f"the {res} image of library {library_id!r}")
    if consts.HIRES not in images:
        raise ValueError(f"No image for library {library_id!r}: {path}/spatial has no tissue_hires_image.png.")

    xy = np.asarray(adata.obsm[consts.SPATIAL_KEY], dtype=float)
    no_pos = ~np.all(np.isfinite(xy), axis=1)
    if no_pos.any():
        raise ValueError(
            f"{int(no_pos.sum())} spots of {counts_file} (e.g. {adata.obs_names[no_pos][:3].tolist()}) have no row in "
            "the tissue positions file; counts and positions are from different runs. Pass matching files."
        )
    if fullres_image is not None:
        check_in_image(xy, width, height, library_id, image=str(fullres_image))
        entry[consts.METADATA][consts.SOURCE_IMAGE_PATH] = str(fullres_image)
    else:
        h, w = images[consts.HIRES].shape[:2]
        s = sf[consts.HIRES_SCALEF]
        check_in_image(
            xy, int(np.ceil(w / s)), int(np.ceil(h / s)), library_id, image="the hires image (full-res extent)"
        )
    entry[consts.METADATA].update(microns_per_pixel_source=mpp_source, reader="read_visium")

    adata.obsm[consts.SPATIAL_KEY] = xy
    adata.obs[library_key] = library_id
    finalize(adata, library_key, he_only=counts_file is None)
    logg.info(f"read Visium library {library_id!r}: {adata.n_obs} spots x {adata.n_vars} genes")
    return adata


def _check_visium_folder(path: Path, counts_file: str | None) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; pass the Space Ranger output folder ('outs').")
    spatial = path / "spatial"
    needed = [path / counts_file] if counts_file is not None else []
    needed += [spatial / "scalefactors_json.json", spatial / "tissue_hires_image.png"]
    needed += [spatial / "tissue_lowres_image.png"]
    missing = [str(p.relative_to(path)) for p in needed if not p.exists()]
    if not (spatial / "tissue_positions.csv").exists() and not (spatial / "tissue_positions_list.csv").exists():
        missing.append("spatial/tissue_positions.csv (or tissue_positions_list.csv)")
    if missing:
        have = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())[:20]
        what = "No image for the library: " if any("image" in m for m in missing) else ""
        raise FileNotFoundError(
            f"{what}{path} is not a complete Space Ranger output: missing {missing} (found {have}). "
            "Pass the 'outs' folder of Space Ranger, or the right counts_file"
            + (" (counts_file=None reads an H&E-only slide, without counts)." if counts_file is not None else ".")
        )


def _spots_only(path: Path, library_id: str) -> AnnData:
    """An H&E-only Visium slide: the in-tissue spots of the positions file, 0 genes, images and scale factors."""
    import json

    import pandas as pd
    from PIL import Image

    spatial = path / "spatial"
    new = spatial / "tissue_positions.csv"
    cols = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    if new.exists():  # Space Ranger >= 2: a header line
        pos = pd.read_csv(new)
        if list(pos.columns) != cols:  # written without the header
            pos = pd.read_csv(new, header=None, names=cols)
    else:
        pos = pd.read_csv(spatial / "tissue_positions_list.csv", header=None, names=cols)
    pos = pos[pd.to_numeric(pos["in_tissue"], errors="coerce") == 1]
    if pos.empty:
        raise ValueError(f"{spatial} lists no spot under tissue (in_tissue == 1); it holds no spots to predict.")
    names = pd.Index(pos["barcode"].astype(str).to_numpy())
    obs = pd.DataFrame({c: pos[c].to_numpy(dtype=int) for c in ("in_tissue", "array_row", "array_col")}, index=names)
    xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=float)
    scalefactors = json.loads((spatial / "scalefactors_json.json").read_text())
    images = {}
    for res in (consts.HIRES, consts.LOWRES):
        f = spatial / f"tissue_{res}_image.png"
        if f.exists():
            with Image.open(f) as im:
                images[res] = np.asarray(im.convert("RGB") if im.mode in ("RGBA", "P") else im)
    adata = AnnData(np.zeros((len(obs), 0), dtype=np.float32), obs=obs)
    adata.obsm[consts.SPATIAL_KEY] = xy
    meta = {"source": "spatial/ (no counts)"}
    entry = {consts.IMAGES: images, consts.SCALEFACTORS: scalefactors, consts.METADATA: meta}
    adata.uns[consts.SPATIAL_KEY] = {library_id: entry}
    return adata


def _h5_library_id(path: Path) -> str | None:
    if path.suffix != ".h5":
        return None
    import h5py

    with h5py.File(path, "r") as f:
        ids = f.attrs.get("library_ids")
    if ids is None or len(np.atleast_1d(ids)) == 0:
        return None
    lid = np.atleast_1d(ids)[0]
    return lid.decode() if isinstance(lid, bytes) else str(lid)
