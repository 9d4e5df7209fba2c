"""ONNX Runtime for a frozen image encoder: exported once, cached by content, checked against torch."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
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
from agl_scverse._utils import sha256_file
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
    """Whether ``onnxruntime`` and ``onnx`` (torch's exporter writes with it) are installed; nothing is imported."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def cache_dir() -> Path:
    """Folder of exported graphs (not created): ``$AGL_SCVERSE_CACHE/onnx``, else ``$XDG_CACHE_HOME/agl-scverse/onnx``."""
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
    return not path.is_symlink() and path.is_file()


def _files_sha256(folder: Path) -> dict[str, str]:
    """sha256 of every regular file of ``folder`` but the metadata (the graph and any external-data files)."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name == _META:
            continue
        if not _regular_file(p):
            raise PermissionError(f"{p} is not a regular file.")
        out[p.name] = sha256_file(p)
    return out


def _read_entry(entry: Path, key: str) -> Path | None:
    """The graph of a cache entry when it is intact (its metadata names ``key`` and its files' sha256), else None."""
    try:
        if entry.is_symlink() or not entry.is_dir():
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


def graph_key(module: nn.Module, input_px: int, extra: dict[str, Any] | None = None, quantization: str = "") -> str:
    """The cache key of ``module``'s graph: sha256 of its tensors, structure, input size, versions and ``extra``."""
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


def _device(module: nn.Module) -> torch.device:
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if first is None else first.device


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block, back in its own mode after it."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


def _export(module: nn.Module, input_px: int, folder: Path) -> None:
    """Write ``module``'s graph (float32 input ``images`` of shape (batch, 3, px, px) -> ``features``) into ``folder``."""
    x = torch.zeros(2, 3, int(input_px), int(input_px), device=_device(module))
    with _eval_mode(module), torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values that are constant here
        torch.onnx.export(
            module, (x,), str(folder / _GRAPH), dynamo=False, input_names=["images"], output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, opset_version=OPSET,
            do_constant_folding=True,
        )  # fmt: skip


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
    """The graph for ``key``: cached, else exported into the cache (``fresh``: always), else into a temporary folder."""
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
        placed = True
    except OSError:  # another process put its own (equal) graph there first: use ours from where it is
        placed = False
    try:
        yield (entry if placed else tmp) / _GRAPH
    finally:
        if not placed:
            shutil.rmtree(tmp, ignore_errors=True)


class OnnxEncoder:
    """An exported graph run by ONNX Runtime (``threads`` default ``torch.get_num_threads()``): ``(B, 3, H, W)`` -> ``(B, D)``."""

    def __init__(
        self, path: str | Path, providers: list[str] | None = None, threads: int | None = None, quantization: str = ""
    ):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle intra-op threads sleep, leaving the cores to the thread cutting the next patches
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
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (float64; 1 for two zero rows)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    dot = (a * b).sum(1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (na * nb)
    return np.where(both_zero, 1.0, np.nan_to_num(cos, nan=0.0))


def _torch_features(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with _eval_mode(module), torch.inference_mode():
        y = module(x.to(_device(module)))
    if isinstance(y, tuple | list):
        y = y[0]
    return y.float().cpu()


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
    """``module`` as an :class:`OnnxEncoder` checked on ``first_batch`` (a failing cached graph is exported again)."""
    key = graph_key(module, input_px, extra, quantization)
    last = 0.0
    for fresh in (False, True):
        try:
            with _graph_path(module, input_px, key, quantization, fresh) as path:
                enc = OnnxEncoder(path, providers=providers, quantization=quantization)
            x = first_batch[:N_CHECK]
            last = enc.check_cosine = float(row_cosine(enc(x).numpy(), _torch_features(module, x).numpy()).min())
        except Exception as err:
            raise RuntimeError(f"exporting the encoder to ONNX failed ({type(err).__name__}: {err})") from err
        if quantization or last >= min_cosine:
            return enc
    raise RuntimeError(
        f"ONNX Runtime's features differ from torch's (cosine similarity {last:.6f} < {min_cosine} on the first "
        "patches)"
    )


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
    """``"torch"`` or ``"onnx"``, before any export: ``"auto"`` says in one log line why not ONNX; ``"onnx"`` raises."""
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
    """The checked :class:`OnnxEncoder` of a resolved ``backend`` (None: torch); the last one started is kept."""
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
    """Forget the ONNX Runtime session :func:`start_backend` keeps for the next run (frees its memory)."""
    _STARTED.clear()
