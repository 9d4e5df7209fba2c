"""Every key this package reads from or writes to AnnData, in one place (the layout: ``docs/data_layouts.md``)."""

from __future__ import annotations

from typing import Literal, get_args

# --- input layout -----------------------------------------------------------------------------------------
SPATIAL_KEY = "spatial"  # .obsm and .uns key, as scanpy/squidpy
LIBRARY_KEY = "library_id"  # default .obs column telling slides apart
IMAGES = "images"
SCALEFACTORS = "scalefactors"
METADATA = "metadata"
HIRES = "hires"
LOWRES = "lowres"
FULLRES = "fullres"
HIRES_SCALEF = "tissue_hires_scalef"
LOWRES_SCALEF = "tissue_lowres_scalef"
SPOT_DIAMETER = "spot_diameter_fullres"
MICRONS_PER_PIXEL = "microns_per_pixel"
SOURCE_IMAGE_PATH = "source_image_path"
PATCHES_H5 = "patches_h5"
HEST_PATCH_INDEX = "hest_patch_index"  # .obs column: row of each spot in the HEST patches h5 (metadata["patches_h5"])
# metadata of a library read from a SpatialData object: the image element read lazily at full resolution
SPATIALDATA_IMAGE = "spatialdata_image"  # image element name
SPATIALDATA_PATH = "spatialdata_path"  # zarr store it can be reopened from (a backed SpatialData), optional
SPATIALDATA_IMAGE_TOKEN = "spatialdata_image_token"  # handle of the live image element in this process
SPATIALDATA_DOWNSCALED = "spatialdata_image_downscaled"  # True: the element is a downscaled stand-in (Visium hires)
MICRONS_PER_PIXEL_SOURCE = "microns_per_pixel_source"  # where microns_per_pixel came from (metadata)
#: A hires/lowres image standing in for a missing full-resolution one (or, at predict, a source coarser than the
#: model's training source) is refused above this ratio of µm/px (unless ``allow_lowres=True``).
LOWRES_TOLERANCE = 1.2

# --- embeddings -------------------------------------------------------------------------------------------
EMBED_PREFIX = "X_agl_"  # .obsm["X_agl_<encoder>"]
EMBED_UNS = "agl_embeddings"  # .uns["agl_embeddings"][obsm_key] = {encoder, weights_sha256, patch_px, ...}

# --- ownership of written keys (see _transaction.check_owned) ----------------------------------------------
#: Field of every ``.uns`` entry the package writes: the keys written with it, ``{"var": [...], "obs": [...], ...}``.
OWNED_FIELD = "agl_keys"
#: Name prefixes of the package's own namespace (its default ``key_added`` and embedding keys): ours by name.
OWN_PREFIXES = ("agl", EMBED_PREFIX)
#: ``.uns`` keys that scanpy, squidpy and spatialdata own: never written, whatever ``key_added`` says.
RESERVED_UNS: tuple[str, ...] = (SPATIAL_KEY, "spatialdata_attrs", "log1p", "hvg", "pca", "neighbors", "umap")
RESERVED_UNS += ("tsne", "draw_graph", "diffmap_evals", "leiden", "louvain", "paga", "rank_genes_groups", "dendrogram")
RESERVED_UNS += ("moranI", "gearyC", "spatial_neighbors", "co_occurrence", "interaction")

# --- value vocabularies (Literal aliases; the tuples are what validators accept) ---------------------------
Method = Literal["pgl", "agl", "topk", "dkgsb"]
Mode = Literal["embedding", "finetune"]
Transform = Literal["log1p", "log1p_cpm", "none"]
Prior = Literal["hvg", "coexpression", "moran"]
Loss = Literal["pearson", "mse"]
MetaNormalizer = Literal["soft", "detached"]
#: DkGSB look-ahead: the live Adam optimiser's next step(s), SGD steps, or the authors' (a fresh Adam on a copy).
Lookahead = Literal["adam", "sgd", "authors"]
#: agl_fit(head=): MLP trunk (trained), closed-form reduced-rank ridge, or both with their targets averaged
Head = Literal["mlp", "rrr", "hybrid"]
#: Which parameters the DkGSB look-ahead moves (``"auto"``: the per-mode default of ``agl_fit``).
MetaScope = Literal["all", "last"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # how encoders run (embed_patches, fine-tune mode)
Backend = Literal["auto", "torch", "onnx"]  # what runs a frozen encoder (model/_onnx_backend.py)
Role = Literal["target", "auxiliary", "excluded"]
Split = Literal["train", "val", "unused"]
#: Scale of the values ``agl_predict`` writes: the model's own expression scale, or scanpy's normalised one.
PredScale = Literal["model", "log1p_cp10k"]
Auto = Literal["auto"]  # a value chosen for the user (meta_scope, k)

METHODS: tuple[str, ...] = get_args(Method)
MODES: tuple[str, ...] = get_args(Mode)
TRANSFORMS: tuple[str, ...] = get_args(Transform)
TRANSFORM_LOG1P, TRANSFORM_LOG1P_CPM, TRANSFORM_NONE = get_args(Transform)
#: ``.uns`` key that scanpy's ``pp.log1p`` sets on the AnnData it transformed.
SCANPY_LOG1P_UNS = "log1p"
PRIORS: tuple[str, ...] = get_args(Prior)
LOSSES: tuple[str, ...] = get_args(Loss)
META_NORMALIZERS: tuple[str, ...] = get_args(MetaNormalizer)
LOOKAHEADS: tuple[str, ...] = get_args(Lookahead)
LOOKAHEAD_ADAM, LOOKAHEAD_SGD, LOOKAHEAD_AUTHORS = LOOKAHEADS
#: ``inner_lr`` and ``inner_steps`` that ``None`` takes per look-ahead (``"adam"`` uses the live optimiser's lr;
#: ``"authors"``: the public AGL code's fresh Adam, lr 3e-5, 12 steps on one batch).
INNER_LR_DEFAULTS: dict[str, float] = {"adam": 0.1, "sgd": 0.1, "authors": 3e-5}
INNER_STEPS_DEFAULTS: dict[str, int] = {"adam": 1, "sgd": 1, "authors": 12}
HEADS: tuple[str, ...] = get_args(Head)
HEAD_MLP, HEAD_RRR, HEAD_HYBRID = HEADS
#: Shares of the linear head in a ``head="hybrid"`` model's target predictions (the MLP networks have the rest)
#: that ``agl_fit`` chooses from on the validation spots; ``HYBRID_LINEAR_WEIGHT`` without validation spots.
HYBRID_WEIGHTS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
HYBRID_LINEAR_WEIGHT = 0.5
META_SCOPES: tuple[str, ...] = get_args(MetaScope)
META_SCOPE_ALL, META_SCOPE_LAST = META_SCOPES
#: ``meta_scope`` that takes the mode's default (``MODE_DEFAULTS`` of ``agl_scverse.configs``).
META_SCOPE_AUTO: Auto = "auto"
#: ``k`` of ``method="topk"`` that chooses the number of auxiliaries on the validation spots.
K_AUTO = "auto"
PRECISIONS: tuple[str, ...] = get_args(Precision)
BACKENDS: tuple[str, ...] = get_args(Backend)
ROLE_TARGET, ROLE_AUX, ROLE_EXCLUDED = get_args(Role)
ROLES: tuple[str, ...] = get_args(Role)
SPLIT_TRAIN, SPLIT_VAL, SPLIT_UNUSED = get_args(Split)
SPLITS: tuple[str, ...] = get_args(Split)
PRED_SCALES: tuple[str, ...] = get_args(PredScale)
SCALE_MODEL, SCALE_LOG1P_CP10K = get_args(PredScale)
#: Counts per spot after the library-size normalisation of ``"log1p_cp10k"`` (scanpy's ``target_sum=1e4``).
CP10K_TARGET_SUM = 1e4

# --- defaults ---------------------------------------------------------------------------------------------
DEFAULT_KEY = "agl"  # default key_added of every tool
DEFAULT_PATCH_PX = 224
DEFAULT_PATCH_UM = 112.0


def embedding_key(encoder_name: str) -> str:
    """``.obsm`` key of the features of an encoder: ``"X_agl_<encoder>"``."""
    return f"{EMBED_PREFIX}{encoder_name}"


class Keys:
    """Names of every ``.var`` / ``.obs`` column, ``.uns`` entry and layer written by one AGL run."""

    def __init__(self, key_added: str = DEFAULT_KEY):
        if not key_added or not isinstance(key_added, str):
            raise ValueError(f"key_added must be a non-empty string, got {key_added!r}.")
        self.prefix = key_added

    def __repr__(self) -> str:
        return f"Keys({self.prefix!r})"

    def _name(self, suffix: str) -> str:
        return f"{self.prefix}_{suffix}"

    # .var columns
    role = property(lambda self: self._name("role"))  # target / auxiliary / excluded
    prior = property(lambda self: self._name("prior"))  # prior score of auxiliaries (higher = better)
    prior_rank = property(lambda self: self._name("prior_rank"))  # 0 = best auxiliary, -1 otherwise
    weight = property(lambda self: self._name("weight"))  # mask weight (1 for targets)
    selected = property(lambda self: self._name("selected"))  # bool
    # bool: the gene has predictions in pred_layer (and in any other prediction layer of the run, e.g. a spread);
    # scanpy's mask_var / squidpy's genes= take it. Written by agl_predict / predict_anndata.
    predicted = property(lambda self: self._name("predicted"))
    pcc = property(lambda self: self._name("pcc"))
    spearman = property(lambda self: self._name("spearman"))
    mse = property(lambda self: self._name("mse"))
    # .obs column: train / val / unused
    split = property(lambda self: self._name("split"))
    # .uns entries
    uns = property(lambda self: self.prefix)  # params, k, threshold, history, metrics
    gene_roles = property(lambda self: self._name("gene_roles"))  # parameters of agl.pp.gene_roles
    # .layers: spots x genes, float32, predictions where .var[predicted], 0 elsewhere (never NaN)
    pred_layer = property(lambda self: self._name("pred"))
    # .layers: the spread (sd over the members) of a seed ensemble's predictions, 0 where not predicted
    spread_layer = property(lambda self: self._name("pred_sd"))
    # .uns entry describing the prediction layers: scale, transform, counts layer, observed (see agl_predict)
    pred_uns = property(lambda self: self._name("pred"))
    # private .var column cross_validate uses to hand a fold's prior to agl_fit
    fold_prior = property(lambda self: self._name("fold_prior"))
