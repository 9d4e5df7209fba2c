"""Does the DkGSB hypergradient point where training goes? A check on the HER2+ sections.

For one leave-one-section-out fold (train C2-C4, validate on C5; C6 unused), DenseNet-121 features, top-50 HVG
targets and every other gene as an auxiliary, a network is trained for one epoch at ``theta = 0.5`` (as DkGSB's
first epoch). Then, for ``--batches`` pairs of (train, validation) meta batches, it compares the hypergradients of

- ``legacy``: SGD look-ahead (``inner_lr = 0.1``), ``sum(w)`` detached (the default before this release),
- ``sgd-soft``: the same look-ahead, differentiated exactly,
- ``adam``: the live-Adam look-ahead (``lookahead="adam"``, the default now), exact,
- ``authors`` (with ``--authors``): the authors' look-ahead (``lookahead="authors"``: a fresh Adam, lr 3e-5,
  ``--authors-h`` steps on the one training meta batch, train mode -- the network has no dropout here --, the
  detached normaliser as in their code),

with two finite-difference "truths" computed on copies of the real network and optimiser (float64, no dropout):

- ``truth-1``: the validation-batch target loss after the network's next real Adam step at ``theta +- h``;
- ``truth-N``: the target loss on all validation spots after ``--horizon`` real Adam steps on different training
  batches at ``theta +- eps`` (a longer horizon than any look-ahead).

Prints the sign agreement of each hypergradient with each truth and the median seconds per meta step, and writes
``benchmarks/results/check_hypergradient.json``.

Run::

    python -m benchmarks.checks.check_hypergradient [--cache benchmarks/out/her2st_densenet121.h5ad] [--batches 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

import agl_scverse as agl
from agl_scverse._expression import ExpressionBatches
from agl_scverse.model import AdamState, EmbeddingHead, GeneMask, hypergradient
from agl_scverse.train._loss import per_gene_loss, weighted_loss
from agl_scverse.train._trainer import StandardizedTargets
from benchmarks._common import OUT, RESULTS, git_state


def _weights(mask: GeneMask, n_t: int, theta: float) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([torch.ones(n_t, dtype=torch.float64), torch.sigmoid((theta - mask.ranks) / mask.tau)])


def _real_steps(net, opt, batches, w, loss="pearson"):
    """Copies of ``net``/``opt`` after real Adam steps on ``batches`` with gene weights ``w`` (eval mode)."""
    net2 = copy.deepcopy(net).eval()
    opt2 = torch.optim.Adam(net2.parameters(), **opt.defaults)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for x, y in batches:
        opt2.zero_grad()
        weighted_loss(per_gene_loss(net2(x), y, loss), w).backward()
        opt2.step()
    return net2


def _target_loss(net, x, y, n_t) -> float:
    with torch.no_grad():
        return float(per_gene_loss(net(x, n_first=n_t), y[:, :n_t]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=OUT / "her2st_densenet121.h5ad")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--horizon", type=int, default=10)
    ap.add_argument("--theta", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "check_hypergradient.json")
    ap.add_argument("--authors", action="store_true", help="also the authors' look-ahead (fresh Adam, H steps)")
    ap.add_argument("--authors-h", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import anndata as ad

    adata = ad.read_h5ad(args.cache)
    lib = adata.obs["library_id"].astype(str).to_numpy()
    train_idx = np.flatnonzero(np.isin(lib, ["C2", "C3", "C4"]))
    val_idx = np.flatnonzero(lib == "C5")
    roles = agl.pp.gene_roles(adata, n_targets=50, train_mask=np.isin(lib, ["C2", "C3", "C4"]), inplace=False)
    genes = list(roles.targets) + list(roles.auxiliaries)
    n_t = len(roles.targets)
    expr = ExpressionBatches(adata.X, adata.var_names.get_indexer(genes), "log1p")
    Y = StandardizedTargets(expr, train_idx)
    X = torch.as_tensor(np.asarray(adata.obsm["X_agl_densenet121"]), dtype=torch.float64)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = EmbeddingHead(X.shape[1], len(genes), hidden=(256,), dropout=0.0).double()
    mu, sd = X[train_idx].mean(0), X[train_idx].std(0).clamp_min(1e-6)
    net.set_input_scaling(mu, sd)
    mask = GeneMask(roles.normalized_rank.astype(np.float64), tau=0.01, theta=args.theta, dtype=torch.float64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    w0 = _weights(mask, n_t, args.theta)

    def yb(idx):
        return Y(idx).double()

    for idx in np.array_split(rng.permutation(train_idx), max(1, len(train_idx) // 128)):  # one epoch
        opt.zero_grad()
        weighted_loss(per_gene_loss(net(X[idx]), yb(idx)), w0).backward()
        opt.step()
    net.eval()
    x_val, y_val = X[val_idx], yb(val_idx)
    rows = []
    h, eps = 1e-4, 0.01
    for b in range(args.batches):
        mtr = rng.choice(train_idx, 128, replace=False)
        mva = rng.choice(val_idx, 128, replace=False)
        tr, va = (X[mtr], yb(mtr)), (X[mva], yb(mva))
        row = {"batch": b}
        looks = {
            "legacy": {"normalizer": "detached", "inner_lr": 0.1},
            "sgd-soft": {"normalizer": "soft", "inner_lr": 0.1},
            "adam": {"normalizer": "soft", "optimizer_state": AdamState.from_optimizer(opt, net)},
        }
        if args.authors:
            looks["authors"] = {
                "normalizer": "detached", "optimizer_state": AdamState.fresh(net, 3e-5),
                "inner_steps": args.authors_h, "train_mode": True,
            }  # fmt: skip
        for name, kw in looks.items():
            t0 = time.perf_counter()
            g, _ = hypergradient(net, mask, n_t, *tr, *va, **kw)
            row[name], row[f"{name}_seconds"] = float(g), time.perf_counter() - t0
        up = _target_loss(_real_steps(net, opt, [tr], _weights(mask, n_t, args.theta + h)), *va, n_t)
        down = _target_loss(_real_steps(net, opt, [tr], _weights(mask, n_t, args.theta - h)), *va, n_t)
        row["truth-1"] = (up - down) / (2 * h)
        steps = [(X[i], yb(i)) for i in (rng.choice(train_idx, 128, replace=False) for _ in range(args.horizon))]
        up = _target_loss(_real_steps(net, opt, steps, _weights(mask, n_t, args.theta + eps)), x_val, y_val, n_t)
        down = _target_loss(_real_steps(net, opt, steps, _weights(mask, n_t, args.theta - eps)), x_val, y_val, n_t)
        row[f"truth-{args.horizon}"] = (up - down) / (2 * eps)
        rows.append(row)
        print({k: (f"{v:.3e}" if isinstance(v, float) else v) for k, v in row.items() if "seconds" not in k})
    truths = ["truth-1", f"truth-{args.horizon}"]
    summary = {}
    for name in [n for n in ("legacy", "sgd-soft", "adam", "authors") if n in rows[0]]:
        summary[name] = {
            **{f"sign_agrees_{t}": int(sum(np.sign(r[name]) == np.sign(r[t]) for r in rows)) for t in truths},
            "median_seconds": float(np.median([r[f"{name}_seconds"] for r in rows])),
        }
    summary["truth-1 vs truth-N sign agreement"] = int(
        sum(np.sign(r[truths[0]]) == np.sign(r[truths[1]]) for r in rows)
    )
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python -m benchmarks.checks.check_hypergradient"
    cmd += f" --batches {args.batches} --horizon {args.horizon} --theta {args.theta:g}"
    cmd += f" --authors --authors-h {args.authors_h}" if args.authors else ""
    args.out.write_text(
        json.dumps(
            {"command": cmd, "git": git_state(), "rows": rows, "summary": summary, "n_batches": len(rows)}, indent=2
        )
    )


if __name__ == "__main__":
    main()
