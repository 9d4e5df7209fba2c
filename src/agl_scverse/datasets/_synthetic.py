"""A synthetic H&E-like slide whose counts come from a known generative model."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg
from scipy import ndimage, sparse
from scipy.special import ndtri

from agl_scverse import _constants as consts
from agl_scverse._validate import check_positive

__all__ = ["synthetic_slide", "TISSUE_TYPES"]

#: Tissue types drawn by :func:`synthetic_slide`, in order (``n_types`` takes the first ones).
TISSUE_TYPES: tuple[str, ...] = ("tumour", "stroma", "immune", "epithelium", "adipose")

# Per tissue type: eosin background RGB, fibre amplitude, fibre RGB, white (lumen / fat) fraction,
# nuclei per 1000 µm², nucleus radius (µm), nucleus elongation (long/short axis), hematoxylin nucleus RGB.
_PALETTE = {
    "tumour": ((205, 150, 190), 0.10, (190, 95, 150), 0.02, 9.0, 4.2, 1.3, (75, 40, 120)),
    "stroma": ((236, 160, 188), 0.75, (205, 85, 135), 0.04, 1.6, 2.2, 3.0, (105, 55, 135)),
    "immune": ((218, 178, 212), 0.05, (200, 120, 170), 0.00, 22.0, 2.4, 1.05, (45, 25, 95)),
    "epithelium": ((238, 196, 218), 0.15, (215, 130, 170), 0.30, 5.0, 3.3, 1.5, (120, 80, 165)),
    "adipose": ((248, 232, 240), 0.05, (225, 170, 200), 0.78, 0.6, 2.8, 1.6, (115, 75, 150)),
}
_FIELD_PX = 8  # resolution (full-res pixels) of the smooth fields that define the layout
_HIRES_FACTOR = 4  # hires image = full-res downscaled by this factor


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Standardised Gaussian random field (smoothed white noise)."""
    z = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return ((z - z.mean()) / (z.std() + 1e-12)).astype(np.float32)


def _interp_matrix(n_out: int, factor: int) -> sparse.csr_matrix:
    """Linear interpolation weights (n_out x n_out // factor) from coarse cell centres to fine pixel centres."""
    n_in = n_out // factor
    pos = np.clip((np.arange(n_out) + 0.5) / factor - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    rows = np.r_[np.arange(n_out), np.arange(n_out)]
    vals = np.r_[1 - (pos - lo), pos - lo].astype(np.float32)
    return sparse.csr_matrix((vals, (rows, np.r_[lo, hi])), shape=(n_out, n_in))


def _upsample(field: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear upsampling of the last two axes of a coarse field by an integer factor."""
    if field.ndim == 3:
        return np.stack([_upsample(f, factor) for f in field])
    ry = _interp_matrix(field.shape[0] * factor, factor)
    rx = _interp_matrix(field.shape[1] * factor, factor)
    tmp = np.asarray(ry @ field.astype(np.float32))  # H x w
    return np.ascontiguousarray(np.asarray(rx @ tmp.T).T, dtype=np.float32)


def _render_slide(
    rng: np.random.Generator,
    rng_texture: np.random.Generator,
    height: int,
    width: int,
    types: list[str],
    region_um: float,
    sharpness: float,
    mpp: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One slide: RGB image, and on the coarse grid its composition, cellularity and nuclear size."""
    n_types = len(types)
    hc, wc = height // _FIELD_PX, width // _FIELD_PX
    cell_um = _FIELD_PX * mpp
    pal = [_PALETTE[t] for t in types]

    # tissue layout: softmax of smooth random fields -> soft composition per coarse cell
    logits = np.stack([_smooth_field(rng, (hc, wc), region_um / cell_um) for _ in range(n_types)])
    logits *= sharpness
    comp = np.exp(logits - logits.max(0, keepdims=True))
    comp /= comp.sum(0, keepdims=True)
    # continuous factors, independent of the tissue type
    cellularity = _smooth_field(rng, (hc, wc), 0.6 * region_um / cell_um)
    nuc_size = _smooth_field(rng, (hc, wc), 0.6 * region_um / cell_um)

    def mix(values) -> np.ndarray:
        return np.tensordot(np.asarray(values, dtype=np.float32), comp, axes=(0, 0))

    bg = np.stack([mix([p[0][c] for p in pal]) for c in range(3)], -1)
    fib_rgb = np.stack([mix([p[2][c] for p in pal]) for c in range(3)], -1)
    fib_amp = mix([p[1] for p in pal])
    white_frac = np.clip(mix([p[3] for p in pal]), 1e-3, 1 - 1e-3)
    density = mix([p[4] for p in pal]) * np.exp(0.45 * cellularity)  # nuclei per 1000 µm²

    f = _FIELD_PX
    rng = rng_texture
    # background: eosin colour with wavy fibres; two fibre directions blended by a smooth selector field
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    ang = rng.uniform(0, np.pi, 2)
    warp = _upsample(_smooth_field(rng, (hc, wc), 25.0 / cell_um), f) * 4.0
    select = 1 / (1 + np.exp(-3 * _upsample(_smooth_field(rng, (hc, wc), 150.0 / cell_um), f)))
    k = 2 * np.pi / (7.0 / mpp)  # fibre period 7 µm
    stripes = select * (0.5 + 0.5 * np.sin((x * np.cos(ang[0]) + y * np.sin(ang[0])) * k + warp))
    stripes += (1 - select) * (0.5 + 0.5 * np.sin((x * np.cos(ang[1]) + y * np.sin(ang[1])) * k + warp))
    del x, y, warp, select
    broken = _upsample(_smooth_field(rng, (hc * 2, wc * 2), 1.5), f // 2)
    fibre = np.clip(stripes**3 * (0.6 + 0.4 * np.tanh(2 * broken)), 0, 1) * _upsample(fib_amp, f)
    del stripes, broken
    img = _upsample(bg.transpose(2, 0, 1), f) * (1 - fibre) + _upsample(fib_rgb.transpose(2, 0, 1), f) * fibre
    del fibre

    # white lumens / fat: a fine blob field thresholded at the local white fraction
    blobs = _upsample(_smooth_field(rng, (hc * 2, wc * 2), 14.0 / (cell_um / 2)), f // 2)
    thresh = _upsample(ndtri(1 - white_frac).astype(np.float32), f)
    white = np.clip((blobs - thresh) * 6.0, 0, 1)
    membrane = np.exp(-(((blobs - thresh) / 0.08) ** 2)) * _upsample(white_frac, f) * 0.35
    del blobs, thresh
    img = img * (1 - white) + 250.0 * white
    img = img * (1 - membrane) + np.asarray(pal[0][2], np.float32)[:, None, None] * membrane
    del membrane

    # nuclei: inhomogeneous Poisson process (thinning), ellipses drawn from a nearest-seed map
    lam = density / 1000.0 * mpp**2  # nuclei per full-res pixel, coarse grid
    lam_max = float(lam.max())
    n_cand = rng.poisson(lam_max * height * width)
    py = rng.uniform(0, height, n_cand)
    px = rng.uniform(0, width, n_cand)
    cy, cx = (py // f).astype(int), (px // f).astype(int)
    keep = rng.uniform(0, lam_max, n_cand) < lam[cy, cx]
    py, px, cy, cx = py[keep], px[keep], cy[keep], cx[keep]
    n_nuc = len(py)
    # each nucleus takes a tissue type drawn from the local composition
    cum = np.cumsum(comp[:, cy, cx], axis=0)
    ntype = np.minimum((rng.uniform(0, 1, n_nuc)[None] > cum).sum(0), n_types - 1)
    rad = np.array([p[5] for p in pal])[ntype] * np.exp(0.22 * nuc_size[cy, cx] + 0.12 * rng.standard_normal(n_nuc))
    elong = np.array([p[6] for p in pal])[ntype] * np.exp(0.1 * rng.standard_normal(n_nuc))
    ang = rng.uniform(0, np.pi, n_nuc)
    ncol = np.array([p[7] for p in pal], np.float32)[ntype] * np.exp(0.08 * rng.standard_normal((n_nuc, 1)))
    ra = (rad * np.sqrt(elong) / mpp).astype(np.float32)
    rb = (rad / np.sqrt(elong) / mpp).astype(np.float32)

    iy, ix = np.clip(py.astype(int), 0, height - 1), np.clip(px.astype(int), 0, width - 1)
    label = np.full((height, width), -1, np.int32)
    label[iy, ix] = np.arange(n_nuc, dtype=np.int32)
    nearest = ndimage.distance_transform_edt(label < 0, return_distances=False, return_indices=True)
    nid = label[nearest[0], nearest[1]]
    dy = np.arange(height, dtype=np.float32)[:, None] - nearest[0] + 0.5 - (py - iy)[nid].astype(np.float32)
    dx = np.arange(width, dtype=np.float32)[None, :] - nearest[1] + 0.5 - (px - ix)[nid].astype(np.float32)
    del nearest
    ca, sa = np.cos(ang).astype(np.float32)[nid], np.sin(ang).astype(np.float32)[nid]
    q = np.sqrt(((dx * ca + dy * sa) / ra[nid]) ** 2 + ((dy * ca - dx * sa) / rb[nid]) ** 2)
    del dx, dy, ca, sa
    alpha = np.clip((1.0 - q) * 2.5, 0, 1) * (1 - white)
    chroma = 0.85 + 0.25 * q  # darker rim-to-centre gradient, lighter chromatin near the edge
    for c in range(3):
        img[c] = img[c] * (1 - alpha) + ncol[nid, c] * np.minimum(chroma, 1.1) * alpha
    del q, alpha, chroma, nid, white

    img += rng.standard_normal(img.shape, dtype=np.float32) * 5.0
    rgb = np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return np.ascontiguousarray(rgb), comp, cellularity, nuc_size


def _spot_means(field: np.ndarray, xy_px: np.ndarray, radius_px: float) -> np.ndarray:
    """Mean of coarse fields (... x h x w) over a disk around each spot (xy in full-res pixels)."""
    f = _FIELD_PX
    r = int(np.ceil(radius_px / f))
    oy, ox = np.mgrid[-r : r + 1, -r : r + 1]
    disk = (oy * f) ** 2 + (ox * f) ** 2 <= radius_px**2
    oy, ox = oy[disk], ox[disk]
    cx = np.clip((xy_px[:, 0] // f).astype(int)[:, None] + ox[None], 0, field.shape[-1] - 1)
    cy = np.clip((xy_px[:, 1] // f).astype(int)[:, None] + oy[None], 0, field.shape[-2] - 1)
    return field[..., cy, cx].mean(-1)


def synthetic_slide(
    n_rows: int = 20,
    n_cols: int = 20,
    n_tissue_genes: int = 80,
    n_informative: int = 300,
    n_noise: int = 1600,
    n_bursty_noise: int = 100,
    *,
    n_slides: int = 1,
    n_types: int = 5,
    spot_spacing_um: float = 100.0,
    spot_diameter_um: float = 100.0,
    microns_per_pixel: float = 1.0,
    margin_um: float = 150.0,
    region_um: float = 220.0,
    depth: float = 1.0,
    depth_sd: float = 0.3,
    hidden_sd: float = 0.25,
    informative_strength: float = 0.85,
    informative_mean: tuple[float, float] = (0.3, 1.2),
    tissue_mean: tuple[float, float] = (3.0, 100.0),
    seed: int = 0,
) -> AnnData:
    """Simulate an H&E-like slide (or several) with spot counts drawn from an image-driven generative model.

    The image is a mosaic of smooth random tissue regions (:data:`TISSUE_TYPES`), each with its own colour,
    fibres, white space and nuclei, modulated by two smooth factors: cellularity and nuclear size. A spot's latent
    state ``z`` (its tissue composition and mean factors over the spot disk) is visible in its patch. Counts follow

    ``counts[s, g] ~ NB(mean = L_s * exp(b_g + (z_s + e_s) @ W_g), dispersion r_g)``

    with per-spot library size ``L_s`` (log-normal depth noise) and image-invisible noise ``e_s ~ N(0,
    hidden_sd²)``. Gene kinds:

    - ``"tissue"``: strong loadings ``W_g``, moderately expressed: the top HVG, natural targets;
    - ``"informative"``: loadings scaled by ``informative_strength``, low expression: the auxiliaries to select;
    - ``"noise"``: unrelated to the image; ``n_bursty_noise`` of them are overdispersed, so they rank high on HVG
      dispersion (harmful auxiliaries a dispersion prior cannot tell apart).

    Layout, texture and counts use independent random streams derived from ``seed``.

    Parameters
    ----------
    n_rows
        Rows of the spot grid.
    n_cols
        Columns of the spot grid.
    n_tissue_genes
        Number of tissue genes (following the tissue type).
    n_informative
        Number of informative auxiliary genes (driven by the visible latent state).
    n_noise
        Number of noise genes (including the bursty ones).
    n_bursty_noise
        How many noise genes are bursty (negative binomial with a very small dispersion parameter).
    n_slides
        Number of slides (own layout, shared gene programmes): library ids ``"synthetic_0"``, ... (one:
        ``"synthetic"``).
    n_types
        Number of tissue types (2-5), the first ones of :data:`TISSUE_TYPES`.
    spot_spacing_um
        Centre-to-centre spacing of spots, in µm.
    spot_diameter_um
        Spot diameter, in µm.
    microns_per_pixel
        Scale of the full-resolution image.
    margin_um
        Tissue margin around the spot grid.
    region_um
        Length scale of the tissue regions (smoothing of the layout fields).
    depth
        Multiplies every gene's mean count (sequencing depth).
    depth_sd
        Standard deviation of the per-spot log library size.
    hidden_sd
        Standard deviation of the image-invisible per-spot noise added to the latent state.
    informative_strength
        Loadings of informative genes relative to tissue genes.
    informative_mean
        Range (log-uniform) of the mean counts per spot of informative genes, at ``depth=1``.
    tissue_mean
        The same for tissue genes.
    seed
        Seed of the :class:`numpy.random.Generator`; the output is a deterministic function of all arguments.

    Returns
    -------
    AnnData in the agl-scverse layout (:doc:`/data_layouts`, with ``"fullres"`` and ``"hires"`` images) and the
    ground truth: ``.var["synthetic_kind"]`` (``"tissue"``, ``"informative"``, ``"noise"``), ``.var["informative"]``,
    ``.var["bursty"]``, ``.obs["tissue_type"]`` (dominant type), ``.obsm["synthetic_latent"]`` (visible latent
    state, columns ``.uns["synthetic"]["latent_names"]``) and ``.obsm["synthetic_hidden"]`` (invisible noise).

    Examples
    --------
    >>> import agl_scverse as agl
    >>> adata = agl.datasets.synthetic_slide(n_rows=8, n_cols=8, seed=0)
    >>> adata.shape
    (64, 1980)
    >>> adata.var["synthetic_kind"].value_counts().to_dict()
    {'noise': 1600, 'informative': 300, 'tissue': 80}
    >>> adata.uns["spatial"]["synthetic"]["images"]["fullres"].shape
    (1024, 1024, 3)
    """
    _check_args(locals())
    seeds = np.random.SeedSequence(seed).spawn(1 + 3 * n_slides)  # genes; then layout, texture, counts per slide
    rng = np.random.default_rng(seeds[0])
    types = list(TISSUE_TYPES[:n_types])
    mpp = float(microns_per_pixel)
    spacing_px = spot_spacing_um / mpp
    margin_px = margin_um / mpp
    mult = _FIELD_PX * _HIRES_FACTOR
    height = int(np.ceil(((n_rows - 1) * spacing_px + 2 * margin_px) / mult) * mult)
    width = int(np.ceil(((n_cols - 1) * spacing_px + 2 * margin_px) / mult) * mult)
    off_y = (height - (n_rows - 1) * spacing_px) / 2
    off_x = (width - (n_cols - 1) * spacing_px) / 2
    gy, gx = np.mgrid[0:n_rows, 0:n_cols]
    xy = np.stack([off_x + gx.ravel() * spacing_px, off_y + gy.ravel() * spacing_px], 1)
    n_spots = n_rows * n_cols
    radius_px = spot_diameter_um / mpp / 2

    # --- gene programmes (shared by all slides) ----------------------------------------------------------
    n_lat = n_types + 2
    latent_names = [f"frac_{t}" for t in types] + ["cellularity", "nuclear_size"]
    n_genes = n_tissue_genes + n_informative + n_noise
    kind = np.array(["tissue"] * n_tissue_genes + ["informative"] * n_informative + ["noise"] * n_noise, dtype=object)

    def loadings(n: int, scale: float) -> np.ndarray:
        w = np.zeros((n_lat, n), np.float64)
        primary = rng.integers(0, n_types, n)
        w[primary, np.arange(n)] = rng.uniform(2.5, 4.0, n) * rng.choice([1.0, 1.0, 1.0, -0.6], n)
        w[:n_types] += rng.normal(0, 0.3, (n_types, n))
        w[n_types:] = rng.normal(0, 0.45, (2, n)) * (rng.uniform(size=(2, n)) < 0.6)
        return w * scale

    W = np.zeros((n_lat, n_genes))
    W[:, :n_tissue_genes] = loadings(n_tissue_genes, 1.0)
    W[:, n_tissue_genes : n_tissue_genes + n_informative] = loadings(n_informative, informative_strength)
    (t_lo, t_hi), (i_lo, i_hi) = np.log(np.asarray(tissue_mean, float)), np.log(np.asarray(informative_mean, float))
    mean = np.empty(n_genes)
    mean[:n_tissue_genes] = np.exp(rng.uniform(t_lo, t_hi, n_tissue_genes))
    mean[n_tissue_genes : n_tissue_genes + n_informative] = np.exp(rng.uniform(i_lo, i_hi, n_informative))
    mean[n_tissue_genes + n_informative :] = np.exp(rng.uniform(np.log(0.05), np.log(1000.0), n_noise))
    disp = np.full(n_genes, 30.0)  # NB dispersion parameter r (var = mu + mu²/r)
    bursty = np.zeros(n_genes, bool)
    bursty_idx = n_tissue_genes + n_informative + rng.choice(n_noise, n_bursty_noise, replace=False)
    bursty[bursty_idx] = True
    mean[bursty_idx] = np.exp(rng.uniform(np.log(0.2), np.log(4.0), n_bursty_noise))
    disp[bursty_idx] = np.exp(rng.uniform(np.log(0.8), np.log(2.5), n_bursty_noise))
    # centre the latent so that b_g sets the mean count: a reference composition
    z_ref_mean = np.r_[np.full(n_types, 1.0 / n_types), 0.0, 0.0]

    # --- slides ------------------------------------------------------------------------------------------
    lib_ids = ["synthetic"] if n_slides == 1 else [f"synthetic_{i}" for i in range(n_slides)]
    spatial, blocks, obs_parts, lat_parts, hid_parts = {}, [], [], [], []
    for i, lib in enumerate(lib_ids):
        rng_layout, rng_texture, rng = (np.random.default_rng(s) for s in seeds[1 + 3 * i : 4 + 3 * i])
        img, comp, cell, size = _render_slide(rng_layout, rng_texture, height, width, types, region_um, 4.0, mpp)
        z = np.concatenate(
            [_spot_means(comp, xy, radius_px), _spot_means(np.stack([cell, size]), xy, radius_px)], 0
        ).T  # spots x n_lat
        hidden = rng.normal(0.0, hidden_sd, (n_spots, n_lat))
        eta = (z + hidden - z_ref_mean) @ W
        lib_size = depth * np.exp(rng.normal(-0.5 * depth_sd**2, depth_sd, n_spots))
        mu = lib_size[:, None] * mean[None] * np.exp(eta)
        counts = rng.poisson(rng.gamma(disp[None], mu / disp[None]))
        blocks.append(sparse.csr_matrix(counts.astype(np.float32)))
        hires = img.reshape(height // _HIRES_FACTOR, _HIRES_FACTOR, width // _HIRES_FACTOR, _HIRES_FACTOR, 3)
        hires = hires.mean((1, 3)).round().astype(np.uint8)
        sf = {consts.HIRES_SCALEF: 1.0 / _HIRES_FACTOR, consts.SPOT_DIAMETER: float(spot_diameter_um / mpp)}
        sf[consts.MICRONS_PER_PIXEL] = mpp
        images = {consts.FULLRES: img, consts.HIRES: hires}
        spatial[lib] = {consts.IMAGES: images, consts.SCALEFACTORS: sf, consts.METADATA: {}}
        dom = np.asarray(types)[z[:, :n_types].argmax(1)]
        cols = {consts.LIBRARY_KEY: lib, "array_row": gy.ravel(), "array_col": gx.ravel(), "tissue_type": dom}
        names = [f"{lib}_r{r}_c{c}" for r, c in zip(gy.ravel(), gx.ravel())]
        obs_parts.append(pd.DataFrame({**cols, "library_size_factor": lib_size / depth}, index=names))
        lat_parts.append(z.astype(np.float32))
        hid_parts.append(hidden.astype(np.float32))

    obs = pd.concat(obs_parts)
    obs[consts.LIBRARY_KEY] = pd.Categorical(obs[consts.LIBRARY_KEY], categories=lib_ids)
    obs["tissue_type"] = pd.Categorical(obs["tissue_type"], categories=types)
    width_digits = len(str(n_genes))
    var = pd.DataFrame(index=[f"{k[:4]}_{i:0{width_digits}d}" for i, k in enumerate(kind)])
    var["synthetic_kind"] = pd.Categorical(kind, categories=["tissue", "informative", "noise"])
    var["informative"], var["bursty"], var["synthetic_mean"] = kind == "informative", bursty, mean.astype(np.float32)
    adata = AnnData(X=sparse.vstack(blocks, format="csr", dtype=np.float32), obs=obs, var=var)
    adata.obsm[consts.SPATIAL_KEY] = np.tile(xy, (n_slides, 1)).astype(np.float64)
    adata.obsm["synthetic_latent"] = np.concatenate(lat_parts)
    adata.obsm["synthetic_hidden"] = np.concatenate(hid_parts)
    adata.uns[consts.SPATIAL_KEY] = spatial
    adata.uns["synthetic"] = {"latent_names": latent_names, "tissue_types": types, "seed": int(seed)}
    adata.varm["synthetic_loadings"] = W.T.astype(np.float32)
    logg.info(
        f"synthetic slide(s): {n_slides} x {n_spots} spots, {n_genes} genes, image {height} x {width} px "
        f"at {mpp:g} µm/px"
    )
    return adata


def _check_args(args: dict) -> None:
    ints = {"n_rows": 2, "n_cols": 2, "n_tissue_genes": 1, "n_informative": 0, "n_noise": 0, "n_bursty_noise": 0}
    for name, lo in {**ints, "n_slides": 1, "n_types": 2}.items():
        val = args[name]
        if isinstance(val, bool) or not isinstance(val, int | np.integer) or val < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {val!r}.")
    if args["n_types"] > len(TISSUE_TYPES):
        raise ValueError(f"n_types must be at most {len(TISSUE_TYPES)} (tissue types {TISSUE_TYPES}).")
    if args["n_bursty_noise"] > args["n_noise"]:
        raise ValueError(
            f"n_bursty_noise={args['n_bursty_noise']} exceeds n_noise={args['n_noise']}: bursty genes are a "
            "subset of the noise genes."
        )
    for name in ("spot_spacing_um", "spot_diameter_um", "microns_per_pixel", "region_um", "depth"):
        check_positive(name, args[name])
    for name in ("margin_um", "depth_sd", "hidden_sd", "informative_strength"):
        check_positive(name, args[name], allow_zero=True)
    for name in ("informative_mean", "tissue_mean"):
        lo, hi = args[name]
        if not (0 < lo <= hi):
            raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {args[name]!r}.")
    if args["spot_spacing_um"] / args["microns_per_pixel"] < 2 * _FIELD_PX:
        raise ValueError("spot_spacing_um / microns_per_pixel must be at least 16 pixels; lower microns_per_pixel.")
