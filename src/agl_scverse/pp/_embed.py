"""Spot embeddings: run an image encoder over spot patches and cache the features in ``.obsm``.

The pieces: :class:`~agl_scverse.pp.SpotPatches` cuts the patches, :func:`agl_scverse.model.get_encoder` builds the
encoder and says how to normalise its input (:func:`agl_scverse.pp.normalize` with ``info["mean"]``,
``info["std"]``); the fine-tune trainer uses the same pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anndata import AnnData
from scanpy import logging as logg
from torch import nn
from torch.utils.data import DataLoader

from agl_scverse import _constants as K
from agl_scverse._docs import d
from agl_scverse._transaction import restore_on_error
from agl_scverse._utils import resolve_device
from agl_scverse._validate import check_positive
from agl_scverse.io._spatialdata import as_anndata, update_table
from agl_scverse.model._encoders import encoder_record, get_encoder, normalize

from ._patches import SpotPatches, check_patch_batch

__all__ = ["embed_patches"]


# ------------------------------------------------------------------------------------------------ inference
def _features(y: Any, batch: int) -> torch.Tensor:
    if isinstance(y, tuple | list) and y and isinstance(y[0], torch.Tensor):
        y = y[0]
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"The encoder returned {type(y).__name__}; it must return a (B, D) tensor.")
    if y.ndim == 1 and batch == 1:
        y = y[None]
    if y.ndim != 2 or y.shape[0] != batch:
        raise ValueError(
            f"The encoder returned shape {tuple(y.shape)} for a batch of {batch}; it must return (B, D) features. "
            "Add global pooling (timm models built by name already pool)."
        )
    return y


def _encode(
    model: nn.Module,
    ds: SpotPatches,
    mean,
    std,
    batch_size: int,
    device,
    num_workers: int,
    desc: str,
    prefetch_factor: int = 2,
) -> np.ndarray:
    from tqdm.auto import tqdm

    params = list(model.parameters()) + list(model.buffers())
    orig_device = params[0].device if params else None
    was_training = model.training
    # Workers each reopen the images (the dataset pickles without open files) and keep their own tile cache;
    # they are not kept alive between calls, and each holds at most prefetch_factor batches in flight.
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=int(prefetch_factor) if num_workers > 0 else None,
        persistent_workers=False,
    )
    out: np.ndarray | None = None
    pos = 0
    model.to(device).eval()
    try:
        with torch.inference_mode(), tqdm(total=len(ds), desc=desc, unit="spot") as bar:
            for batch in loader:
                x = normalize(batch.to(device, non_blocking=True), mean, std)
                y = _features(model(x), len(batch))
                if out is None:
                    out = np.empty((len(ds), y.shape[1]), dtype=np.float32)
                elif y.shape[1] != out.shape[1]:
                    raise ValueError(f"The encoder returned {y.shape[1]} features, then {out.shape[1]}.")
                out[pos : pos + len(batch)] = y.detach().float().cpu().numpy()
                pos += len(batch)
                bar.update(len(batch))
    finally:
        model.train(was_training)
        if orig_device is not None:
            model.to(orig_device)
    assert out is not None and pos == len(ds)
    return out


@d.dedent
def embed_patches(
    data: Any,
    encoder: str | nn.Module | Callable | tuple[nn.Module, dict] = "resnet18",
    weights: str | Path | None = None,
    pretrained: bool = False,
    patch_px: int = K.DEFAULT_PATCH_PX,
    patch_um: float = K.DEFAULT_PATCH_UM,
    batch_size: int = 32,
    device: str = "auto",
    library_key: str | None = None,
    key_added: str | None = None,
    on_outside: str = "error",
    num_workers: int = 0,
    copy: bool = False,
    *,
    pad_mode: str = "constant",
    min_inside: float = 0.5,
    seed: int = 0,
    prefetch_factor: int = 2,
    allow_lowres: bool = False,
) -> AnnData | None:
    """Embed spot-centred patches with an image encoder; cache the features in ``.obsm``.

    Patches of ``patch_um`` µm around each spot, resized to ``patch_px`` (see :class:`SpotPatches`), are
    normalised with the encoder's mean/std and run through the encoder in eval mode under
    ``torch.inference_mode``, in batches, with a progress bar.

    Parameters
    ----------
    %(data)s
    encoder
        Encoder name (registered or any ``timm`` model, random init unless ``weights``/``pretrained``), a torch
        module, a tensor -> tensor callable, or a ``(module, info)`` pair from :func:`get_encoder`.
    weights
        Local state-dict file for the encoder (see :func:`load_weights`); its sha256 is recorded.
    pretrained
        Download timm's pretrained weights (needs the model hub; off by default).
    patch_px, patch_um
        Patch side in pixels and in µm.
    batch_size
        Patches per forward pass.
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
    %(library_key)s
    key_added
        ``.obsm`` key of the features. Default ``"X_agl_<encoder name>"``.
    on_outside
        ``"error"`` or ``"pad"``, for spots whose patch lies mostly outside the image (see :class:`SpotPatches`).
    num_workers
        DataLoader workers cutting patches (each reopens the slide images and reads its patches by region; the
        features are the same as with 0).
    %(copy)s
    pad_mode, min_inside
        Border handling, see :class:`SpotPatches`.
    seed
        Seed of a random-initialised encoder.
    prefetch_factor
        Batches each worker prepares ahead (with ``num_workers > 0``); memory grows with
        ``num_workers * prefetch_factor * batch_size`` patches.
    allow_lowres
        Cut patches from a ``"hires"`` image coarser than the patches when a library has no full-resolution image
        (refused by default, see :class:`SpotPatches`). The source resolution (µm per pixel of the image level
        read, per library) is recorded either way (``source_um_per_px``), and :func:`agl_scverse.tl.agl_predict`
        compares it with the model's.

    Returns
    -------
    ``None`` (``copy=False``; a SpatialData input gets the results in its table) or a new AnnData
    (``copy=True``). Writes ``.obsm[key]`` (float32, spots x D) and ``.uns["agl_embeddings"][key]``: encoder name, weights
    path and sha256, patch and padding settings, the source resolution (``source_um_per_px`` and the image / level
    read per library), normalisation mean/std, feature_dim, versions. Nothing is
    written when it fails.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> agl.pp.embed_patches(adata, encoder="densenet121", weights="densenet121.pth")  # doctest: +SKIP
    >>> adata.obsm["X_agl_densenet121"].shape  # doctest: +SKIP
    (910, 1024)
    """
    adata = as_anndata(data)
    check_positive("batch_size", batch_size, integer=True)
    check_positive("num_workers", num_workers, integer=True, allow_zero=True)
    check_positive("prefetch_factor", prefetch_factor, integer=True)
    if key_added is not None and (not isinstance(key_added, str) or not key_added):
        raise ValueError(f"key_added must be a non-empty string, got {key_added!r}.")
    dev = resolve_device(device)
    ds = SpotPatches(
        adata,
        patch_px=patch_px,
        patch_um=patch_um,
        library_key=library_key,
        pad_mode=pad_mode,
        min_inside=min_inside,
        on_outside=on_outside,
        allow_lowres=allow_lowres,
    )  # decodes nothing: the memory checks come before the encoder is built
    check_patch_batch(ds.patch_px, int(batch_size), max(1, int(num_workers) * int(prefetch_factor)))
    model, info = get_encoder(encoder, weights=weights, pretrained=pretrained, seed=seed)
    key = key_added or K.embedding_key(info["name"])
    feats = _encode(
        model,
        ds,
        info["mean"],
        info["std"],
        int(batch_size),
        dev,
        int(num_workers),
        f"embedding ({info['name']})",
        prefetch_factor=int(prefetch_factor),
    )
    if not np.all(np.isfinite(feats)):
        bad = int((~np.isfinite(feats).all(axis=1)).sum())
        raise ValueError(f"The encoder produced NaN/inf features for {bad} spots; nothing was written.")
    info["feature_dim"] = int(feats.shape[1])
    record = encoder_record(info, **ds.record(), n_spots=int(feats.shape[0]), library_key=ds.library_key)
    target = adata.copy() if copy else adata
    store = dict(target.uns.get(K.EMBED_UNS, {}) or {})
    store[key] = {k: v for k, v in record.items() if v is not None}  # None is never stored
    with restore_on_error(target, obsm=[key], uns=[K.EMBED_UNS]):
        target.obsm[key] = feats
        target.uns[K.EMBED_UNS] = store
    logg.info(f"Added .obsm[{key!r}] ({feats.shape[0]} x {feats.shape[1]}) and .uns[{K.EMBED_UNS!r}][{key!r}].")
    if copy:
        return target
    if target is not data:  # a SpatialData: write into its table
        update_table(data, target, obsm=[key], uns=[K.EMBED_UNS])
    return None
