"""`scopegym suite`'s scores recomputed independently from the raw returns in suite.json.

The suite normalizes each run (task, agent, seed) by the task's reference agents,
(score - mean_random) / (mean_heuristic - mean_random), aggregates with the interquartile mean
(scipy.stats.trim_mean(x, 0.25), as rliable does) and a stratified-bootstrap 95 % percentile
interval, and reports performance profiles. Here numpy/scipy redo all of it from the per-episode
returns; the bootstrap with its own resampling.
"""

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import trim_mean

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("SCOPEGYM_BIN", str(ROOT / "target" / "debug" / "scopegym"))
TASKS = "StemSparseScan,AfmFeedbackTuning,StemAutofocus"


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    subprocess.run(
        [BIN, "suite", "--budget", "small", "--tasks", TASKS, "--out", str(out)],
        check=True, capture_output=True,
    )
    with open(out / "suite.json") as f:
        return json.load(f)


def per_seed_scores(agent_entry):
    """Each seed's score: the mean of its episodes' returns (recomputed, not read)."""
    return np.array([
        np.mean([e["return"] for e in s["episodes"]])
        for s in agent_entry["results"]["per_seed"]
    ])


def normalized_by_task(suite):
    """{agent: [per-task arrays of normalized run scores]}, tasks in file order."""
    out = {}
    for task in suite["tasks"]:
        by_agent = {a["agent"]: a for a in task["agents"]}
        low = per_seed_scores(by_agent["random"]).mean()
        high = per_seed_scores(by_agent["heuristic"]).mean()
        assert task["reference"]["low"] == pytest.approx(low, rel=1e-12, abs=1e-12)
        assert task["reference"]["high"] == pytest.approx(high, rel=1e-12, abs=1e-12)
        for name, a in by_agent.items():
            norm = (per_seed_scores(a) - low) / (high - low)
            np.testing.assert_allclose(a["normalized"], norm, rtol=1e-10, atol=1e-12)
            assert a["normalized_mean"] == pytest.approx(norm.mean(), rel=1e-10, abs=1e-12)
            out.setdefault(name, []).append(norm)
    return out


def test_normalized_scores_iqm_and_profiles_are_exact(suite):
    assert suite["suite"]["split"] == "test"
    assert len(suite["tasks"]) == 3
    norm = normalized_by_task(suite)
    taus = np.array(suite["taus"])
    sc = suite["suite"]["scoring"]
    np.testing.assert_allclose(taus, np.linspace(sc["tau_min"], sc["tau_max"], sc["tau_points"]))
    for agg in suite["aggregate"]:
        per_task = norm[agg["agent"]]
        pooled = np.concatenate(per_task)
        assert agg["runs"] == pooled.size
        assert agg["iqm"] == pytest.approx(trim_mean(pooled, 0.25), rel=1e-10, abs=1e-12)
        assert agg["mean"] == pytest.approx(pooled.mean(), rel=1e-10, abs=1e-12)
        profile = [np.mean([np.mean(t > tau) for t in per_task]) for tau in taus]
        np.testing.assert_allclose(agg["profile"], profile, rtol=0, atol=1e-12)
    # The references normalize to task means of exactly 0 and 1.
    for t in suite["tasks"]:
        by_agent = {a["agent"]: a for a in t["agents"]}
        assert by_agent["random"]["normalized_mean"] == pytest.approx(0.0, abs=1e-12)
        assert by_agent["heuristic"]["normalized_mean"] == pytest.approx(1.0, abs=1e-12)


def test_bootstrap_interval_matches_an_independent_resampling(suite):
    """Our own stratified bootstrap (numpy, 20 000 resamples) against the suite's (2 000).

    Tolerance, in probability: the suite's endpoint is the 2.5 % (97.5 %) quantile of R = 2000
    resamples, so the true bootstrap CDF at that endpoint is 0.025 with standard error
    sqrt(p (1 - p) / R) = 0.0035 (the CDF of an order statistic); our empirical CDF from
    M = 20 000 resamples adds sqrt(p (1 - p) / M) = 0.0011. Four standard errors of each:
    tol = 0.0184. An interval at another level (the 5 % quantile: 0.025 away) or an
    unstratified bootstrap would fail it.
    """
    norm = normalized_by_task(suite)
    rng = np.random.default_rng(20240611)
    m = 20_000
    r = suite["suite"]["scoring"]["bootstrap_resamples"]
    conf = suite["suite"]["scoring"]["confidence"]
    a = (1 - conf) / 2
    tol = 4 * math.sqrt(a * (1 - a) / r) + 4 * math.sqrt(a * (1 - a) / m)
    assert tol < 0.025  # discriminates the 95 % interval from a 90 % one
    checked = 0
    for agg in suite["aggregate"]:
        per_task = norm[agg["agent"]]
        draws = np.concatenate(
            [t[rng.integers(0, t.size, size=(m, t.size))] for t in per_task], axis=1
        )
        stats = np.sort(trim_mean(draws, 0.25, axis=1))
        lo, hi = agg["iqm_ci"]
        for endpoint, p in [(lo, a), (hi, 1 - a)]:
            below = np.searchsorted(stats, endpoint, side="left") / m
            at_or_below = np.searchsorted(stats, endpoint, side="right") / m
            print(f"{agg['agent']}: endpoint {endpoint:.4f}, our CDF [{below:.4f}, {at_or_below:.4f}] vs {p}")
            assert below - tol <= p <= at_or_below + tol, (agg["agent"], endpoint, below, at_or_below)
        assert lo <= agg["iqm"] <= hi or stats[0] == stats[-1]
        checked += 1
    assert checked >= 3
