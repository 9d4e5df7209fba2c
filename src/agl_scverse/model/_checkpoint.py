"""The fitted model object: network + a JSON-able config, saved atomically to a directory.

Layout of a saved model directory::

    <path>/
        config.json          genes in output order, roles, prior, ranks, learned weights, theta, k, transform,
                             embedding key, encoder info, network shape, method, hyperparameters, versions
        model.safetensors    network weights and buffers (input standardisation, output calibration)

:meth:`AGLModel.save` writes everything into a temporary directory beside ``path`` and renames it into place only
when complete, so an error or an interrupt never leaves a half-written model, and an existing model is replaced
only after the new one is fully written (``overwrite=True``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from torch import nn

from agl_scverse._serialize import to_json

from ._encoders import get_encoder
from ._heads import EmbeddingHead, FinetuneNet
from ._inference import array_batches, forward

__all__ = ["AGLModel", "CONFIG_NAME", "WEIGHTS_NAME", "build_network"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: Version of the saved layout. 2: ``config["encoder"]`` is the encoder record of
#: :func:`agl_scverse.model.encoder_record` (its name under ``"encoder"``; version 1 called it ``"name"``).
FORMAT_VERSION = 2


def upgrade_config(config: dict) -> dict:
    """Bring a saved config of an older format version to the current one (in a new dict)."""
    config = dict(config)
    if int(config.get("format_version", 1)) < 2:
        enc = dict(config.get("encoder") or {})
        if "name" in enc and "encoder" not in enc:
            enc["encoder"] = enc.pop("name")
        config["encoder"] = enc
    return config


class AGLModel:
    """A trained AGL network with everything needed to reuse it on new slides.

    Parameters
    ----------
    net
        The trained network (:class:`~agl_scverse.model.EmbeddingHead` or :class:`~agl_scverse.model.FinetuneNet`).
    config
        JSON-able dict. Keys used by the package: ``genes`` (output order), ``roles`` (``"target"`` /
        ``"auxiliary"`` per output gene), ``weights`` (mask weight per output gene), ``method``, ``mode``,
        ``transform``, ``embedding_key``, ``encoder`` (name, weights_sha256, weights_path, patch_px, patch_um),
        ``net`` (constructor arguments), ``k``, ``threshold``, ``prior``, ``prior_ranks``, ``hyperparameters``,
        ``versions``.

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
        if "net" not in self.config and hasattr(net, "config"):
            self.config["net"] = net.config()
        n_out = getattr(net, "n_out", None)
        if n_out is not None and len(self.genes) != n_out:
            raise ValueError(f"config lists {len(self.genes)} genes but the network outputs {n_out}.")

    # -- gene bookkeeping ----------------------------------------------------------------------------------
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
        """Targets and selected auxiliaries (weight > 0.5): the genes whose outputs were trained."""
        return [g for g, w in zip(self.genes, self.weights) if w > 0.5]

    @property
    def method(self) -> str | None:
        return self.config.get("method")

    @property
    def mode(self) -> str:
        return self.config.get("mode", "embedding")

    @property
    def k(self) -> int | None:
        return self.config.get("k")

    @property
    def threshold(self) -> float | None:
        return self.config.get("threshold")

    def __repr__(self) -> str:
        n_t = len(self.targets)
        return (
            f"AGLModel(method={self.method!r}, mode={self.mode!r}, targets={n_t}, "
            f"auxiliaries={len(self.genes) - n_t}, k={self.k})"
        )

    # -- inference -----------------------------------------------------------------------------------------
    def predict(self, features, batch_size: int = 512, columns: np.ndarray | None = None) -> np.ndarray:
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
        """
        batches = array_batches(features, batch_size, float_input=self.mode == "embedding")
        return forward(self.net, batches, len(self.genes), calibrated=True, cols=columns)

    # -- persistence ---------------------------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the model to directory ``path`` atomically (temp dir beside it, then rename).

        Parameters
        ----------
        path
            Target directory (must not exist unless ``overwrite=True``).
        overwrite
            Replace an existing model directory; the old one is removed only after the new one is in place.

        Returns
        -------
        The path written.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it or choose another path.")
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory; remove it or choose another path.")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        old = None
        try:
            state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME))
            cfg = dict(self.config)
            cfg["format_version"] = FORMAT_VERSION
            with open(tmp / CONFIG_NAME, "w") as fh:
                json.dump(to_json(cfg), fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                old.rmdir()
                os.rename(path, old)
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and old.exists() and not path.exists():
                os.rename(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return path

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

        Examples
        --------
        >>> model = AGLModel.load("my_model")  # doctest: +SKIP
        """
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{path} is not a saved AGL model (needs {CONFIG_NAME} and {WEIGHTS_NAME}).")
        with open(path / CONFIG_NAME) as fh:
            config = upgrade_config(json.load(fh))
        net = build_network(config)
        state = load_file(str(path / WEIGHTS_NAME))
        net.load_state_dict(state)
        return cls(net.to(device), config)


def build_network(config: dict) -> nn.Module:
    """Re-create an untrained network of the shape recorded in ``config["net"]`` (weights are loaded after)."""
    nc = config.get("net") or {}
    kind = nc.get("kind", "embedding")
    if kind == "embedding":
        return EmbeddingHead(nc["n_in"], nc["n_out"], hidden=nc.get("hidden", ()), dropout=nc.get("dropout", 0.0))
    if kind == "finetune":
        enc = config.get("encoder") or {}
        backbone, info = get_encoder(enc.get("encoder"), weights=None)
        return FinetuneNet(backbone, nc["n_features"], nc["n_out"], mean=nc.get("mean"), std=nc.get("std"))
    raise ValueError(f"Unknown network kind {kind!r} in the model config.")
