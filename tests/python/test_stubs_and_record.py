"""Type stubs against the built module, and Minari-compatible recording."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest

import scopegym

STEER = "scopegym/StemDopantSteer-v1"


def test_stubs_match_the_built_module():
    pkg = Path(scopegym.__file__).parent
    assert (pkg / "py.typed").exists() and (pkg / "_native.pyi").exists()
    out = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "scopegym._native"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_package_type_checks():
    out = subprocess.run([sys.executable, "-m", "mypy", "-p", "scopegym"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def replay(env_id, seed, actions, config=None):
    env = scopegym.ScopegymEnv(env_id, normalize_actions=False, config=config)
    obs, _ = env.reset(seed=seed)
    out = [obs]
    rewards = []
    for a in actions:
        obs, r, te, tr, _ = env.step(a)
        out.append(obs)
        rewards.append(r)
    return out, rewards


def test_record_loads_with_minari_and_matches_what_was_stepped(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    import minari

    path = scopegym.record(STEER, 3, seed=7, policy="random", config={"max_steps": 20})
    assert path == tmp_path / "scopegym/StemDopantSteer/random-v1"
    ds = minari.load_dataset("scopegym/StemDopantSteer/random-v1")
    assert ds.total_episodes == 3
    assert ds.observation_space == gym.make(STEER).observation_space
    eps = list(ds.iterate_episodes())
    for i, ep in enumerate(eps):
        obs, rewards = replay(STEER, 7 + i, ep.actions, config={"max_steps": 20})
        np.testing.assert_array_equal(np.stack(obs), ep.observations)
        np.testing.assert_array_equal(np.asarray(rewards), ep.rewards)
        assert ep.terminations[-1] or ep.truncations[-1]
    with h5py.File(path / "data" / "main_data.hdf5") as f:
        assert f["episode_0"].attrs["seed"] == 7
    meta = json.loads((path / "data" / "metadata.json").read_text())
    assert meta["env_id"] == STEER and meta["total_episodes"] == 3
    assert meta["minari_version"] == minari.__version__
    assert json.loads(meta["env_spec"])["kwargs"]["normalize_actions"] is False
    assert {"ref_min_score", "ref_max_score", "author", "description"} <= set(meta)
    # The recovered env takes the stored (physical) actions.
    env = ds.recover_environment()
    obs, _ = env.reset(seed=7)
    for a, want in zip(eps[0].actions, eps[0].observations[1:]):
        obs = env.step(a)[0]
        np.testing.assert_array_equal(obs, want)
    with pytest.raises(scopegym.DatasetError):
        scopegym.record(STEER, 1, seed=7, policy="random")


def test_record_heuristic_and_callable_policies(tmp_path):
    p = scopegym.record(STEER, 1, seed=1, policy="heuristic", path=tmp_path / "h")
    with h5py.File(p / "data" / "main_data.hdf5") as f:
        assert f["episode_0/actions"].shape[1] == 3
    calls = []

    def policy(obs):
        calls.append(obs)
        return np.array([0.0, 0.0, 1.0], dtype=np.float32)

    p = scopegym.record("scopegym/SpmTipConditioning-v2", 1, policy=lambda o: 0, path=tmp_path / "d")
    with h5py.File(p / "data" / "main_data.hdf5") as f:
        assert (f["episode_0/actions"][()] == 0).all()
    scopegym.record(STEER, 1, policy=policy, path=tmp_path / "c", config={"max_steps": 4})
    assert len(calls) == 4
