"""DkGSB on the built-in synthetic slide, whose informative auxiliaries are known (``.var["informative"]``).

Same regime and seed as ``benchmarks/accuracy/bench_synthetic_methods.py`` (seed 2): clean informative auxiliaries,
20 noisy tissue genes as targets, 1,600 noise genes (100 bursty, ranking high on the HVG prior), a simulated
encoder (noisy 256-d view of the tissue state). Deterministic on CPU for the seed.
"""

from __future__ import annotations

import numpy as np

import agl_scverse as agl


def test_dkgsb_selects_informative_auxiliaries_and_beats_pgl():
    seed = 2
    adata = agl.datasets.synthetic_slide(
        n_rows=20, n_cols=20, informative_strength=1.0, informative_mean=(3.0, 30.0), tissue_mean=(0.5, 3.0), seed=seed
    )
    rng = np.random.default_rng(1000 + seed)
    lat = adata.obsm["synthetic_latent"]
    P = rng.normal(size=(lat.shape[1], 256))
    adata.obsm["X_sim"] = (np.tanh(lat @ P) + 2.0 * rng.normal(size=(adata.n_obs, 256))).astype(np.float32)
    targets = adata.var_names[adata.var["synthetic_kind"] == "tissue"][:20].tolist()

    df = agl.tl.compare_methods(
        adata,
        ["pgl", "dkgsb", "topk"],
        seed=seed,
        embedding_key="X_sim",
        targets=targets,
        method_kwargs={"topk": {"k": "auto"}},
        refit=False,  # one network on the training split (the regime this test was written for)
        n_seeds=1,
    ).set_index("method")

    row = df.loc["dkgsb"]
    k, k0, n_aux = int(row["k"]), int(row["k_start"]), int(row["n_auxiliary"])
    assert abs(k - k0) > 0.1 * n_aux  # the threshold was learned, not left at its start
    assert row["precision"] > 1.5 * row["base_rate"]  # enriched for informative auxiliaries
    assert df.loc["dkgsb", "test_pcc"] > df.loc["pgl", "test_pcc"] + 0.01  # held-out target PCC
    # the search over k: the best held-out PCC here, and the most informative selection
    # (benchmarks/RESULTS.md: DkGSB's look-ahead goes to k = 61 on this seed, where the HVG ranking's top is
    # crowded by bursty noise genes; the search stops at k = 370 with precision 0.55)
    search = df.loc["topk"]
    assert search["precision"] > 2 * search["base_rate"] and search["precision"] > search["precision_start"] + 0.1
    assert search["test_pcc"] > df.loc["pgl", "test_pcc"] + 0.01
