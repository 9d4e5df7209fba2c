"""Builders of small test data shared by the test modules (``tests/helpers`` is on the pytest ``pythonpath``: ``from builders import ...``).

- :func:`small_slide`: Poisson counts driven by a latent state that the embedding ``.obsm["X_emb"]`` sees; two
  slides ``"A"`` / ``"B"`` in ``.obs["slide"]`` (the engine, fit, predict and evaluate tests).
- :func:`he_like`, :func:`write_legacy_section` and :func:`write_visium`: H&E-looking images, legacy ST folders and
  Space Ranger folders on disk (readers).
- :func:`make_sdata`: a tiny SpatialData (image, circle shapes, table).
- :func:`visium_folder_from` and :func:`spatialdata_from`: the same slides (an AnnData read by ``read_legacy_st``)
  packed as a Space Ranger ``outs`` folder and as a multi-section SpatialData with image pyramids (the route
  checks; ``benchmarks/checks/check_routes.py`` uses them on the HER2+ sections).
- :func:`snapshot` / :func:`assert_unchanged`: what a failed call must leave unchanged.
- :data:`FAST`: ``agl_fit`` settings that train in a fraction of a second.
- :func:`noise_slide`, :data:`NOISE_PX` / :data:`NOISE_UM` and :data:`needs_ort`: the encoder tests' slide, its
  patches, and the mark of tests that need ONNX Runtime (fixtures ``noise`` and ``graph_cache`` in ``conftest.py``).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from PIL import Image

from agl_scverse.encoders._onnx_backend import onnx_backend_available

PITCH_PX = 40.0  # fake legacy ST: 200 µm pitch -> 5 µm/px
NOISE_PX, NOISE_UM = 32, 32.0  # the encoder tests' patches of :func:`noise_slide`

#: Marks a test that needs ONNX Runtime (and onnx) installed.
needs_ort = pytest.mark.skipif(not onnx_backend_available(), reason="onnxruntime / onnx not installed")

FAST = {"hidden": (16,), "epochs": 4, "patience": 10, "batch_size": 32, "meta_batch_size": 32, "progress": False}


def small_slide(n: int = 120, n_genes: int = 60, d: int = 12, seed: int = 0, sparse: bool = True) -> AnnData:
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, 3))
    X_emb = np.tanh(Z @ rng.normal(size=(3, d))) + 0.2 * rng.normal(size=(n, d))
    L = rng.normal(size=(3, n_genes)) * np.linspace(1.0, 0.1, n_genes)
    mu = np.exp(0.5 + 0.6 * Z @ L)
    counts = rng.poisson(mu).astype(np.float32)
    side = int(np.ceil(np.sqrt(n)))
    xy = np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(float) * 100 + 50
    adata = AnnData(
        X=sp.csr_matrix(counts) if sparse else counts,
        obs=pd.DataFrame({"slide": np.where(np.arange(n) < n // 2, "A", "B")}, index=[f"s{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )
    adata.obsm["spatial"] = xy
    adata.obsm["X_emb"] = X_emb.astype(np.float32)
    return adata


def noise_slide() -> AnnData:
    """Ten spots on a 120 x 140 px random RGB image at 1 µm/px (one library ``lib``): the encoder tests' slide."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(120, 140, 3), dtype=np.uint8)
    xy = rng.uniform(20, 100, size=(10, 2))
    return AnnData(
        np.ones((10, 3), dtype=np.float32),
        obs=pd.DataFrame(index=[f"s{i}" for i in range(10)]),
        obsm={"spatial": xy},
        uns={"spatial": {"lib": {"images": {"fullres": img}, "scalefactors": {"microns_per_pixel": 1.0}}}},
    )


def snapshot(adata: AnnData) -> dict:
    """What a failed call must leave unchanged."""
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X).copy()
    return {
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "uns": sorted(adata.uns.keys()),
        "obsm": {k: np.asarray(v).copy() for k, v in adata.obsm.items()},
        "layers": sorted(adata.layers.keys()),
        "X": X,
    }


def assert_unchanged(adata: AnnData, snap: dict) -> None:
    pd.testing.assert_frame_equal(adata.obs, snap["obs"])
    pd.testing.assert_frame_equal(adata.var, snap["var"])
    assert sorted(adata.uns.keys()) == snap["uns"]
    assert sorted(adata.layers.keys()) == snap["layers"]
    assert set(adata.obsm.keys()) == set(snap["obsm"])
    for k, v in snap["obsm"].items():
        np.testing.assert_array_equal(np.asarray(adata.obsm[k]), v)
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    np.testing.assert_array_equal(X, snap["X"])


def he_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Bright background with a darker pink/purple 'tissue' disc in the middle."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 235, dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    tissue = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2
    img[tissue] = (rng.normal([150, 90, 160], 10, size=(int(tissue.sum()), 3))).clip(0, 255).astype(np.uint8)
    return img


def write_legacy_section(
    folder: Path,
    n: int = 4,
    genes=("A", "B", "C"),
    img_size=(300, 320),
    offset=(100.0, 90.0),
    extra_spot: bool = True,
    extra_counts: bool = True,
    counts_values=None,
    gray: bool = False,
    image: bool = True,
    seed: int = 0,
) -> Path:
    """A legacy ST section: an n x n grid of spots with ``PITCH_PX`` spacing."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [(x, y) for y in range(1, n + 1) for x in range(1, n + 1)]
    rows = [f"{x}x{y}" for x, y in ids] + (["99x99"] if extra_counts else [])
    values = rng.poisson(3.0, size=(len(rows), len(genes))) if counts_values is None else counts_values
    counts = pd.DataFrame(values, index=rows, columns=list(genes))
    with gzip.open(folder / "counts.tsv.gz", "wt") as fh:
        counts.to_csv(fh, sep="\t")
    spots = pd.DataFrame(
        {
            "x": [x for x, _ in ids],
            "y": [y for _, y in ids],
            "pixel_x": [offset[0] + (x - 1) * PITCH_PX for x, _ in ids],
            "pixel_y": [offset[1] + (y - 1) * PITCH_PX for _, y in ids],
        }
    )
    if extra_spot:
        spots.loc[len(spots)] = [50, 50, 10.0, 10.0]
    spots["selected"] = 1
    spots.to_csv(folder / "spots.tsv", sep="\t", index=False)
    if image:
        h, w = img_size
        arr = he_like(h, w, seed)
        im = Image.fromarray(arr[..., 0]) if gray else Image.fromarray(arr)
        im.save(folder / "he.jpg", quality=90)
    return folder


def write_visium(
    folder: Path,
    genes=("G1", "G2", "G3"),
    n: int = 5,
    scalefactors=None,
    gray: bool = False,
    positions_header: bool = True,
) -> Path:
    """A tiny Space Ranger 'outs' folder: v3 h5 counts, tissue positions, scale factors, hires/lowres PNGs."""
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    barcodes = [f"AAAC{i:04d}-1" for i in range(n)]
    X = sp.csr_matrix(rng.poisson(2.0, size=(n, len(genes))).astype(np.int32))
    Xc = sp.csc_matrix(X.T)  # 10x stores the features x barcodes matrix in CSC
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "w") as f:
        f.attrs["library_ids"] = np.array([b"lib_h5"])
        m = f.create_group("matrix")
        m["barcodes"] = np.array(barcodes, dtype="S")
        m["data"] = Xc.data
        m["indices"] = Xc.indices.astype(np.int64)
        m["indptr"] = Xc.indptr.astype(np.int64)
        m["shape"] = np.array(Xc.shape, dtype=np.int32)
        feat = m.create_group("features")
        feat["id"] = np.array([f"ENSG{i}" for i in range(len(genes))], dtype="S")
        feat["name"] = np.array(list(genes), dtype="S")
        feat["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        feat["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")
    spatial = folder / "spatial"
    spatial.mkdir(exist_ok=True)
    # full-res image 1000 x 800 (w x h); spots at pxl_col (x) = 200 + 100 i, pxl_row (y) = 300
    pos = pd.DataFrame(
        {
            "barcode": barcodes + ["TTTT0000-1"],
            "in_tissue": 1,
            "array_row": 0,
            "array_col": list(range(n + 1)),
            "pxl_row_in_fullres": 300,
            "pxl_col_in_fullres": [200 + 100 * i for i in range(n + 1)],
        }
    )
    pos.to_csv(spatial / "tissue_positions.csv", index=False, header=positions_header)
    sf = {"tissue_hires_scalef": 0.2, "tissue_lowres_scalef": 0.05, "spot_diameter_fullres": 110.0}
    sf.update(scalefactors or {})
    (spatial / "scalefactors_json.json").write_text(json.dumps(sf))
    full = he_like(800, 1000)
    for name, s in (("hires", 0.2), ("lowres", 0.05)):
        im = Image.fromarray(full).resize((int(1000 * s), int(800 * s)))
        (im.convert("L") if gray else im).save(spatial / f"tissue_{name}_image.png")
    Image.fromarray(full).save(folder / "fullres.jpg")
    return folder


def make_sdata(
    image: bool = True,
    channels: int = 3,
    multiscale: bool = False,
    size=(60, 80),
    table_region: str = "spots",
    obs_names=("a", "b", "c"),
    X=None,
):
    """Image (c, y, x) with a 2x scale to 'global'; three circle spots in global coordinates (radius 5)."""
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    h, w = size
    rgb = he_like(h, w).transpose(2, 0, 1)
    img = rgb if channels == 3 else rgb[:channels]
    images = {}
    if image:
        kw = {"scale_factors": [2]} if multiscale else {}
        images["he"] = Image2DModel.parse(
            img, dims=("c", "y", "x"), transformations={"global": Scale([2.0, 2.0], axes=("y", "x"))}, **kw
        )
    centres = np.array([[40.0, 30.0], [60.0, 50.0], [100.0, 80.0]])
    shapes = ShapesModel.parse(
        centres,
        geometry=0,
        radius=np.full(3, 5.0),
        index=np.array([10, 11, 12]),
        transformations={"global": Identity()},
    )
    obs = pd.DataFrame(
        {"region": pd.Categorical([table_region] * 3), "spot_id": [12, 10, 11]}, index=list(obs_names)
    )  # table rows in another order than the shapes
    X = np.array([[1, 0, 2], [0, 3, 1], [4, 1, 0]], dtype=np.float32) if X is None else X
    table = TableModel.parse(
        ad.AnnData(X, obs=obs, var=pd.DataFrame(index=["g1", "g2", "g3"])),
        region=table_region,
        region_key="region",
        instance_key="spot_id",
    )
    return SpatialData(images=images, shapes={"spots": shapes}, tables={"table": table})


def _write_10x_h5(path: Path, X, barcodes, genes) -> None:
    """Counts (spots x genes) as a Space Ranger v3 ``filtered_feature_bc_matrix.h5``."""
    import h5py

    Xc = sp.csc_matrix(sp.csr_matrix(X).T.astype(np.int32))  # 10x stores the features x barcodes matrix in CSC
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array(list(barcodes), dtype="S")
        m["data"] = Xc.data
        m["indices"] = Xc.indices.astype(np.int64)
        m["indptr"] = Xc.indptr.astype(np.int64)
        m["shape"] = np.array(Xc.shape, dtype=np.int32)
        feat = m.create_group("features")
        feat["id"] = np.array(list(genes), dtype="S")
        feat["name"] = np.array(list(genes), dtype="S")
        feat["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        feat["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")


def _library_image(adata: AnnData, lib: str) -> tuple[np.ndarray, str]:
    """The full-resolution pixels of a library (decoded as the readers decode them) and the image file."""
    from agl_scverse import _spatial

    path = adata.uns["spatial"][lib]["metadata"]["source_image_path"]
    src, _, _ = _spatial.get_image(adata, lib)
    return np.asarray(src), path


def visium_folder_from(adata: AnnData, lib: str, folder: Path, library_key: str = "library_id") -> Path:
    """One library of ``adata`` (legacy ST layout) as a Space Ranger ``outs`` folder; returns the folder.

    Counts in ``filtered_feature_bc_matrix.h5``, spot centres in ``spatial/tissue_positions.csv`` (full-res
    pixels), ``spot_diameter_fullres = 65 / microns_per_pixel`` (Space Ranger's 65 µm reference spot, so the
    reader derives the same scale), 2000-px hires and 600-px lowres PNGs. The full-resolution image stays where it
    is (give it to ``read_visium(fullres_image=...)``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    sub = adata[adata.obs[library_key].astype(str) == lib]
    mpp = float(adata.uns["spatial"][lib]["scalefactors"]["microns_per_pixel"])
    full, _ = _library_image(adata, lib)
    _write_10x_h5(folder / "filtered_feature_bc_matrix.h5", sub.X, sub.obs_names, sub.var_names)
    spatial = folder / "spatial"
    spatial.mkdir(exist_ok=True)
    xy = np.asarray(sub.obsm["spatial"], dtype=float)
    pd.DataFrame(
        {
            "barcode": sub.obs_names,
            "in_tissue": 1,
            "array_row": np.arange(sub.n_obs),
            "array_col": 0,
            "pxl_row_in_fullres": xy[:, 1],
            "pxl_col_in_fullres": xy[:, 0],
        }
    ).to_csv(spatial / "tissue_positions.csv", index=False)
    h, w = full.shape[:2]
    sf = {"spot_diameter_fullres": 65.0 / mpp}
    for name, px in (("hires", 2000), ("lowres", 600)):
        s = min(1.0, px / max(h, w))
        Image.fromarray(full).resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS).save(
            spatial / f"tissue_{name}_image.png"
        )
        sf[f"tissue_{name}_scalef"] = s
    (spatial / "scalefactors_json.json").write_text(json.dumps(sf))
    return folder


def spatialdata_from(adata: AnnData, library_key: str = "library_id", shapes_in_um: bool = True, scale_factors=(2, 2)):
    """Every library of ``adata`` as one section of a SpatialData: an image pyramid, circle shapes, one table.

    Section ``lib`` has image ``"he_<lib>"`` (the decoded full-resolution pixels, a multiscale pyramid with
    ``scale_factors``), shapes ``"spots_<lib>"`` (radius = half the spot diameter) and coordinate system
    ``"<lib>_um"`` in µm: the image maps to it with ``Scale(microns_per_pixel)``; the shapes are in µm
    (``shapes_in_um``, Identity) or in image pixels (a second coordinate system ``"<lib>"``, Identity for both).
    One table annotates every ``"spots_<lib>"`` (``region`` lists them).
    """
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    images, shapes, regions = {}, {}, []
    libs = list(adata.obs[library_key].astype(str).unique())
    obs = adata.obs[[]].copy()
    obs["region"] = ""
    obs["instance"] = np.arange(adata.n_obs)
    for lib in libs:
        rows = (adata.obs[library_key].astype(str) == lib).to_numpy()
        sf = adata.uns["spatial"][lib]["scalefactors"]
        mpp = float(sf["microns_per_pixel"])
        full, _ = _library_image(adata, lib)
        tr_img = {f"{lib}_um": Scale([mpp, mpp], axes=("y", "x"))}
        xy = np.asarray(adata.obsm["spatial"], dtype=float)[rows]
        radius = np.full(len(xy), float(sf["spot_diameter_fullres"]) / 2.0)
        if shapes_in_um:
            tr_shapes = {f"{lib}_um": Identity()}
            xy, radius = xy * mpp, radius * mpp
        else:
            tr_img[lib] = Identity()
            tr_shapes = {lib: Identity()}
        images[f"he_{lib}"] = Image2DModel.parse(
            full.transpose(2, 0, 1), dims=("c", "y", "x"), scale_factors=list(scale_factors) or None,
            transformations=tr_img, chunks=(3, 1024, 1024),
        )  # fmt: skip
        shapes[f"spots_{lib}"] = ShapesModel.parse(
            xy, geometry=0, radius=radius, index=np.flatnonzero(rows), transformations=tr_shapes
        )
        obs.loc[rows, "region"] = f"spots_{lib}"
        regions.append(f"spots_{lib}")
    obs["region"] = pd.Categorical(obs["region"], categories=regions)
    obs["instance"] = np.arange(adata.n_obs)
    table = ad.AnnData(adata.X.copy(), obs=obs, var=adata.var[[]].copy())
    table = TableModel.parse(table, region=regions, region_key="region", instance_key="instance")
    return SpatialData(images=images, shapes=shapes, tables={"table": table})


def fit_args(**kwargs) -> dict:
    """``agl_fit`` arguments with flat settings (``epochs=3``, as in :data:`FAST`) grouped into their configs.

    So a test written with short flat settings calls ``agl_fit`` in the config spelling (``training={...}``), with
    no deprecation warning; the grouping is the package's own table of the old keywords.
    """
    from agl_scverse._legacy_keywords import LEGACY_KEYWORDS

    out: dict = {}
    for name, value in kwargs.items():
        if name in LEGACY_KEYWORDS:
            out.setdefault(LEGACY_KEYWORDS[name][0], {})[name] = value
        elif name == "encoder" and isinstance(value, str):
            out.setdefault("encoder", {})["encoder"] = value
        else:
            out[name] = value
    return out
