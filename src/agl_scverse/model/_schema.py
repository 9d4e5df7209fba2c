"""What a saved model's ``config.json`` may hold, checked (fields, digest, weight shapes) before anything is built."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from agl_scverse import _constants as consts

__all__ = [
    "FILE_KWARGS",
    "FORMAT_VERSION",
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "MAX_DIM",
    "SUPPORTED_FORMATS",
    "check_digest",
    "check_weights_header",
    "config_digest",
    "parse_config",
    "expected_shapes",
    "upgrade_config",
    "validate_config",
]

#: Version of the saved layout (2: the encoder record names the encoder ``"encoder"``, version 1 ``"name"``;
#: 3: adds ``weights_sha256``, of ``model.safetensors``; 4: adds ``digest``, of every other top-level field).
FORMAT_VERSION = 4
SUPPORTED_FORMATS = (1, 2, 3, 4)
#: The field holding :func:`config_digest` (format 4).
DIGEST_FIELD = "digest"
#: Largest ``config.json`` read (bytes): a config of 100,000 genes is about 10 MB.
MAX_CONFIG_BYTES = 256 * 2**20
#: Deepest nesting of lists / objects in a config (the package writes at most 4 levels).
MAX_DEPTH = 32
#: Largest network dimension (input width, hidden width, output genes, feature width) a config may name.
MAX_DIM = 2**24
#: Most hidden layers / ensemble members a config may name.
MAX_LAYERS = 64
MAX_MEMBERS = 1024
#: timm keyword arguments that open a file or download: refused in a saved config (no file a config names is opened).
FILE_KWARGS = ("checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "file", "url",
               "hf_hub_id", "hf_hub_filename", "state_dict")  # fmt: skip
#: Network kinds of ``config["net"]["kind"]`` and the model mode each one serves.
NET_KINDS = {"embedding": "embedding", "ensemble": "embedding", "finetune": "finetune"}  # kind -> mode
#: What a fine-tuned model ran in (``config["precision"]["precision"]``, see :mod:`agl_scverse.train._precision`).
RUN_PRECISIONS = ("fp32", "bf16", "fp16")
#: Fields added after format 3 was fixed, and the value a config without them means.
OPTIONAL_DEFAULTS: dict[str, Any] = {"augment": False, "precision": None}
#: Roles an output gene can have (``"excluded"`` genes are not outputs).
OUTPUT_ROLES = (consts.ROLE_TARGET, consts.ROLE_AUX)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Checker:
    """Raises ``ValueError`` naming the config file and the field."""

    def __init__(self, where: str, verb: str = "load"):
        self.where, self.verb = where, verb

    def fail(self, field: str, problem: str) -> NoReturn:
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

    def optional(self, config: dict, field: str, check: Callable[..., Any], *args: Any, prefix: str = "") -> None:
        """Check ``config[field]`` (named ``prefix + field``) unless it is absent or null."""
        if config.get(field) is not None:
            check(prefix + field, config[field], *args)


def parse_config(text: bytes | str, where: str = "config.json") -> Any:
    """The JSON value of a config file's bytes, with its size and nesting bounded; ``ValueError`` otherwise.

    Examples
    --------
    >>> parse_config(b'{"genes": ["a"]}')
    {'genes': ['a']}
    >>> parse_config("[" * 100 + "]" * 100)
    Traceback (most recent call last):
    ...
    ValueError: config.json nests lists / objects deeper than 32 levels (at [0][0][0][0][0][0]...); refusing to load this model.
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise ValueError(
            f"{where} is {len(text)} bytes, more than a model config can be ({MAX_CONFIG_BYTES} bytes); "
            "refusing to load this model."
        )
    if (path := _too_deep(text)) is not None:
        raise ValueError(
            f"{where} nests lists / objects deeper than {MAX_DEPTH} levels (at {path}...); refusing to load this model."
        )
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{where} is not valid JSON ({err}); refusing to load this model.") from err


def _too_deep(text: bytes | str) -> str | None:
    """A bracket path deeper than :data:`MAX_DEPTH` in JSON text (strings skipped), or None; no recursion."""
    data = text.encode() if isinstance(text, str) else text
    depth, in_str, escaped = 0, False, False
    for byte in data:
        if in_str:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_str = False
        elif byte == 0x22:
            in_str = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > MAX_DEPTH:
                return "[0]" * 6
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return None


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def config_digest(config: dict) -> dict[str, str]:
    """sha256 of the canonical JSON of every top-level field of ``config`` (``weights_sha256`` too) but the digest."""
    return {k: hashlib.sha256(_canonical(v)).hexdigest() for k, v in sorted(config.items()) if k != DIGEST_FIELD}


def check_digest(config: dict, where: str = "config.json") -> None:
    """Raise ``ValueError`` naming every field whose value differs from the one :func:`config_digest` recorded."""
    recorded = config.get(DIGEST_FIELD)
    c = _Checker(where)
    if not isinstance(recorded, dict) or not all(isinstance(v, str) and _SHA256.match(v) for v in recorded.values()):
        c.fail(DIGEST_FIELD, "must map every field to the sha256 of its value (format 4)")
    actual = config_digest(config)
    changed = sorted(k for k in set(recorded) | set(actual) if recorded.get(k) != actual.get(k))
    if changed:
        what = [f"{k!r} ({'added' if k not in recorded else 'removed' if k not in actual else 'changed'})"
                for k in changed]  # fmt: skip
        raise ValueError(
            f"{where} was changed after the model was saved: field {', '.join(what[:10])} "
            f"{'does' if len(what) == 1 else 'do'} not match the digest recorded at save; refusing to load this "
            "model. Save the model again from the object that trained it, or fit it again."
        )


def upgrade_config(config: dict) -> dict:
    """Bring a saved config of an older format version to the current one (in a new dict)."""
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
    if dup := sorted(g for g, n in Counter(genes).items() if n > 1):
        c.fail("genes", f"lists {dup[:5]} more than once")
    roles = c.is_list("roles", config.get("roles"), len(genes))
    for i, r in enumerate(roles):
        c.is_str(f"roles[{i}]", r, OUTPUT_ROLES)
    n_t = roles.count(consts.ROLE_TARGET)
    if n_t == 0:
        c.fail("roles", "names no target gene")
    if roles[:n_t] != [consts.ROLE_TARGET] * n_t:
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
    c.optional(enc, "patch_px", c.is_int, 1, 1 << 16, prefix="encoder.")
    c.optional(enc, "patch_um", c.is_number, 1e-6, prefix="encoder.")
    c.optional(enc, "seed", c.is_int, -(1 << 63), 1 << 64, prefix="encoder.")
    for field in ("spec", "preset", "arch", "hf_hub", "source"):  # how to rebuild it (absent before 0.3)
        c.optional(enc, field, c.is_str, prefix="encoder.")
    if enc.get("encoder_kwargs") is not None:
        text = c.is_str("encoder.encoder_kwargs", enc["encoder_kwargs"])
        try:
            ok = isinstance(json.loads(text), dict)
        except ValueError:
            ok = False
        if not ok:
            c.fail("encoder.encoder_kwargs", f"must be a JSON object of timm keyword arguments, got {text!r}")
        if named := _file_kwargs(json.loads(text)):
            c.fail(
                "encoder.encoder_kwargs",
                f"names {named[0]!r}, a timm argument that opens a file or downloads weights; no file a config names "
                "is opened (pass encoder weights to agl_predict(weights=...))",
            )
    c.optional(enc, "native_mpp", c.is_number, 1e-6, prefix="encoder.")
    if enc.get("strict") is not None and not isinstance(enc["strict"], bool):
        c.fail("encoder.strict", f"must be true or false, got {enc['strict']!r}")


def _file_kwargs(value: Any, prefix: str = "") -> list[str]:
    """Dotted names of the :data:`FILE_KWARGS` keys anywhere in a JSON value."""
    found: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k in FILE_KWARGS:
                found.append(prefix + k)
            found += _file_kwargs(v, f"{prefix}{k}.")
    elif isinstance(value, list):
        for v in value:
            found += _file_kwargs(v, prefix)
    return found


def _check_precision(c: _Checker, prec: Any) -> None:
    """``config["precision"]``: null, or the record of :meth:`agl_scverse.train._precision.Precision.record`."""
    if prec is None:
        return
    if not isinstance(prec, dict):
        c.fail(
            "precision", f"must be a dict (precision, channels_last, precision_requested), got {type(prec).__name__}"
        )
    c.is_str("precision.precision", prec.get("precision"), RUN_PRECISIONS)
    if prec.get("channels_last") is not None and not isinstance(prec["channels_last"], bool):
        c.fail("precision.channels_last", f"must be true or false, got {prec['channels_last']!r}")
    c.optional(prec, "precision_requested", c.is_str, consts.PRECISIONS, prefix="precision.")


def _check_net(c: _Checker, net: Any, n_genes: int) -> str:
    """``config["net"]``; returns its kind."""
    if not isinstance(net, dict):
        c.fail("net", f"must be a dict of the network's constructor arguments, got {type(net).__name__}")
    kind = c.is_str("net.kind", net.get("kind", "embedding"), tuple(NET_KINDS))
    if c.is_int("net.n_out", net.get("n_out"), 1, MAX_DIM) != n_genes:
        c.fail("net.n_out", f"is {net['n_out']} but the config lists {n_genes} genes")
    if kind == "ensemble":
        lin = net.get("linear")
        c.is_int("net.n_members", net.get("n_members"), 2 if lin is None else 1, MAX_MEMBERS)
        if lin is not None:  # head="hybrid": a linear head of the first outputs
            if not isinstance(lin, dict):
                c.fail("net.linear", f"must be a dict, got {type(lin).__name__}")
            c.is_int("net.linear.n_out", lin.get("n_out"), 1, n_genes)
            c.is_number("net.linear.weight", lin.get("weight"), 0.0, 1.0)
    if kind in ("embedding", "ensemble"):
        c.is_int("net.n_in", net.get("n_in"), 1, MAX_DIM)
        hidden = c.is_list("net.hidden", net.get("hidden", []))
        if len(hidden) > MAX_LAYERS:
            c.fail("net.hidden", f"names {len(hidden)} hidden layers, more than {MAX_LAYERS}")
        for i, h in enumerate(hidden):
            c.is_int(f"net.hidden[{i}]", h, 1, MAX_DIM)
        c.is_number("net.dropout", net.get("dropout", 0.0), 0.0, 1.0)
        return kind
    c.is_int("net.n_features", net.get("n_features"), 1, MAX_DIM)
    for field in ("mean", "std"):
        if net.get(field) is not None:
            values = c.is_list(f"net.{field}", net[field])
            if len(values) != 3:
                c.fail(f"net.{field}", f"must hold 3 channel values, got {len(values)}")
            for i, v in enumerate(values):
                c.is_number(f"net.{field}[{i}]", v, 0.0 if field == "mean" else 1e-12)
    return kind


def validate_config(config: Any, where: str = "config.json", verb: str = "load") -> dict:
    """Check a (format-upgraded) model config; return it, or raise ``ValueError`` naming ``where`` and the field."""
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
    if version >= 4 and not isinstance(config.get(DIGEST_FIELD), dict):
        c.fail(DIGEST_FIELD, "must map every field to the sha256 of its value (format 4)")
    n_genes = len(c.is_list("genes", config.get("genes")))
    _check_genes(c, config)
    kind = _check_net(c, config.get("net"), n_genes)
    mode = c.is_str("mode", config.get("mode", NET_KINDS[kind]), consts.MODES)
    if mode != NET_KINDS[kind]:
        c.fail("mode", f"is {mode!r} but the network is of kind {kind!r}")
    for field, choices in (("method", consts.METHODS), ("transform", consts.TRANSFORMS), ("prior", consts.PRIORS)):
        c.optional(config, field, c.is_str, choices)
    for field in ("embedding_key", "layer", "library_key"):
        c.optional(config, field, c.is_str)
    for field in ("threshold", "theta"):
        c.optional(config, field, c.is_number)
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


def weights_header(data: bytes) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` from the header of safetensors bytes (the format's 8-byte length + JSON header)."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, 100 * 2**20):
        raise ValueError(f"header length {n} exceeds the file")
    header = json.loads(data[8 : 8 + n])
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    found = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        shape, dtype = v["shape"], v["dtype"]
        found[k] = (tuple(int(s) for s in shape), _dtype_name(dtype))
    return found


def check_weights_header(
    path: Path, expected: dict[str, tuple[tuple[int, ...], str]], data: bytes | None = None
) -> None:
    """Compare a safetensors header (of ``data``, else read from ``path``) with ``expected``; reads no tensor."""
    try:
        if data is None:
            with open(path, "rb") as fh:
                head = fh.read(8)
                data = head + fh.read(int.from_bytes(head, "little")) if len(head) == 8 else head
        found = weights_header(data)
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
