"""Datasets written by `scopegym record` read with h5py in the Minari layout."""

import json
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("SCOPEGYM_BIN", str(ROOT / "target" / "debug" / "scopegym"))
ENV = "scopegym/AfmFeedbackTuning-v2"


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
    # One file per episode, linked from the main file (relative to its folder).
    assert sorted(p.name for p in (data / "episodes").iterdir()) == ["episode_0.hdf5", "episode_1.hdf5"]
    with h5py.File(data / "main_data.hdf5", "r") as f:
        assert sorted(f.keys()) == ["episode_0", "episode_1"]
        for i in range(2):
            link = f.get(f"episode_{i}", getlink=True)
            assert isinstance(link, h5py.ExternalLink)
            assert (link.filename, link.path) == (f"episodes/episode_{i}.hdf5", "/")
            ep = f[f"episode_{i}"]
            assert ep["infos/is_success"].dtype == np.bool_
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
    # Minari's metadata: author, description, size, reference scores, and the spec that
    # rebuilds the env with physical actions at the recorded level.
    assert meta["author"] == ["scopegym"] and ENV in meta["description"]
    assert meta["minari_version"] == "0.5.0" and meta["jpeg_encoding"] is False
    assert meta["dataset_size"] >= 0.0
    assert meta["num_episodes_average_score"] == 20
    assert meta["ref_max_score"] > meta["ref_min_score"]
    spec = json.loads(meta["env_spec"])
    assert spec["entry_point"] == "scopegym.env:ScopegymEnv"
    assert spec["kwargs"] == {"task_id": ENV, "normalize_actions": False,
                              "config": {"difficulty": "medium", "split": "train"}}
    assert json.loads(meta["eval_env_spec"])["kwargs"]["config"]["split"] == "test"


def test_same_seed_same_data(tmp_path):
    a = record(tmp_path / "a", 9, agent="heuristic", episodes=1)
    b = record(tmp_path / "b", 9, agent="heuristic", episodes=1)
    with h5py.File(a / "main_data.hdf5", "r") as fa, h5py.File(b / "main_data.hdf5", "r") as fb:
        for k in ("observations", "actions", "rewards", "terminations", "truncations"):
            np.testing.assert_array_equal(fa["episode_0"][k][()], fb["episode_0"][k][()])
