# %% [markdown]
# # 04 · A whole slide from its H&E alone: virtual expression maps
#
# A model trained on four HER2+ sections of patient C (legacy ST: C2-C5) predicts the fifth section, C6, from
# nothing but its H&E image: `agl.io.read_he_image` reads the JPEG, `agl.pp.tissue_mask` finds the tissue,
# `agl.pp.spot_grid` lays pseudo-spots over it and `agl.tl.predict_anndata` embeds each grid patch and predicts.
# The virtual map then goes beside C6's measured expression, read only for that comparison, and the prediction at
# the grid spot nearest each measured spot is scored against the same model predicting at the measured spots.
#
# The data are not shipped with the package: set `AGL_HER2ST` to a folder with one sub-folder per section
# (`counts.tsv.gz`, `spots.tsv`, `he.jpg`) and `AGL_WEIGHTS` to a local DenseNet-121 ImageNet weights file
# (without it the notebook uses a randomly initialised ResNet-18, whose features are much weaker).

# %%
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
from scipy.spatial import cKDTree

import agl_scverse as agl

sc.settings.verbosity = 1
DATA = Path(os.environ.get("AGL_HER2ST", "../../shared/data/her2st"))
WEIGHTS = Path(
    os.environ.get("AGL_WEIGHTS", "../../shared/weights/densenet121_keras_imagenet_features_torchvision.pth")
)
QUICK = os.environ.get("AGL_TUTORIAL_QUICK") == "1"  # a small, fast run (the test suite's)
TRAIN = ["C2"] if QUICK else ["C2", "C3", "C4", "C5"]
TEST = "C6"
print(f"QUICK={QUICK}, training sections {TRAIN}, predicted from its H&E alone: {TEST}")

# %% [markdown]
# ## 1 · Train on the other sections
#
# As in tutorial 02: the training sections with `agl.io.read_legacy_st`, DenseNet-121 features of 224-px patches
# covering 160 µm (an `agl.EncoderConfig`), and AGL + DkGSB with the default settings except a single network
# (`agl.TrainingConfig(n_seeds=1)`, to keep this notebook fast; the default averages a seed ensemble). No spatial
# context: the grid has no measured neighbours, and a plain model keeps the grid route and the spot route alike.
# The quick run (or a missing weights file) uses a random-init ResNet-18 at 64 px, only to exercise the code.

# %%
if WEIGHTS.exists() and not QUICK:
    ENCODER = agl.EncoderConfig("densenet121", weights=WEIGHTS, patch_px=224, patch_um=160.0)
else:
    print("quick run or no weights file: a random-init ResNet-18 (weak features)")
    ENCODER = agl.EncoderConfig("resnet18", patch_px=64, patch_um=160.0)
train = agl.io.read_legacy_st(DATA, sections=TRAIN)
t0 = time.perf_counter()
agl.pp.embed_patches(train, ENCODER, library_key="library_id", device="cpu", progress=False)
emb_key = f"X_agl_{ENCODER.encoder}"
model = agl.tl.agl_fit(
    train,
    embedding_key=emb_key,
    training=agl.TrainingConfig(n_seeds=1, epochs=3 if QUICK else None),
    seed=0,
    library_key="library_id",
    device="cpu",
    progress=False,
)
print(f"{train.n_obs} training spots embedded and fitted in {time.perf_counter() - t0:.0f} s")
print(model)

# %% [markdown]
# ## 2 · Section C6: the H&E image alone
#
# `he.jpg` records no pixel size, so `read_he_image` needs it: legacy ST spots sit on a 200 µm grid, and the
# median distance between neighbouring spot centres of the array (`spots.tsv`, pixel positions only: no expression)
# gives µm per pixel, as `agl.io.read_legacy_st` estimates it. A slide from a scanner records it in its metadata.

# %%
spots = pd.read_csv(DATA / TEST / "spots.tsv", sep="\t")
centres = spots[["pixel_x", "pixel_y"]].to_numpy(float)
spacing_px = float(np.median(cKDTree(centres).query(centres, k=2)[0][:, 1]))
mpp = 200.0 / spacing_px
print(f"neighbouring spots {spacing_px:.1f} px apart -> {mpp:.4f} µm per pixel")
slide = agl.io.read_he_image(DATA / TEST / "he.jpg", microns_per_pixel=mpp, library_id=TEST)
print(slide)

# %% [markdown]
# ## 3 · Tissue and a spot grid
#
# `agl.pp.tissue_mask` reads a ~10 µm/px overview of the image and thresholds its HSV saturation (Otsu's method),
# then drops small specks and fills small holes; `agl.pp.spot_grid` keeps the points of a hexagonal lattice that
# fall on it. Spot size defaults to the model's training patch (160 µm); the pitch here is Visium's 100 µm, so
# neighbouring patches overlap and every measured spot has a grid spot close by (section 6 compares the model's
# own 160 µm pitch). The quick run uses a coarser pitch.

# %%
mask = agl.pp.tissue_mask(slide)
print(f"tissue: {mask.fraction:.1%} of the image")
grid = agl.pp.spot_grid(slide, model=model, mask=mask, pitch_um=400.0 if QUICK else 100.0)
print(grid)
print(grid.uns["agl_grid"])

# %% [markdown]
# ## 4 · Predict the grid
#
# `predict_anndata` embeds each grid patch with the model's recorded encoder (the config gives the weights file,
# checked against the sha256 the model recorded) and returns a new AnnData: the predicted genes (targets and the
# selected auxiliaries) in `.X`, the grid in `.obsm["spatial"]` and the slide's image in `.uns["spatial"]`.

# %%
t0 = time.perf_counter()
pred = agl.tl.predict_anndata(grid, model, encoder=ENCODER, device="cpu", progress=False)
grid_s = time.perf_counter() - t0
print(f"{pred.n_obs} grid spots x {pred.n_vars} genes predicted in {grid_s:.0f} s")
print(pred)

# %% [markdown]
# ## 5 · Whole-slide virtual maps
#
# `agl.pl.slide_prediction` draws each grid spot as a disk over the H&E image (at most the grid's pitch wide, so
# the disks tile), one row per gene; here three Axes in a row, given with `ax=`, for the first three of the
# model's target genes:

# %%
targets = list(model.targets)
fig, axs = plt.subplots(1, 3, figsize=(14, 4.2))
agl.pl.slide_prediction(pred, targets[:3], ax=axs)

# %% [markdown]
# ## 6 · Beside C6's measured expression
#
# Now, and only for the comparison, C6's counts. With `measured=`, each gene gets the measured map (log1p counts,
# the model's scale) beside the virtual one, one colour range per gene and the same extent; the predicted panel's
# title gives the Pearson r between each measured spot and the grid spot nearest to it.
#
# The same model also predicts C6 the usual way, at its measured spots (the spot route: patches centred on the
# spots). Scored on the same measured spots: mean Pearson r over the model's target genes, the grid route reading
# the grid spot nearest each measured spot.

# %%
measured = agl.io.read_legacy_st(DATA, sections=[TEST])
t0 = time.perf_counter()
at_spots = agl.tl.predict_anndata(measured, model, encoder=ENCODER, device="cpu", progress=False)
spot_s = time.perf_counter() - t0
dist, nearest = cKDTree(pred.obsm["spatial"]).query(measured.obsm["spatial"])
pitch_px = grid.uns["agl_grid"]["pitch_um"] / mpp
counts = measured[:, targets].X
observed = np.log1p(np.asarray(counts.toarray() if hasattr(counts, "toarray") else counts, dtype=float))


def mean_pcc(obs, prd):
    """Mean over genes of the Pearson r across spots (a constant prediction counts as 0)."""
    o, p = obs - obs.mean(0), prd - prd.mean(0)
    den = np.sqrt((o**2).sum(0) * (p**2).sum(0))
    return float(np.mean(np.where(den > 0, (o * p).sum(0) / np.where(den > 0, den, 1), 0.0)))


grid_pcc = mean_pcc(observed, np.asarray(pred[:, targets].X)[nearest])
spot_pcc = mean_pcc(observed, np.asarray(at_spots[:, targets].X))
print(f"measured spots within one pitch of a grid spot: {np.mean(dist <= pitch_px):.1%} of {measured.n_obs}")
print(f"grid route: mean target PCC = {grid_pcc:.4f} ({pred.n_obs} grid spots in {grid_s:.0f} s)")
print(f"spot route: mean target PCC = {spot_pcc:.4f} ({measured.n_obs} measured spots in {spot_s:.0f} s)")
print(f"grid / spot = {grid_pcc / spot_pcc:.3f}")

# %% [markdown]
# The pitch matters for this comparison: the grid spot nearest a measured spot is up to half a pitch or so away,
# and its patch shows somewhat different tissue. The same model on a grid at its training patch's pitch (160 µm,
# `spot_grid`'s default with `model=`; patches tile without overlap, about 2.5 x fewer spots):

# %%
coarse = agl.pp.spot_grid(slide, model=model, mask=mask, pitch_um=600.0 if QUICK else None)
t0 = time.perf_counter()
pred_coarse = agl.tl.predict_anndata(coarse, model, encoder=ENCODER, device="cpu", progress=False)
coarse_s = time.perf_counter() - t0
dist_c, nearest_c = cKDTree(pred_coarse.obsm["spatial"]).query(measured.obsm["spatial"])
coarse_pcc = mean_pcc(observed, np.asarray(pred_coarse[:, targets].X)[nearest_c])
pitch_c = coarse.uns["agl_grid"]["pitch_um"]
print(
    f"pitch {pitch_c:g} µm: {coarse.n_obs} grid spots in {coarse_s:.0f} s, median distance to the nearest "
    f"{np.median(dist_c) * mpp:.0f} µm (pitch {grid.uns['agl_grid']['pitch_um']:g} µm: {np.median(dist) * mpp:.0f} µm)"
)
print(f"pitch {pitch_c:g} µm: mean target PCC = {coarse_pcc:.4f}, grid / spot = {coarse_pcc / spot_pcc:.3f}")

# %% [markdown]
# The three targets the grid route predicts best on C6, chosen on C6 itself (so for display only, not a score):

# %%
per_gene = pd.Series(
    [np.corrcoef(observed[:, j], np.asarray(pred[:, g].X).ravel()[nearest])[0, 1] for j, g in enumerate(targets)],
    index=targets,
)
best = per_gene.sort_values(ascending=False).index[:3].tolist()
print("genes:", best)
agl.pl.slide_prediction(pred, best, measured=measured, figsize=(10, 11))

# %% [markdown]
# **Reading the maps.** The virtual map covers the whole tissue, also between and beyond the measured spots; it is
# smoother than the measurement (a prediction from 160 µm of tissue, not a count). In the stored run, 97.8% of
# C6's measured spots have a grid spot within one pitch, and on the 100 µm grid the mean target PCC at the nearest
# grid spot is 0.943 x the spot route's (0.1523 against 0.1615); at the model's own 160 µm pitch it is 0.865 x
# (0.1397): a finer grid than the patch pays off when the map is read at given positions. Per-gene r on ~180 spots
# of one section is a noisy estimate (see `benchmarks/RESULTS.md` for leave-one-section-out numbers), and the
# seconds above are one run on a shared 2-core CPU.
