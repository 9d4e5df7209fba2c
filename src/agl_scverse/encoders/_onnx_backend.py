"""ONNX Runtime for a frozen image encoder: exported once, cached by content, checked against torch.

The ``backend=`` argument of :func:`agl_scverse.pp.embed_patches` (and of the tools that embed through it) says
which engine runs the frozen encoder's forward pass:

``"auto"`` (default)
    ONNX Runtime on a CPU when ``onnxruntime`` is installed, the run is in float32 and the encoder exports; the
    first time a process runs a graph, the first patches of the run are also computed in torch and must agree
    (cosine similarity >= :data:`MIN_COSINE` per patch; the checked session is kept for the next run, see
    :func:`start_backend`). Otherwise torch, with one log line saying why.
``"torch"``
    The torch module (the reference; fine-tuning always trains in torch).
``"onnx"``
    ONNX Runtime, or an error saying why it cannot run.

int8 dynamic quantisation of the graph (``onnx_encoder(..., quantization="int8-dynamic")``) is measured by
``benchmarks/bench_encoder_backends.py`` but is not a backend option: on the CPUs measured it was slower than the
float32 graph and its features further from torch's (see the Encoders page).

The graph is exported with torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, no extra
package), with a dynamic batch size, and cached in a private per-user directory (:func:`cache_dir`) under a key
made of the module's weights (sha256 of every tensor), its structure, how it was built, the input size and the
torch version: the same encoder is exported once, a changed one gets a new graph. Each cached graph carries the
sha256 of its files; a graph that fails that check, or whose features disagree with torch's, is exported again.
Files are written into a temporary directory beside the cache entry and moved into place with ``os.replace``.
ONNX Runtime's intra-op threads follow ``torch.get_num_threads()`` (which follows ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scanpy import logging as logg
from torch import nn

from agl_scverse import _constants as consts
from agl_scverse._images import CACHE_ENV
from agl_scverse._validate import check_choice

__all__ = [
    "MIN_COSINE",
    "OnnxEncoder",
    "cache_dir",
    "clear_started",
    "graph_key",
    "info_key",
    "onnx_encoder",
    "onnx_backend_available",
    "providers_for",
    "row_cosine",
    "select_backend",
    "start_backend",
]

#: Smallest cosine similarity per patch between ONNX Runtime's and torch's features for the graph to be used.
MIN_COSINE = 0.999
#: ONNX opset of the exported graphs.
OPSET = 17
#: Patches of the first batch computed by both engines to check a graph.
N_CHECK = 4
_GRAPH = "encoder.onnx"
_META = "meta.json"
_FORMAT = 1  # bump when the export changes in a way the key does not capture
#: The session :func:`start_backend` started last, by (graph key, providers, threads): at most one is kept.
_STARTED: dict[tuple, OnnxEncoder] = {}


def onnx_backend_available() -> bool:
    """Whether ``onnxruntime`` (the engine) and ``onnx`` (which torch's exporter writes with) are installed.

    Nothing is imported. Both come with ``pip install 'agl-scverse[onnx]'``.

    Examples
    --------
    >>> isinstance(onnx_backend_available(), bool)
    True
    """
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


# ------------------------------------------------------------------------------------------------ the cache
def cache_dir() -> Path:
    """The directory of exported graphs: ``$AGL_SCVERSE_CACHE/onnx``, else ``$XDG_CACHE_HOME/agl-scverse/onnx``.

    (``~/.cache/agl-scverse/onnx`` without either variable.) It is not created here.

    Examples
    --------
    >>> cache_dir().name
    'onnx'
    """
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser() / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "agl-scverse" / "onnx"


def _private_dir(path: Path) -> Path:
    """Create ``path`` (and its parent) as directories only this user reads (0700); refuse links and others' dirs."""
    for p in (path.parent, path):
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise PermissionError(f"{p} is a symbolic link or not a directory; refusing to use it as a cache.")
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise PermissionError(f"{p} belongs to another user; refusing to use it as a cache.")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(p, 0o700)
    return path


def _regular_file(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode)


def _files_sha256(folder: Path) -> dict[str, str]:
    """sha256 of every regular file of ``folder`` but the metadata (the graph and any external-data files)."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name == _META:
            continue
        if not _regular_file(p):
            raise PermissionError(f"{p} is not a regular file.")
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        out[p.name] = h.hexdigest()
    return out


def _read_entry(entry: Path, key: str) -> Path | None:
    """The graph of a cache entry when it is intact (its metadata names ``key`` and its files' sha256), else None."""
    try:
        st = os.lstat(entry)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            return None
        meta_path, graph = entry / _META, entry / _GRAPH
        if not (_regular_file(meta_path) and _regular_file(graph)):
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key or meta.get("files") != _files_sha256(entry):
            return None
    except (OSError, ValueError):
        return None
    return graph


# ------------------------------------------------------------------------------------------------ export
def graph_key(module: nn.Module, input_px: int, extra: dict[str, Any] | None = None, quantization: str = "") -> str:
    """The cache key of ``module``'s graph: sha256 of its tensors, structure, input size, versions and ``extra``.

    Examples
    --------
    >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> graph_key(a, 8) == graph_key(a, 8), graph_key(a, 8) == graph_key(b, 8), graph_key(a, 8) == graph_key(a, 16)
    (True, False, False)
    """
    h = hashlib.sha256()
    head = {
        "format": _FORMAT,
        "opset": OPSET,
        "torch": torch.__version__,
        "input_px": int(input_px),
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "quantization": quantization,
        "extra": extra or {},
    }
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    h.update(repr(module).encode())
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _export(module: nn.Module, input_px: int, folder: Path) -> None:
    """Write ``module``'s graph (float32 input ``images`` of shape (batch, 3, px, px) -> ``features``) into ``folder``."""
    params = list(module.parameters()) + list(module.buffers())
    dev = params[0].device if params else torch.device("cpu")
    x = torch.zeros(2, 3, int(input_px), int(input_px), device=dev)
    was = module.training
    module.eval()
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python values that are constant here
            torch.onnx.export(
                module, (x,), str(folder / _GRAPH), dynamo=False, input_names=["images"], output_names=["features"],
                dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, opset_version=OPSET,
                do_constant_folding=True,
            )  # fmt: skip
    finally:
        module.train(was)


def _quantize(folder: Path) -> None:
    """Replace the graph of ``folder`` by its int8 dynamic quantisation (``onnxruntime.quantization``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, pre = folder / "fp32.onnx", folder / "pre.onnx"
    os.replace(folder / _GRAPH, src)
    quant_pre_process(str(src), str(pre))  # shapes, and folds the exporter's Identity nodes into initializers
    quantize_dynamic(str(pre), str(folder / _GRAPH), weight_type=QuantType.QInt8)
    src.unlink()
    pre.unlink()


def _build_entry(module: nn.Module, input_px: int, key: str, quantization: str, where: Path) -> Path:
    """Export (and quantise) into a new temporary directory under ``where``; returns it, metadata written last."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=where))  # 0700
    try:
        _export(module, input_px, tmp)
        if quantization:
            _quantize(tmp)
        meta = {"key": key, "input_px": int(input_px), "quantization": quantization, "torch": torch.__version__}
        meta["files"] = _files_sha256(tmp)
        (tmp / _META).write_text(json.dumps(meta, sort_keys=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


@contextlib.contextmanager
def _graph_path(module: nn.Module, input_px: int, key: str, quantization: str, fresh: bool) -> Iterator[Path]:
    """The path of the graph for ``key``: from the cache, or exported into it (atomically).

    When the cache cannot be used, the graph is exported into a temporary directory removed after the session
    has loaded it. ``fresh``: export again even when the cache holds an intact graph.
    """
    try:
        root = _private_dir(cache_dir())
    except OSError as err:
        logg.info(f"ONNX graph cache {cache_dir()} not usable ({err}); exporting for this run only.")
        with tempfile.TemporaryDirectory(prefix="agl-onnx-") as scratch:
            yield _build_entry(module, input_px, key, quantization, Path(scratch)) / _GRAPH
        return
    entry = root / key[:32]
    graph = None if fresh else _read_entry(entry, key)
    if graph is not None:
        yield graph
        return
    tmp = _build_entry(module, input_px, key, quantization, root)
    try:
        if os.path.lexists(entry):  # stale, broken or replaced: move it aside, then remove it
            aside = root / f".old-{key[:16]}-{os.getpid()}"
            os.replace(entry, aside)
            shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() and not aside.is_symlink() else aside.unlink()
        os.replace(tmp, entry)
    except OSError:  # another process put its own (equal) graph there first: use ours from where it is
        placed = False
    else:
        placed = True
    if placed:
        yield entry / _GRAPH
        return
    try:
        yield tmp / _GRAPH
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the engine
class OnnxEncoder:
    """An exported encoder run by ONNX Runtime: ``(B, 3, H, W)`` float32 tensor in, ``(B, D)`` tensor out.

    Parameters
    ----------
    path
        The ``.onnx`` graph (read once; the session holds it in memory).
    providers
        ONNX Runtime execution providers, in order of preference. Default ``["CPUExecutionProvider"]``. On a GPU
        with ``onnxruntime-gpu``: ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` or with
        ``"TensorrtExecutionProvider"`` first (not measured here).
    threads
        Intra-op threads; default ``torch.get_num_threads()`` (which follows ``OMP_NUM_THREADS``).
    quantization
        What the graph's weights are (``""`` float32, ``"int8-dynamic"``), for the record.
    """

    def __init__(
        self, path: str | Path, providers: list[str] | None = None, threads: int | None = None, quantization: str = ""
    ):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads sleep rather than spin: the thread cutting the next patches (and other processes)
        # get the cores between ONNX Runtime's parallel sections (faster end to end on a shared 2-core CPU).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        if [i.name for i in self.session.get_inputs()] != ["images"]:
            raise ValueError(
                "the exported graph does not read its image input (the forward pass leaves torch, e.g. through "
                "NumPy, so tracing saw constants)"
            )
        self.threads = opts.intra_op_num_threads
        self.quantization = quantization
        self.check_cosine: float | None = None
        self.version = ort.__version__

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Features of a normalised float32 image batch (on the CPU)."""
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(["features"], {"images": arr})[0])

    def record(self) -> dict[str, Any]:
        """How the features were made, for the embedding record."""
        rec = {
            "backend": "onnx",
            "onnx_quantization": self.quantization or None,
            "onnxruntime": self.version,
            "onnx_providers": list(self.session.get_providers()),
            "onnx_threads": int(self.threads),
            "onnx_check_cosine": self.check_cosine,
        }
        return {k: v for k, v in rec.items() if v is not None}


def row_cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (float64; 1 for two zero rows).

    Examples
    --------
    >>> row_cosine(np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[2.0, 0.0], [0.0, 0.0]])).tolist()
    [1.0, 1.0]
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    dot = (a * b).sum(1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (na * nb)
    return np.where(both_zero, 1.0, np.nan_to_num(cos, nan=0.0))


def _torch_features(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    params = list(module.parameters()) + list(module.buffers())
    dev = params[0].device if params else torch.device("cpu")
    was = module.training
    module.eval()
    try:
        with torch.inference_mode():
            y = module(x.to(dev))
    finally:
        module.train(was)
    if isinstance(y, tuple | list):
        y = y[0]
    return y.float().cpu()


def _check(enc: OnnxEncoder, module: nn.Module, x: torch.Tensor, threshold: float) -> float:
    x = x[:N_CHECK]
    cos = float(row_cosine(enc(x).numpy(), _torch_features(module, x).numpy()).min())
    enc.check_cosine = cos
    return cos


def onnx_encoder(
    module: nn.Module,
    input_px: int,
    first_batch: torch.Tensor,
    *,
    extra: dict[str, Any] | None = None,
    quantization: str = "",
    providers: list[str] | None = None,
    min_cosine: float = MIN_COSINE,
) -> OnnxEncoder:
    """``module`` as an :class:`OnnxEncoder`, from the cache or exported, checked on ``first_batch``.

    Parameters
    ----------
    module
        The frozen encoder (kept as it is; it runs once in torch on the checked patches).
    input_px
        Side of the square input in pixels (part of the graph's key).
    first_batch
        Normalised float32 images; the first :data:`N_CHECK` are computed by both engines.
    extra
        How the encoder was built (name, architecture, keyword arguments), part of the key.
    quantization
        ``""`` (float32) or ``"int8-dynamic"``.
    providers
        ONNX Runtime execution providers (see :class:`OnnxEncoder`).
    min_cosine
        Smallest cosine similarity per checked patch between the engines' features (float32 graphs; a cached
        graph below it is exported again, and a new one below it is an error).

    Raises
    ------
    RuntimeError
        The export failed, or the exported graph's features disagree with torch's.

    Examples
    --------
    >>> import timm
    >>> m = timm.create_model("resnet18", num_classes=0).eval()  # doctest: +SKIP
    >>> enc = onnx_encoder(m, 64, torch.randn(2, 3, 64, 64))  # doctest: +SKIP
    >>> enc(torch.randn(5, 3, 64, 64)).shape  # doctest: +SKIP
    torch.Size([5, 512])
    """
    key = graph_key(module, input_px, extra, quantization)
    last = 0.0
    for fresh in (False, True):
        try:
            with _graph_path(module, input_px, key, quantization, fresh) as path:
                enc = OnnxEncoder(path, providers=providers, quantization=quantization)
            last = _check(enc, module, first_batch, min_cosine)
        except Exception as err:
            raise RuntimeError(f"exporting the encoder to ONNX failed ({type(err).__name__}: {err})") from err
        if quantization or last >= min_cosine:
            return enc
    raise RuntimeError(
        f"ONNX Runtime's features differ from torch's (cosine similarity {last:.6f} < {min_cosine} on the first "
        "patches)"
    )


# ------------------------------------------------------------------------------------------------ choice
def info_key(info: dict[str, Any] | None) -> dict[str, Any]:
    """The part of a :func:`~agl_scverse.model.get_encoder` ``info`` that goes into a graph's cache key."""
    info = info or {}
    keys = ("name", "spec", "arch", "preset", "encoder_kwargs", "source", "weights_sha256", "seed")
    return {k: info.get(k) for k in keys if info.get(k) not in (None, "")}


def select_backend(
    backend: str,
    device: torch.device,
    precision_name: str,
    callable_encoder: bool = False,
    precision_requested: str = "auto",
) -> str:
    """What runs the encoder: ``"torch"`` or ``"onnx"`` (decided before any export; see the module docs).

    ``"auto"`` gives ``"onnx"`` on a CPU with ``onnxruntime`` and ``onnx`` installed, for a module (not a plain
    callable), when ``precision="auto"`` resolved to float32; otherwise ``"torch"`` with one log line saying why
    (an explicit ``precision="fp32"`` asks for torch's float32 reference, bit for bit as earlier versions). A
    forced ONNX backend that cannot run raises.

    Examples
    --------
    >>> select_backend("torch", torch.device("cpu"), "fp32")
    'torch'
    """
    check_choice("backend", backend, consts.BACKENDS)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        why = None
        if device.type != "cpu":
            why = f"the encoder runs on {device.type} (ONNX Runtime is used on CPUs)"
        elif precision_name != "fp32":
            why = f"precision {precision_name!r} (ONNX Runtime runs float32)"
        elif precision_requested != "auto":
            why = f"precision={precision_requested!r} asks for torch's float32 reference"
        elif callable_encoder:
            why = "the encoder is a plain Python callable (only torch modules are exported)"
        elif not onnx_backend_available():
            why = "onnxruntime / onnx are not installed (pip install 'agl-scverse[onnx]' for a faster CPU encoder)"
        if why is not None:
            if device.type == "cpu":
                logg.info(f"backend='auto': the encoder runs in torch: {why}.")
            return "torch"
        return "onnx"
    if not onnx_backend_available():
        raise ImportError(
            f"backend={backend!r} needs onnxruntime and onnx: pip install 'agl-scverse[onnx]' (or onnxruntime onnx), "
            "or use backend='torch'."
        )
    if precision_name != "fp32":
        raise ValueError(
            f"backend={backend!r} runs the encoder in float32; the precision asked for is {precision_name!r}. Use "
            "precision='fp32' (or 'auto' on a CPU without native bf16), or backend='torch'."
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"backend={backend!r} runs on a CPU (or a CUDA GPU with onnxruntime-gpu), not {device.type!r}."
        )
    return backend


def providers_for(device: torch.device) -> list[str]:
    """ONNX Runtime execution providers for ``device`` (CUDA needs ``onnxruntime-gpu``; checked here)."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ValueError(
            "backend='onnx' on a CUDA device needs onnxruntime-gpu (CUDAExecutionProvider is not available); "
            "use backend='torch' on the GPU, or device='cpu'."
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def start_backend(
    backend: str,
    requested: str,
    module: nn.Module,
    input_px: int,
    first_batch: torch.Tensor,
    device: torch.device,
    info: dict[str, Any] | None = None,
) -> OnnxEncoder | None:
    """The :class:`OnnxEncoder` of a resolved ``backend`` (None for torch), checked on ``first_batch``.

    ``backend`` is what :func:`select_backend` returned for ``requested``. When the export or the check fails,
    ``requested="auto"`` goes on in torch (None, with one log line); a forced backend raises ``RuntimeError``.
    The session of the last graph started is kept in this process, keyed by content (:func:`graph_key`: the
    module's tensors and structure, the input size, how it was built), the providers and the thread count: the
    next run of the same encoder reuses it and the check it passed, without loading or checking again
    (:func:`clear_started` forgets it).
    """
    if backend == "torch":
        return None
    providers = providers_for(device)
    memo = (graph_key(module, input_px, info_key(info)), tuple(providers), torch.get_num_threads())
    if memo in _STARTED:  # this process already loaded and checked the graph of this very content
        return _STARTED[memo]
    try:
        enc = onnx_encoder(module, input_px, first_batch, extra=info_key(info), providers=providers)
    except RuntimeError as err:
        if requested != "auto":
            raise RuntimeError(f"backend={requested!r}: {err}. Use backend='torch' for this encoder.") from err
        logg.info(f"backend='auto': the encoder runs in torch: {err}.")
        return None
    _STARTED.clear()  # one graph kept: the encoder of the last run
    _STARTED[memo] = enc
    return enc


def clear_started() -> None:
    """Forget the ONNX Runtime session :func:`start_backend` keeps for the next run (frees its memory).

    Examples
    --------
    >>> clear_started()
    """
    _STARTED.clear()
