"""One network vs refit vs refit + five seeds vs the hybrid head (the embedding-mode defaults) on the demo's slide.

The slide, features and held-out spots of ``agl-scverse demo`` (seed 0: 400 spots, random-init ResNet-18 at
112 px, a seeded quarter of the spots held out); PGL, AGL-all and DkGSB fitted three ways on the rest and scored on
the held-out spots (mean target Pearson r, ``agl.tl.evaluate``).

    python -m benchmarks.accuracy.bench_defaults_synthetic

Prints a table and writes ``benchmarks/results/defaults_synthetic.json``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import agl_scverse as agl
from benchmarks._common import RESULTS, git_state

#: The settings compared: fields of ``agl_fit``'s ``training`` config (:class:`agl_scverse.TrainingConfig`) and head.
SETTINGS = {
    "one network": ({"refit": False, "n_seeds": 1}, "mlp"),
    "refit": ({"refit": True, "n_seeds": 1}, "mlp"),
    "refit, 5 seeds": ({}, "mlp"),
    "refit, 5 seeds, hybrid (default)": ({}, None),
}


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)  # no options: --help only
    a = agl.datasets.synthetic_slide(seed=0)
    agl.pp.embed_patches(a, agl.EncoderConfig("resnet18", patch_px=112))
    test = np.zeros(a.n_obs, dtype=bool)
    test[np.random.default_rng(0).choice(a.n_obs, size=a.n_obs // 4, replace=False)] = True
    rows = []
    for method in ("pgl", "agl", "dkgsb"):
        for name, (kw, head) in SETTINGS.items():
            t = time.perf_counter()
            model = agl.tl.agl_fit(
                a,
                method=method,
                embedding_key="X_agl_resnet18",
                spots=~test,
                seed=0,
                progress=False,
                training=agl.TrainingConfig(**kw),
                network=agl.NetworkConfig(head=head),
            )
            secs = time.perf_counter() - t
            agl.tl.agl_predict(a, model)
            agl.tl.evaluate(a, model, spots=test)
            pcc = float(a.uns["agl"]["metrics"]["test"]["model"]["pearson"])
            rows.append({"method": method, "setting": name, "pcc": pcc, "fit_seconds": secs})
            print(f"{method:6s} {name:34s} PCC {pcc:.3f}  fit {secs:.1f} s", flush=True)
    out = RESULTS / "defaults_synthetic.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"command": "python -m benchmarks.accuracy.bench_defaults_synthetic", "git": git_state(), "rows": rows},
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
