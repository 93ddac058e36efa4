"""scopegym.bo.minimize: the Rust GP-BO on Python black-box functions (skopt's gp_minimize
style)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import scopegym
from scopegym.bo import OptimizeResult, minimize


def branin(x: list[float]) -> float:
    a, b, c = 1.0, 5.1 / (4 * math.pi**2), 5 / math.pi
    r, s, t = 6.0, 10.0, 1 / (8 * math.pi)
    return a * (x[1] - b * x[0] ** 2 + c * x[0] - r) ** 2 + s * (1 - t) * math.cos(x[0]) + s


BRANIN_BOUNDS = [(-5.0, 10.0), (0.0, 15.0)]
BRANIN_MIN = 0.397887


def test_result_has_the_scipy_fields_and_is_consistent():
    res = minimize(branin, BRANIN_BOUNDS, n_initial=5, n_calls=12, seed=3)
    assert isinstance(res, OptimizeResult)
    assert res.nfev == 12 == len(res.x_iters) == len(res.func_vals)
    assert isinstance(res.func_vals, np.ndarray)
    # fun and x are the best evaluated pair, recomputed independently.
    i = int(np.argmin([branin(x) for x in res.x_iters]))
    assert res.fun == pytest.approx(branin(res.x), abs=0)
    assert res.x == res.x_iters[i]
    for x in res.x_iters:
        assert all(lo <= v <= hi for v, (lo, hi) in zip(x, BRANIN_BOUNDS))
    assert res["fun"] == res.fun


def test_branin_regret_is_small_with_40_calls():
    regrets = [minimize(branin, BRANIN_BOUNDS, n_initial=10, n_calls=40, seed=s).fun - BRANIN_MIN for s in range(3)]
    print("Branin simple regret, 3 seeds:", regrets)
    assert float(np.median(regrets)) < 0.05


def test_beats_random_search_on_a_narrow_quadratic():
    f = lambda x: sum((v - 0.37) ** 2 for v in x)  # noqa: E731
    bounds = [(-2.0, 2.0)] * 3
    bo = [minimize(f, bounds, n_initial=6, n_calls=25, seed=s).fun for s in range(3)]
    rng = np.random.default_rng(0)
    rnd = [min(f(list(rng.uniform(-2, 2, 3))) for _ in range(25)) for _ in range(3)]
    print("BO", bo, "random", rnd)
    assert np.median(bo) < 0.1 * np.median(rnd)


def test_same_seed_same_points_every_acquisition():
    for acq in ("ei", "logei", "ucb", "pi", "maxuncertainty", "thompson"):
        a = minimize(branin, BRANIN_BOUNDS, n_initial=4, n_calls=7, acquisition=acq, seed=11)
        b = minimize(branin, BRANIN_BOUNDS, n_initial=4, n_calls=7, acquisition=acq, seed=11)
        assert a.x_iters == b.x_iters, acq


def test_bad_input_raises_clear_errors():
    with pytest.raises(scopegym.InvalidArgument, match="bounds"):
        minimize(branin, [(1.0, 0.0)], n_calls=3, n_initial=2)
    with pytest.raises(scopegym.InvalidArgument, match="acquisition"):
        minimize(branin, BRANIN_BOUNDS, acquisition="nope", n_calls=3, n_initial=2)
    with pytest.raises(scopegym.InvalidArgument, match="n_calls"):
        minimize(branin, BRANIN_BOUNDS, n_initial=10, n_calls=5)
    with pytest.raises(ValueError, match="finite"):
        minimize(lambda x: float("nan"), BRANIN_BOUNDS, n_initial=2, n_calls=3)

    class Boom(Exception):
        pass

    def bad(x):
        raise Boom("from func")

    with pytest.raises(Boom):
        minimize(bad, BRANIN_BOUNDS, n_initial=2, n_calls=3)


def test_callback_can_stop_early():
    seen = []

    def cb(res):
        seen.append(res.nfev)
        return res.nfev >= 4

    res = minimize(branin, BRANIN_BOUNDS, n_initial=3, n_calls=20, callback=cb)
    assert res.nfev == 4 and seen == [1, 2, 3, 4]
