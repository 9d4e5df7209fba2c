"""The fitted model: a network and a JSON-able config, saved atomically to a directory and checked whole at load."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from scanpy import logging as logg
from torch import nn

from agl_scverse import _constants as consts
from agl_scverse._modeldir import (
    CONFIG_NAME,
    MODEL_FILES,
    WEIGHTS_NAME,
    atomic_replace,
    recover,
    remove_stale,
    writer_lock,
)
from agl_scverse._serialize import to_json
from agl_scverse._utils import resolve_device, sha256_file
from agl_scverse._validate import check_choice
from agl_scverse.encoders._factory import get_encoder
from agl_scverse.encoders._record import record_kwargs
from agl_scverse.train._data import index_batches_of, patch_batches
from agl_scverse.train._inference import array_batches, forward
from agl_scverse.train._precision import resolve_precision

from ._heads import EmbeddingEnsemble, EmbeddingHead, FinetuneNet
from ._schema import (
    DIGEST_FIELD,
    FORMAT_VERSION,
    MAX_CONFIG_BYTES,
    check_digest,
    check_weights_header,
    config_digest,
    expected_shapes,
    parse_config,
    upgrade_config,
    validate_config,
)

__all__ = [
    "AGLModel",
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "build_network",
    "check_model",
    "read_config",
    "upgrade_config",
]


#: How often :meth:`AGLModel.load` reads again when a save replaced the model while it was reading.
LOAD_ATTEMPTS = 10
_DIR_FD = os.open in os.supports_dir_fd  # opening files relative to a folder handle (POSIX)


def _read_generation(path: Path) -> tuple[bytes, bytes, tuple[int, int]]:
    """``config.json`` and ``model.safetensors`` of one generation of ``path`` (one folder handle), its identity."""
    dfd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        st = os.fstat(dfd)
        out = []
        for name, limit in ((CONFIG_NAME, MAX_CONFIG_BYTES + 1), (WEIGHTS_NAME, -1)):
            flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)  # a FIFO in place of a file must not block
            fd = os.open(name, flags, dir_fd=dfd) if _DIR_FD else os.open(path / name, flags)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise ValueError(f"{path / name} is not a regular file; refusing to load this model.")
            with os.fdopen(fd, "rb") as fh:
                out.append(fh.read(limit))
    finally:
        os.close(dfd)
    return out[0], out[1], (st.st_dev, st.st_ino)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def check_model(path: Path, config_bytes: bytes, weights: bytes | None) -> dict:
    """The checked config (digest, weights' sha256 and header shapes) of a model's files; ``ValueError`` if not.

    ``weights=None`` checks the config only. Allocates no network.
    """
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    raw = parse_config(config_bytes, where=str(cfg_path))
    config = validate_config(upgrade_config(raw), where=str(cfg_path))
    if config.get("format_version", 1) >= 4:
        check_digest(raw, where=str(cfg_path))
    if weights is None:
        return config
    recorded = config.get("weights_sha256")
    if recorded is None:
        logg.warning(
            f"{path} was saved in format version {config.get('format_version', 1)}, which records no sha256 of "
            f"{WEIGHTS_NAME}; its integrity cannot be checked. Save it again to record one."
        )
    elif (actual := hashlib.sha256(weights).hexdigest()) != recorded:
        raise ValueError(
            f"{w_path} is damaged or was changed: its sha256 is {actual}, config.json records "
            f"weights_sha256 {recorded}; refusing to load this model."
        )
    check_weights_header(w_path, expected_shapes(build_network, config), weights)
    return config


def read_config(path: Path, check_weights: bool = True) -> dict:
    """The checked config of the model directory ``path`` (see :func:`check_model`); one generation is read."""
    cfg, weights, _ = _read_generation(Path(path))
    return check_model(Path(path), cfg, weights if check_weights else None)


def _state_dict(path: Path, weights: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a checked weights file; refuses NaN or infinite values, naming the tensors."""
    from safetensors.torch import load

    try:
        state = load(weights)
    except Exception as err:  # safetensors' own error type
        raise ValueError(
            f"{path / WEIGHTS_NAME} is not a readable safetensors file ({err}); refusing to load this model."
        ) from err
    if bad := non_finite(state):
        raise ValueError(
            f"{path / WEIGHTS_NAME} holds NaN or infinite values in tensor {', '.join(map(repr, bad[:8]))}"
            f"{f' ({len(bad)} tensors)' if len(bad) > 8 else ''}; a trained network never does, so it would write "
            "NaN predictions. Refusing to load this model: fit it again."
        )
    return state


#: Buffers whose infinite values mean "unbounded" (the clipping range of an output never seen in training).
UNBOUNDED = ("out_lo", "out_hi")


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding NaN, or infinite values outside the :data:`UNBOUNDED` clipping bounds."""
    bad = []
    for k, v in state.items():
        if not v.is_floating_point():
            continue
        ok = ~torch.isnan(v) if k.rsplit(".", 1)[-1] in UNBOUNDED else torch.isfinite(v)
        if not bool(ok.all()):
            bad.append(k)
    return bad


def _is_intact(path: Path) -> bool:
    """Whether ``path`` holds a model that :meth:`AGLModel.load` accepts."""
    if not all((path / n).is_file() for n in MODEL_FILES):
        return False
    try:
        cfg, weights, _ = _read_generation(path)
        check_model(path, cfg, weights)
        _state_dict(path, weights)
    except (OSError, ValueError):
        return False
    return True


class AGLModel:
    """A trained AGL network with everything needed to reuse it on new slides.

    Parameters
    ----------
    net
        The trained network (:class:`~agl_scverse.model.EmbeddingHead` or :class:`~agl_scverse.model.FinetuneNet`).
    config
        JSON-able dict. Keys used by the package: ``genes`` (output order), ``roles`` (``"target"`` /
        ``"auxiliary"`` per output gene), ``weights`` (mask weight per output gene), ``method``, ``mode``,
        ``transform``, ``embedding_key``, ``encoder`` (name, weights_sha256, weights_path, patch_px, patch_um;
        ``weights_path`` is a record, never opened), ``net`` (constructor arguments), ``k``, ``threshold``,
        ``prior``, ``prior_ranks``, ``hyperparameters``, ``versions``. :meth:`save` adds ``format_version`` and
        ``weights_sha256``; the config must pass :func:`~agl_scverse.model._schema.validate_config`.

    Examples
    --------
    >>> import numpy as np
    >>> from agl_scverse.model import EmbeddingHead
    >>> net = EmbeddingHead(4, 2, hidden=(3,))
    >>> m = AGLModel(net, {"genes": ["a", "b"], "roles": ["target", "auxiliary"], "weights": [1.0, 1.0]})
    >>> m.predict(np.zeros((5, 4))).shape, m.targets
    ((5, 2), ['a'])
    """

    def __init__(self, net: nn.Module, config: dict):
        self.net = net.eval()
        self.config = to_json(dict(config))
        if "net" not in self.config and callable(net_config := getattr(net, "config", None)):
            self.config["net"] = net_config()
        n_out = getattr(net, "n_out", None)
        if n_out is not None and len(self.genes) != n_out:
            raise ValueError(f"config lists {len(self.genes)} genes but the network outputs {n_out}.")

    @property
    def genes(self) -> list[str]:
        """Genes in the network's output order (targets first)."""
        return list(self.config.get("genes", []))

    @property
    def roles(self) -> list[str]:
        """Role of every output gene (``"target"`` or ``"auxiliary"``)."""
        return list(self.config.get("roles", []))

    @property
    def targets(self) -> list[str]:
        """Target genes, in output order."""
        return [g for g, r in zip(self.genes, self.roles) if r == "target"]

    @property
    def weights(self) -> np.ndarray:
        """Mask weight of every output gene (1 for targets)."""
        return np.asarray(self.config.get("weights", [1.0] * len(self.genes)), dtype=float)

    @property
    def predicted_genes(self) -> list[str]:
        """Targets and selected auxiliaries (weight > 0.5), the genes whose outputs were trained."""
        return [g for g, w in zip(self.genes, self.weights) if w > 0.5]

    @property
    def method(self) -> str | None:
        """Training method (``"pgl"``, ``"agl"``, ``"topk"`` or ``"dkgsb"``)."""
        return self.config.get("method")

    @property
    def mode(self) -> str:
        """``"embedding"`` (a head on cached features) or ``"finetune"`` (encoder and head)."""
        return self.config.get("mode", "embedding")

    @property
    def k(self) -> int | None:
        """Number of auxiliary genes used (selected by DkGSB, or all of them for AGL-all / top-k)."""
        return self.config.get("k")

    @property
    def threshold(self) -> float | None:
        """DkGSB's learned threshold on the prior ranks (None for the other methods)."""
        return self.config.get("threshold")

    @property
    def n_members(self) -> int:
        """Number of networks averaged (``agl_fit(n_seeds=...)``; 1 for a single network)."""
        return int(getattr(self.net, "n_members", 1))

    def members(self) -> list[AGLModel]:
        """One model per network of a seed ensemble (sharing its tensors and config); ``[self]`` otherwise."""
        if self.n_members == 1 or not isinstance(self.net, EmbeddingEnsemble):
            return [self]
        return [AGLModel(m, {**self.config, "net": m.config()}) for m in self.net.heads()]

    def __repr__(self) -> str:
        n_t = len(self.targets)
        ens = f", n_members={self.n_members}" if self.n_members > 1 else ""
        return (
            f"AGLModel(method={self.method!r}, mode={self.mode!r}, targets={n_t}, "
            f"auxiliaries={len(self.genes) - n_t}, k={self.k}{ens})"
        )

    def predict(
        self,
        features,
        batch_size: int = 512,
        columns: np.ndarray | None = None,
        *,
        device: str = "auto",
        precision: consts.Precision = "auto",
        num_workers: int = 0,
        prefetch_factor: int = 2,
        backend: consts.Backend = "auto",
    ) -> np.ndarray:
        """Predictions (transformed scale, e.g. ``log1p`` counts) for every output gene, float32.

        Parameters
        ----------
        features
            Embedding mode: ``(n_spots, n_features)`` array. Fine-tune mode: ``(n_spots, H, W, 3)`` uint8 patches
            (or a torch Dataset yielding patches).
        batch_size
            Spots per forward pass.
        columns
            Positions (in :attr:`genes`) of the only outputs to compute, in that order (default: all).
        device
            Torch device of the forward passes: ``"auto"`` (default: CUDA when available, else CPU; the default of
            every function of the package), ``"cpu"`` (bit-for-bit reproducible), ``"cuda"``, ... The network is
            moved back to where it was afterwards.
        precision
            Fine-tune mode: how the backbone runs (``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"``, see
            :func:`agl_scverse.pp.embed_patches`); the output layer runs in float32. The
            embedding-mode head always runs in float32.
        num_workers
            Fine-tune mode with a patch Dataset: DataLoader workers cutting the patches (same predictions with any
            number).
        prefetch_factor
            Batches each worker prepares ahead.
        backend
            ``"auto"`` or ``"torch"`` (``"onnx"``, for frozen encoders, is refused in fine-tune mode; the
            embedding-mode head runs in torch).
        """
        check_choice("backend", backend, consts.BACKENDS)
        if self.mode != "embedding" and backend not in ("auto", "torch"):
            raise ValueError(
                f"backend={backend!r} runs a frozen encoder (embedding mode); this fine-tuned model's network runs "
                "in torch: use backend='auto' or 'torch'."
            )
        home = next(self.net.parameters(), torch.empty(0)).device  # where the network goes back to
        dev = resolve_device(device)
        self.net.to(dev)
        try:
            return self._predict_on(dev, features, batch_size, columns, precision, num_workers, prefetch_factor)
        finally:
            self.net.to(home)

    def _predict_on(self, device, features, batch_size, columns, precision, num_workers, prefetch_factor):
        if self.mode == "embedding":
            batches = array_batches(features, batch_size, float_input=True)
            return forward(self.net, batches, len(self.genes), calibrated=True, cols=columns)
        prec = resolve_precision(precision, device, self.net)
        if isinstance(features, torch.utils.data.Dataset):
            batches = patch_batches(
                features, index_batches_of(np.arange(len(features)), batch_size), num_workers=num_workers,
                prefetch_factor=prefetch_factor, pin_memory=device.type == "cuda",
            )  # fmt: skip
        else:
            batches = array_batches(features, batch_size, float_input=False)
        converted = prec.to_layout(self.net)
        try:
            with prec.autocast():
                images = (prec.image_batch(x) for x in batches)
                return forward(self.net, images, len(self.genes), calibrated=True, cols=columns)
        finally:
            prec.restore_layout(self.net, converted)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the model to directory ``path`` atomically (temp dir beside it, then rename).

        Parameters
        ----------
        path
            Target directory (must not exist unless ``overwrite=True``).
        overwrite
            Replace an existing model directory (one holding only ``config.json`` and ``model.safetensors``,
            or an empty one); the old one is removed only after the new one is in place. Anything else at
            ``path`` (a file, a link, a folder with other entries) is refused with ``FileExistsError``.

        Returns
        -------
        The path written.

        Raises
        ------
        FileExistsError
            ``path`` exists and ``overwrite`` is False, or it is not a model directory.
        ValueError
            The config is not one :meth:`load` would accept (nothing is written).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with writer_lock(path):  # saves to one folder take turns: none deletes another's temporary
            recover(path, _is_intact)  # a model an interrupted save left beside path counts as being at path
            remove_stale(path)
            return atomic_replace(path, self._write, overwrite)

    def _write(self, directory: Path) -> None:
        """Write ``model.safetensors`` and ``config.json`` (format version, weights sha256, digest) into ``directory``."""
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        if bad := non_finite(state):
            raise ValueError(
                f"The network holds NaN or infinite values in tensor {', '.join(map(repr, bad[:8]))}; refusing to "
                "save a model that would predict NaN."
            )
        cfg = {**self.config, "format_version": FORMAT_VERSION, "weights_sha256": sha256_file(directory / WEIGHTS_NAME)}
        cfg.pop(DIGEST_FIELD, None)
        cfg = to_json(cfg)
        cfg[DIGEST_FIELD] = config_digest(cfg)
        cfg = validate_config(cfg, where="AGLModel.config", verb="save")
        with open(directory / CONFIG_NAME, "w") as fh:
            json.dump(cfg, fh, indent=1)

    @classmethod
    def coerce(cls, model: AGLModel | str | Path) -> AGLModel:
        """``model`` itself, or the model saved in directory ``model``.

        Examples
        --------
        >>> AGLModel.coerce("my_model")  # doctest: +SKIP
        """
        if isinstance(model, AGLModel):
            return model
        if isinstance(model, str | Path):
            return cls.load(model)
        raise TypeError(f"model must be an AGLModel or the path of a saved model, got {type(model).__name__}.")

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> AGLModel:
        """Load a model saved with :meth:`save` (predictions are bit-for-bit identical on CPU).

        Everything is checked before the network is built (:func:`check_model`, finite values); a model saved
        meanwhile is never half-read, and one an interrupted save left beside ``path`` is moved back first. No file
        a config names is opened.

        Raises
        ------
        FileNotFoundError
            ``path`` holds no model.
        ValueError
            The config, its digest, the weights' checksum, shapes or values are not valid (named in the message).

        Examples
        --------
        >>> model = AGLModel.load("my_model")  # doctest: +SKIP
        """
        path = Path(path)
        for attempt in range(LOAD_ATTEMPTS):
            last = attempt == LOAD_ATTEMPTS - 1
            # the last try holds the writers' lock throughout: however often saves replaced the folder while the
            # earlier tries read it (a reader preempted at the wrong moment), none can while this one does
            with writer_lock(path) if last else nullcontext():
                if not all((path / n).is_file() for n in MODEL_FILES):
                    # wait for a save under way, restore an interrupted one's model, and decide "no model" while no
                    # writer can be between its two renames (after the lock, the next save may already be)
                    with nullcontext() if last else writer_lock(path):
                        recover(path, _is_intact)
                        present = all((path / n).is_file() for n in MODEL_FILES)
                    if not present:
                        raise FileNotFoundError(
                            f"{path} is not a saved AGL model (needs {CONFIG_NAME} and {WEIGHTS_NAME})."
                        )
                ident = None
                try:
                    cfg_bytes, weights, ident = _read_generation(path)
                    config = check_model(path, cfg_bytes, weights)
                    state = _state_dict(path, weights)
                    break
                except (OSError, ValueError):
                    # a save replaced the folder while it was read (its files were removed, or a writer that does
                    # not swap folders changed them): read the new generation; otherwise the error stands
                    if last or (ident is not None and _identity(path) == ident):
                        raise
            time.sleep(0.005 * (attempt + 1))
        del weights
        net = build_network(config)
        net.load_state_dict(state)
        return cls(net.to(device), config)


def build_network(config: dict) -> nn.Module:
    """Re-create an untrained network of the shape recorded in ``config["net"]`` (weights are loaded after)."""
    nc = config.get("net") or {}
    kind = nc.get("kind", "embedding")
    if kind in ("embedding", "ensemble"):
        shape = (nc["n_in"], nc["n_out"])
        kw = {"hidden": nc.get("hidden", ()), "dropout": nc.get("dropout", 0.0)}
        if kind == "ensemble":
            lin = nc.get("linear")
            linear = None if lin is None else EmbeddingHead(nc["n_in"], lin["n_out"], hidden=(), dropout=0.0)
            members = [EmbeddingHead(*shape, **kw) for _ in range(int(nc["n_members"]))]
            return EmbeddingEnsemble(members, linear, lin["weight"] if lin else 0.5)
        return EmbeddingHead(*shape, **kw)
    if kind == "finetune":
        enc = config.get("encoder") or {}
        if enc.get("source") in ("module", "callable"):
            raise ValueError(
                f"This model was fine-tuned on a custom {enc['source']} backbone ({enc.get('encoder')!r}), which "
                "cannot be rebuilt from config.json. Rebuild it yourself: net = FinetuneNet(<your backbone>, "
                "n_features, n_out, mean, std) with config['net'], net.load_state_dict(safetensors.torch.load_file("
                "path / 'model.safetensors')), AGLModel(net, config)."
            )
        backbone, info = get_encoder(enc.get("spec") or enc["encoder"], weights=None, encoder_kwargs=record_kwargs(enc))
        return FinetuneNet(backbone, nc["n_features"], nc["n_out"], mean=nc.get("mean"), std=nc.get("std"))
    raise ValueError(f"Unknown network kind {kind!r} in the model config.")
