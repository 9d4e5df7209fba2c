"""Encoder backends end to end through ``agl.pp.embed_patches``, against a bare eager fp32 forward, in one run.

On the first ``--spots`` HER2+ spots (DenseNet-121 with the local ImageNet weights, 224 px patches of 160 µm by
default), measured in one process, one after the other:

- bare eager fp32 forward: ``model(x)`` over pre-built normalised batches (median time per full batch), at the
  start and again at the end of the run (the machine is shared: the two say how much the load moved);
- ``embed_patches`` end to end (patch cutting from the decoded image cache, normalisation, forward, record) with
  ``backend="torch", precision="fp32"`` (eager fp32), ``backend="torch", precision="auto"`` (channels_last on a
  CPU without native bf16), a ``torch.compile``-d encoder (``--no-compile`` to skip its ~2 min of compiling;
  its first call, compile included, is reported apart), and the default ``backend="auto"`` (ONNX Runtime; first
  call with an empty graph cache, export included, reported apart), the default again with nothing kept from the
  previous call (the encoder built, the graph read from the disk cache, its session started and checked against
  torch, as in a new process) and the default with the patches cut serially (no read-ahead thread);
- int8 dynamic quantisation of the exported graph: bare forward over the same batches and cosine similarity of its
  features with torch's (it is not a backend option: see the Encoders page).

Each end-to-end variant runs ``--repeats`` times; spots/s are medians, ratios are to the median bare eager fp32
forward (start and end pooled). Peak RSS per variant is the largest resident size a sampling thread saw while it
ran. The images are decoded into the image cache before any timing.

Usage::

    python -m benchmarks.speed.bench_encoder_backends [--spots 128] [--repeats 3] [--no-compile] [--threads N]
        [--data ../shared/data/her2st] [--weights <densenet .pth>] [--out benchmarks/results/encoder_backends.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from benchmarks._common import REPO, SHARED


class PeakRSS:
    """Largest resident set size of this process seen while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def bare_forward(fn, batches: list[torch.Tensor]) -> float:
    """Median seconds per full batch of ``fn`` (one warm-up batch first)."""
    with torch.inference_mode():
        fn(batches[0])
        times = []
        for x in batches:
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "her2st")
    ap.add_argument(
        "--weights", type=Path, default=SHARED / "weights" / "densenet121_keras_imagenet_features_torchvision.pth"
    )
    ap.add_argument("--encoder", default="densenet121")
    ap.add_argument("--section", default="C2")
    ap.add_argument("--spots", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--patch-px", type=int, default=224)
    ap.add_argument("--patch-um", type=float, default=160.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch (and ONNX Runtime) threads; default torch's")
    ap.add_argument("--int8-batches", type=int, default=2, help="full batches timed for int8 (slow here; 0: skip)")
    ap.add_argument("--bare-batches", type=int, default=0, help="full batches of the bare forwards (0: all)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (about 2 min of compiling)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "encoder_backends.json")
    args = ap.parse_args()

    import agl_scverse as agl
    from agl_scverse._utils import versions
    from agl_scverse.encoders import _onnx_backend as ob
    from agl_scverse.pp import _embed as emb

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("AGL_SCVERSE_CACHE", tempfile.mkdtemp(prefix="agl-bench-"))  # an empty graph cache
    load_start = os.getloadavg()
    adata = agl.io.read_legacy_st(args.data, sections=[args.section])[: args.spots].copy()
    n = adata.n_obs
    weights = str(args.weights) if args.weights and args.encoder == "densenet121" else None
    enc = {  # the EncoderConfig fields; each variant overrides some
        "encoder": args.encoder, "weights": weights, "patch_px": args.patch_px, "patch_um": args.patch_um,
        "batch_size": args.batch_size,
    }  # fmt: skip
    ds = agl.pp.SpotPatches(adata, patch_px=args.patch_px, patch_um=args.patch_um, library_key="library_id")
    patches = torch.stack([ds[i] for i in range(n)])  # decodes the image into the cache once
    model, info = agl.model.get_encoder(args.encoder, weights=weights)
    model.eval()
    x_all = agl.model.normalize(patches, info["mean"], info["std"])
    full = [x_all[s : s + args.batch_size] for s in range(0, n - args.batch_size + 1, args.batch_size)]
    bare_batches = full[: args.bare_batches] if args.bare_batches > 0 else full
    print(f"{n} spots, {len(full)} full batches of {args.batch_size}, {torch.get_num_threads()} threads")

    res: dict = {"variants": {}}
    bare_start = bare_forward(model, bare_batches)
    print(f"bare eager fp32 forward (start): {args.batch_size / bare_start:.2f} spots/s")

    def e2e(label: str, repeats: int, before=None, read_ahead: bool = True, **extra) -> np.ndarray:
        rates, peaks, feats = [], [], None
        default = emb.READ_AHEAD
        for _ in range(repeats):
            if before is not None:
                before()
            emb.READ_AHEAD = read_ahead  # the documented switch of the patch read-ahead (default on)
            try:
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    out = agl.pp.embed_patches(
                        adata, {**enc, **extra}, device="cpu", library_key="library_id", key_added="X", copy=True
                    )
                    dt = time.perf_counter() - t0
            finally:
                emb.READ_AHEAD = default
            rates.append(n / dt)
            peaks.append(mem.peak)
            feats = np.asarray(out.obsm["X"])
            rec = out.uns["agl_embeddings"]["X"]
        res["variants"][label] = {
            "spots_per_s": rates,
            "median_spots_per_s": statistics.median(rates),
            "peak_rss_gib": max(peaks) / 2**30,
            "backend": rec.get("backend"),
            "precision": rec.get("precision"),
            "channels_last": rec.get("channels_last"),
        }
        print(
            f"{label}: {statistics.median(rates):.2f} spots/s (median of {repeats}), peak RSS {max(peaks) / 2**30:.2f} GiB"
        )
        return feats

    ref = e2e("eager fp32 (torch)", args.repeats, backend="torch", precision="fp32")
    e2e("channels_last (torch, precision='auto')", args.repeats, backend="torch", precision="auto")
    if not args.no_compile:
        compiled = torch.compile(model)
        pair = (compiled, info)
        e2e("torch.compile: first call (compiling)", 1, encoder=pair, weights=None, backend="torch", precision="fp32")
        e2e("torch.compile", args.repeats, encoder=pair, weights=None, backend="torch", precision="fp32")
    onnx_first = e2e("ONNX Runtime: first call (export)", 1)  # backend="auto", the default
    onnx = e2e("ONNX Runtime (default backend='auto')", args.repeats)

    def forget() -> None:  # as in a new process: nothing kept from the previous call but the graph on disk
        emb._BUILT.clear()
        ob.clear_started()

    e2e("ONNX Runtime (default), nothing kept from the last call", args.repeats, before=forget)
    e2e("ONNX Runtime (default), patches cut serially", args.repeats, read_ahead=False)
    cos = ob.row_cosine(ref, onnx)
    cos_first = ob.row_cosine(ref, onnx_first)

    # int8 dynamic quantisation of the same graph: bare forward and agreement with torch
    q_s, q_cos = None, None
    if args.int8_batches > 0:
        q = ob.onnx_encoder(model, args.patch_px, full[0], quantization="int8-dynamic")
        q_batches = full[: args.int8_batches]
        q_s = bare_forward(q, q_batches)
        with torch.inference_mode():
            q_cos = ob.row_cosine(torch.cat([q(x) for x in q_batches]), torch.cat([model(x) for x in q_batches]))
    f32 = ob.onnx_encoder(model, args.patch_px, full[0], extra=ob.info_key(info))
    f32_s = bare_forward(f32, bare_batches)

    bare_end = bare_forward(model, bare_batches)
    print(f"bare eager fp32 forward (end): {args.batch_size / bare_end:.2f} spots/s")
    bare_rate = args.batch_size / statistics.median([bare_start, bare_end])
    for v in res["variants"].values():
        v["ratio_to_bare_eager"] = v["median_spots_per_s"] / bare_rate
    res.update(
        {
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "logical_cpus": os.cpu_count(),
                "threads": torch.get_num_threads(),
                "load_avg_start": load_start,
                "load_avg_end": os.getloadavg(),
            },
            "versions": versions(),
            "onnxruntime": f32.version,
            "encoder": args.encoder,
            "n_spots": n,
            "patch_px": args.patch_px,
            "patch_um": args.patch_um,
            "batch_size": args.batch_size,
            "bare_eager_fp32_spots_per_s": {
                "start": args.batch_size / bare_start,
                "end": args.batch_size / bare_end,
                "median": bare_rate,
            },
            "bare_onnx_fp32_spots_per_s": args.batch_size / f32_s,
            "bare_onnx_int8_dynamic_spots_per_s": None if q_s is None else args.batch_size / q_s,
            "cosine_onnx_vs_torch": {"min": float(cos.min()), "median": float(np.median(cos))},
            "cosine_onnx_first_call_vs_torch_min": float(cos_first.min()),
            "cosine_int8_vs_torch": None
            if q_cos is None
            else {"min": float(q_cos.min()), "median": float(np.median(q_cos))},
        }
    )
    default = res["variants"]["ONNX Runtime (default backend='auto')"]
    res["target_default_ge_2.5x_bare_eager"] = bool(default["ratio_to_bare_eager"] >= 2.5)
    for label, v in res["variants"].items():
        print(f"  {label:45s} {v['median_spots_per_s']:7.2f} spots/s  {v['ratio_to_bare_eager']:.2f}x bare eager")
    print(
        f"  bare ONNX fp32 {args.batch_size / f32_s:.2f} spots/s; ONNX features' cosine with torch: min {cos.min():.6f}"
    )
    if q_s is not None:
        print(f"  bare ONNX int8 {args.batch_size / q_s:.2f} spots/s; cosine with torch: min {q_cos.min():.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
