"""Every key this package reads from or writes to AnnData, in one place.

The contract (see ``docs/data_layouts.md``):

- ``.X`` (or a named layer): raw counts, spots x genes.
- ``.obsm["spatial"]``: spot centres in **full-resolution pixels** (x, y).
- ``.obs[library_key]``: which slide a spot belongs to (categorical) when there are several.
- ``.uns["spatial"][library_id]``:
    - ``"images"``: ``{"hires": array, "lowres": array}`` as in scanpy/squidpy (optional ``"fullres"``);
    - ``"scalefactors"``: ``tissue_hires_scalef``, ``tissue_lowres_scalef``, ``spot_diameter_fullres``
      and ``microns_per_pixel`` (µm per full-resolution pixel, our addition);
    - ``"metadata"``: ``source_image_path`` (full-resolution image file read lazily for patches) and
      ``patches_h5`` (HEST pre-extracted patches), both optional.
"""

from __future__ import annotations

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

# --- embeddings -------------------------------------------------------------------------------------------
EMBED_PREFIX = "X_agl_"  # .obsm["X_agl_<encoder>"]
EMBED_UNS = "agl_embeddings"  # .uns["agl_embeddings"][obsm_key] = {encoder, weights_sha256, patch_px, ...}

# --- gene roles and AGL results ---------------------------------------------------------------------------
ROLE = "agl_role"
PRIOR = "agl_prior"
PRIOR_RANK = "agl_prior_rank"
WEIGHT = "agl_weight"
SELECTED = "agl_selected"
ROLE_TARGET = "target"
ROLE_AUX = "auxiliary"
ROLE_EXCLUDED = "excluded"
UNS_KEY = "agl"  # .uns["agl"]: params, k, threshold, history, metrics, split
PRED_LAYER = "agl_pred"

# --- defaults ---------------------------------------------------------------------------------------------
DEFAULT_PATCH_PX = 224
DEFAULT_PATCH_UM = 112.0


class Keys:
    """Names of the ``.var`` columns, ``.uns`` entry and layer written by one AGL run.

    ``key_added`` (default ``"agl"``) prefixes them all, so several runs can live in one AnnData.

    Examples
    --------
    >>> Keys().role, Keys("agl_dkgsb").pred_layer
    ('agl_role', 'agl_dkgsb_pred')
    """

    def __init__(self, key_added: str = UNS_KEY):
        if not key_added or not isinstance(key_added, str):
            raise ValueError(f"key_added must be a non-empty string, got {key_added!r}.")
        self.prefix = key_added

    def __repr__(self) -> str:
        return f"Keys({self.prefix!r})"

    role = property(lambda self: f"{self.prefix}_role")
    prior = property(lambda self: f"{self.prefix}_prior")
    prior_rank = property(lambda self: f"{self.prefix}_prior_rank")
    weight = property(lambda self: f"{self.prefix}_weight")
    selected = property(lambda self: f"{self.prefix}_selected")
    uns = property(lambda self: self.prefix)
    pred_layer = property(lambda self: f"{self.prefix}_pred")
    split = property(lambda self: f"{self.prefix}_split")  # .obs column: train / val / unused
    pcc = property(lambda self: f"{self.prefix}_pcc")
    spearman = property(lambda self: f"{self.prefix}_spearman")
    mse = property(lambda self: f"{self.prefix}_mse")
