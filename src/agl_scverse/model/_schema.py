"""What a saved model's ``config.json`` may hold, checked before anything is built from it.

:func:`validate_config` checks every field the package reads (types, allowed values from ``_constants``,
lengths of the per-gene lists against each other and against the network's output size, unique gene names,
known format version); :func:`expected_shapes` gives the tensor shapes the config implies (the network is built
on torch's ``meta`` device, so nothing is allocated) and :func:`check_weights_header` compares them with the
header of the weights file before a single tensor is read. Every refusal names the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agl_scverse import _constants as K

__all__ = [
    "FORMAT_VERSION",
    "SUPPORTED_FORMATS",
    "check_weights_header",
    "expected_shapes",
    "upgrade_config",
    "validate_config",
]

#: Version of the saved layout. 2: ``config["encoder"]`` is the encoder record of
#: :func:`agl_scverse.model.encoder_record` (its name under ``"encoder"``; version 1 called it ``"name"``).
#: 3: ``config["weights_sha256"]`` records the sha256 of ``model.safetensors`` (checked on load).
FORMAT_VERSION = 3
SUPPORTED_FORMATS = (1, 2, 3)
#: Network kinds of ``config["net"]["kind"]`` and the model mode each one serves.
NET_KINDS = {"embedding": "embedding", "ensemble": "embedding", "finetune": "finetune"}  # kind -> mode
#: What a fine-tuned model ran in (``config["precision"]["precision"]``, see :mod:`agl_scverse.model._precision`).
RUN_PRECISIONS = ("fp32", "bf16", "fp16")
#: Fields added after format 3 was fixed, and the value a config without them means.
OPTIONAL_DEFAULTS: dict[str, Any] = {"augment": False, "precision": None}
#: Roles an output gene can have (``"excluded"`` genes are not outputs).
OUTPUT_ROLES = (K.ROLE_TARGET, K.ROLE_AUX)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Checker:
    """Raises ``ValueError`` naming the config file and the field."""

    def __init__(self, where: str, verb: str = "load"):
        self.where, self.verb = where, verb

    def fail(self, field: str, problem: str) -> None:
        raise ValueError(f"{self.where}: field {field!r} {problem}; refusing to {self.verb} this model.")

    def is_int(self, field: str, value: Any, low: int = 0, high: float = math.inf) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(field, f"must be an integer in [{low}, {high}], got {value!r}")
        return value

    def is_number(self, field: str, value: Any, low: float = -math.inf, high: float = math.inf) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not low <= value <= high:
            self.fail(field, f"must be a finite number in [{low}, {high}], got {value!r}")
        return float(value)

    def is_str(self, field: str, value: Any, choices: tuple[str, ...] | None = None, empty: bool = False) -> str:
        if not isinstance(value, str) or (not empty and not value):
            self.fail(field, f"must be a {'' if empty else 'non-empty '}string, got {value!r}")
        if choices is not None and value not in choices:
            self.fail(field, f"must be one of {list(choices)}, got {value!r}")
        return value

    def is_list(self, field: str, value: Any, length: int | None = None) -> list:
        if not isinstance(value, list):
            self.fail(field, f"must be a list, got {type(value).__name__}")
        if length is not None and len(value) != length:
            self.fail(field, f"has {len(value)} entries but the model has {length} output genes")
        return value

    def is_sha(self, field: str, value: Any) -> str:
        if not isinstance(value, str) or not _SHA256.match(value):
            self.fail(field, f"must be a sha256 (64 lower-case hex digits), got {value!r}")
        return value

    def optional(self, config: dict, field: str, check: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """Check ``config[field]`` unless it is absent or null."""
        if config.get(field) is not None:
            check(field, config[field], *args, **kw)


def upgrade_config(config: dict) -> dict:
    """Bring a saved config of an older format version to the current one (in a new dict).

    Examples
    --------
    >>> upgrade_config({"format_version": 1, "encoder": {"name": "resnet18"}})["encoder"]
    {'encoder': 'resnet18'}
    >>> upgrade_config({"format_version": 3})["augment"]  # saved before fine-tune augmentation existed
    False
    """
    if not isinstance(config, dict):
        return config  # validate_config says what is wrong
    config = dict(config)
    for field, value in OPTIONAL_DEFAULTS.items():  # models saved before the field existed
        config.setdefault(field, value)
    version = config.get("format_version", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version < 2:
        enc = config.get("encoder") or {}
        if isinstance(enc, dict):
            enc = dict(enc)
            if "name" in enc and "encoder" not in enc:
                enc["encoder"] = enc.pop("name")
            config["encoder"] = enc
    return config


def _check_genes(c: _Checker, config: dict) -> int:
    """Genes, roles, weights and the per-auxiliary lists; returns the number of auxiliaries."""
    genes = c.is_list("genes", config.get("genes"))
    if not genes:
        c.fail("genes", "is empty")
    for i, g in enumerate(genes):
        c.is_str(f"genes[{i}]", g)
    if len(set(genes)) != len(genes):
        seen: set[str] = set()
        dup = sorted({g for g in genes if g in seen or seen.add(g)})
        c.fail("genes", f"lists {dup[:5]} more than once")
    roles = c.is_list("roles", config.get("roles"), len(genes))
    for i, r in enumerate(roles):
        c.is_str(f"roles[{i}]", r, OUTPUT_ROLES)
    n_t = roles.count(K.ROLE_TARGET)
    if n_t == 0:
        c.fail("roles", "names no target gene")
    if roles[:n_t] != [K.ROLE_TARGET] * n_t:
        c.fail("roles", "must list the targets first (genes are in output order)")
    n_aux = len(genes) - n_t
    if config.get("weights") is not None:
        for i, w in enumerate(c.is_list("weights", config["weights"], len(genes))):
            c.is_number(f"weights[{i}]", w, 0.0, 1.0)
    for field in ("prior_ranks", "prior_scores"):
        if config.get(field) is not None:
            values = c.is_list(field, config[field])
            if len(values) != n_aux:
                c.fail(field, f"has {len(values)} entries but the model has {n_aux} auxiliary genes")
            for i, v in enumerate(values):
                if v is not None:  # a prior score can be a stored NaN (null)
                    c.is_number(f"{field}[{i}]", v)
    c.optional(config, "k", c.is_int, 0, n_aux)
    return n_aux


def _check_encoder(c: _Checker, enc: Any, needs_name: bool) -> None:
    if enc is None:
        enc = {}
    if not isinstance(enc, dict):
        c.fail("encoder", f"must be a dict, got {type(enc).__name__}")
    if needs_name or enc.get("encoder") is not None:
        c.is_str("encoder.encoder", enc.get("encoder"))
    if enc.get("weights_sha256") not in (None, ""):
        c.is_sha("encoder.weights_sha256", enc["weights_sha256"])
    if enc.get("weights_path") not in (None, ""):
        c.is_str("encoder.weights_path", enc["weights_path"])  # a record only: never opened
    if enc.get("patch_px") is not None:
        c.is_int("encoder.patch_px", enc["patch_px"], 1, 1 << 16)
    if enc.get("patch_um") is not None:
        c.is_number("encoder.patch_um", enc["patch_um"], 1e-6)
    if enc.get("seed") is not None:
        c.is_int("encoder.seed", enc["seed"], -(1 << 63), 1 << 64)
    for field in ("spec", "preset", "arch", "hf_hub", "source"):  # how to rebuild it (absent before 0.3)
        if enc.get(field) is not None:
            c.is_str(f"encoder.{field}", enc[field])
    if enc.get("encoder_kwargs") is not None:
        text = c.is_str("encoder.encoder_kwargs", enc["encoder_kwargs"])
        try:
            ok = isinstance(json.loads(text), dict)
        except ValueError:
            ok = False
        if not ok:
            c.fail("encoder.encoder_kwargs", f"must be a JSON object of timm keyword arguments, got {text!r}")
    if enc.get("native_mpp") is not None:
        c.is_number("encoder.native_mpp", enc["native_mpp"], 1e-6)
    if enc.get("strict") is not None and not isinstance(enc["strict"], bool):
        c.fail("encoder.strict", f"must be true or false, got {enc['strict']!r}")


def _check_precision(c: _Checker, prec: Any) -> None:
    """``config["precision"]``: null, or the record of :meth:`agl_scverse.model._precision.Precision.record`."""
    if prec is None:
        return
    if not isinstance(prec, dict):
        c.fail(
            "precision", f"must be a dict (precision, channels_last, precision_requested), got {type(prec).__name__}"
        )
    c.is_str("precision.precision", prec.get("precision"), RUN_PRECISIONS)
    if prec.get("channels_last") is not None and not isinstance(prec["channels_last"], bool):
        c.fail("precision.channels_last", f"must be true or false, got {prec['channels_last']!r}")
    if prec.get("precision_requested") is not None:
        c.is_str("precision.precision_requested", prec["precision_requested"], K.PRECISIONS)


def _check_net(c: _Checker, net: Any, n_genes: int) -> str:
    """``config["net"]``; returns its kind."""
    if not isinstance(net, dict):
        c.fail("net", f"must be a dict of the network's constructor arguments, got {type(net).__name__}")
    kind = c.is_str("net.kind", net.get("kind", "embedding"), tuple(NET_KINDS))
    if c.is_int("net.n_out", net.get("n_out"), 1) != n_genes:
        c.fail("net.n_out", f"is {net['n_out']} but the config lists {n_genes} genes")
    if kind == "ensemble":
        lin = net.get("linear")
        c.is_int("net.n_members", net.get("n_members"), 2 if lin is None else 1)
        if lin is not None:  # head="hybrid": a linear head of the first outputs
            if not isinstance(lin, dict):
                c.fail("net.linear", f"must be a dict, got {type(lin).__name__}")
            c.is_int("net.linear.n_out", lin.get("n_out"), 1, n_genes)
            c.is_number("net.linear.weight", lin.get("weight"), 0.0, 1.0)
    if kind in ("embedding", "ensemble"):
        c.is_int("net.n_in", net.get("n_in"), 1)
        for i, h in enumerate(c.is_list("net.hidden", net.get("hidden", []))):
            c.is_int(f"net.hidden[{i}]", h, 1)
        c.is_number("net.dropout", net.get("dropout", 0.0), 0.0, 1.0)
        return kind
    c.is_int("net.n_features", net.get("n_features"), 1)
    for field in ("mean", "std"):
        if net.get(field) is not None:
            values = c.is_list(f"net.{field}", net[field])
            if len(values) != 3:
                c.fail(f"net.{field}", f"must hold 3 channel values, got {len(values)}")
            for i, v in enumerate(values):
                c.is_number(f"net.{field}[{i}]", v, 0.0 if field == "mean" else 1e-12)
    return kind


def validate_config(config: Any, where: str = "config.json", verb: str = "load") -> dict:
    """Check a (format-upgraded) model config; return it, or raise ``ValueError`` naming the bad field.

    Parameters
    ----------
    config
        The parsed ``config.json``.
    where
        How to name the file in messages.
    verb
        What is refused (``"load"``, ``"save"``), for messages.

    Examples
    --------
    >>> cfg = {"genes": ["a"], "roles": ["target"], "net": {"kind": "embedding", "n_in": 2, "n_out": 1}}
    >>> validate_config(cfg)["genes"]
    ['a']
    >>> validate_config({**cfg, "method": "best"})
    Traceback (most recent call last):
    ...
    ValueError: config.json: field 'method' must be one of ['pgl', 'agl', 'topk', 'dkgsb'], got 'best'; refusing to load this model.
    """
    c = _Checker(where, verb)
    if not isinstance(config, dict):
        raise ValueError(
            f"{where} must hold a JSON object, got {type(config).__name__}; refusing to {verb} this model."
        )
    version = config.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_FORMATS:
        c.fail("format_version", f"is {version!r}; this agl-scverse reads format versions {list(SUPPORTED_FORMATS)}")
    if version >= 3:
        c.is_sha("weights_sha256", config.get("weights_sha256"))
    n_genes = len(c.is_list("genes", config.get("genes")))
    _check_genes(c, config)
    kind = _check_net(c, config.get("net"), n_genes)
    mode = c.is_str("mode", config.get("mode", NET_KINDS[kind]), K.MODES)
    if mode != NET_KINDS[kind]:
        c.fail("mode", f"is {mode!r} but the network is of kind {kind!r}")
    c.optional(config, "method", c.is_str, K.METHODS)
    c.optional(config, "transform", c.is_str, K.TRANSFORMS)
    c.optional(config, "prior", c.is_str, K.PRIORS)
    c.optional(config, "embedding_key", c.is_str)
    c.optional(config, "layer", c.is_str)
    c.optional(config, "library_key", c.is_str)
    c.optional(config, "threshold", c.is_number)
    c.optional(config, "theta", c.is_number)
    _check_encoder(c, config.get("encoder"), needs_name=kind == "finetune")
    if config.get("augment") is not None and not isinstance(config["augment"], bool):
        c.fail("augment", f"must be true or false, got {config['augment']!r}")
    _check_precision(c, config.get("precision"))
    for field in ("hyperparameters", "versions"):
        if config.get(field) is not None and not isinstance(config[field], dict):
            c.fail(field, f"must be a dict, got {type(config[field]).__name__}")
    return config


def expected_shapes(build: Callable[[dict], Any], config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of the state dict of ``build(config)``, built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        net = build(config)
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in net.state_dict().items()}


def check_weights_header(path: Path, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Compare the tensor names, shapes and dtypes in a safetensors header with ``expected`` (reads no tensor)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            found = {}
            for k in fh.keys():  # noqa: SIM118  (safe_open has no __iter__)
                sl = fh.get_slice(k)
                found[k] = (tuple(int(n) for n in sl.get_shape()), _dtype_name(sl.get_dtype()))
    except Exception as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); refusing to load this model.") from err
    problems = [f"missing tensor {k!r} {list(s)}" for k, (s, _) in expected.items() if k not in found]
    problems += [f"unexpected tensor {k!r} {list(s)}" for k, (s, _) in found.items() if k not in expected]
    for k in sorted(set(found) & set(expected)):
        (fs, fd), (es, ed) = found[k], expected[k]
        if fs != es or fd != ed:
            problems.append(f"{k!r} is {list(fs)} {fd} in the file, the config implies {list(es)} {ed}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise ValueError(
            f"{path} does not hold the network config.json describes ({shown}); refusing to load this model."
        )


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip


def _dtype_name(code: str) -> str:
    return _DTYPES.get(str(code), str(code).lower())
