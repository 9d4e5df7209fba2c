"""The same slides read as legacy ST, as a Space Ranger folder and as a SpatialData give the same patches.

Also: several sections in one SpatialData, a spatialdata-io style Visium object (hires image in two coordinate
systems), the physical scale (derived or refused), and the low-resolution guard of patches and predictions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from builders import FAST, spatialdata_from, visium_folder_from, write_legacy_section

import agl_scverse as agl
from agl_scverse import _spatial
from agl_scverse.pp import SpotPatches

GENES = tuple(f"G{i}" for i in range(30))
PATCH = {"patch_px": 16, "patch_um": 100.0}  # 6.25 µm/px patches; the slides are at 5 µm/px (level 0 is read)


def _mean_colour(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


@pytest.fixture
def legacy(tmp_path):
    root = tmp_path / "st"
    for i, lib in enumerate(("S1", "S2")):
        write_legacy_section(root / lib, n=5, genes=GENES, img_size=(300, 320), seed=i, extra_spot=False)
    return agl.io.read_legacy_st(root)


def _sections(adata, lib):
    return adata[adata.obs["library_id"].astype(str) == lib].copy()


def test_three_routes_give_identical_patches_and_records(legacy, tmp_path):
    from_sd = agl.io.from_spatialdata(
        spatialdata_from(legacy), library_id={"spots_S1": "S1", "spots_S2": "S2"}
    )  # scale from the µm coordinate systems "<lib>_um"
    assert list(from_sd.obs["library_id"].cat.categories) == ["S1", "S2"]
    for lib in ("S2",):  # (one Space Ranger folder is enough; reading it imports squidpy, seconds)
        ref = _sections(legacy, lib)
        path = legacy.uns["spatial"][lib]["metadata"]["source_image_path"]
        vis = agl.io.read_visium(
            visium_folder_from(legacy, lib, tmp_path / f"vis_{lib}"), library_id=lib, fullres_image=path
        )
        sd_lib = _sections(from_sd, lib)
        assert _spatial.microns_per_pixel(sd_lib, lib) == pytest.approx(_spatial.microns_per_pixel(ref, lib))
        assert _spatial.microns_per_pixel(vis, lib) == pytest.approx(_spatial.microns_per_pixel(ref, lib))
        np.testing.assert_allclose(vis.obsm["spatial"], ref.obsm["spatial"])
        np.testing.assert_allclose(sd_lib.obsm["spatial"], ref.obsm["spatial"])
        patches = {
            name: agl.pp.extract_patches(a, **PATCH) for name, a in (("legacy", ref), ("visium", vis), ("sd", sd_lib))
        }
        assert patches["legacy"].std() > 0
        np.testing.assert_array_equal(patches["visium"], patches["legacy"])
        np.testing.assert_array_equal(patches["sd"], patches["legacy"])
        recs = []
        for a in (ref, vis, sd_lib):
            agl.pp.embed_patches(a, encoder=_mean_colour, key_added="X_c", device="cpu", **PATCH)
            recs.append(a.uns["agl_embeddings"]["X_c"])
        np.testing.assert_array_equal(vis.obsm["X_c"], ref.obsm["X_c"])
        np.testing.assert_array_equal(sd_lib.obsm["X_c"], ref.obsm["X_c"])
        assert {r["image"][lib] for r in recs} == {"fullres"}
        np.testing.assert_allclose([r["source_um_per_px"][lib] for r in recs], 5.0)


def test_spatialdata_sections_in_one_table_are_all_read(legacy):
    sdata = spatialdata_from(legacy, shapes_in_um=False)  # shapes in image pixels, the µm system on the image
    adata = agl.io.from_spatialdata(sdata)
    assert list(adata.obs["library_id"].cat.categories) == ["spots_S1", "spots_S2"]  # one library per region
    assert list(adata.obs_names) == list(legacy.obs_names)  # table order
    np.testing.assert_allclose(adata.obsm["spatial"], legacy.obsm["spatial"])
    for lib, img in (("spots_S1", "he_S1"), ("spots_S2", "he_S2")):
        meta = adata.uns["spatial"][lib]["metadata"]
        assert meta["spatialdata_image"] == img and meta["spatialdata_shapes"] == lib
        assert meta["spatialdata_coordinate_system"] in (lib[6:], f"{lib[6:]}_um")  # both give the same mapping
        assert "µm system" in meta["microns_per_pixel_source"]
        src, _, which = _spatial.get_image(adata, lib)
        assert which == "fullres" and len(src.levels) == 3  # the pyramid of the element, read by region
    # one section only; a single library id for several sections is refused
    one = agl.io.from_spatialdata(sdata, shapes_key="spots_S2", library_id="B")
    assert list(one.obs["library_id"].cat.categories) == ["B"] and one.n_obs == 25
    with pytest.raises(ValueError, match="names one library"):
        agl.io.from_spatialdata(sdata, library_id="B")


def test_spatialdata_scale_is_derived_or_refused(legacy):
    sdata = spatialdata_from(_sections(legacy, "S1"), shapes_in_um=False)
    from spatialdata.transformations import Identity, set_transformation

    set_transformation(sdata.images["he_S1"], {"S1": Identity()}, set_all=True)  # no µm system any more
    with pytest.raises(ValueError, match=r"physical scale .* is unknown.*microns_per_pixel="):
        agl.io.from_spatialdata(sdata)
    a = agl.io.from_spatialdata(sdata, microns_per_pixel={"spots_S1": 2.5})
    assert _spatial.microns_per_pixel(a, "he_S1") == 2.5
    a = agl.io.from_spatialdata(sdata, spot_diameter_um=100.0)  # legacy ST circles: 100 µm
    assert _spatial.microns_per_pixel(a, "he_S1") == pytest.approx(
        100.0 / legacy.uns["spatial"]["S1"]["scalefactors"]["spot_diameter_fullres"]
    )
    sdata.tables["table"].uns["spatial"] = {"S1": {"scalefactors": {"microns_per_pixel": 5.0}}}
    a = agl.io.from_spatialdata(sdata, library_id="S1")
    assert _spatial.microns_per_pixel(a, "S1") == 5.0
    assert a.uns["spatial"]["S1"]["metadata"]["microns_per_pixel_source"] == "table metadata microns_per_pixel"


def _visium_like(legacy, with_fullres: bool):
    """spatialdata-io's Visium layout: shapes in full-res pixels, hires / lowres images in two systems each."""
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    a = _sections(legacy, "S1")
    full = np.asarray(_spatial.get_image(a, "S1")[0])
    d = 65.0 / 5.0  # spot_diameter_fullres: 65 µm at 5 µm/px
    sf = {"tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.25, "spot_diameter_fullres": d}
    images = {}
    for name, s in (("hires", 0.5), ("lowres", 0.25)):
        small = full[:: int(1 / s), :: int(1 / s)]
        images[f"S1_{name}_image"] = Image2DModel.parse(
            small.transpose(2, 0, 1),
            dims=("c", "y", "x"),
            transformations={f"downscaled_{name}": Identity(), "S1": Scale([1 / s, 1 / s], axes=("y", "x"))},
        )
    if with_fullres:
        images["S1_full_image"] = Image2DModel.parse(
            full.transpose(2, 0, 1), dims=("c", "y", "x"), transformations={"S1": Identity()}
        )
    shapes = ShapesModel.parse(
        np.asarray(a.obsm["spatial"]),
        geometry=0,
        radius=np.full(a.n_obs, d / 2),
        index=np.arange(a.n_obs),
        transformations={
            "S1": Identity(),
            "downscaled_hires": Scale([0.5, 0.5], axes=("y", "x")),
            "downscaled_lowres": Scale([0.25, 0.25], axes=("y", "x")),
        },
    )
    obs = pd.DataFrame({"region": pd.Categorical(["S1"] * a.n_obs), "spot_id": np.arange(a.n_obs)}, index=a.obs_names)
    table = TableModel.parse(
        ad.AnnData(a.X.copy(), obs=obs, var=a.var[[]].copy()), region="S1", region_key="region", instance_key="spot_id"
    )
    table.uns["spatial"] = {"S1": {"scalefactors": sf}}
    return SpatialData(images=images, shapes={"S1": shapes}, tables={"table": table}), a


def test_spatialdata_io_visium_layout_without_fullres_image(legacy):
    sdata, ref = _visium_like(legacy, with_fullres=False)
    adata = agl.io.from_spatialdata(sdata, library_id="S1")  # no "Multiple equal paths" error
    meta = adata.uns["spatial"]["S1"]["metadata"]
    assert meta["spatialdata_image"] == "S1_hires_image"  # the finer of hires / lowres
    assert meta["spatialdata_coordinate_system"] == "S1" and meta["spatialdata_image_downscaled"] is True
    assert "Space Ranger" in meta["microns_per_pixel_source"]
    assert _spatial.microns_per_pixel(adata, "S1") == pytest.approx(10.0)  # 5 µm/px full res, hires at 0.5
    np.testing.assert_allclose(adata.obsm["spatial"], ref.obsm["spatial"] * 0.5)
    with pytest.raises(ValueError, match="no full-resolution image.*allow_lowres=True"):
        SpotPatches(adata, **PATCH)  # 10 µm/px stand-in for 6.25 µm/px patches
    with pytest.warns(UserWarning, match="allow_lowres=True"):
        ds = SpotPatches(adata, allow_lowres=True, **PATCH)
    assert ds.source_um_per_px == {"S1": pytest.approx(10.0)}
    # the same object with its full-resolution image: chosen, and the patches are the legacy route's
    sdata, ref = _visium_like(legacy, with_fullres=True)
    adata = agl.io.from_spatialdata(sdata, library_id="S1")
    assert adata.uns["spatial"]["S1"]["metadata"]["spatialdata_image"] == "S1_full_image"
    np.testing.assert_array_equal(agl.pp.extract_patches(adata, **PATCH), agl.pp.extract_patches(ref, **PATCH))
    with pytest.raises(ValueError, match="not shared"):
        agl.io.from_spatialdata(sdata, coordinate_system="downscaled_hires", image_key="S1_full_image")


def test_predict_refuses_a_coarser_source_than_the_model_was_trained_on(legacy):
    model = agl.tl.agl_fit(
        legacy, method="pgl", n_targets=5, min_cells=1, encoder="resnet18", device="cpu", seed=0, **PATCH, **FAST
    )
    rec = model.config["encoder"]
    assert rec["source_um_per_px"] == {"S1": pytest.approx(5.0), "S2": pytest.approx(5.0)}
    low = _sections(legacy, "S2")
    key = model.config["embedding_key"]
    assert key in low.obsm  # embedded at fit from the full-resolution image: predicting from it is fine
    agl.tl.agl_predict(low.copy(), model)
    del low.obsm[key]
    entry = low.uns["spatial"]["S2"]
    del entry["metadata"]["source_image_path"]  # only the thumbnail is left
    full = np.asarray(_spatial.get_image(_sections(legacy, "S2"), "S2")[0])
    entry["images"] = {"hires": full[::4, ::4].copy()}
    entry["scalefactors"]["tissue_hires_scalef"] = 0.25  # 20 µm/px
    with pytest.raises(ValueError, match="allow_lowres=True"):
        agl.tl.agl_predict(low, model)  # the embedding cannot be cut from the thumbnail without asking
    agl.pp.embed_patches(low, encoder="resnet18", key_added=key, device="cpu", allow_lowres=True, **PATCH)
    with pytest.raises(ValueError, match=r"20 µm/px image .* coarser than the 6.25 µm/px the model"):
        agl.tl.agl_predict(low, model)  # an embedding made from it is refused at predict
    with pytest.warns(UserWarning):
        agl.tl.agl_predict(low, model, allow_lowres=True)
    assert np.isfinite(low.layers["agl_pred"][:, low.var_names.isin(model.targets)]).all()
