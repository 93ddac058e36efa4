"""Bayesian optimization of any black-box function on scopegym's Rust Gaussian process, in the
style of scikit-optimize's ``gp_minimize``::

    from scopegym.bo import minimize

    res = minimize(lambda x: (x[0] - 0.3) ** 2, [(-1.0, 1.0)], n_calls=20, seed=0)
    res.x, res.fun          # best point found and its value
    res.x_iters, res.func_vals

The GP (Matérn-5/2 or RBF with a lengthscale per dimension, hyperparameters by maximum
marginal likelihood with priors) and the acquisition run in Rust; ``func`` is called from Python
with a list of floats and must return a finite float. The first ``n_initial`` points are a Latin
hypercube over ``bounds`` (seeded); each later point maximizes the acquisition.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from . import _native
from ._errors import InvalidArgument

__all__ = ["OptimizeResult", "minimize", "ACQUISITIONS"]

#: The acquisition functions ``minimize`` accepts (as in ``scopegym run --agent bo``'s config).
ACQUISITIONS = ("ei", "logei", "ucb", "pi", "maxuncertainty", "thompson")


class OptimizeResult(dict):
    """The result of :func:`minimize`, a dict whose keys are also attributes (as
    ``scipy.optimize.OptimizeResult``): ``x`` (list of float, the best point), ``fun`` (its
    value), ``x_iters`` (every evaluated point, in order), ``func_vals`` (numpy array of their
    values), ``nfev``, ``acquisition``, ``seed``, ``specs``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    __setattr__ = dict.__setitem__  # type: ignore[assignment]
    __delattr__ = dict.__delitem__  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OptimizeResult(fun={self.get('fun')!r}, x={self.get('x')!r}, nfev={self.get('nfev')!r})"


def minimize(
    func: Callable[[list[float]], float],
    bounds: Sequence[tuple[float, float]],
    n_initial: int = 10,
    n_calls: int = 40,
    acquisition: str = "logei",
    seed: int = 0,
    *,
    kernel: str = "matern52",
    xi: float = 0.0,
    beta: float = 4.0,
    callback: Callable[[OptimizeResult], Any] | None = None,
) -> OptimizeResult:
    """Minimizes ``func`` over the box ``bounds`` with ``n_calls`` evaluations in all, the
    first ``n_initial`` of them space-filling.

    ``acquisition`` is one of :data:`ACQUISITIONS` (``beta`` is UCB's β, ``xi`` the improvement
    margin of EI, LogEI and PI, in ``func``'s units); ``kernel`` is ``"matern52"`` or ``"rbf"``.
    ``callback``, if given, is called with the partial result after every evaluation and stops
    the search by returning ``True``. Raises :class:`scopegym.InvalidArgument` for bad bounds or
    counts, ``ValueError`` when ``func`` returns a non-finite value, and lets ``func``'s own
    exceptions through.
    """
    bounds = [(float(lo), float(hi)) for lo, hi in bounds]
    if int(n_initial) != n_initial or int(n_calls) != n_calls:
        raise TypeError("n_initial and n_calls must be integers")
    n_calls = int(n_calls)
    if n_calls < 1 or n_calls < int(n_initial):
        raise InvalidArgument(f"invalid argument n_calls: must be ≥ n_initial ({n_initial}) and ≥ 1, got {n_calls}")
    opt = _native.BayesOpt(bounds, int(n_initial), str(acquisition), int(seed), str(kernel), float(xi), float(beta))
    x_iters: list[list[float]] = []
    vals: list[float] = []
    for _ in range(n_calls):
        x = list(opt.ask())
        y = func(list(x))
        try:
            y = float(y)
        except (TypeError, ValueError) as e:
            raise ValueError(f"func must return a float, got {y!r} at x = {x}") from e
        if not math.isfinite(y):
            raise ValueError(f"func returned {y} at x = {x}: the objective must be finite")
        # The Rust optimizer maximizes.
        opt.tell(x, -y)
        x_iters.append(x)
        vals.append(y)
        if callback is not None and callback(_result(x_iters, vals, acquisition, seed, bounds)) is True:
            break
    return _result(x_iters, vals, acquisition, seed, bounds)


def _result(
    x_iters: list[list[float]], vals: list[float], acquisition: str, seed: int, bounds: list[tuple[float, float]]
) -> OptimizeResult:
    i = int(np.argmin(vals))
    return OptimizeResult(
        x=list(x_iters[i]),
        fun=float(vals[i]),
        x_iters=[list(x) for x in x_iters],
        func_vals=np.asarray(vals, dtype=np.float64),
        nfev=len(vals),
        acquisition=acquisition,
        seed=seed,
        specs={"bounds": bounds},
    )
