"""Spot embeddings: an image encoder run over spot patches, the features cached in ``.obsm``."""

from __future__ import annotations

import collections
import contextlib
import copy
import json
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from anndata import AnnData
from scanpy import logging as logg
from torch import nn

from agl_scverse import _constants as consts
from agl_scverse import _distributed as dist
from agl_scverse._docs import d
from agl_scverse._legacy_keywords import EMBED_KEYWORDS, encoder_keywords
from agl_scverse._transaction import check_owned, restore_on_error
from agl_scverse._utils import resolve_device, show_progress
from agl_scverse.configs import EncoderConfig, as_encoder_config
from agl_scverse.encoders._factory import check_native_scale, get_encoder
from agl_scverse.encoders._modules import CallableEncoder
from agl_scverse.encoders._normalize import normalize
from agl_scverse.encoders._onnx_backend import select_backend, start_backend
from agl_scverse.encoders._record import encoder_record
from agl_scverse.encoders._registry import list_encoders
from agl_scverse.encoders._weights import weights_sha256
from agl_scverse.io._spatialdata import as_anndata, tool_return
from agl_scverse.train._data import index_batches_of, patch_batches
from agl_scverse.train._precision import Precision, resolve_precision

from ._patches import SpotPatches, check_patch_batch

__all__ = ["embed_patches"]


#: Accepted ``tta`` values of :func:`embed_patches`: 1 (off), 4 (quarter turns), 8 (quarter turns x flip).
TTA_CHOICES = (1, 4, 8)


def dihedral_views(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The first ``n`` of the 8 dihedral transforms of a (B, C, H, W) batch: 4 quarter turns, then flipped ones."""
    views = [x] + [torch.rot90(x, k, dims=(2, 3)) for k in range(1, min(n, 4))]  # only the views asked for
    if n > 4:
        flipped = torch.flip(x, dims=(3,))
        views += [torch.rot90(flipped, k, dims=(2, 3)) for k in range(n - 4)]
    return views[:n]


def _tta(tta: bool | int) -> int:
    n = {False: 1, True: 8}.get(tta, tta) if isinstance(tta, bool) else tta
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or int(n) not in TTA_CHOICES:
        raise ValueError(f"tta must be False, True (8 views) or one of {TTA_CHOICES}, got {tta!r}.")
    return int(n)


#: The encoder :func:`built_encoder` built last, by what built it (one kept; see there).
_BUILT: dict[tuple, tuple[nn.Module, dict[str, Any]]] = {}
#: Largest encoder (bytes of its tensors) :func:`built_encoder` keeps for the next call.
MAX_KEPT_ENCODER_BYTES = 1 << 30


def _build_key(encoder: Any, weights: Any, pretrained: bool, seed: int, encoder_kwargs: Any, strict: bool):
    """What fixes the module built from a timm name or preset (None where it may not: then it is not kept)."""
    if not isinstance(encoder, str) or pretrained or encoder.startswith("hf-hub:") or encoder in list_encoders():
        return None  # hub files, registered factories: built again each time
    try:
        kwargs = json.dumps(encoder_kwargs or {}, sort_keys=True)  # objects (layer classes): not kept
        file = None
        if weights is not None:
            path = Path(weights).expanduser().resolve()
            file = (str(path), weights_sha256(path))  # by content: a changed file is another key
    except (TypeError, ValueError, OSError):
        return None  # get_encoder says what is wrong
    return (encoder, file, int(seed), kwargs, bool(strict), torch.__version__)


def built_encoder(
    encoder: Any, weights: Any, pretrained: bool, seed: int, encoder_kwargs: Any, strict: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`get_encoder`, reusing the module built last from the same name, settings and weights file content."""
    key = _build_key(encoder, weights, pretrained, seed, encoder_kwargs, strict)
    if key is not None and key in _BUILT:
        module, info = _BUILT[key]
        return module, copy.deepcopy(info)
    module, info = get_encoder(
        encoder, weights=weights, pretrained=pretrained, seed=seed, encoder_kwargs=encoder_kwargs, strict=strict
    )
    _BUILT.clear()
    size = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    if key is not None and size <= MAX_KEPT_ENCODER_BYTES:
        _BUILT[key] = (module, copy.deepcopy(info))
    return module, info


#: Without DataLoader workers, one thread cuts (and normalises) the next batch of patches while the encoder runs the
#: current one. ``False`` cuts them serially in the calling thread (same features, bit for bit): a switch for
#: benchmarks that measure what the read-ahead buys (``benchmarks/speed/bench_encoder_backends.py``).
READ_AHEAD: bool = True


class ReadAhead:
    """Iterate over ``source`` with its next items made ahead in one background thread, as a context manager."""

    _END = object()

    def __init__(self, source: Iterator[Any], depth: int = 1, name: str = "agl-read-ahead"):
        self._source, self._depth = source, max(1, int(depth))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._ahead: collections.deque[Future] = collections.deque()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop the items not started, wait for the one being made, then close the source."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._ahead.clear()
        close = getattr(self._source, "close", None)  # a generator's own finally blocks run here
        if close is not None:
            close()

    def __iter__(self) -> ReadAhead:
        return self

    def __next__(self) -> Any:
        while len(self._ahead) < self._depth + 2:  # one in hand, one made, one being made (depth 1)
            self._ahead.append(self._pool.submit(next, self._source, self._END))
        item = self._ahead.popleft().result()  # the source's error is raised here
        if item is self._END:
            raise StopIteration
        return item


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
    precision: Precision | None = None,
    seed: int = 0,
    sampler: Any = None,
    progress: bool = True,
    backend: str = "torch",
    info: dict | None = None,
    tta: int = 1,
    read_ahead: bool | None = None,
) -> tuple[np.ndarray, dict]:
    """Features of the patches of ``ds`` (float32) and the record of how they were computed (precision, backend).

    ``read_ahead``: cut the next batch in a thread while the encoder runs (``None``: :data:`READ_AHEAD`).
    """
    from tqdm.auto import tqdm

    params = list(model.parameters()) + list(model.buffers())
    orig_device = params[0].device if params else None
    was_training = model.training
    prec = (precision or resolve_precision("auto", device)).for_module(model)
    resolved = select_backend(backend, device, prec.name, isinstance(model, CallableEncoder), prec.requested)
    # Workers each reopen the images (the dataset pickles without open files) and keep their own tile cache;
    # they are not kept alive between calls, and each holds at most prefetch_factor batches in flight.
    order = np.arange(len(ds)) if sampler is None else np.fromiter(iter(sampler), dtype=np.int64)
    n = len(order)
    batches = patch_batches(
        ds, index_batches_of(order, batch_size), num_workers=num_workers,
        prefetch_factor=prefetch_factor, pin_memory=device.type == "cuda", seed=seed,
    )  # fmt: skip
    if device.type == "cpu":  # normalised where they are cut (the same operations as on the caller's side)
        batches = (normalize(b, mean, std) for b in batches)
    # Without workers, one thread cuts (and normalises) batch i + 1 while the encoder runs batch i.
    read_ahead = READ_AHEAD if read_ahead is None else read_ahead
    ahead = ReadAhead(batches) if read_ahead and num_workers == 0 else contextlib.nullcontext(batches)
    out: np.ndarray | None = None
    pos = 0
    model.to(device).eval()
    converted, started, onnx = False, False, None
    try:
        with (
            ahead as stream,
            torch.inference_mode(),
            tqdm(total=n, desc=desc, unit="spot", disable=not progress or not dist.is_main()) as bar,
        ):
            for batch in stream:
                x = batch if device.type == "cpu" else normalize(batch.to(device, non_blocking=True), mean, std)
                if not started:  # the engine starts on real patches: an ONNX graph is checked against torch here
                    started = True
                    onnx = start_backend(resolved, backend, model, int(x.shape[-1]), x, device, info)
                    converted = onnx is None and prec.to_layout(model)
                y: torch.Tensor | None = None
                for view in dihedral_views(x, tta):  # the patch itself first; more views with tta > 1
                    if onnx is not None:
                        yv = _features(onnx(view), len(x)).float()
                    else:
                        with prec.autocast():
                            yv = _features(model(prec.image_batch(view)), len(x)).float()
                    y = yv if y is None else y + yv
                assert y is not None  # tta >= 1 views
                y = y / tta
                if out is None:
                    out = np.empty((n, y.shape[1]), dtype=np.float32)
                elif y.shape[1] != out.shape[1]:
                    raise ValueError(f"The encoder returned {out.shape[1]} features, then {y.shape[1]}.")
                out[pos : pos + len(x)] = y.detach().float().cpu().numpy()
                pos += len(x)
                bar.update(len(x))
    finally:
        prec.restore_layout(model, converted)
        model.train(was_training)
        if orig_device is not None:
            model.to(orig_device)
    assert out is not None and pos == n
    if onnx is not None:  # float32 in ONNX Runtime's own layout
        return out, {**prec.record(), "channels_last": False, **onnx.record(), "backend_requested": backend}
    return out, {**prec.record(), "backend": "torch", "backend_requested": backend}


def _encode_distributed(model: nn.Module, ds: SpotPatches, *args, **kw) -> tuple[np.ndarray, dict]:
    """:func:`_encode` under ``torchrun``: each rank embeds its ``DistributedSampler`` share, every rank gets all."""
    from torch.utils.data import DistributedSampler

    sampler: DistributedSampler[Any] = DistributedSampler(
        ds, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=False
    )
    local, record = _encode(model, ds, *args, **kw, sampler=sampler)  # type: ignore[misc]  # args end before it
    parts = dist.all_gather_object((np.asarray(list(iter(sampler)), dtype=np.int64), local))
    out = np.empty((len(ds), local.shape[1]), dtype=np.float32)
    for idx, feats in parts:
        out[idx] = feats
    return out, record


@encoder_keywords(*EMBED_KEYWORDS)
@d.dedent
def embed_patches(
    data: Any,
    encoder: EncoderConfig | Mapping[str, Any] | str | nn.Module | Callable | tuple[nn.Module, dict] = "resnet18",
    *,
    device: str = "auto",
    library_key: str | None = None,
    key_added: str | None = None,
    on_outside: Literal["error", "pad"] = "error",
    pad_mode: str = "constant",
    min_inside: float = 0.5,
    seed: int = 0,
    copy: bool = False,
    progress: bool | None = None,
) -> AnnData | None:
    """Embed spot-centred patches with an image encoder; cache the features in ``.obsm``.

    Patches of ``patch_um`` µm around each spot, resized to ``patch_px`` (see :class:`SpotPatches`), are
    normalised with the encoder's mean/std and run through the encoder in eval mode under ``torch.inference_mode``,
    in batches (a torch DataLoader), with a progress bar, in the precision and by the backend the encoder config
    asks for (timings on the Encoders page).

    Parameters
    ----------
    %(data)s
    encoder
        The encoder and how it runs: an :class:`~agl_scverse.EncoderConfig` (or a dict of its fields; each field is
        described there), or just the encoder (its ``encoder`` field): a preset (``"uni"``, ``"virchow2"``, ...; see
        :func:`agl_scverse.model.list_presets`), an ``"hf-hub:<org>/<model>"`` timm model, a registered name or any
        ``timm`` model (random init unless ``weights``/``pretrained``), a torch module, a tensor -> tensor callable,
        or a ``(module, info)`` pair from :func:`get_encoder`. The weights file's sha256 and every setting are
        recorded, so :func:`agl_scverse.tl.agl_predict` can check a slide's embedding against a model's. The old
        keywords (``weights=``, ``patch_px=``, ``precision=``, ...) still work for one release, with a
        ``FutureWarning`` giving the new spelling.
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
    %(library_key)s
    key_added
        ``.obsm`` key of the features. Default ``"X_agl_<encoder name>"``.
    on_outside
        ``"error"`` or ``"pad"``, for spots whose patch lies mostly outside the image (see :class:`SpotPatches`).
    pad_mode
        How a patch crossing the image border is padded, see :class:`SpotPatches`.
    min_inside
        A patch with less than this fraction inside the image is handled per ``on_outside``.
    seed
        Seed of a random-initialised encoder.
    %(copy)s
    %(progress)s

    Returns
    -------
    ``None`` (``copy=False``; a SpatialData input gets the results in its table) or a new AnnData
    (``copy=True``). Writes ``.obsm[key]`` (float32, spots x D) and ``.uns["agl_embeddings"][key]``: encoder name, weights
    path and sha256, patch and padding settings, the source resolution (``source_um_per_px`` and the image / level
    read per library), normalisation mean/std, feature_dim, the precision used (``precision``, ``channels_last``,
    ``precision_requested``), the engine (``backend``: ``"torch"`` or ``"onnx"``;
    ``backend_requested``; with ONNX Runtime its version, providers, threads and ``onnx_check_cosine``), ``tta``
    (views averaged), versions. Nothing is written when it fails.

    Notes
    -----
    Under ``torchrun`` (``torchrun --nproc_per_node N script.py``) every process embeds its share of the spots
    (a ``DistributedSampler``, one GPU each) and every process receives all the features: each writes them into its
    own AnnData; let rank 0 (``int(os.environ.get("RANK", 0)) == 0``) write files.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> enc = agl.EncoderConfig("densenet121", weights="densenet121.pth", patch_um=160.0)
    >>> agl.pp.embed_patches(adata, enc)  # doctest: +SKIP
    >>> adata.obsm["X_agl_densenet121"].shape  # doctest: +SKIP
    (910, 1024)
    """
    adata = as_anndata(data)
    cfg = as_encoder_config(encoder)
    n_views = _tta(cfg.tta)
    if key_added is not None and (not isinstance(key_added, str) or not key_added):
        raise ValueError(f"key_added must be a non-empty string, got {key_added!r}.")
    dev = resolve_device(device)
    prec = resolve_precision(cfg.precision, dev)  # checked before the encoder is built
    ds = SpotPatches(
        adata,
        patch_px=cfg.patch_px,
        patch_um=cfg.patch_um,
        library_key=library_key,
        pad_mode=pad_mode,
        min_inside=min_inside,
        on_outside=on_outside,
        allow_lowres=cfg.allow_lowres,
    )  # decodes nothing: the memory checks come before the encoder is built
    in_flight = max(1, cfg.num_workers * cfg.prefetch_factor)
    check_patch_batch(ds.patch_px, cfg.batch_size, in_flight, ahead=2 if cfg.num_workers == 0 else 0)  # ReadAhead
    model, info = built_encoder(
        cfg.encoder, cfg.weights, cfg.pretrained, seed,
        dict(cfg.encoder_kwargs) if cfg.encoder_kwargs is not None else None, cfg.strict,
    )  # fmt: skip
    check_native_scale(info, ds.patch_px, ds.patch_um)
    key = key_added or consts.embedding_key(info["name"])
    check_owned(adata, obsm=[key], uns=[consts.EMBED_UNS])  # before encoding: key_added="spatial" holds the coordinates
    feats, prec_record = (_encode_distributed if dist.init_from_env() else _encode)(
        model,
        ds,
        info["mean"],
        info["std"],
        cfg.batch_size,
        dev,
        cfg.num_workers,
        f"embedding ({info['name']})",
        prefetch_factor=cfg.prefetch_factor,
        precision=prec,
        seed=int(seed),
        progress=show_progress(progress),
        backend=cfg.backend,
        info=info,
        tta=n_views,
    )
    if not np.all(np.isfinite(feats)):
        bad = int((~np.isfinite(feats).all(axis=1)).sum())
        raise ValueError(f"The encoder produced NaN/inf features for {bad} spots; nothing was written.")
    info["feature_dim"] = int(feats.shape[1])
    record = encoder_record(
        info, **ds.record(), **prec_record, n_spots=int(feats.shape[0]), library_key=ds.library_key, tta=n_views
    )
    target = adata.copy() if copy else adata
    with restore_on_error(target, obsm=[key], uns=[consts.EMBED_UNS]):
        put_embedding(target, key, feats, {k: v for k, v in record.items() if v is not None})  # None is never stored
    logg.info(f"Added .obsm[{key!r}] ({feats.shape[0]} x {feats.shape[1]}) and .uns[{consts.EMBED_UNS!r}][{key!r}].")
    return tool_return(data, target, copy, obsm=[key], uns=[consts.EMBED_UNS])


def put_embedding(target: AnnData, key: str, features: np.ndarray, record: Mapping[str, Any] | None) -> None:
    """Write an embedding into ``.obsm[key]`` and its record into ``.uns["agl_embeddings"][key]``, keeping the others."""
    target.obsm[key] = features
    target.uns[consts.EMBED_UNS] = {**dict(target.uns.get(consts.EMBED_UNS) or {}), key: record}
