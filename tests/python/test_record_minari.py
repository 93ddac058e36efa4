"""Minari datasets from ``scopegym.record`` and ``scopegym record``, read back with Minari and h5py:
the recovered environment replays the stored actions into the stored observations and rewards;
external links resolve from any working directory and after moving the dataset; infos,
metadata and reference scores; repairing a damaged main file."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np
import pytest

import scopegym
from scopegym.record import repair_dataset

minari = pytest.importorskip("minari")

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("SCOPEGYM_BIN", str(ROOT / "target" / "debug" / "scopegym"))
STEER = "scopegym/StemDopantSteer-v1"
AFM = "scopegym/AfmFeedbackTuning-v2"
SPARSE = "scopegym/StemSparseScan-v2"  # Dict observations, Discrete actions


def cli_record(out: Path, env_id: str, *args: str) -> Path:
    subprocess.run([BIN, "record", env_id, "--out", str(out), *args], check=True, capture_output=True)
    return out


def row(obs: Any, t: int) -> Any:
    """Step ``t`` of a stored observation batch (arrays, or dicts of arrays)."""
    return {k: row(v, t) for k, v in obs.items()} if isinstance(obs, dict) else obs[t]


def assert_obs_equal(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for k in a:
            assert_obs_equal(a[k], b[k])
    else:
        np.testing.assert_array_equal(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32))


def replay_against(ds: Any, env: gym.Env[Any, Any]) -> int:
    """Resets ``env`` with each episode's seed, steps the stored actions and compares; returns
    the steps replayed."""
    metas = list(ds.storage.get_episode_metadata(range(ds.total_episodes)))
    steps = 0
    for i, (ep, meta) in enumerate(zip(ds.iterate_episodes(), metas)):
        assert meta["id"] == i and meta["total_steps"] == len(ep.rewards)
        obs, _ = env.reset(seed=int(meta["seed"]))
        assert_obs_equal(obs, row(ep.observations, 0))
        for t in range(len(ep.rewards)):
            a = row(ep.actions, t)
            obs, r, term, trunc, _ = env.step(a)
            assert_obs_equal(obs, row(ep.observations, t + 1))
            assert r == ep.rewards[t]
            assert (term, trunc) == (bool(ep.terminations[t]), bool(ep.truncations[t]))
        assert ep.terminations[-1] or ep.truncations[-1]
        steps += len(ep.rewards)
    return steps


@pytest.mark.parametrize("writer", ["python", "cli"])
def test_recovered_environment_replays_the_stored_actions(tmp_path, writer):
    if writer == "python":
        env_id = STEER
        path = scopegym.record(
            STEER, 3, seed=7, config={"max_steps": 12}, difficulty="easy", split="test",
            path=tmp_path / "ds", reference_episodes=2,
        )
        config = {"max_steps": 12, "difficulty": "easy", "split": "test"}
        seeds = [7, 8, 9]
    else:
        env_id = AFM
        path = cli_record(tmp_path / "ds", AFM, "--episodes", "2", "--seed", "4", "--difficulty", "hard",
                          "--split", "test", "--reference-episodes", "2")
        config = {"difficulty": "hard", "split": "test"}
        seeds = [4, 5]
    ds = minari.MinariDataset(path / "data")
    meta = ds.storage.metadata
    assert ds.total_episodes == len(seeds)
    env = ds.recover_environment()
    # The stored actions are physical: the recovered env takes them as they are.
    assert env.unwrapped.action_space == ds.action_space
    assert env.unwrapped.physical_action_space == ds.action_space
    assert env.spec is not None and env.spec.kwargs["normalize_actions"] is False
    assert env.spec.kwargs["config"] == config
    # No TimeLimit: the engine truncates at the configured limit (TimeLimit would also flag
    # truncated on a termination at the last step, which the stored flags do not).
    assert env.spec.max_episode_steps is None
    assert env.unwrapped.max_episode_steps == meta["max_episode_steps"]
    assert [m["seed"] for m in ds.storage.get_episode_metadata(range(len(seeds)))] == seeds
    assert replay_against(ds, env) == ds.total_steps
    # The evaluation env: the same task on the held-out split.
    eval_env = ds.recover_environment(eval_env=True)
    assert eval_env.spec is not None and eval_env.spec.kwargs["config"] == {**config, "split": "test"}
    # The CLI writes the EnvSpec exactly as Gymnasium would.
    spec = gym.spec(env_id)
    want = gym.envs.registration.EnvSpec(
        id=env_id,
        entry_point=spec.entry_point,
        vector_entry_point=spec.vector_entry_point,
        kwargs={"task_id": env_id, "normalize_actions": False, "config": config},
    ).to_json()
    assert json.loads(meta["env_spec"]) == json.loads(want)
    if writer == "cli":
        assert meta["env_spec"] == want
        assert meta["minari_version"] == "0.5.0"
    else:
        assert meta["minari_version"] == importlib.metadata.version("minari") == minari.__version__


def test_dict_observations_and_discrete_actions_replay(tmp_path):
    path = scopegym.record(SPARSE, 2, seed=3, policy="heuristic", path=tmp_path / "ds", reference_episodes=0)
    ds = minari.MinariDataset(path / "data")
    assert isinstance(ds.observation_space, gym.spaces.Dict)
    assert replay_against(ds, ds.recover_environment()) == ds.total_steps
    assert "ref_min_score" not in ds.storage.metadata


READER = r"""
import json, sys
import h5py, minari
data = sys.argv[1]
with h5py.File(data + "/main_data.hdf5", "r") as f:
    link = f.get("episode_0", getlink=True)
    out = {"link": [type(link).__name__, link.filename, link.path],
           "h5py": [[int(f[k].attrs["id"]), int(f[k].attrs["total_steps"]), int(f[k].attrs["seed"]),
                     int(f[k]["rewards"].shape[0])] for k in sorted(f)]}
ds = minari.MinariDataset(data)
out["minari"] = [[int(m["id"]), int(m["total_steps"]), int(m["seed"])]
                 for m in ds.storage.get_episode_metadata(range(ds.total_episodes))]
out["steps"] = [len(ep.rewards) for ep in ds.iterate_episodes()]
print(json.dumps(out))
"""


def read_elsewhere(data: str, cwd: Path) -> dict[str, Any]:
    """Reads the dataset in a fresh interpreter whose working directory is ``cwd``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("HDF5_EXT_PREFIX", None)
    out = subprocess.run([sys.executable, "-c", READER, data], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_external_links_resolve_from_any_folder_and_after_moving(tmp_path):
    path = scopegym.record(STEER, 3, seed=11, config={"max_steps": 5}, path=tmp_path / "a" / "ds",
                           reference_episodes=0)
    want = {
        "link": ["ExternalLink", "episodes/episode_0.hdf5", "/"],
        "h5py": [[i, 5, 11 + i, 5] for i in range(3)],
        "minari": [[i, 5, 11 + i] for i in range(3)],
        "steps": [5, 5, 5],
    }
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert read_elsewhere(str(path / "data"), elsewhere) == want
    # Moved as a whole (the links are relative to the main file's folder), read by a relative
    # path and by an absolute one from an unrelated folder.
    moved = tmp_path / "b" / "moved"
    moved.parent.mkdir()
    shutil.move(str(path), str(moved))
    assert read_elsewhere("moved/data", moved.parent) == want
    assert read_elsewhere(str(moved / "data"), elsewhere) == want


def step_infos(env_id: str, config: dict[str, Any], seed: int, actions: np.ndarray) -> list[dict[str, Any]]:
    env = scopegym.ScopegymEnv(env_id, config=config, normalize_actions=False)
    _, info = env.reset(seed=seed)
    infos = [info]
    for a in actions:
        infos.append(env.step(a)[4])
    return infos


def test_infos_metadata_and_reference_scores(tmp_path):
    config = {"max_steps": 6}
    path = scopegym.record(STEER, 2, seed=5, policy="heuristic", config=config, path=tmp_path / "ds",
                           reference_episodes=3, author="Ada Lovelace")
    ds = minari.MinariDataset(path / "data")
    meta = ds.storage.metadata
    with h5py.File(path / "data" / "main_data.hdf5") as f:
        for i, ep in enumerate(ds.iterate_episodes()):
            g = f[f"episode_{i}"]
            t = int(g.attrs["total_steps"])
            infos = step_infos(STEER, config, 5 + i, ep.actions)
            assert "infos" in g and ep.infos is not None
            assert g["infos/is_success"].dtype == np.bool_ and g["infos/is_success"].shape == (t + 1,)
            numeric = [k for k, v in infos[1].items() if isinstance(v, (bool, int, float, np.ndarray))]
            assert sorted(ep.infos) == sorted(numeric)
            for k in numeric:
                col = ep.infos[k]
                assert len(col) == t + 1
                for j in range(1, t + 1):
                    np.testing.assert_array_equal(col[j], infos[j][k])
                if k in infos[0]:
                    np.testing.assert_array_equal(col[0], infos[0][k])
                elif col.dtype == np.bool_:
                    assert not col[0]
                elif col.dtype.kind == "f":
                    assert np.all(np.isnan(col[0]))
            # Text values are left out.
            assert not any(isinstance(v, str) and k in g["infos"] for k, v in infos[1].items())
    assert meta["author"] == {"Ada Lovelace"}
    assert STEER in meta["description"] and "heuristic" in meta["description"]
    assert meta["dataset_size"] == ds.storage.get_size()
    assert meta["requirements"] == [f"scopegym=={scopegym.__version__}"]
    assert meta["num_episodes_average_score"] == 3
    # ref_max_score is the heuristic's mean return over seeds 0..3 on the same config.
    env = scopegym.ScopegymEnv(STEER, config=config, normalize_actions=False)
    returns = []
    for s in range(3):
        obs, _ = env.reset(seed=s)
        ret, done = 0.0, False
        while not done:
            obs, r, te, tr, _ = env.step(env.heuristic_action(obs))
            ret, done = ret + r, te or tr
        returns.append(ret)
    assert meta["ref_max_score"] == pytest.approx(np.mean(returns), rel=1e-12, abs=1e-12)
    assert meta["reference_scores"]["random"]["mean_return"] == meta["ref_min_score"]
    lo, hi = meta["ref_min_score"], meta["ref_max_score"]
    np.testing.assert_allclose(minari.get_normalized_score(ds, np.array([lo, hi])), [0.0, 1.0])


def test_repair_after_a_crash_damaged_the_main_file(tmp_path):
    path = scopegym.record(STEER, 3, seed=0, config={"max_steps": 4}, path=tmp_path / "ds", reference_episodes=0)
    main = path / "data" / "main_data.hdf5"
    main.write_bytes(main.read_bytes()[:200])
    (path / "data" / "episodes" / ".episode_3.hdf5.partial-1").write_bytes(b"unfinished")
    with pytest.raises(Exception):
        list(minari.MinariDataset(path / "data").iterate_episodes())
    report = repair_dataset(path)
    assert (report["episodes"], report["steps"]) == (3, 12)
    assert len(report["removed"]) == 1 and len(report["moved"]) == 1  # the damaged main file
    ds = minari.MinariDataset(path / "data")
    assert [len(ep.rewards) for ep in ds.iterate_episodes()] == [4, 4, 4]
    assert ds.storage.metadata["dataset_size"] == ds.storage.get_size()
    # The CLI does the same.
    main.write_bytes(b"")
    subprocess.run([BIN, "record", "--repair", "--out", str(path)], check=True, capture_output=True)
    assert minari.MinariDataset(path / "data").total_episodes == 3


def test_cli_record_rejects_bad_levels(tmp_path):
    for args in (["--difficulty", "extreme"], ["--split", "validation"]):
        out = subprocess.run([BIN, "record", AFM, "--episodes", "1", "--reference-episodes", "0",
                              "--out", str(tmp_path / args[1]), *args], capture_output=True, text=True)
        assert out.returncode == 2, out.stderr
        assert args[0].lstrip("-") in out.stderr


def test_recording_waits_for_a_reader_holding_the_main_file(tmp_path):
    """HDF5 locks a file a process reads against writers: the recorder waits instead of failing."""
    out = tmp_path / "ds"
    proc = subprocess.Popen([BIN, "record", AFM, "--episodes", "60", "--reference-episodes", "0", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    meta = out / "data" / "metadata.json"
    deadline = time.monotonic() + 60
    while not (meta.exists() and json.loads(meta.read_text() or "{}").get("total_episodes", 0) >= 1):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    with h5py.File(out / "data" / "main_data.hdf5", "r") as f:
        held = sorted(f)
        time.sleep(1.0)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert len(held) >= 1
    ds = minari.MinariDataset(out / "data")
    assert ds.total_episodes == 60 and len(list(ds.iterate_episodes())) == 60
