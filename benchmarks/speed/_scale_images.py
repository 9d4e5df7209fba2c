"""Whole-slide scale: embedding patches from a synthetic pyramidal TIFF, with the peak memory of the embedding.

Two functions for ``benchmarks/speed/bench_scale.py`` (no command line of their own):

- :func:`write_synthetic_wsi` writes a JPEG-compressed, tiled, pyramidal BigTIFF of H&E-like texture (white
  glass, pink stroma with fibres, purple nuclei) of any size without ever holding the image in memory: every
  tile of every level is computed from its pixel coordinates (the texture is a function of the position in µm,
  with anti-aliasing by the level's pixel size), not by downsampling the level below;
- :func:`run_image_benchmark` writes such a slide, puts ``n_spots`` spots on it and runs
  ``agl.pp.embed_patches`` in a subprocess, so the peak RSS reported is that of the embedding process alone.

Example::

    from benchmarks.speed._scale_images import run_image_benchmark
    print(run_image_benchmark("/tmp/agl_scale", size_px=20000, n_spots=2000))
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

#: µm per level-0 pixel of the synthetic slide (a 40x scan).
MICRONS_PER_PIXEL = 0.25
_GLASS = np.array([243.0, 241.0, 246.0], dtype=np.float32)
_STROMA = np.array([228.0, 150.0, 188.0], dtype=np.float32)
_FIBRE = np.array([205.0, 105.0, 160.0], dtype=np.float32)
_NUCLEUS = np.array([78.0, 48.0, 128.0], dtype=np.float32)
_CELL_UM = 8.0  # one nucleus candidate per 8 µm cell
_FIBRE_UM, _WAVE_UM = 8.0, 32.0  # fibre period and the period of its waviness
#: The cell texture repeats every 512 µm (a multiple of the cell, fibre and wave periods); the tissue outline,
#: computed per pixel, does not repeat.
_PERIOD_UM = 512.0


# ------------------------------------------------------------------------------------------------ texture
def _hash(*ints: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-random uint64 per integer coordinate tuple (splitmix-style mixing)."""
    h = np.full(np.broadcast(*ints).shape, np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k, v in enumerate(ints):
            h ^= np.asarray(v, dtype=np.int64).astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9 + 2 * k + 1)
            h ^= h >> np.uint64(31)
            h *= np.uint64(0x94D049BB133111EB)
            h ^= h >> np.uint64(29)
    return h


def _unit(h: np.ndarray, shift: int = 0) -> np.ndarray:
    """A float in [0, 1) from 16 bits of a hash."""
    return ((h >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.float32) / np.float32(65536.0)


def _sep_sin(xs: np.ndarray, ys: np.ndarray, fx: float, fy: float, phase: float) -> np.ndarray:
    """``sin(fx * x + fy * y + phase)`` on the grid ``ys x xs``, from 1-D sines (sin(a + b) expanded)."""
    a, b = fx * xs + phase, fy * ys
    return np.sin(b)[:, None] * np.cos(a)[None, :] + np.cos(b)[:, None] * np.sin(a)[None, :]


def _field(xs: np.ndarray, ys: np.ndarray, size_um: float, seed: int, n: int = 5) -> np.ndarray:
    """A smooth field in about [-1, 1] varying over a fraction of the slide (the tissue outline)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(ys), len(xs)), dtype=np.float32)
    for _ in range(n):
        f = rng.uniform(1.5, 4.0) * 2 * np.pi / size_um
        a = rng.uniform(0, 2 * np.pi)
        out += _sep_sin(xs, ys, f * np.cos(a), f * np.sin(a), rng.uniform(0, 2 * np.pi))
    return out / np.float32(np.sqrt(n / 2.0))


def _centres_um(start: int, n: int, d: float) -> np.ndarray:
    """µm positions of the centres of level pixels ``start .. start + n - 1`` (downsample ``d``)."""
    return ((start + np.arange(n, dtype=np.float64)) * d + (d - 1) / 2) * MICRONS_PER_PIXEL


def _cells_block(xs: np.ndarray, ys: np.ndarray, px_um: float, seed: int) -> np.ndarray:
    """Stroma, fibres and nuclei (float32 RGB) at the pixel centres ``ys x xs`` (µm), anti-aliased by ``px_um``."""
    f32 = np.float32
    # wavy fibres, damped when the pixels are coarser than their period: sin(a + b), separable
    amp = 0.3 * np.exp(-((px_um / _FIBRE_UM) ** 2) * 4.0)
    a, b = 2 * np.pi * xs / _FIBRE_UM, 2.5 * np.sin(2 * np.pi * ys / _WAVE_UM)
    fibres = (np.sin(b) * amp).astype(f32)[:, None] * np.cos(a).astype(f32)[None, :]
    fibres += (np.cos(b) * amp).astype(f32)[:, None] * np.sin(a).astype(f32)[None, :]
    fibres += f32(amp)
    # nuclei: at most one per cell, inside it; the cell's hash (periodic) gives presence, radius and position
    n_cells = int(round(_PERIOD_UM / _CELL_UM))
    ci, cj = np.floor(xs / _CELL_UM).astype(np.int64), np.floor(ys / _CELL_UM).astype(np.int64)
    gi, gj = np.arange(ci[0], ci[-1] + 1), np.arange(cj[0], cj[-1] + 1)
    h = _hash(gi[None, :] % n_cells, gj[:, None] % n_cells, seed=seed + 1)
    r = 1.6 + 1.4 * _unit(h, 0)
    free = _CELL_UM - 2 * r
    radius = np.where(_unit(h, 48) < 0.45, r, -1e3).astype(f32).ravel()
    cx = (gi[None, :] * _CELL_UM + r + free * _unit(h, 16)).ravel()
    cy = (gj[:, None] * _CELL_UM + r + free * _unit(h, 32)).ravel()
    cell = (cj - gj[0])[:, None] * len(gi) + (ci - gi[0])[None, :]
    dx = (xs[None, :] - cx[cell]).astype(f32)
    dy = (ys[:, None] - cy[cell]).astype(f32)
    fade = min(1.0, (2 * 2.3 / px_um) ** 2)  # sub-pixel nuclei fade into the stroma
    nucleus = np.clip((radius[cell] - np.sqrt(dx * dx + dy * dy)) * f32(1.0 / px_um) + f32(0.5), 0, 1)
    nucleus *= f32(0.9 * fade)
    rgb = _STROMA + (_FIBRE - _STROMA) * fibres[..., None]
    rgb += (_NUCLEUS - rgb) * nucleus[..., None]
    return rgb


_MAPS: dict[tuple, np.ndarray] = {}


def _cell_map(d: float, seed: int) -> np.ndarray:
    """One period of the cell texture at downsample ``d``, uint8 RGB, computed from that level's coordinates."""
    key = ("map", float(d), int(seed))
    if key not in _MAPS:
        period = int(round(_PERIOD_UM / (MICRONS_PER_PIXEL * d)))
        if period < 1 or abs(period * MICRONS_PER_PIXEL * d - _PERIOD_UM) > 1e-6:
            raise ValueError(f"downsample {d} does not divide the {_PERIOD_UM:g} µm texture period.")
        out = np.empty((period, period, 3), dtype=np.uint8)
        block = 512
        for y in range(0, period, block):
            ys = _centres_um(y, min(block, period - y), d)
            for x in range(0, period, block):
                xs = _centres_um(x, min(block, period - x), d)
                out[y : y + len(ys), x : x + len(xs)] = np.clip(
                    _cells_block(xs, ys, MICRONS_PER_PIXEL * d, seed) + 0.5, 0, 255
                )
        for old in [k for k in _MAPS if k[1] != key[1]]:
            del _MAPS[old]  # one level at a time: the writer goes level by level
        _MAPS[key] = out
    return _MAPS[key]


def _cells_tile(x0: int, y0: int, tile: int, d: float, seed: int) -> np.ndarray:
    """The cell texture of one tile: a slice of the periodic map, padded by a tile so no slice wraps."""
    key = ("padded", float(d), int(seed), int(tile))
    if key not in _MAPS:
        cells = _cell_map(d, seed)
        _MAPS[key] = np.pad(cells, ((0, tile), (0, tile), (0, 0)), mode="wrap")
    period = _MAPS[("map", float(d), int(seed))].shape[0]
    y, x = y0 % period, x0 % period
    return _MAPS[key][y : y + tile, x : x + tile]


_NOISE: dict[int, np.ndarray] = {}


def _noise_table(seed: int, n: int = 1024) -> np.ndarray:
    if seed not in _NOISE:
        _NOISE[seed] = np.random.default_rng(seed).integers(-7, 8, size=(n, n), dtype=np.int16)
    return _NOISE[seed]


def synthetic_tile(x0: int, y0: int, tile: int, downsample: float, size_px: int, seed: int = 0) -> np.ndarray:
    """The ``tile x tile`` uint8 RGB pixels of the level with ``downsample``, top-left level pixel ``(x0, y0)``.

    Computed from coordinates alone, so any tile of any level can be made without the others: glass, and tissue
    inside a smooth outline (a sum of separable sines of the position in µm) with stroma, wavy fibres and nuclei
    (from a hash of their 8 µm cell, repeating every 512 µm; each level renders them at its own pixel size,
    anti-aliased, not by downsampling level 0), plus grain.
    """
    d = float(downsample)
    px_um = MICRONS_PER_PIXEL * d
    xs, ys = _centres_um(x0, tile, d), _centres_um(y0, tile, d)
    size_um = size_px * MICRONS_PER_PIXEL
    table = _noise_table(seed + 3)
    grain = table[(y0 + np.arange(tile)) % table.shape[0]][:, (x0 + np.arange(tile)) % table.shape[1]]
    # tissue: inside a smooth outline with a soft edge; the outline varies slowly, so test a coarse grid first
    gain = 40.0 / max(px_um, 1.0)
    sub = np.r_[0:tile:32, tile - 1]
    coarse = (_field(xs[sub], ys[sub], size_um, seed) + 0.35) * gain + 0.5
    if coarse.max() < -0.5 * gain:  # glass only
        rgb = np.broadcast_to(_GLASS.astype(np.int16), (tile, tile, 3)) + grain[..., None]
        return np.clip(rgb, 0, 255).astype(np.uint8)
    rgb = _cells_tile(x0, y0, tile, d, seed).astype(np.int16)
    if coarse.min() <= 1 + 0.5 * gain:  # near the outline: blend with glass
        tissue = np.clip((_field(xs, ys, size_um, seed) + 0.35) * gain + 0.5, 0, 1)[..., None]
        rgb = (_GLASS + (rgb - _GLASS) * tissue).astype(np.int16)
    rgb += grain[..., None]
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _level_tiles(size: int, tile: int, downsample: float, size_px: int, seed: int) -> Iterator[np.ndarray]:
    n = -(-size // tile)
    for ty in range(n):
        for tx in range(n):
            yield synthetic_tile(tx * tile, ty * tile, tile, downsample, size_px, seed)


def write_synthetic_wsi(
    path: str | Path, size_px: int = 60000, tile: int = 512, levels: int = 4, seed: int = 0, quality: int = 85
) -> dict[str, Any]:
    """Write a ``size_px x size_px`` JPEG-compressed pyramidal tiled BigTIFF of H&E-like texture.

    Level ``l`` is ``ceil(size_px / 2**l)`` pixels wide, stored in SubIFDs of level 0 (as OME-TIFF pyramids are),
    JPEG tiles of ``tile`` pixels (RGB), 0.25 µm per level-0 pixel. Tiles are produced one at a
    time from a generator, so memory stays at a few tiles whatever ``size_px``.

    Returns
    -------
    ``{"path", "size_px", "tile", "levels", "file_bytes", "write_s"}``.
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = [-(-int(size_px) // 2**lv) for lv in range(int(levels))]
    res = 1e4 / MICRONS_PER_PIXEL  # pixels per cm
    kw = {
        "dtype": np.uint8,
        "tile": (int(tile), int(tile)),
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": int(quality)},
    }
    t0 = time.perf_counter()
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for lv, size in enumerate(sizes):
            extra = {"subifds": len(sizes) - 1} if lv == 0 else {"subfiletype": 1}
            tw.write(
                _level_tiles(size, int(tile), 2.0**lv, int(size_px), int(seed)),
                shape=(size, size, 3),
                resolution=(res / 2**lv, res / 2**lv),
                resolutionunit="CENTIMETER",
                **kw,
                **extra,
            )
    return {
        "path": str(path),
        "size_px": int(size_px),
        "tile": int(tile),
        "levels": int(levels),
        "file_bytes": path.stat().st_size,
        "write_s": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------------------ benchmark
_CHILD = r"""
import json, os, resource, sys, time
args = json.loads(sys.argv[1])

def rss_peak_mb(who=resource.RUSAGE_SELF):
    kb = resource.getrusage(who).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20

import anndata as ad
import psutil
import agl_scverse as agl

adata = ad.read_h5ad(args["h5ad"])
rss_before = psutil.Process().memory_info().rss / 2**20
peak_before = rss_peak_mb()
t0 = time.perf_counter()
enc = agl.EncoderConfig(
    args["encoder"], patch_px=args["patch_px"], patch_um=args["patch_um"], batch_size=args["batch_size"],
    num_workers=args["num_workers"],
)
agl.pp.embed_patches(adata, encoder=enc, device=args["device"], seed=0)
embed_s = time.perf_counter() - t0
key = "X_agl_" + args["encoder"]
rec = adata.uns["agl_embeddings"][key]
out = {
    "embed_s": embed_s,
    "rss_before_embed_mb": rss_before,
    "peak_rss_before_embed_mb": peak_before,
    "peak_rss_mb": rss_peak_mb(),
    "peak_rss_children_mb": rss_peak_mb(resource.RUSAGE_CHILDREN),
    "feature_shape": list(adata.obsm[key].shape),
    "level": {k: int(v) for k, v in rec["level"].items()},
    "level_downsample": {k: float(v) for k, v in rec["level_downsample"].items()},
    "crop_side_px": {k: int(v) for k, v in rec["crop_side_px"].items()},
}
with open(args["result"], "w") as fh:
    json.dump(out, fh)
"""


def _children_peak_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def _spots_adata(tif: Path, size_px: int, n_spots: int, patch_um: float, seed: int):
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    margin = patch_um / MICRONS_PER_PIXEL / 2 + 1
    xy = rng.uniform(margin, size_px - margin, size=(int(n_spots), 2))
    return ad.AnnData(
        np.ones((int(n_spots), 4), dtype=np.float32),
        obs=pd.DataFrame(index=[f"spot{i}" for i in range(int(n_spots))]),
        obsm={"spatial": xy},
        uns={
            "spatial": {
                "wsi": {
                    "images": {},
                    "scalefactors": {
                        "spot_diameter_fullres": 55.0 / MICRONS_PER_PIXEL,
                        "microns_per_pixel": MICRONS_PER_PIXEL,
                    },
                    "metadata": {"source_image_path": str(tif)},
                }
            }
        },
    )


def run_image_benchmark(
    out_dir: str | Path,
    size_px: int = 60000,
    n_spots: int = 2000,
    tile: int = 512,
    levels: int = 4,
    patch_px: int = 64,
    patch_um: float = 112.0,
    encoder: str = "resnet18",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    seed: int = 0,
    keep_image: bool = False,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Write a synthetic WSI, embed ``n_spots`` spots on it in a subprocess, report times and peak memory.

    The embedding runs ``agl.pp.embed_patches`` (random-init ``encoder``, ``patch_px`` pixels for ``patch_um`` µm,
    so a coarse pyramid level is read) in a fresh Python process, whose own ``ru_maxrss`` is the peak RSS reported
    (imports included: torch, scanpy and the rest already take about 0.8 GB; ``rss_before_embed_mb`` is its RSS
    after reading the AnnData, before embedding). ``peak_rss_children_mb`` is the largest process that one
    started and waited for (DataLoader workers with ``num_workers > 0``, but also helper processes of imported
    libraries). ``peak_rss_lifetime_mb`` is the subprocess's peak as this process sees it
    (``getrusage(RUSAGE_CHILDREN)``, from start to exit; None when an earlier child of this process was larger).
    The TIFF goes to ``out_dir`` and is deleted afterwards unless ``keep_image``.

    Returns
    -------
    ``image_px``, ``file_mb``, ``write_s``, ``n_spots``, ``embed_s``, ``spots_per_s``, ``peak_rss_mb`` and details
    (level read, crop side, RSS before embedding, children's peak RSS).
    """
    import agl_scverse

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tif = out_dir / f"synthetic_wsi_{int(size_px)}.tif"
    h5ad = out_dir / f"synthetic_wsi_{int(size_px)}_spots.h5ad"
    try:
        written = write_synthetic_wsi(tif, size_px=size_px, tile=tile, levels=levels, seed=seed)
        _spots_adata(tif, int(size_px), n_spots, patch_um, seed).write_h5ad(h5ad)
        with tempfile.NamedTemporaryFile("r", suffix=".json", dir=out_dir, delete=False) as fh:
            result_path = Path(fh.name)
        args = {
            "h5ad": str(h5ad),
            "result": str(result_path),
            "encoder": encoder,
            "patch_px": int(patch_px),
            "patch_um": float(patch_um),
            "batch_size": int(batch_size),
            "num_workers": int(num_workers),
            "device": device,
        }
        src = str(Path(agl_scverse.__file__).resolve().parents[1])  # the package this process imports
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        env["TQDM_DISABLE"] = "1"
        before = _children_peak_mb()
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"embedding subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        child = json.loads(result_path.read_text())
        after = _children_peak_mb()
        # the subprocess's whole life (imports to exit, and its own children), as wait4 saw it; only known when it
        # is the largest child this process has waited for
        child["peak_rss_lifetime_mb"] = after if after > before else None
        result_path.unlink()
    finally:
        if not keep_image:
            for path in (tif, h5ad):
                path.unlink(missing_ok=True)
    return {
        "image_px": [int(size_px), int(size_px)],
        "tile": int(tile),
        "levels": int(levels),
        "file_mb": written["file_bytes"] / 2**20,
        "write_s": written["write_s"],
        "n_spots": int(n_spots),
        "patch_px": int(patch_px),
        "patch_um": float(patch_um),
        "encoder": encoder,
        "embed_s": child["embed_s"],
        "spots_per_s": int(n_spots) / child["embed_s"],
        "peak_rss_mb": child["peak_rss_mb"],
        "peak_rss_lifetime_mb": child["peak_rss_lifetime_mb"],
        "rss_before_embed_mb": child["rss_before_embed_mb"],
        "peak_rss_before_embed_mb": child["peak_rss_before_embed_mb"],
        "peak_rss_children_mb": child["peak_rss_children_mb"],
        "level": child["level"],
        "level_downsample": child["level_downsample"],
        "crop_side_px": child["crop_side_px"],
        "feature_shape": child["feature_shape"],
    }
