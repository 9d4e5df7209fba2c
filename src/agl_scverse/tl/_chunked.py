"""Predictions of a large grid written in chunks as they finish, so that a killed run resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
from anndata import AnnData
from scanpy import logging as logg
from tqdm.auto import tqdm

from agl_scverse import _constants as consts
from agl_scverse import _distributed as dist
from agl_scverse._constants import Keys, PredScale
from agl_scverse._legacy_keywords import PREDICT_KEYWORDS, encoder_keywords
from agl_scverse._utils import show_progress
from agl_scverse.configs import EncoderConfig, explicit_fields
from agl_scverse.model import AGLModel

from ._predict import PredictGenes, predict_core, predict_options, predictions_anndata

__all__ = ["predict_chunked"]

MANIFEST, TEMPLATE = "manifest.json", "template.h5ad"


def _model_digest(model: AGLModel) -> str:
    """sha256 of the model's config and of its network's weights (a fitted, unsaved model included)."""
    h = hashlib.sha256(json.dumps(model.config, sort_keys=True, default=str).encode())
    for name, t in sorted(model.net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _grid_digest(grid: AnnData) -> str:
    h = hashlib.sha256(np.ascontiguousarray(grid.obsm[consts.SPATIAL_KEY], dtype=np.float64).tobytes())
    h.update("\n".join(map(str, grid.obs_names)).encode())
    return h.hexdigest()


def _save_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@encoder_keywords(*PREDICT_KEYWORDS)
def predict_chunked(
    grid: AnnData,
    model: AGLModel | str | Path,
    out_dir: str | Path,
    *,
    chunk_size: int = 4096,
    genes: PredictGenes | Sequence[str] = "selected",
    scale: PredScale = "model",
    encoder: EncoderConfig | Mapping[str, Any] | Any = None,
    key_added: str = consts.DEFAULT_KEY,
    device: str = "auto",
    batch_size: int = 512,
    progress: bool | None = None,
) -> AnnData:
    """:func:`~agl_scverse.tl.predict_anndata` over a large grid, chunk by chunk, each chunk saved as it finishes.

    The same prediction path as :func:`~agl_scverse.tl.agl_predict` and :func:`~agl_scverse.tl.predict_anndata`,
    run on one chunk of spots at a time.

    ``out_dir`` receives ``manifest.json`` (the model's digest: its config and weights; the grid's: spot centres
    and names; the chunk size and the prediction arguments), ``template.h5ad`` (the genes and run records of the
    output, no spots) and one ``part_<index>.npy`` of predictions per chunk, each written through a temporary
    file and renamed, so a killed run leaves only whole chunks. Run again with the same arguments, it skips the
    chunks already there and computes the rest; a folder holding chunks of another model, grid or arguments is
    refused.

    Under ``torchrun`` (``torchrun --nproc_per_node N script.py``) each chunk's patches are embedded by all the
    processes, each a share (as :func:`~agl_scverse.pp.embed_patches` does), rank 0 writes the files, and every rank
    returns the same AnnData: ``out_dir`` must be a folder every process sees (one machine, or a shared file system).

    Parameters
    ----------
    grid
        Spots to predict, e.g. from :func:`agl_scverse.pp.spot_grid`.
    model
        A fitted :class:`~agl_scverse.model.AGLModel` or its directory.
    out_dir
        Folder of the chunks (created).
    chunk_size
        Spots per chunk.
    genes
        The model's genes to predict, as in :func:`~agl_scverse.tl.predict_anndata` (default: the selected ones).
    scale
        Scale of the predictions (``"model"`` or ``"log1p_cp10k"``), as in :func:`~agl_scverse.tl.predict_anndata`.
    encoder
        How the image encoder runs: an :class:`~agl_scverse.EncoderConfig` or a dict of its fields, e.g.
        ``{"weights": "w.pth", "num_workers": 4}``, as in :func:`~agl_scverse.tl.predict_anndata`.
    key_added
        Prefix of the keys of the output's run records.
    device
        Torch device: ``"auto"`` (default: CUDA when available), ``"cpu"`` (bit-for-bit reproducible), ...
    batch_size
        Spots per forward pass (a seed ensemble's spread is not kept).
    progress
        Progress bar over the chunks (``None``: follow scanpy's verbosity).

    Returns
    -------
    The AnnData :func:`~agl_scverse.tl.predict_anndata` returns, without the embedding (``.obsm`` holds ``"spatial"`` only, and
    ``.uns`` the grid's ``"spatial"`` and ``"agl_grid"`` beside the run records).

    Examples
    --------
    >>> import agl_scverse as agl
    >>> grid = agl.pp.spot_grid(agl.io.read_he_image("slide.ome.tif"))  # doctest: +SKIP
    >>> pred = agl.tl.predict_chunked(grid, "my_model", "slide_chunks", chunk_size=2048)  # doctest: +SKIP
    """
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size is {chunk_size!r}; it must be a positive number of spots.")
    chunk_size = int(chunk_size)
    if grid.n_obs == 0:
        raise ValueError("The grid has no spots.")
    model = AGLModel.coerce(model)
    opts = predict_options(model, encoder=encoder, device=device, batch_size=batch_size, scale=scale, spread=False)
    given = explicit_fields(encoder)
    args = {  # what the values depend on (not the workers)
        "genes": genes, "scale": scale, "key_added": key_added, "batch_size": batch_size,
        **{k: v for k, v in given.items() if k not in ("num_workers", "prefetch_factor", "batch_size")},
    }  # fmt: skip
    out_dir = Path(out_dir)
    manifest = {
        "model_digest": _model_digest(model),
        "grid_digest": _grid_digest(grid),
        "n_spots": int(grid.n_obs),
        "chunk_size": chunk_size,
        "predict_kwargs": {k: str(v) for k, v in sorted(args.items())},
    }
    mpath = out_dir / MANIFEST
    dist.init_from_env()  # joins torchrun's process group; nothing in a plain python process
    main = dist.is_main()
    if mpath.is_file():
        old = json.loads(mpath.read_text())
        diff = [k for k in manifest if old.get(k) != manifest[k]]
        if diff:
            raise ValueError(
                f"{out_dir} holds predictions of another run ({', '.join(diff)} differ); pass a new out_dir or "
                "delete that folder."
            )
    elif main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _save_atomic(mpath, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    starts = range(0, grid.n_obs, chunk_size)
    parts = [out_dir / f"part_{i:06d}.npy" for i in range(len(starts))]
    todo = dist.broadcast_object([i for i, p in enumerate(parts) if not p.is_file()])  # rank 0's view: every rank
    if len(todo) < len(parts) and main:
        logg.info(f"predict_chunked: {len(parts) - len(todo)} of {len(parts)} chunks already in {out_dir}; resuming")
    for i in tqdm(todo, desc="grid chunks", disable=not show_progress(progress) or not main):
        a = starts[i]
        sub = grid[a : a + chunk_size].copy()
        X, _, _, pred_genes = predict_core(sub, model, into=None, genes=genes, **{**opts, "progress": False})
        X = np.asarray(X.compute() if hasattr(X, "compute") else X, dtype=np.float32)
        if not main:  # rank 0 writes; the others took their share of the embedding
            continue
        if not (out_dir / TEMPLATE).is_file():
            pred = predictions_anndata(
                AnnData(obs=sub.obs[[]]), model, Keys(key_added), X, pred_genes, opts["scale"], genes
            )
            template = AnnData(var=pred.var.copy(), uns=dict(pred.uns))
            _save_atomic(out_dir / TEMPLATE, template.write_h5ad)
        _save_atomic(parts[i], lambda p, X=X: np.save(p, X))
    dist.barrier()  # every chunk is on disk before any rank reads them
    template = ad.read_h5ad(out_dir / TEMPLATE)
    X = np.concatenate([np.load(p) for p in parts], axis=0)
    out = AnnData(X=X, obs=grid.obs.copy(), var=template.var.copy(), uns=dict(template.uns))
    out.obsm[consts.SPATIAL_KEY] = np.asarray(grid.obsm[consts.SPATIAL_KEY]).copy()
    for key in (consts.SPATIAL_KEY, "agl_grid"):
        if key in grid.uns:
            out.uns[key] = grid.uns[key]
    if main:
        logg.info(f"predict_chunked: {out.n_obs} spots x {out.n_vars} genes from {len(parts)} chunks in {out_dir}")
    return out
