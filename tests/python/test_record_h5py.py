"""Datasets written by `scopegym record` read with h5py in the Minari layout."""

import json
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("SCOPEGYM_BIN", str(ROOT / "target" / "debug" / "scopegym"))
ENV = "scopegym/AfmFeedbackTuning-v1"


def record(out, seed, agent="random", episodes=2):
    subprocess.run([BIN, "record", ENV, "--agent", agent, "--episodes", str(episodes),
                    "--seed", str(seed), "--out", str(out)], check=True, capture_output=True)
    return out / "data"


def test_minari_layout(tmp_path):
    data = record(tmp_path / "ds", 5)
    meta = json.loads((data / "metadata.json").read_text())
    assert meta["data_format"] == "hdf5" and meta["total_episodes"] == 2
    obs_space = json.loads(meta["observation_space"])
    act_space = json.loads(meta["action_space"])
    assert obs_space["type"] == "Box" and act_space["type"] == "Box"
    steps = 0
    with h5py.File(data / "main_data.hdf5", "r") as f:
        assert sorted(f.keys()) == ["episode_0", "episode_1"]
        for i in range(2):
            ep = f[f"episode_{i}"]
            t = int(ep.attrs["total_steps"])
            steps += t
            assert ep.attrs["id"] == i and ep.attrs["seed"] == 5 + i
            assert ep["observations"].shape == (t + 1, *obs_space["shape"])
            assert ep["actions"].shape == (t, *act_space["shape"])
            assert ep["rewards"].shape == (t,) and ep["rewards"].dtype == np.float64
            for flag in ("terminations", "truncations"):
                assert ep[flag].dtype == np.bool_ and ep[flag].shape == (t,)
            # The episode ends exactly at its last step.
            assert ep["terminations"][-1] or ep["truncations"][-1]
            assert not np.any(ep["terminations"][:-1] | ep["truncations"][:-1])
            act = ep["actions"][()]
            assert np.all(act >= np.array(act_space["low"])) and np.all(act <= np.array(act_space["high"]))
    assert meta["total_steps"] == steps


def test_same_seed_same_data(tmp_path):
    a = record(tmp_path / "a", 9, agent="heuristic", episodes=1)
    b = record(tmp_path / "b", 9, agent="heuristic", episodes=1)
    with h5py.File(a / "main_data.hdf5", "r") as fa, h5py.File(b / "main_data.hdf5", "r") as fb:
        for k in ("observations", "actions", "rewards", "terminations", "truncations"):
            np.testing.assert_array_equal(fa["episode_0"][k][()], fb["episode_0"][k][()])
