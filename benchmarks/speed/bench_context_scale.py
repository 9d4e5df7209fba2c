"""Peak memory and time of agl.pp.spatial_context at scale: synthetic spots on a grid, random float32 embeddings.

Each recipe runs in its own process (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is a process-lifetime peak), which
reports its peak resident memory before (squidpy imported, input built) and after the call and the sizes of the input embedding and of the output.
The bound to check: peak - baseline (input and coordinates loaded) ~ the output array plus one library's embedding
copy plus chunk buffers (64 MiB of gathered neighbour rows for max / std).

Run::

    python -m benchmarks.speed.bench_context_scale [--n 200000] [--dim 1024] [--libraries 4]

Writes ``benchmarks/results/context_scale.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._common import REPO, RESULTS, command, git_state

RECIPES = {
    "default (k=12, concat, mean+std)": {},
    "blend_k12": {"output": "blend"},
    "concat_k12 mean+max+std": {"aggregation": ["mean", "max", "std"]},
    "rings2 (hex grid), blend": {"n_rings": 2, "output": "blend"},
}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(n: int, dim: int, libraries: int, recipe: str) -> dict:
    import pandas as pd
    import squidpy  # noqa: F401  (imported before the baseline: its import alone takes ~400 MiB)
    from anndata import AnnData

    import agl_scverse as agl

    side = int(np.ceil(np.sqrt(n / libraries)))
    per = n // libraries
    gx, gy = np.meshgrid(np.arange(side), np.arange(side))
    grid = np.stack([gx.ravel() + 0.5 * (gy.ravel() % 2), gy.ravel() * np.sqrt(3) / 2], 1)[:per] * 100.0  # hexagonal
    coords = np.concatenate([grid] * libraries)
    lib = np.repeat([f"L{i}" for i in range(libraries)], per)
    rng = np.random.default_rng(0)
    X = np.empty((len(lib), dim), dtype=np.float32)
    for s in range(0, len(lib), 65536):
        X[s : s + 65536] = rng.standard_normal((min(65536, len(lib) - s), dim), dtype=np.float32)
    a = AnnData(obs=pd.DataFrame({"library_id": pd.Categorical(lib)}, index=pd.RangeIndex(len(lib)).astype(str)))
    a.obsm["spatial"] = coords
    a.obsm["X_emb"] = X
    base = peak_mib()
    t = time.perf_counter()
    agl.pp.spatial_context(a, "X_emb", **RECIPES[recipe])
    secs = time.perf_counter() - t
    out = a.obsm["X_emb_context"]
    return {
        "recipe": recipe, "n_spots": int(len(lib)), "dim": dim, "libraries": libraries, "seconds": secs,
        "baseline_peak_mib": base, "peak_mib": peak_mib(), "input_mib": X.nbytes / 2**20,
        "output_mib": out.nbytes / 2**20, "library_input_mib": X.nbytes / libraries / 2**20,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--libraries", type=int, default=4)
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--child", default=None)
    ap.add_argument("--out", default=str(RESULTS / "context_scale.json"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.n, args.dim, args.libraries, args.child)))
        return
    rows = []
    for recipe in args.recipes:
        cmd = [sys.executable, "-m", __spec__.name, "--n", str(args.n), "--dim", str(args.dim), "--libraries",
               str(args.libraries), "--child", recipe]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ}, cwd=REPO)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{recipe}: {r['seconds']:.1f} s, peak {r['peak_mib']:.0f} MiB (before the call {r['baseline_peak_mib']:.0f}"
              f" MiB; output {r['output_mib']:.0f} MiB)", flush=True)  # fmt: skip
    print("\n| recipe | spots x dim | seconds | peak RSS before -> after (MiB) | increase | output (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['n_spots']} x {r['dim']} | {r['seconds']:.1f} | {r['baseline_peak_mib']:.0f} -> "
              f"{r['peak_mib']:.0f} | {r['peak_mib'] - r['baseline_peak_mib']:.0f} | {r['output_mib']:.0f} |")  # fmt: skip
    info = {
        "rows": rows,
        "command": command(),
        "git": git_state(),
        "machine": platform.platform(),
        "load": os.getloadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
