"""Spot-centred image patches at a fixed physical scale (geometry and levels: the Data layouts page)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scanpy import logging as logg
from torch.utils.data import DataLoader, Dataset

from agl_scverse import _constants as consts
from agl_scverse import _spatial
from agl_scverse._images import ImageSource
from agl_scverse._validate import check_choice, check_in_range, check_positive, check_spatial, resolve_spots
from agl_scverse.encoders._normalize import normalize
from agl_scverse.io._spatialdata import as_anndata

from ._crop import (
    MAX_BATCH_BYTES,
    MAX_PATCH_BYTES,
    ON_OUTSIDE,
    PAD_MODES,
    as_pad_value,
    check_patch_batch,
    crop_origin,
    crop_with_padding,
    patch_bytes,
    resize_patch,
    subpixel_shift,
)

__all__ = [
    "SpotPatches",
    "extract_patches",
    "patch_loader",
    "iter_patch_batches",
    "normalize",
    "check_patch_batch",
    "patch_bytes",
    "crop_origin",
    "subpixel_shift",
    "MAX_PATCH_BYTES",
    "MAX_BATCH_BYTES",
]

#: ``.obs`` column with each spot's row in a HEST ``patches_h5`` file.
HEST_PATCH_INDEX = consts.HEST_PATCH_INDEX
#: Physical side of a HEST-1k patch: 224 px at 0.5 µm/px.
HEST_PATCH_UM = 112.0


class SpotPatches(Dataset):
    """Spot-centred patches of a fixed physical size, as a torch :class:`~torch.utils.data.Dataset`.

    Item ``i`` is a uint8 tensor ``(3, patch_px, patch_px)`` for spot ``obs_names[i]``. Each library image is opened
    as a source at construction (its size and pyramid levels, so border checks are known before any work; no
    pixel is decoded) and each item reads its crop by region. The Data layouts page gives the geometry, pyramid
    levels, resizing and padding. The dataset pickles without open files or memory maps (DataLoader workers
    reopen the images on first use).

    Parameters
    ----------
    adata
        Slide(s) in the agl-scverse layout: ``.obsm["spatial"]`` in full-resolution pixels, images and scale
        factors in ``.uns["spatial"][library_id]``.
    patch_px
        Side of the returned patch in pixels.
    patch_um
        Side of the tissue square covered by a patch, in µm.
    library_key
        ``.obs`` column telling slides apart; needed when ``uns["spatial"]`` holds several libraries (then
        ``"library_id"`` is used when present).
    spots
        Subset and order of spots: obs names, integer positions or a boolean mask. Default: all, in order.
    pad_mode
        ``"constant"`` (fill with ``pad_value``), ``"reflect"`` or ``"edge"``, for patch parts outside the image.
    pad_value
        Fill colour for ``pad_mode="constant"``: one or three values in 0..255 (default 255, white).
    min_inside
        Spots whose patch has less than this fraction of its area inside the image are "outside".
    on_outside
        ``"error"``: raise, listing them. ``"pad"``: keep them, padded, with a warning.
    allow_lowres
        Cut patches from the ``"hires"`` / ``"lowres"`` image when a library has no full-resolution image and that
        image is coarser than the patch's µm per pixel (``patch_um / patch_px``). Off by default: such patches are
        upsampled and lose detail (predictions get worse), so this raises and names the full-resolution source
        to give instead (``read_visium(fullres_image=...)``, ``metadata["source_image_path"]``, the SpatialData
        image element).

    Attributes
    ----------
    obs_names
        Spot names, in item order.
    spot_index
        Positions of the items' spots in ``adata``.
    library
        Library id of each item.
    inside_fraction
        Fraction of each patch inside its image (1 = fully inside).
    outside
        Names of spots below ``min_inside``.
    crop_side
        Crop side in pixels of the level read, per library (before resizing).
    level
        Pyramid level read per library (0 = full resolution of the image used).
    level_downsample
        Downsample factor of that level relative to level 0, per library.
    image_kind
        ``"fullres"``, ``"hires"``, ``"lowres"`` or ``"patches_h5"`` per library.
    source_um_per_px
        µm per pixel of the image level the patches are cut from, per library (the source resolution; patches
        carry detail down to ``max(source_um_per_px, patch_um / patch_px)``).

    Examples
    --------
    >>> import agl_scverse as agl
    >>> ds = agl.pp.SpotPatches(adata, patch_px=224, patch_um=112)  # doctest: +SKIP
    >>> ds[0].shape  # doctest: +SKIP
    torch.Size([3, 224, 224])
    """

    def __init__(
        self,
        adata: AnnData,
        patch_px: int = consts.DEFAULT_PATCH_PX,
        patch_um: float = consts.DEFAULT_PATCH_UM,
        library_key: str | None = None,
        spots: Any = None,
        pad_mode: str = "constant",
        pad_value: int | Sequence[int] = 255,
        min_inside: float = 0.5,
        on_outside: str = "error",
        allow_lowres: bool = False,
    ):
        if not isinstance(adata, AnnData):
            raise TypeError(f"SpotPatches expects an AnnData, got {type(adata).__name__}.")
        check_positive("patch_px", patch_px, integer=True)
        check_positive("patch_um", patch_um)
        patch_um = float(patch_um)
        check_choice("pad_mode", pad_mode, PAD_MODES)
        check_choice("on_outside", on_outside, ON_OUTSIDE)  # to drop spots, select the others with spots=...
        check_in_range("min_inside", min_inside, 0.0, 1.0)
        self.patch_px = int(patch_px)
        self.patch_um = patch_um
        self.pad_mode = pad_mode
        self.pad_value = as_pad_value(pad_value)
        self.min_inside = float(min_inside)
        self.on_outside = on_outside
        self.allow_lowres = bool(allow_lowres)

        library_key = _spatial.resolve_library_key(adata, library_key)
        self.library_key = library_key
        xy_all = check_spatial(adata)
        idx = resolve_spots(adata, spots)
        masks = _spatial.spot_masks(adata, library_key)
        lib_of = np.full(adata.n_obs, None, dtype=object)
        for lib, m in masks.items():
            lib_of[m] = lib
        libs_sel = lib_of[idx]
        if np.any(pd.isna(libs_sel)):
            bad = adata.obs_names[idx[pd.isna(libs_sel)]][:5].tolist()
            raise ValueError(
                f"{int(pd.isna(libs_sel).sum())} spots have no library in obs[{library_key!r}] (e.g. {bad}). "
                "Fill the column or leave those spots out with spots=..."
            )
        self.spot_index = idx
        self.obs_names = adata.obs_names[idx].copy()
        self.library = np.asarray(libs_sel, dtype=str)
        self.libraries = [lib for lib in masks if np.any(self.library == lib)]

        # Per-library source: pre-extracted HEST patches or an image source (read by region, never whole).
        self._sources: dict[str, ImageSource] = {}
        self._h5: dict[str, Any] = {}
        self._h5_pid: int | None = None
        self._h5_path: dict[str, str] = {}
        self.image_kind: dict[str, str] = {}
        self.crop_side: dict[str, int] = {}
        self.scale: dict[str, float] = {}
        self.microns_per_pixel: dict[str, float] = {}
        self.level: dict[str, int] = {}
        self.level_downsample: dict[str, float] = {}
        self.source_um_per_px: dict[str, float] = {}
        n = len(idx)
        self._box = np.zeros((n, 2), dtype=np.int64)  # x0, y0 in pixels of the level read
        self._frac = np.zeros((n, 2), dtype=np.float64)  # sub-pixel part of the crop's position (0: none)
        self._h5_row = np.full(n, -1, dtype=np.int64)
        self.inside_fraction = np.ones(n, dtype=float)
        for lib in self.libraries:
            sel = np.flatnonzero(self.library == lib)
            entry = _spatial.library_entry(adata, lib)
            h5_path = (entry.get(consts.METADATA, {}) or {}).get(consts.PATCHES_H5)
            if h5_path and HEST_PATCH_INDEX in adata.obs and abs(patch_um - HEST_PATCH_UM) < 1e-6:
                self._setup_h5(adata, lib, str(h5_path), sel)
                continue
            if h5_path and abs(patch_um - HEST_PATCH_UM) >= 1e-6:
                logg.info(
                    f"Library {lib!r}: HEST patches cover {HEST_PATCH_UM:g} µm, not {patch_um:g} µm; "
                    "cutting patches from the slide image instead."
                )
            self._setup_image(adata, lib, sel, xy_all[idx[sel]])

        low = self.inside_fraction < self.min_inside
        self.outside = self.obs_names[low]
        if low.any():
            first = self.outside[:10].tolist()
            msg = (
                f"{int(low.sum())} of {n} spots have less than {self.min_inside:.0%} of their {patch_um:g} µm patch "
                f"inside the image (first: {first})."
            )
            if on_outside == "error":
                raise ValueError(
                    msg + " Pass on_outside='pad' to keep them with padded borders "
                    f"(pad_mode={pad_mode!r}), or drop them, e.g. spots=~adata.obs_names.isin(<those ids>)."
                )
            logg.warning(msg + f" Keeping them, padded with pad_mode={pad_mode!r}.")
        n_part = int(np.sum((self.inside_fraction < 1.0) & ~low))
        if n_part:
            logg.info(f"{n_part} spots have patches partly outside the image; borders padded ({pad_mode!r}).")

    def _setup_image(self, adata: AnnData, lib: str, sel: np.ndarray, xy: np.ndarray) -> None:
        """Open the library's image, choose the pyramid level and place every crop on it."""
        src, scale, which = _spatial.get_image(adata, lib, warn=False)  # the resolution rule is below
        mpp = _spatial.microns_per_pixel(adata, lib)
        side_f = self.patch_um / mpp * scale
        if side_f < 1:
            raise ValueError(
                f"Library {lib!r}: a {self.patch_um:g} µm patch is {side_f:.2g} pixels of the {which} image "
                f"({mpp:.3g} µm per full-res pixel, scale {scale:.3g}); use a larger patch_um."
            )
        level = src.choose_level(mpp / scale, self.patch_um / self.patch_px)
        lv = src.levels[level]
        source_mpp = mpp / scale * lv.downsample
        patch_mpp = self.patch_um / self.patch_px
        if which != consts.FULLRES and source_mpp > patch_mpp * consts.LOWRES_TOLERANCE:
            msg = (
                f"Library {lib!r} has no full-resolution image, and its {which!r} image has {source_mpp:.3g} µm/px, "
                f"coarser than the patches' {patch_mpp:.3g} µm/px ({self.patch_um:g} µm in {self.patch_px} px): "
                "patches would be upsampled from it and lose detail."
            )
            if not self.allow_lowres:
                raise ValueError(
                    msg + " Give the full-resolution image (agl.io.read_visium(..., fullres_image=<the H&E the "
                    "spots refer to>), uns['spatial'][library_id]['metadata']['source_image_path'], or the full-res "
                    "image element of the SpatialData), or pass allow_lowres=True to use it anyway."
                )
            warnings.warn(msg + " Using it (allow_lowres=True).", UserWarning, stacklevel=3)
        W, H = lv.width, lv.height
        side = max(1, int(np.floor(side_f / lv.downsample + 0.5)))
        centres = xy * scale  # in level-0 pixels of the image used
        if level:  # pixel j of a level with downsample d spans level-0 pixels d*j .. d*j + d - 1
            d_xy = np.array([src.width / W, src.height / H])
            centres = (centres - (d_xy - 1) / 2.0) / d_xy
        need = patch_bytes(side, self.patch_px)
        if need > MAX_PATCH_BYTES:
            raise ValueError(
                f"Library {lib!r}: a {self.patch_um:g} µm patch is a {side} x {side} px crop of the {which} image "
                f"(level {level}, {mpp / scale * lv.downsample:.3g} µm/px), resized to {self.patch_px} px; cutting one "
                f"takes about {need / 2**30:.1f} GiB (the crop, its padded copy, the resize), over the "
                f"{MAX_PATCH_BYTES / 2**30:.0f} GiB limit (MAX_PATCH_BYTES of agl_scverse.pp._patches). Use a smaller "
                "patch_um or patch_px (spot patches cover ~100-200 µm: the default is 112 µm in 224 px)."
            )
        starts, frac = crop_origin(centres, side)
        self._box[sel] = starts
        self._frac[sel] = frac
        ix = np.clip(starts[:, 0] + side, 0, W) - np.clip(starts[:, 0], 0, W)
        iy = np.clip(starts[:, 1] + side, 0, H) - np.clip(starts[:, 1], 0, H)
        self.inside_fraction[sel] = (ix * iy) / float(side * side)
        self._sources[lib] = src
        self.image_kind[lib] = which
        self.crop_side[lib] = side
        self.scale[lib] = float(scale)
        self.microns_per_pixel[lib] = float(mpp)
        self.level[lib] = int(level)
        self.level_downsample[lib] = float(lv.downsample)
        self.source_um_per_px[lib] = float(source_mpp)
        if level:
            logg.info(
                f"Library {lib!r}: reading pyramid level {level} (downsample {lv.downsample:.3g}, "
                f"{mpp / scale * lv.downsample:.3g} µm/px) for {self.patch_um / self.patch_px:.3g} µm/px patches."
            )

    def _setup_h5(self, adata: AnnData, lib: str, path: str, sel: np.ndarray) -> None:
        import h5py

        if not Path(path).exists():
            raise FileNotFoundError(
                f"HEST patches of library {lib!r} not found at {path}. Move the file back or update "
                "uns['spatial'][library_id]['metadata']['patches_h5']."
            )
        with h5py.File(path, "r") as f:
            if "img" not in f:
                raise KeyError(f"HEST patch file {path} has no 'img' dataset (keys: {list(f)}).")
            shape, dtype = f["img"].shape, f["img"].dtype
        if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
            raise ValueError(f"HEST patches in {path} have shape {shape}; expected (n, side, side, 3).")
        if dtype != np.uint8:
            raise ValueError(f"HEST patches in {path} have dtype {dtype}; expected uint8.")
        rows = pd.to_numeric(adata.obs[HEST_PATCH_INDEX].iloc[self.spot_index[sel]], errors="coerce").to_numpy()
        if np.any(~np.isfinite(rows)) or np.any(rows < 0) or np.any(rows >= shape[0]):
            raise ValueError(
                f"obs[{HEST_PATCH_INDEX!r}] of library {lib!r} holds values outside 0..{shape[0] - 1} "
                f"(the rows of {path}); re-read the sample with agl.io."
            )
        self._h5_row[sel] = rows.astype(np.int64)
        self._h5_path[lib] = path
        self.image_kind[lib] = "patches_h5"
        self.crop_side[lib] = int(shape[1])
        self.scale[lib] = float("nan")
        self.microns_per_pixel[lib] = HEST_PATCH_UM / shape[1]
        self.source_um_per_px[lib] = HEST_PATCH_UM / shape[1]

    def _h5_patch(self, lib: str, row: int) -> np.ndarray:
        if self._h5_pid != os.getpid():  # an h5py handle must not cross a fork
            self._h5, self._h5_pid = {}, os.getpid()
        if lib not in self._h5:
            import h5py

            self._h5[lib] = h5py.File(self._h5_path[lib], "r")
        return np.asarray(self._h5[lib]["img"][row])

    def __len__(self) -> int:
        return len(self.spot_index)

    def _crop(self, i: int, extra: int = 0) -> np.ndarray:
        """Item ``i``'s crop from the source image (``extra`` pixels wider), padded at the border."""
        lib, (x0, y0) = self.library[i], (int(v) for v in self._box[i])
        side = self.crop_side[lib] + extra
        return crop_with_padding(self._sources[lib], x0, y0, side, self.pad_mode, self.pad_value, self.level[lib])

    def patch_array(self, i: int) -> np.ndarray:
        """Item ``i`` before resizing: ``(side, side, 3)`` uint8 crop from the source image (at its chosen level).

        A fractional centre's crop is the one-pixel-larger crop shifted by the fraction (:func:`subpixel_shift`);
        the item itself resamples once (offset and resize together).
        """
        if self._h5_row[i] >= 0:
            return self._h5_patch(self.library[i], int(self._h5_row[i]))
        fx, fy = (float(v) for v in self._frac[i])
        return self._crop(i) if fx == 0.0 and fy == 0.0 else subpixel_shift(self._crop(i, 1), fx, fy)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} patches")
        i = int(i) % len(self)
        if self._h5_row[i] < 0 and self._frac[i].any():  # a fractional centre: one resampling, offset and resize
            return torch.from_numpy(self._subpixel_patch(i)).permute(2, 0, 1).contiguous()
        crop = self.patch_array(i)
        t = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).contiguous()
        return resize_patch(t, self.patch_px)

    def _subpixel_patch(self, i: int) -> np.ndarray:
        """Item ``i`` of a spot with a fractional centre, as a ``(patch_px, patch_px, 3)`` uint8 array."""
        from PIL import Image

        side, (fx, fy) = self.crop_side[self.library[i]], (float(v) for v in self._frac[i])
        box = (fx, fy, fx + side, fy + side)
        out = Image.fromarray(self._crop(i, 1)).resize((self.patch_px,) * 2, Image.Resampling.BILINEAR, box=box)
        return np.array(out, dtype=np.uint8)  # a writable copy (torch.from_numpy)

    def __getstate__(self) -> dict:
        # Open h5 files are not pickled; image sources pickle without their open files or memory maps, and
        # workers reopen both on first use.
        state = self.__dict__.copy()
        state["_h5"] = {}
        state["_h5_pid"] = None
        return state

    def __repr__(self) -> str:
        kinds = ", ".join(
            f"{lib}: {k}" + (f" level {self.level[lib]}" if self.level.get(lib) else "")
            for lib, k in self.image_kind.items()
        )
        return (
            f"SpotPatches({len(self)} spots, {self.patch_px} px for {self.patch_um:g} µm, pad_mode={self.pad_mode!r}; "
            f"{kinds})"
        )

    def record(self) -> dict:
        """h5ad-serialisable description of how the patches were made (for ``.uns``)."""
        return {
            "patch_px": self.patch_px,
            "patch_um": self.patch_um,
            "pad_mode": self.pad_mode,
            "pad_value": [int(v) for v in self.pad_value],
            "min_inside": self.min_inside,
            "on_outside": self.on_outside,
            "resize": "torchvision resize, bilinear, antialias=True",
            "centres": "sub-pixel (bilinear shift of a one-pixel-larger crop)",
            "n_subpixel": int(np.sum(np.any(self._frac != 0.0, axis=1))),
            "image": {str(k): str(v) for k, v in self.image_kind.items()},
            "crop_side_px": {str(k): int(v) for k, v in self.crop_side.items()},
            "level": {str(k): int(v) for k, v in self.level.items()},
            "level_downsample": {str(k): float(v) for k, v in self.level_downsample.items()},
            "source_um_per_px": {str(k): float(v) for k, v in self.source_um_per_px.items()},
            "allow_lowres": self.allow_lowres,
            "n_padded": int(np.sum(self.inside_fraction < 1.0)),
            "n_outside": int(len(self.outside)),
        }


def _as_dataset(data: AnnData | SpotPatches, **kwargs) -> SpotPatches:
    if isinstance(data, SpotPatches):
        if kwargs:
            raise TypeError(f"Patch options {sorted(kwargs)} cannot be applied to an existing SpotPatches.")
        return data
    return SpotPatches(as_anndata(data), **kwargs)


def patch_loader(
    data: AnnData | SpotPatches,
    batch_size: int = 32,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    prefetch_factor: int = 2,
    **patch_kwargs,
) -> DataLoader:
    """A :class:`~torch.utils.data.DataLoader` of uint8 patch batches ``(B, 3, patch_px, patch_px)``.

    Parameters
    ----------
    data
        An AnnData (patches made with ``patch_kwargs``, see :class:`SpotPatches`) or a :class:`SpotPatches`.
    batch_size
        Patches per batch.
    shuffle
        Shuffle the spots.
    num_workers
        DataLoader worker processes (each reopens the slide images it needs and reads patches by region).
    seed
        Seed of the shuffling order.
    prefetch_factor
        Batches each worker prepares ahead (only with ``num_workers > 0``).

    Examples
    --------
    >>> loader = agl.pp.patch_loader(adata, batch_size=64, patch_px=224)  # doctest: +SKIP
    >>> x = agl.model.normalize(next(iter(loader)))  # doctest: +SKIP
    """
    ds = _as_dataset(data, **patch_kwargs)
    gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(
        ds,
        batch_size=int(batch_size),
        shuffle=shuffle,
        num_workers=int(num_workers),
        generator=gen,
        prefetch_factor=int(prefetch_factor) if int(num_workers) > 0 else None,
        persistent_workers=False,
    )


def iter_patch_batches(data: AnnData | SpotPatches, batch_size: int = 32, **patch_kwargs) -> Iterator[torch.Tensor]:
    """Iterate over uint8 patch batches in spot order, in this process (no DataLoader).

    Examples
    --------
    >>> for batch in agl.pp.iter_patch_batches(adata, batch_size=16, patch_px=64):  # doctest: +SKIP
    ...     print(batch.shape)
    """
    ds = _as_dataset(data, **patch_kwargs)
    for start in range(0, len(ds), int(batch_size)):
        yield torch.stack([ds[i] for i in range(start, min(start + int(batch_size), len(ds)))])


def extract_patches(
    data: AnnData | SpotPatches,
    patch_px: int = consts.DEFAULT_PATCH_PX,
    patch_um: float = consts.DEFAULT_PATCH_UM,
    library_key: str | None = None,
    spots: Any = None,
    pad_mode: str = "constant",
    pad_value: int | Sequence[int] = 255,
    min_inside: float = 0.5,
    on_outside: str = "error",
    allow_lowres: bool = False,
) -> np.ndarray:
    """All patches at once as a ``(n_spots, patch_px, patch_px, 3)`` uint8 array (for small data).

    Parameters are those of :class:`SpotPatches` (ignored when ``data`` already is one).

    Examples
    --------
    >>> patches = agl.pp.extract_patches(adata, patch_px=64, patch_um=112)  # doctest: +SKIP
    >>> patches.shape  # doctest: +SKIP
    (910, 64, 64, 3)
    """
    if isinstance(data, SpotPatches):
        ds = data
    else:
        ds = _as_dataset(
            data,
            patch_px=patch_px,
            patch_um=patch_um,
            library_key=library_key,
            spots=spots,
            pad_mode=pad_mode,
            pad_value=pad_value,
            min_inside=min_inside,
            on_outside=on_outside,
            allow_lowres=allow_lowres,
        )
    out = np.empty((len(ds), ds.patch_px, ds.patch_px, 3), dtype=np.uint8)
    for i in range(len(ds)):
        out[i] = ds[i].permute(1, 2, 0).numpy()
    return out
