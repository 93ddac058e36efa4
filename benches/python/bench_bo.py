"""One Bayesian-optimization iteration in 2-D, scopegym's Rust GP against BoTorch, side by side
in one run on the same data.

The iteration: fit the GP's hyperparameters by maximizing the marginal likelihood, then LogEI
over the 50 x 50 grid of the unit square. The data: n = 50, 100, 200, 400 points of
``sin(3x) cos(5y) + 0.5x`` plus Gaussian noise of sd 0.05 (seeded NumPy draws, written to one
JSON file that both sides read).

- BoTorch: ``SingleTaskGP`` (Matern-5/2 with ARD lengthscales and BoTorch's default priors,
  inputs in [0, 1], outputs standardized by its ``Standardize`` transform), ``fit_gpytorch_mll``
  (L-BFGS-B through SciPy), ``LogExpectedImprovement`` over the grid, float64, one thread.
  Two starts: *cold* (a fresh model, BoTorch's default initial hyperparameters: what one
  iteration of the usual BoTorch loop does) and *warm* (the hyperparameters of a fit on the
  first n - 1 points loaded first, as the Rust side does).
- Rust: ``agents/examples/bo_speed.rs``, the fit warm-started from a fit on the first n - 1
  points (``BoConfig::default()``'s settings: one L-BFGS start, argmin), Matern-5/2 with ARD
  lengthscales and the priors of DESIGN.md section 9, then LogEI over the grid; one thread.

Run (after ``source scripts/env.sh``):
``cargo build --release -p scopegym-agents --example bo_speed`` then
``.venv/bin/python benches/python/bench_bo.py [--repeats 10] [--json]`` (the example binary:
``$SCOPEGYM_BO_SPEED``, else ``$CARGO_TARGET_DIR/release/examples/bo_speed``, else
``target/release/examples/bo_speed``). Target: Rust >= 10x BoTorch at n = 200.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from botorch.acquisition import LogExpectedImprovement  # noqa: E402
from botorch.fit import fit_gpytorch_mll  # noqa: E402
from botorch.models import SingleTaskGP  # noqa: E402
from botorch.models.transforms.outcome import Standardize  # noqa: E402
from gpytorch.mlls import ExactMarginalLogLikelihood  # noqa: E402

SIZES = (50, 100, 200, 400)


def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 2))
    y = np.sin(3 * x[:, 0]) * np.cos(5 * x[:, 1]) + 0.5 * x[:, 0] + 0.05 * rng.standard_normal(n)
    return x, y


def grid() -> torch.Tensor:
    g = np.linspace(0.0, 1.0, 50)
    xx, yy = np.meshgrid(g, g)
    return torch.tensor(np.stack([xx.ravel(), yy.ravel()], axis=1), dtype=torch.float64)


def model(x: np.ndarray, y: np.ndarray) -> SingleTaskGP:
    tx = torch.tensor(x, dtype=torch.float64)
    ty = torch.tensor(y, dtype=torch.float64).unsqueeze(-1)
    return SingleTaskGP(tx, ty, outcome_transform=Standardize(m=1))


def botorch_iteration(x: np.ndarray, y: np.ndarray, cand: torch.Tensor, warm: dict | None) -> float:
    gp = model(x, y)
    if warm is not None:
        gp.load_state_dict(warm, strict=False)
    mll = ExactMarginalLogLikelihood(gp.likelihood, gp)
    fit_gpytorch_mll(mll)
    gp.eval()
    best = gp.outcome_transform(torch.tensor(y, dtype=torch.float64).unsqueeze(-1))[0].max()
    acq = LogExpectedImprovement(gp, best_f=best)
    with torch.no_grad():
        v = acq(cand.unsqueeze(1))
    return float(v.max())


def hyperparameters(x: np.ndarray, y: np.ndarray) -> dict:
    """The fitted hyperparameters (no training data, no outcome transform) for a warm start."""
    gp = model(x, y)
    fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
    return {
        k: v.clone()
        for k, v in gp.state_dict().items()
        if not k.startswith("outcome_transform") and "train" not in k
    }


def time_median(f, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def rust_binary() -> str:
    if os.environ.get("SCOPEGYM_BO_SPEED"):
        return os.environ["SCOPEGYM_BO_SPEED"]
    target = os.environ.get("CARGO_TARGET_DIR", "target")
    return os.path.join(target, "release", "examples", "bo_speed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10, help="timed iterations per size (median)")
    ap.add_argument("--json", action="store_true", help="print the table as JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    sets = {n: data(n, 7) for n in SIZES}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.json")
        with open(path, "w") as f:
            json.dump({str(n): {"x": x.tolist(), "y": y.tolist()} for n, (x, y) in sets.items()}, f)
        out = subprocess.run([rust_binary(), path, str(args.repeats)], check=True, capture_output=True, text=True)
    rust = {int(k): v for k, v in json.loads(out.stdout).items()}
    cand = grid()
    rows = []
    for n, (x, y) in sets.items():
        cold = time_median(lambda: botorch_iteration(x, y, cand, None), args.repeats)
        warm_state = hyperparameters(x[:-1], y[:-1])
        warm = time_median(lambda: botorch_iteration(x, y, cand, warm_state), args.repeats)
        rows.append(
            {
                "n": n,
                "rust_ms": rust[n],
                "botorch_cold_ms": cold,
                "botorch_warm_ms": warm,
                "speedup_vs_cold": cold / rust[n],
                "speedup_vs_warm": warm / rust[n],
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"one BO iteration (fit + LogEI on a 50x50 grid, 2-D), median of {args.repeats}, one thread")
    print(f"{'n':>5} {'Rust ms':>9} {'BoTorch cold ms':>16} {'BoTorch warm ms':>16} {'x cold':>7} {'x warm':>7}")
    for r in rows:
        print(
            f"{r['n']:>5} {r['rust_ms']:>9.2f} {r['botorch_cold_ms']:>16.1f} {r['botorch_warm_ms']:>16.1f}"
            f" {r['speedup_vs_cold']:>7.1f} {r['speedup_vs_warm']:>7.1f}"
        )


if __name__ == "__main__":
    main()
