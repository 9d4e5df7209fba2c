"""Generate (and optionally execute) the tutorial notebooks.

Usage (from the repository root)::

    python tutorials/make_notebooks.py            # write the three notebooks, unexecuted
    python tutorials/make_notebooks.py --execute  # write and execute them in place (full mode)
    python tutorials/make_notebooks.py --execute 01  # only notebooks whose name contains "01"
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """import os
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the stored notebook
warnings.filterwarnings("ignore", category=SyntaxWarning)  # docrep noise from squidpy's import
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc

import agl_scverse as agl

%matplotlib inline
plt.rcParams["figure.dpi"] = 80
sc.settings.verbosity = 1

# Parameters: AGL_TUTORIAL_QUICK=1 runs a small, fast version (used by tests/test_tutorials.py).
QUICK = os.environ.get("AGL_TUTORIAL_QUICK", "0") == "1"
SEED = 0"""


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


# --------------------------------------------------------------------------------------------- 01 quickstart
NB01 = [
    md("""
# 01 · Quickstart: AGL + DkGSB on a synthetic slide

This notebook runs the whole agl-scverse workflow on the built-in **synthetic slide** (no download needed):

1. simulate an H&E-like image with spot counts (`agl.datasets.synthetic_slide`),
2. embed the image patch under every spot (`agl.pp.embed_patches`),
3. train an MLP head with **Auxiliary Gene Learning** and **DkGSB** auxiliary-gene selection on 75% of the spots
   (`agl.tl.agl_fit`),
4. predict and score the 25% held-out spots against two baselines (`agl.tl.agl_predict`, `agl.tl.evaluate`),
5. plot the learned gene selection, the training history and predicted vs observed maps (`agl.pl.*`).

Set the environment variable `AGL_TUTORIAL_QUICK=1` for a smaller, faster run (the test suite does this).
"""),
    code(
        SETUP
        + """
PATCH_PX = 64 if QUICK else 112  # pixels per patch side (see the embedding step)
EPOCHS = 10 if QUICK else None  # None: the trainer's default with early stopping
print(f"QUICK={QUICK}, PATCH_PX={PATCH_PX}, EPOCHS={EPOCHS}")"""
    ),
    md("""
## 1 · A synthetic slide

`synthetic_slide` draws a mosaic of tissue regions (tumour, stroma, immune, epithelium, adipose) and a grid of
spots. Counts depend on what the image shows under each spot. It plants three kinds of genes, recorded in
`.var["synthetic_kind"]`: `tissue` genes (strong image signal, the natural prediction targets), `informative` genes (the
same signal, weaker and noisier: the auxiliaries AGL should pick) and `noise` genes (unrelated to the image, some
of them bursty so that they look highly variable). The AnnData follows the scanpy/squidpy layout: raw counts in
`.X`, spot centres in `.obsm["spatial"]`, the image in `.uns["spatial"]`.
"""),
    code("""
adata = agl.datasets.synthetic_slide(seed=SEED)
print(adata)
adata.var["synthetic_kind"].value_counts()"""),
    md("""
## 2 · Embed the spot patches

`embed_patches` cuts a square patch around every spot (`patch_um=112` µm by default), resizes it to `patch_px`
pixels, runs it through an image encoder and stores the features in `.obsm["X_agl_<encoder>"]` (settings in
`.uns["agl_embeddings"]`).

We use a **randomly initialised ResNet-18**: this tutorial must run without downloading weights. Random
convolutional features still encode colour and texture, which is enough on this synthetic image; for real
tissue pass a local pretrained weights file (`weights="densenet121.pth"`, see tutorial 02).

Why `patch_px=112`? The synthetic image has 1 µm per pixel, so a 112-µm patch holds exactly 112 source pixels;
resizing it up to the usual 224 px would add no information and cost four times the compute on a CPU.
"""),
    code("""
agl.pp.embed_patches(adata, encoder="resnet18", patch_px=PATCH_PX, seed=SEED, device="cpu")
emb_key = "X_agl_resnet18"
print(emb_key, adata.obsm[emb_key].shape)
{k: adata.uns["agl_embeddings"][emb_key].get(k) for k in ("encoder", "patch_px", "patch_um", "weights_path")}"""),
    md("""
## 3 · Train AGL with DkGSB on 75% of the spots

We hold out a seeded 25% of the spots as a test set and pass the rest as `spots=`. Inside the fit,
`agl_fit` draws 20% of the used spots for validation (early stopping and DkGSB's bi-level step).

`agl_fit` picks the 50 most highly variable genes (on the training spots only) as **targets**; the other genes
are **auxiliaries**, ranked by their HVG dispersion (the *prior*). DkGSB learns a soft top-k mask over that
ranking, `w_i = sigmoid((theta - r_i) / tau)`: the threshold `theta` (hence `k`, the number of auxiliaries used)
is updated by the validation loss of the targets after differentiable inner training steps.
"""),
    code("""
rng = np.random.default_rng(SEED)
test = np.zeros(adata.n_obs, dtype=bool)
test[rng.choice(adata.n_obs, size=adata.n_obs // 4, replace=False)] = True
model = agl.tl.agl_fit(
    adata, method="dkgsb", embedding_key=emb_key, spots=~test, seed=SEED, progress=False,
    training=agl.TrainingConfig(epochs=EPOCHS),  # EPOCHS None: the mode's default
)
model"""),
    md("""
The fit wrote into `adata` (prefix `agl`, change it with `key_added=`):

| key | content |
|---|---|
| `.var["agl_role"]` | `target`, `auxiliary` or `excluded` |
| `.var["agl_prior"]`, `.var["agl_prior_rank"]` | prior score of the auxiliaries and their rank |
| `.var["agl_weight"]`, `.var["agl_selected"]` | learned DkGSB weight `w_i` and whether the gene is used |
| `.obs["agl_split"]` | `train`, `val` or `unused` (our held-out spots) |
| `.uns["agl"]` | parameters, learned `k` and `theta`, training history, metrics |
"""),
    code("""
run = adata.uns["agl"]
print("roles:", adata.var["agl_role"].value_counts().to_dict())
print("split:", adata.obs["agl_split"].value_counts().to_dict())
print(f"learned k = {run['k']} auxiliary genes")
aux_sel = adata.var["agl_selected"] & (adata.var["agl_role"] == "auxiliary")
print("kinds among the selected auxiliaries:", adata.var.loc[aux_sel, "synthetic_kind"].value_counts().to_dict())
print("kinds among all auxiliaries:       ",
      adata.var.loc[adata.var["agl_role"] == "auxiliary", "synthetic_kind"].value_counts().to_dict())"""),
    md("""
## 4 · Predict and evaluate on the held-out spots

`agl_predict` writes `.layers["agl_pred"]` (predictions, in the model's `log1p` scale, for the targets and the
selected auxiliaries; NaN elsewhere). `evaluate` scores the target genes on the held-out spots (by default the
`unused` spots of `.obs["agl_split"]`) and, on the same spots and with the same embedding, two baselines: the
**mean predictor** (training mean of each gene: Pearson r is undefined/0 for it) and **PCA + Ridge** regression
(the HEST-Benchmark linear probe). Per-gene metrics go to `.var["agl_pcc"]`, `.var["agl_spearman"]`,
`.var["agl_mse"]`; the summary to `.uns["agl"]["metrics"]["test"]`.
"""),
    code("""
agl.tl.agl_predict(adata, model)
agl.tl.evaluate(adata, model)
test_metrics = adata.uns["agl"]["metrics"]["test"]
table = pd.DataFrame({name: {m: float(v) for m, v in d.items() if np.isscalar(v)}
                      for name, d in test_metrics.items() if isinstance(d, dict)}).T
print("Evaluation on the held-out spots (mean over target genes):")
table"""),
    code("""
diff = table.loc["model", "pearson"] - table.loc["pca_ridge", "pearson"]
genes = adata.var_names[adata.var["agl_role"] == "target"]
print(f"MLP head (AGL + DkGSB) minus PCA+Ridge, mean target Pearson r: {diff:+.3f}")
print(f"learned k = {run['k']}: informative genes are "
      f"{(adata.var.loc[aux_sel, 'synthetic_kind'] == 'informative').mean():.0%} of the selected auxiliaries "
      f"and {(adata.var.loc[adata.var['agl_role'] == 'auxiliary', 'synthetic_kind'] == 'informative').mean():.0%} "
      "of all auxiliaries")"""),
    md("""
**What the numbers show.** Both models beat the mean predictor on correlation (its r is 0 by convention), not necessarily on MSE: the head is trained with a Pearson loss, which fits the pattern across spots, not the scale. Between the MLP head and the linear
**PCA + Ridge** probe the ranking is *not* stable on this small slide (300 training spots, a random-init
encoder): in the stored run (112-px patches) the head is ahead on mean Pearson r while PCA + Ridge has the better
Spearman r (and a large MSE: its predictions rank spots well but are badly scaled on some genes); in the quick
64-px run PCA + Ridge is ahead on every metric, and on the real HER2+ sections PCA + Ridge is as good as or better
than every MLP head (`benchmarks/RESULTS.md`). DkGSB enriches the auxiliaries it keeps for informative genes over
their share among all auxiliaries. The fair test of AGL is against a head trained on the targets alone (PGL) with
the same encoder and spots: `agl-scverse demo` and the scripts in `benchmarks/` run it.
"""),
    code("""
agl.pl.gene_performance(adata, kind="bar", figsize=(7, 3))"""),
    md("""
## 5 · Plots

`selected_genes` shows every auxiliary gene at its prior rank (x) with its learned weight (y) and the learned
threshold; with `show_history=True` a second panel shows `k` per epoch. `training_history` shows the training
loss, the validation target PCC and `k` per epoch, with the kept epoch marked.
"""),
    code("""
agl.pl.selected_genes(adata, n_labels=5, show_history=True, figsize=(9, 3.2))"""),
    code("""
agl.pl.training_history(adata, figsize=(10, 2.8))"""),
    md("""
`spatial_prediction` draws observed (log1p counts) and predicted expression side by side on the image, through
`squidpy.pl.spatial_scatter`, on one colour scale and cropped to the tissue; the title of each predicted panel
gives the Pearson r over the held-out spots (the 25% `agl_fit` did not see, `.obs["agl_split"] == "unused"`), the
spots the table above scores.
"""),
    code("""
targets = adata.var_names[adata.var["agl_role"] == "target"]
best = adata.var.loc[targets, "agl_pcc"].sort_values(ascending=False).index[:2].tolist()
agl.pl.spatial_prediction(adata, best, figsize=(7.5, 7.4))"""),
    md("""
Next: tutorial 02 runs the same steps on real HER2+ breast cancer sections with a pretrained encoder, and
tutorial 03 adds AGL to an existing scanpy pipeline.
"""),
]


# --------------------------------------------------------------------------------------------- 02 HER2+
NB02 = [
    md("""
# 02 · Real data: HER2+ breast cancer sections (legacy ST)

Five sections of patient C from the HER2+ breast cancer study (Andersson et al., *Nat. Commun.* 2021), measured
with legacy Spatial Transcriptomics (100 µm spots on a 200 µm grid, ~180 spots per section). We train AGL + DkGSB
on four sections and predict the fifth, unseen section from its H&E alone, then compare with the measured counts.

The data are not shipped with the package: set `AGL_HER2ST` to a folder with one sub-folder per section
(`counts.tsv.gz`, `spots.tsv`, `he.jpg`), and `AGL_WEIGHTS` to a local DenseNet-121 ImageNet weights file
(without it the notebook uses a randomly initialised ResNet-18, whose features are much weaker).
"""),
    code("""
import os
from pathlib import Path

import pandas as pd
import scanpy as sc

import agl_scverse as agl

sc.settings.verbosity = 1
DATA = Path(os.environ.get("AGL_HER2ST", "../../shared/data/her2st"))
WEIGHTS = Path(os.environ.get("AGL_WEIGHTS", "../../shared/weights/densenet121_keras_imagenet_features_torchvision.pth"))
QUICK = os.environ.get("AGL_TUTORIAL_QUICK") == "1"  # a small, fast run (the test suite's)
SECTIONS = ["C2", "C3"] if QUICK else ["C2", "C3", "C4", "C5", "C6"]
HELD_OUT = SECTIONS[-1]
print(f"QUICK={QUICK}, sections {SECTIONS}, held out: {HELD_OUT}")"""),
    md("""
## 1 · Read the sections

`agl.io.read_legacy_st` reads every section into one AnnData: raw counts in `.X` (genes joined on their union),
the section in `.obs["library_id"]`, spot centres in full-resolution pixels in `.obsm["spatial"]`, and per section
the H&E image and its µm-per-pixel scale (from the 200 µm spot pitch) in `.uns["spatial"]`.
"""),
    code("""
adata = agl.io.read_legacy_st(DATA, sections=SECTIONS)
print(adata)
print(adata.obs["library_id"].value_counts().sort_index().to_dict())"""),
    md("""
## 2 · Embed the patches

DenseNet-121 with ImageNet weights on 224-px patches covering 160 µm (about the native ~0.71 µm/px), cached in
`.obsm["X_agl_densenet121"]`. The quick run (or a missing weights file) uses a random-init ResNet-18 at 64 px,
only to exercise the code.
"""),
    code("""
if WEIGHTS.exists() and not QUICK:
    encoder, weights, patch_px = "densenet121", WEIGHTS, 224
else:
    print("quick run or no weights file: a random-init ResNet-18 (weak features)")
    encoder, weights, patch_px = "resnet18", None, 64
agl.pp.embed_patches(adata, encoder=encoder, weights=weights, patch_px=patch_px, patch_um=160.0,
                     library_key="library_id", device="cpu")
emb_key = f"X_agl_{encoder}"
print(emb_key, adata.obsm[emb_key].shape)"""),
    md("""
## 3 · Train on the other sections, predict the held-out one

`spots=` restricts the fit to the training sections; the held-out section's spots become `"unused"` in
`.obs["agl_split"]`. Targets (top-50 HVG) and auxiliaries (every other gene seen in ≥ 10 training spots, ranked
by HVG dispersion) are chosen on the training spots only, so nothing leaks from the held-out section. A random
20% of the training spots is used for validation (early stopping and the DkGSB threshold update).
"""),
    code("""
train = (adata.obs["library_id"] != HELD_OUT).to_numpy()
model = agl.tl.agl_fit(adata, method="dkgsb", embedding_key=emb_key, spots=train,
                       training=agl.TrainingConfig(epochs=5 if QUICK else 40), seed=0, library_key="library_id",
                       progress=False)
print(model)
print("split:", adata.obs["agl_split"].value_counts().to_dict())"""),
    md("""
## 4 · Evaluate on the held-out section

`agl_predict` fills `.layers["agl_pred"]` for every spot (all sections); `evaluate` scores the 50 targets on the
held-out (`unused`) spots beside the mean predictor and PCA + Ridge on the same embedding, trained on the training
spots.
"""),
    code("""
agl.tl.agl_predict(adata, model, library_key="library_id")
agl.tl.evaluate(adata, model)
test = adata.uns["agl"]["metrics"]["test"]
table = pd.DataFrame({name: test[name] for name in ("model", "mean_predictor", "pca_ridge")}).T
print(f"Held-out section {HELD_OUT}: mean over target genes")
table[["pearson", "spearman", "mse"]].astype(float).round(3)"""),
    md("""
**Reading the numbers.** Per-gene correlations on an unseen section of ~180 spots are modest for every method
(the published HER2+ benchmarks report mean target PCC around 0.15-0.25 for this kind of model). In the
leave-one-section-out benchmark of this repository (`benchmarks/RESULTS.md`), auxiliary genes help the MLP head
(AGL-all and DkGSB over targets-only PGL), while the linear PCA + Ridge probe on the same features is as good or
better on these 910 spots. One held-out section, as here, is a noisy estimate: use `agl.tl.cross_validate` for a
fair comparison.
"""),
    code("""
agl.pl.gene_performance(adata, kind="bar", figsize=(7, 3))"""),
    md("""
## 5 · Maps on the held-out H&E

Observed (log1p counts) and predicted expression of the three best-predicted targets on the held-out section;
the title of each predicted panel gives the Pearson r over that section's spots, all held out of the fit.
"""),
    code("""
targets = adata.var_names[adata.var["agl_role"] == "target"]
best = adata.var.loc[targets, "agl_pcc"].sort_values(ascending=False).index[:3].tolist()
print("genes:", best)
agl.pl.spatial_prediction(adata, best, library_id=HELD_OUT, library_key="library_id", figsize=(7, 9))"""),
    md("""
## 6 · Which auxiliary genes did DkGSB keep?

Each auxiliary gene at its prior (HVG) rank with its learned weight; genes left of the dashed threshold are used.
"""),
    code("""
n_aux = int((adata.var["agl_role"] == "auxiliary").sum())
print(f"k = {adata.uns['agl']['k']} of {n_aux} auxiliary genes selected")
agl.pl.selected_genes(adata, n_labels=8, show_history=True, figsize=(9, 3.2))"""),
]


# --------------------------------------------------------------------------------------------- 03 scanpy
NB03 = [
    md("""
# 03 · A scanpy / squidpy pipeline on AGL predictions

A typical spatial analysis already has a scanpy pipeline: normalise, log-transform, highly variable genes, PCA,
neighbours, Leiden clusters, spatial statistics with squidpy. This notebook shows that the same pipeline runs on
**predicted** expression, with no masks to invent and no NaN to work around:

- keep the **raw counts in a layer** (`"counts"`) and pass `genes=agl.GeneConfig(layer="counts")` to `agl_fit`, so `.X` can hold
  normalised values;
- train on one slide, predict a second slide from its image alone;
- run PCA → neighbours → Leiden → `sq.gr.spatial_autocorr` on the predictions, in the normalised scale of a
  scanpy pipeline (`scale="log1p_cp10k"`), and compare with the same steps on the measured expression.

We use two synthetic slides (`agl.datasets.synthetic_slide(n_slides=2)`); slide 2 plays the new sample.
Clustering uses `leidenalg` and `igraph` (`pip install "agl-scverse[tutorial]"`).
"""),
    code(
        SETUP
        + """
import squidpy as sq
from scipy.stats import spearmanr
from sklearn.metrics import adjusted_rand_score

PATCH_PX = 64 if QUICK else 112  # the synthetic image is 1 µm/px: a 112-µm patch is 112 pixels
EPOCHS = 10 if QUICK else None
print(f"QUICK={QUICK}, PATCH_PX={PATCH_PX}, EPOCHS={EPOCHS}")"""
    ),
    md("""
## 1 · The usual scanpy preprocessing, raw counts kept in a layer
"""),
    code("""
size = {"n_rows": 12, "n_cols": 12} if QUICK else {}  # quick: 2 x 144 spots instead of 2 x 400
adata = agl.datasets.synthetic_slide(n_slides=2, seed=SEED, **size)
libs = adata.obs["library_id"].cat.categories.tolist()
train_lib, new_lib = libs[0], libs[1]
print(adata.n_obs, "spots,", adata.n_vars, "genes; slides:", libs)

adata.layers["counts"] = adata.X.copy()  # AGL reads raw counts from here
sc.pp.normalize_total(adata, target_sum=1e4)
sc.pp.log1p(adata)
adata"""),
    md("""
## 2 · Train AGL on slide 1, predict slide 2

`layer="counts"` tells AGL where the raw counts are (`.X` now holds log-normalised values). `spots=` restricts
training to slide 1; slide 2's spots are `"unused"` in `.obs["agl_split"]`, so `evaluate` scores them: this is
the held-out Pearson r.
"""),
    code("""
agl.pp.embed_patches(adata, encoder="resnet18", patch_px=PATCH_PX, library_key="library_id", seed=SEED,
                     device="cpu")
model = agl.tl.agl_fit(
    adata, method="dkgsb", genes=agl.GeneConfig(layer="counts"),
    spots=(adata.obs["library_id"] == train_lib).to_numpy(), library_key="library_id", seed=SEED, progress=False,
    training=agl.TrainingConfig(epochs=EPOCHS),
)
agl.tl.agl_predict(adata, model, library_key="library_id")
agl.tl.evaluate(adata, model)  # scores the unused spots: all of slide 2
print(model)
print(f"mean target Pearson r on the held-out slide {new_lib}:",
      round(float(adata.uns["agl"]["metrics"]["test"]["model"]["pearson"]), 3))"""),
    md("""
## 3 · What the predicted layer looks like

`agl_predict` writes three things (key names in `agl_scverse._constants.Keys`):

- `.layers["agl_pred"]`: spots x all genes, predictions for the predicted genes and **0** for the others (never NaN);
- `.var["agl_predicted"]`: which genes are predicted (the targets and the auxiliary genes the mask kept) — the
  boolean mask scanpy's `mask_var=` and squidpy's `genes=` take;
- `.uns["agl_pred"]`: how the layer was made (its scale, the model's transform, the counts layer).

Predictions are in the model's scale by default (`log1p` of raw counts, the scale `evaluate` scores);
`scale="log1p_cp10k"` gives the scale of a scanpy pipeline instead (predicted counts normalised to 10,000 per
spot over the predicted genes, then `log1p`).
"""),
    code("""
layer = adata.layers["agl_pred"]
print("NaN in the layer:", bool(np.isnan(layer).any()), "| predicted genes:", int(adata.var["agl_predicted"].sum()),
      "of", adata.n_vars)
adata.uns["agl_pred"]"""),
    md("""
## 4 · PCA → neighbours → Leiden → Moran's I on the predictions

For a pipeline on the predictions alone, `predict_anndata` returns an AnnData of the predicted genes whose `.X` is
the predictions: every scanpy and squidpy function runs on it as on any AnnData, without masks. Here it predicts
slide 2 from its image (and the embedding of its patches) alone, in scanpy's normalised scale.
"""),
    code("""
new = adata[adata.obs["library_id"] == new_lib].copy()
he = new[:, []].copy()  # what an H&E-only slide gives: spots, image, patch embedding; no expression
pred = agl.tl.predict_anndata(he, model, scale="log1p_cp10k", library_key="library_id")
print(pred)

sc.pp.pca(pred, n_comps=20, random_state=SEED)
sc.pp.neighbors(pred, n_neighbors=15, random_state=SEED)
sc.tl.leiden(pred, resolution=0.5, flavor="igraph", n_iterations=2, random_state=SEED, key_added="leiden")
sq.gr.spatial_neighbors_knn(pred, n_neighs=6)
sq.gr.spatial_autocorr(pred, mode="moran", n_perms=None)
moran_pred = pred.uns["moranI"]
fdr_ok = bool(np.isfinite(moran_pred["pval_norm_fdr_bh"]).all())
n_sig = int((moran_pred["pval_norm_fdr_bh"] < 0.05).sum())
print(f"Leiden on predictions: {pred.obs['leiden'].nunique()} clusters")
print(f"Moran's I: {n_sig} of {len(moran_pred)} predicted genes spatially autocorrelated (FDR < 0.05); "
      f"FDR finite for every gene: {fdr_ok}")
moran_pred.head()"""),
    md("""
## 5 · The same steps on the measured expression of slide 2

The observed AnnData of slide 2, restricted to the same genes, in the same scale (scanpy's log-normalised `.X`),
goes through the same steps. The adjusted Rand index (ARI) compares the two clusterings (1: identical partitions,
about 0: unrelated); the simulated tissue type is the ground truth here. Moran's I of a gene on the predictions
is compared with its Moran's I on the measurements.
"""),
    code("""
obs = new[:, pred.var_names].copy()  # .X: log1p CP10k of the measured counts (normalised over all genes)
sc.pp.pca(obs, n_comps=20, random_state=SEED)
sc.pp.neighbors(obs, n_neighbors=15, random_state=SEED)
sc.tl.leiden(obs, resolution=0.5, flavor="igraph", n_iterations=2, random_state=SEED, key_added="leiden")
sq.gr.spatial_neighbors_knn(obs, n_neighs=6)
sq.gr.spatial_autocorr(obs, mode="moran", n_perms=None)

new.obs["leiden_observed"] = obs.obs["leiden"].to_numpy()
new.obs["leiden_predicted"] = pred.obs["leiden"].to_numpy()
ari = adjusted_rand_score(obs.obs["leiden"], pred.obs["leiden"])
print(f"ARI(predicted clusters, observed clusters) = {ari:.3f}")
for name, lab in (("observed", obs.obs["leiden"]), ("predicted", pred.obs["leiden"])):
    print(f"ARI({name} clusters, true tissue type) = {adjusted_rand_score(new.obs['tissue_type'], lab):.3f}")
both = pd.DataFrame({"observed": obs.uns["moranI"]["I"], "predicted": moran_pred["I"]}).dropna()
rho = spearmanr(both["observed"], both["predicted"]).statistic
print(f"Moran's I over {len(both)} genes: mean observed {both['observed'].mean():.3f}, "
      f"mean predicted {both['predicted'].mean():.3f}, Spearman rho {rho:.3f}")"""),
    md("""
The crosstab shows which observed cluster the spots of each predicted cluster belong to (rows: observed, columns:
predicted):
"""),
    code("""
pd.crosstab(new.obs["leiden_observed"], new.obs["leiden_predicted"], rownames=["observed"],
            colnames=["predicted"])"""),
    md("""
## 6 · Without a new AnnData: the layer and its mask

The same analysis runs on the slide itself, on `.layers["agl_pred"]` with the mask: `mask_var` for PCA (scanpy
would otherwise use `.var["highly_variable"]` when it exists), `genes=` for squidpy (a gene of zeros has no
Moran's I). This layer is in the model's scale (`log1p` counts).
"""),
    code("""
sc.pp.pca(new, n_comps=20, layer="agl_pred", mask_var="agl_predicted", key_added="X_pca_agl", random_state=SEED)
sc.pp.neighbors(new, use_rep="X_pca_agl", key_added="agl", random_state=SEED)
sc.tl.leiden(new, resolution=0.5, flavor="igraph", n_iterations=2, neighbors_key="agl", random_state=SEED,
             key_added="leiden_layer")
sq.gr.spatial_neighbors_knn(new, n_neighs=6)
predicted_genes = new.var_names[new.var["agl_predicted"]]
sq.gr.spatial_autocorr(new, mode="moran", layer="agl_pred", genes=predicted_genes, n_perms=None)
print(f"Leiden on the layer: {new.obs['leiden_layer'].nunique()} clusters; ARI with the clusters of "
      f"predict_anndata: {adjusted_rand_score(new.obs['leiden_layer'], new.obs['leiden_predicted']):.3f}")
print(f"FDR finite for every predicted gene: {bool(np.isfinite(new.uns['moranI']['pval_norm_fdr_bh']).all())}")"""),
    md("""
## 7 · On the image

`squidpy.pl.spatial_scatter` draws the clusterings (and the simulated tissue type) on slide 2's H&E;
`agl.pl.spatial_prediction` draws a gene observed and predicted on a shared colour scale, with the Pearson r over
the held-out spots in the title.
"""),
    code("""
sq.pl.spatial_scatter(
    new, color=["tissue_type", "leiden_observed", "leiden_predicted"], library_id=new_lib,
    library_key="library_id", img_res_key="hires", size=1.2, figsize=(3.2, 3.2), wspace=0.5,
)
best = adata.var.loc[model.targets, "agl_pcc"].idxmax()
agl.pl.spatial_prediction(new, best, library_key="library_id", figsize=(7, 3.2))"""),
    md("""
**What to take from it.** The predictions go through PCA, neighbours, Leiden and Moran's I like measured
expression, with every FDR finite. Predicted expression is smoother than measured counts (it is a function of the
patch only, without the image-invisible noise), so its clusters follow the tissue regions visible in the image and
its Moran's I values are higher than the measured ones; how well the clusters agree with those of the measurements
is what the ARI measures. In the stored run (2 x 400 spots) the held-out target r is about 0.40, the ARI between
predicted and observed clusters about 0.39 (against the simulated tissue types: 0.47 predicted, 0.64 observed), and
the mean Moran's I of the predicted genes 0.35 on predictions against 0.13 on measurements (Spearman rho 0.49 over
genes). Quick runs (2 x 144 spots, 10 epochs) give other values.
On real data the same code gives a first, image-derived segmentation of a new slide, to be confirmed by measured
expression.
"""),
]


NOTEBOOKS = {"01_quickstart.ipynb": "NB01", "02_her2st.ipynb": "NB02", "03_scanpy_pipeline.ipynb": "NB03"}


_BAR = re.compile(r"^.*\d+%\|.*\|.*$")  # a tqdm progress bar line
# a warning raised inside an installed package: "<path>/site-packages/<file>:<line>: <Name>Warning: ..."
_LIBRARY_WARNING = re.compile(r"^\S*site-packages/\S+:\d+: \w*Warning: ")


def clean_outputs(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Stored outputs as a reader should see them: consecutive streams merged, text a carriage return overwrote
    dropped, progress-bar lines removed (Jupyter redraws a bar in place; a stored notebook repeats every frame),
    and warnings raised inside installed packages removed (they name this machine's paths, not the tutorial's)."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged: list = []
        for out in cell.get("outputs", []):
            if (
                out.output_type == "stream"
                and merged
                and merged[-1].output_type == "stream"
                and (merged[-1].name == out.name)
            ):
                merged[-1].text += out.text
            else:
                merged.append(out)
        kept = []
        for out in merged:
            if out.output_type == "stream":
                lines, keep = [ln.rsplit("\r", 1)[-1] for ln in out.text.split("\n")], []
                for ln in lines:
                    if _LIBRARY_WARNING.match(ln):
                        keep.append(None)  # and its source line below
                    elif keep and keep[-1] is None and ln.startswith("  "):
                        keep[-1] = False
                    elif not _BAR.match(ln):
                        keep.append(ln)
                out.text = "\n".join(ln for ln in keep if isinstance(ln, str))
                if not out.text.strip():
                    continue
            kept.append(out)
        cell.outputs = kept
    return nb


def build(name: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=globals()[NOTEBOOKS[name]])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def main(argv: list[str]) -> None:
    execute = "--execute" in argv
    only = [a for a in argv if not a.startswith("--")]
    for name in NOTEBOOKS:
        if NOTEBOOKS[name] not in globals() or (only and not any(o in name for o in only)):
            continue
        nb = build(name)
        path = HERE / name
        nbformat.write(nb, path)
        subprocess.run([sys.executable, "-m", "ruff", "format", "-q", str(path)], check=False)  # tidy code cells
        nb = nbformat.read(path, as_version=4)
        if execute:
            from nbclient import NotebookClient

            t = time.perf_counter()
            NotebookClient(
                nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
            ).execute()
            print(f"{name}: executed in {time.perf_counter() - t:.0f} s")
            clean_outputs(nb)
        nbformat.write(nb, path)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main(sys.argv[1:])
