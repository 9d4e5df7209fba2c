"""Scale benchmark: peak RSS and time of agl_fit / agl_predict / evaluate at real study sizes, and embed_patches
on a synthetic whole-slide TIFF.

Builds sparse synthetic counts (``--genes`` genes, ``--density`` non-zero fraction, Poisson counts on a latent
state) and a 512-d embedding for each size in ``--spots``, writes them to an h5ad under ``--workdir`` once, then
measures each step in a fresh subprocess (so each peak RSS is that step's own, read with
``resource.getrusage``): ``fit`` (``--methods``, e.g. ``agl``, ``dkgsb`` or ``dkgsb:mlp`` for a head other than
the default; ``--epochs`` epochs, ``--n-seeds`` networks, refit with ``--refit``), ``linear_head`` (the closed-form
head of ``head="hybrid"`` alone, on the targets and the widest auxiliary grid of DkGSB), ``predict`` (+ ``write_h5ad`` of
the predictions), ``evaluate`` (``genes="predicted"``) and, when asked, ``fit_backed`` (the fit on
``read_h5ad(..., backed="r")``: counts stay on disk). The image part (``--image-px``) writes a JPEG-compressed
pyramidal tiled TIFF and embeds patches from it (``benchmarks/speed/_scale_images.py``).

Run::

    python -m benchmarks.speed.bench_scale                 # 2k, 10k, 50k, 200k spots x 18k genes + 60k px image
    python -m benchmarks.speed.bench_scale --spots 2000 10000 --steps fit --image-px 0   # a quick subset

Writes ``benchmarks/results/scale.json`` and ``benchmarks/results/scale.png`` (RSS and seconds per epoch versus
spots) and prints a Markdown table for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._common import REPO, RESULTS, git_state


# ----------------------------------------------------------------------------------------------- data
def make_data(path: Path, n_spots: int, n_genes: int, density: float, dim: int = 512, seed: int = 0) -> None:
    """Sparse counts and an embedding driven by one latent state, built in row chunks, written to ``path``."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    n_lat = 8
    W_emb = rng.normal(size=(n_lat, dim)).astype(np.float32)
    load = (rng.normal(size=(n_lat, n_genes)) * rng.uniform(0.0, 0.6, size=n_genes)).astype(np.float32)
    p_gene = np.clip(rng.lognormal(np.log(density), 0.8, size=n_genes), 0.002, 0.95).astype(np.float32)
    p_gene *= density / p_gene.mean()
    lam = rng.lognormal(0.0, 0.7, size=n_genes).astype(np.float32)
    blocks, embs = [], []
    for s in range(0, n_spots, 2000):
        m = min(2000, n_spots - s)
        Z = rng.normal(size=(m, n_lat)).astype(np.float32)
        eff = np.exp(np.clip(Z @ load, -3, 3))
        nz = rng.random((m, n_genes), dtype=np.float32) < np.clip(p_gene * eff, 0, 1)
        counts = np.zeros((m, n_genes), dtype=np.float32)
        counts[nz] = 1 + rng.poisson((lam * eff)[nz])
        blocks.append(sp.csr_matrix(counts))
        embs.append(np.tanh(Z @ W_emb) + 0.3 * rng.normal(size=(m, dim)).astype(np.float32))
    X = sp.vstack(blocks, format="csr", dtype=np.float32)
    obs = pd.DataFrame(index=[f"s{i}" for i in range(n_spots)])
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
    adata.obsm["X_emb"] = np.concatenate(embs).astype(np.float32)
    adata.write_h5ad(path)


# ----------------------------------------------------------------------------------------------- workers
def _linear_head(adata) -> dict:
    """The linear head of ``head="hybrid"`` on every spot (80 % train): what it adds to a fit's peak."""
    from agl_scverse._expression import ExpressionBatches
    from agl_scverse.tl._fit import k_search_grid
    from agl_scverse.tl._linear_head import hybrid_linear

    n, n_t = adata.n_obs, 50
    ks = k_search_grid(adata.n_vars - n_t)
    expr = ExpressionBatches(adata.X, np.arange(n_t + max(ks)))
    order = np.random.default_rng(0).permutation(n)
    train, val = np.sort(order[: int(0.8 * n)]), np.sort(order[int(0.8 * n) :])
    mlp_val = np.random.default_rng(1).normal(size=(len(val), n_t)).astype(np.float32)
    _, info = hybrid_linear(adata.obsm["X_emb"], expr, train, val, n_t, ks, True, mlp_val)
    return {"k": info["k"], "rank": info["rank"], "n_model_genes": n_t + max(ks)}


def _worker(step: str, data: Path, out: Path, method: str, epochs: int, n_seeds: int, refit: bool) -> None:
    """One measured step in this (fresh) process; writes a JSON record to ``out``."""
    import warnings

    import anndata as ad
    import psutil
    import torch

    import agl_scverse as agl

    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    proc = psutil.Process()
    t0 = time.perf_counter()
    adata = ad.read_h5ad(data, backed="r" if step == "fit_backed" else None)
    rec: dict = {"step": step, "method": method, "n_spots": adata.n_obs, "n_genes": adata.n_vars}
    rec["read_seconds"] = time.perf_counter() - t0
    rec["data_rss_mb"] = proc.memory_info().rss / 2**20
    model_dir = data.with_suffix(".model")
    t0 = time.perf_counter()
    if step in ("fit", "fit_backed"):
        name, _, head = method.partition(":")
        training = agl.TrainingConfig(epochs=epochs, patience=epochs + 1, n_seeds=n_seeds, refit=refit)
        model = agl.tl.agl_fit(
            adata, method=name, embedding_key="X_emb", training=training, network=agl.NetworkConfig(head=head or None),
            progress=False, device="cpu", save_dir=model_dir, overwrite=True,
        )  # fmt: skip
        rec["head"] = model.config["head"]
        hist = adata.uns["agl"]["history"]
        rec["seconds_per_epoch"] = float(np.median(hist["seconds"]))
        rec["k"] = int(model.k)
        rec["n_model_genes"] = len(model.genes)
    elif step == "linear_head":
        rec.update(_linear_head(adata))
    elif step == "predict":
        agl.tl.agl_predict(adata, model_dir, device="cpu")
        pred = adata.layers["agl_pred"]
        rec["layer_type"] = type(pred).__name__
        rec["predict_seconds"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        adata.write_h5ad(data.with_suffix(".pred.h5ad"))
        rec["write_seconds"] = time.perf_counter() - t1
        data.with_suffix(".pred.h5ad").unlink()
    elif step == "evaluate":
        adata.obs["agl_split"] = "unused"  # every spot scored, no baselines
        agl.tl.evaluate(adata, model_dir, genes="predicted", baselines=False)
        rec["n_genes_scored"] = int(np.isfinite(adata.var["agl_pcc"]).sum())
    rec["seconds"] = time.perf_counter() - t0
    rec["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write_text(json.dumps(rec))


def measure(step: str, data: Path, method: str = "agl", epochs: int = 2, n_seeds: int = 1, refit: bool = False) -> dict:
    """Run one step in a subprocess and return its record."""
    out = data.with_suffix(f".{step}.{method.replace(':', '_')}.json")
    cmd = [sys.executable, "-m", __spec__.name, "--worker", step, "--data", str(data), "--out", str(out), "--method", method,
           "--epochs", str(epochs), "--n-seeds", str(n_seeds)] + (["--refit"] if refit else [])  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {"step": step, "method": method, "error": (proc.stderr or proc.stdout)[-2000:],
                "wall_seconds": time.perf_counter() - t0}  # fmt: skip
    rec = json.loads(out.read_text())
    rec["wall_seconds"] = time.perf_counter() - t0
    return rec


# ----------------------------------------------------------------------------------------------- report
def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    ok = [r for r in rows if "error" not in r and "skipped" not in r]
    for key in sorted({(r["step"], r["method"]) for r in ok}):
        rs = sorted((r for r in ok if (r["step"], r["method"]) == key), key=lambda r: r["n_spots"])
        x = [r["n_spots"] for r in rs]
        a.plot(
            x,
            [r["peak_rss_mb"] / 1024 for r in rs],
            "o-",
            label=f"{key[0]} ({key[1]})" if key[0].startswith("fit") else key[0],
        )
        if key[0].startswith("fit"):
            b.plot(x, [r["seconds_per_epoch"] for r in rs], "o-", label=f"fit ({key[1]})")
    sizes = sorted({r["n_spots"] for r in ok})
    for ax, title in ((a, "peak RSS (GB)"), (b, "seconds per epoch")):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
        ax.set_xlabel("spots (18k genes)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spots", type=int, nargs="+", default=[2000, 10000, 50000, 200000])
    p.add_argument("--genes", type=int, default=18000)
    p.add_argument("--density", type=float, default=0.075)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n-seeds", type=int, default=1, help="networks per fit (agl_fit's default: 5)")
    p.add_argument("--refit", action="store_true", help="refit on train + validation (agl_fit's default)")
    p.add_argument("--steps", nargs="+", default=["fit", "predict", "evaluate"])
    p.add_argument(
        "--evaluate-max-spots", type=int, default=50000,
        help="skip evaluate(genes='predicted') above this size (time: it scores every predicted gene)",
    )  # fmt: skip
    p.add_argument("--methods", nargs="+", default=["agl", "dkgsb"])
    p.add_argument("--image-px", type=int, default=60000, help="side of the synthetic WSI (0: skip)")
    p.add_argument("--workdir", default="/tmp/agl_scale")
    p.add_argument("--stem", default=None, help="results file name (default: scale, or scale_subset for fewer sizes)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default="agl", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker, Path(args.data), Path(args.out), args.method, args.epochs, args.n_seeds, args.refit)
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    t_all = time.perf_counter()
    for n in args.spots:
        data = work / f"scale_{n}x{args.genes}.h5ad"
        if not data.exists():
            t0 = time.perf_counter()
            make_data(data, n, args.genes, args.density)
            print(f"built {data.name} in {time.perf_counter() - t0:.0f} s", flush=True)
        for step in args.steps:
            if step == "evaluate" and n > args.evaluate_max_spots:
                rows.append(
                    {"step": "evaluate", "method": "agl", "n_spots": n, "skipped": "above --evaluate-max-spots"}
                )
                continue
            for method in args.methods if step.startswith("fit") else ["agl"]:
                if not step.startswith("fit") and "fit" not in args.steps and not data.with_suffix(".model").exists():
                    rows.append(measure("fit", data, "agl", args.epochs, args.n_seeds, args.refit))
                rec = measure(step, data, method, args.epochs, args.n_seeds, args.refit)
                rows.append(rec)
                print(json.dumps(rec), flush=True)
    image = None
    if args.image_px:
        from benchmarks.speed._scale_images import run_image_benchmark

        image = run_image_benchmark(work, size_px=args.image_px)
        print(json.dumps(image), flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python -m benchmarks.speed.bench_scale " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git": git_state(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "total_seconds": time.perf_counter() - t_all,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, torch threads 2",
        "genes": args.genes,
        "density": args.density,
        "epochs": args.epochs,
        "n_seeds": args.n_seeds,
        "refit": args.refit,
        "rows": rows,
        "image": image,
    }
    name = args.stem or ("scale" if set(args.spots) >= {2000, 10000, 50000, 200000} else "scale_subset")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    _plot(rows, RESULTS / f"{name}.png")
    print("\n| spots | step | method | peak RSS (GB) | data RSS (GB) | s / epoch | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r or "skipped" in r:
            why = "error" if "error" in r else "not run: " + r["skipped"]
            print(f"| {r.get('n_spots', '?')} | {r['step']} | {r['method']} | {why} | | | |")
            continue
        spe = f"{r['seconds_per_epoch']:.1f}" if "seconds_per_epoch" in r else "-"
        print(
            f"| {r['n_spots']:,} | {r['step']} | {r['method']} | {r['peak_rss_mb'] / 1024:.2f} | "
            f"{r['data_rss_mb'] / 1024:.2f} | {spe} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
