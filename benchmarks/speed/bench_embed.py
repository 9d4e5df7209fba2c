"""Patch extraction and embedding throughput on the five HER2+ sections (all 910 spots).

Measures, in one run:

- image decode: reading each section's full-resolution JPEG (seconds per section, total);
- patch extraction: ``SpotPatches[i]`` over all spots on already decoded images (spots/s, median of repeats);
- embedding: ``agl.pp.embed_patches`` end to end (fresh call: image decode, encoder build, weight load and
  hash, patch cutting, normalisation, forward) and the inner loop alone on a ready dataset (patches cut on the
  fly + normalise + forward), each as a ratio to a bare ``model(batch)`` loop over pre-built normalised tensors
  (median time per full batch), for a random-init ResNet-18 and for DenseNet-121 with the local weights.

Usage::

    python -m benchmarks.speed.bench_embed [--data ../shared/data/her2st] [--weights <densenet .pth>]
        [--out benchmarks/results/embed.json] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Subset

from benchmarks._common import DENSENET_WEIGHTS, HER2ST, REPO, RESULTS


def load_sections(data: Path):
    """All sections as one AnnData (agl.io.read_legacy_st when present, else spots + image paths only)."""
    import anndata as ad

    import agl_scverse as agl

    reader = getattr(agl.io, "read_legacy_st", None)
    if reader is not None:
        return reader(data, load_images=False), "agl.io.read_legacy_st"
    from scipy.spatial import cKDTree

    parts, uns = [], {}
    for folder in sorted(p for p in data.iterdir() if (p / "spots.tsv").exists()):
        spots = pd.read_csv(folder / "spots.tsv", sep="\t")
        counts_ids = pd.read_csv(folder / "counts.tsv.gz", sep="\t", usecols=[0]).iloc[:, 0].astype(str)
        spots["id"] = spots["x"].astype(str) + "x" + spots["y"].astype(str)
        spots = spots[spots["id"].isin(set(counts_ids))]
        xy = spots[["pixel_x", "pixel_y"]].to_numpy(float)
        d = cKDTree(xy).query(xy, k=2)[0][:, 1]
        a = ad.AnnData(
            np.zeros((len(xy), 1), dtype=np.float32),
            obs=pd.DataFrame({"library_id": folder.name}, index=folder.name + "_" + spots["id"].to_numpy()),
            obsm={"spatial": xy},
        )
        parts.append(a)
        uns[folder.name] = {
            "images": {},
            "scalefactors": {"microns_per_pixel": 200.0 / float(np.median(d))},
            "metadata": {"source_image_path": str(folder / "he.jpg")},
        }
    adata = ad.concat(parts)
    adata.obs["library_id"] = adata.obs["library_id"].astype("category")
    adata.uns["spatial"] = uns
    return adata, "minimal (spots.tsv + he.jpg)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(model, x_all: torch.Tensor, batch_size: int, device: torch.device, max_batches: int) -> dict:
    """Time ``model(batch)`` on pre-built normalised tensors; median over (up to ``max_batches``) full batches."""
    model.to(device).eval()
    times = []
    with torch.inference_mode():
        model(x_all[:batch_size].to(device))  # warm-up (kernel selection, allocations)
        _sync(device)
        for start in range(0, len(x_all), batch_size):
            xb = x_all[start : start + batch_size].to(device)
            t0 = time.perf_counter()
            model(xb)
            _sync(device)
            if len(xb) == batch_size:
                times.append(time.perf_counter() - t0)
            if len(times) >= max_batches:
                break
    med = statistics.median(times)
    return {"median_batch_s": med, "n_batches": len(times), "spots_per_s": batch_size / med}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HER2ST)
    p.add_argument("--weights", type=Path, default=DENSENET_WEIGHTS)
    p.add_argument("--out", type=Path, default=RESULTS / "embed.json")
    p.add_argument("--results-md", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    p.add_argument("--no-md", action="store_true", help="do not update RESULTS.md")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the patch-extraction pass")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--patch-px", type=int, default=224)
    p.add_argument("--patch-um", type=float, default=112.0)
    p.add_argument("--bare-batches", type=int, default=8, help="full batches timed in the bare loop (median)")
    p.add_argument("--loop-spots", type=int, default=256, help="spots in the inner-loop pass (0: all)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import agl_scverse as agl
    from agl_scverse import _spatial
    from agl_scverse._images import tile_cache
    from agl_scverse.pp._embed import _encode

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    adata, loader_name = load_sections(args.data)
    t_read = time.perf_counter() - t0
    libs = list(adata.uns["spatial"])
    n = adata.n_obs
    print(f"{n} spots in {len(libs)} sections ({loader_name}, {t_read:.1f} s)")

    # -- image decode, per section
    decode_s = {}
    for lib in libs:
        tile_cache().clear()
        t0 = time.perf_counter()
        src, _, which = _spatial.get_image(adata, lib)
        img = np.asarray(src)  # a whole decode (a JPEG is decoded once into the memory-mapped cache, then mapped)
        decode_s[lib] = time.perf_counter() - t0
        assert which == "fullres", which
    tile_cache().clear()
    del img

    # -- patch extraction on decoded images
    kw = {"patch_px": args.patch_px, "patch_um": args.patch_um, "library_key": "library_id"}
    t0 = time.perf_counter()
    ds = agl.pp.SpotPatches(adata, **kw)
    t_construct = time.perf_counter() - t0
    extract_rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        extract_rates.append(n / (time.perf_counter() - t0))
    patches = torch.stack([ds[i] for i in range(len(ds))])
    print(
        f"decode {sum(decode_s.values()):.2f} s for {len(libs)} images; SpotPatches() {t_construct:.2f} s; "
        f"extraction {statistics.median(extract_rates):.0f} spots/s (crop side {ds.crop_side})"
    )

    n_loop = n if args.loop_spots <= 0 else min(n, args.loop_spots)
    encoders = [
        ("resnet18 (random init)", {"encoder": "resnet18"}),
        ("densenet121 (local ImageNet weights)", {"encoder": "densenet121", "weights": str(args.weights)}),
    ]
    rows = []
    for label, enc_kw in encoders:
        model, info = agl.model.get_encoder(enc_kw["encoder"], weights=enc_kw.get("weights"))
        x_all = agl.model.normalize(patches, info["mean"], info["std"])
        bare = bare_loop(model, x_all, args.batch_size, device, args.bare_batches)
        # inner loop on the ready dataset (patches cut on the fly, normalise, forward), on the first loop_spots
        sub = Subset(ds, range(n_loop))
        t0 = time.perf_counter()
        _encode(model, sub, info["mean"], info["std"], args.batch_size, device, 0, f"loop {enc_kw['encoder']}")
        _sync(device)
        loop_rate = n_loop / (time.perf_counter() - t0)
        # end to end: a fresh embed_patches call (decodes the images again, builds and loads the encoder)
        tile_cache().clear()
        t0 = time.perf_counter()
        enc = agl.EncoderConfig(**enc_kw, patch_px=args.patch_px, patch_um=args.patch_um, batch_size=args.batch_size)
        out = agl.pp.embed_patches(adata, enc, device=args.device, library_key="library_id", copy=True)
        _sync(device)
        e2e_rate = n / (time.perf_counter() - t0)
        key = f"X_agl_{info['name']}"
        feats = out.obsm[key]
        rows.append(
            {
                "encoder": label,
                "feature_dim": int(feats.shape[1]),
                "bare_spots_per_s": bare["spots_per_s"],
                "bare_median_batch_s": bare["median_batch_s"],
                "loop_spots_per_s": loop_rate,
                "embed_patches_spots_per_s": e2e_rate,
                "loop_ratio_to_bare": loop_rate / bare["spots_per_s"],
                "embed_patches_ratio_to_bare": e2e_rate / bare["spots_per_s"],
                "weights_sha256": info["weights_sha256"],
                "features_finite": bool(np.isfinite(feats).all()),
            }
        )
        print(
            f"{label}: bare {bare['spots_per_s']:.1f} spots/s, loop {loop_rate:.1f} "
            f"({loop_rate / bare['spots_per_s']:.2f}x), embed_patches {e2e_rate:.1f} ({e2e_rate / bare['spots_per_s']:.2f}x)"
        )
        del out, x_all, model

    command = "python -m benchmarks.speed.bench_embed " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    result = {
        "command": command.strip(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "load_average_at_end": list(os.getloadavg()),
        },
        "versions": {"torch": str(torch.__version__), "agl_scverse": agl.__version__},
        "data": {"n_spots": int(n), "sections": libs, "loader": loader_name},
        "settings": {
            "patch_px": args.patch_px,
            "patch_um": args.patch_um,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "bare_batches": args.bare_batches,
            "loop_spots": n_loop,
            "crop_side_px": {str(k): int(v) for k, v in ds.crop_side.items()},
        },
        "decode_s": {k: round(v, 3) for k, v in decode_s.items()},
        "decode_total_s": round(sum(decode_s.values()), 3),
        "spotpatches_construct_s": round(t_construct, 3),
        "extraction_spots_per_s": {"median": statistics.median(extract_rates), "all": extract_rates},
        "embedding": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = _markdown(result)
    print("\n" + table)
    if not args.no_md:
        _update_results_md(args.results_md, table)
    return result


def _markdown(r: dict) -> str:
    s = r["settings"]
    lines = [
        "## Embeddings",
        "",
        f"`{r['command']}` ({r['date_utc']} UTC; {r['machine']['cpu_count']} CPU cores shared with other jobs, "
        f"torch threads {r['machine']['torch_threads']}, device {r['machine']['device']}, load average at end "
        f"{r['machine']['load_average_at_end'][0]:.1f}). Five HER2+ sections, {r['data']['n_spots']} spots, "
        f"{s['patch_px']} px patches of {s['patch_um']:g} µm (crop side {sorted(set(s['crop_side_px'].values()))} "
        f"source px), batch {s['batch_size']}. Raw numbers: `benchmarks/results/embed.json`.",
        "",
        f"- Image decode (full-resolution JPEG, ~9,300 x 9,900 px): {r['decode_total_s']:.2f} s for "
        f"{len(r['decode_s'])} sections ({r['decode_total_s'] / len(r['decode_s']):.2f} s each).",
        f"- Patch extraction on decoded images (crop, pad, resize; `SpotPatches[i]`): "
        f"{r['extraction_spots_per_s']['median']:.0f} spots/s (median of {s['repeats']} passes).",
        "",
        "| encoder | D | bare `model(batch)` spots/s | inner loop spots/s (ratio) | `embed_patches` spots/s (ratio) |",
        "|---|---|---|---|---|",
    ]
    for row in r["embedding"]:
        lines.append(
            f"| {row['encoder']} | {row['feature_dim']} | {row['bare_spots_per_s']:.1f} | "
            f"{row['loop_spots_per_s']:.1f} ({row['loop_ratio_to_bare']:.2f}) | "
            f"{row['embed_patches_spots_per_s']:.1f} ({row['embed_patches_ratio_to_bare']:.2f}) |"
        )
    lines += [
        "",
        f"Bare: median time of a full batch over the pre-built normalised tensors ({s['bare_batches']} batches after "
        f"one warm-up batch). Inner loop: patches cut on the fly from decoded images, normalised, encoded (one pass "
        f"over the first {s['loop_spots']} spots). `embed_patches`: a fresh call end to end on all spots (image "
        "decode, encoder build, weight load and sha256, the loop; one pass). "
        "Ratio = spots/s relative to bare. Timings on a shared machine vary by tens of percent between runs.",
        "",
    ]
    return "\n".join(lines)


def _update_results_md(path: Path, section: str) -> None:
    """Replace (or append) the "## Embeddings" section, leaving the other sections as they are."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    print(f"updating {path}")
    path.write_text(replace_section(text, section))


def replace_section(text: str, section: str, header: str = "## Embeddings") -> str:
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.strip() == header), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + section.rstrip("\n") + "\n" + ("\n" + tail if tail else "")


if __name__ == "__main__":
    main()
