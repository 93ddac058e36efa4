"""The Python package: Gymnasium registration and API, vector env, errors, determinism."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import scopegym

IDS = scopegym.task_ids()
STEER = "scopegym/StemDopantSteer-v1"


def test_every_task_is_registered():
    nine = {
        "StemAutofocus", "StemDopantSteer", "StemSparseScan", "StemEelsExplore",
        "SpmTipConditioning", "SpmAtomManipulation", "PfmDomainWriting",
        "PfmSpectroscopyExplore", "AfmFeedbackTuning",
    }  # fmt: skip
    # The step-8 physics fixes changed six tasks' dynamics (-v2); the other three are unchanged.
    v2 = {"StemAutofocus", "StemSparseScan", "StemEelsExplore", "SpmTipConditioning",
          "SpmAtomManipulation", "AfmFeedbackTuning"}  # fmt: skip
    assert set(IDS) == {f"scopegym/{n}-v{2 if n in v2 else 1}" for n in nine}
    for tid in IDS:
        assert tid in gym.registry
        steps = gym.spec(tid).max_episode_steps
        assert isinstance(steps, int) and steps > 0, tid
        env = gym.make(tid)
        assert env.spec.max_episode_steps == env.unwrapped.max_episode_steps == steps
        env.close()


@pytest.mark.parametrize("tid", IDS)
def test_every_step_reports_is_success(tid):
    env = gym.make(tid)
    env.reset(seed=2)
    env.action_space.seed(2)
    for _ in range(3):
        _, _, te, tr, info = env.step(env.action_space.sample())
        assert type(info["is_success"]) is bool, info
        if te or tr:
            break
    env.close()


def test_difficulty_and_split_reach_the_engine_and_reset_options_rebuild():
    tid = "scopegym/SpmTipConditioning-v2"
    env = gym.make(tid, difficulty="hard", split="test")
    assert env.unwrapped._config == {"difficulty": "hard", "split": "test"}
    with pytest.raises(scopegym.InvalidConfig, match="difficulty"):
        gym.make(tid, difficulty="impossible")
    with pytest.raises(scopegym.InvalidConfig, match="split"):
        gym.make(tid, split="validation")
    # The same seed on the two splits draws different tips; options switch the split.
    a = gym.make(tid)
    obs_train, info_train = a.reset(seed=5)
    obs_test, info_test = a.reset(seed=5, options={"split": "test"})
    params = lambda info: {k: v for k, v in info.items() if k.startswith("param.")}  # noqa: E731
    assert params(info_train) != params(info_test)
    b = gym.make(tid, split="test")
    obs_b, info_b = b.reset(seed=5)
    np.testing.assert_array_equal(obs_b, obs_test)
    assert params(info_b) == params(info_test)
    with pytest.raises(scopegym.InvalidArgument, match="colour"):
        a.reset(seed=1, options={"colour": "red"})
    v = scopegym.make_vec(tid, num_envs=2, threads=1)
    v.reset(seed=5, options={"split": "test", "difficulty": "hard"})
    with pytest.raises(scopegym.InvalidArgument, match="colour"):
        v.reset(seed=1, options={"colour": "red"})
    v.close()


def test_make_vec_uses_every_core_by_default():
    import os

    v = scopegym.make_vec(STEER, num_envs=2)
    assert v._build[4] == (os.cpu_count() or 1)
    v.close()


def test_scopegym_make_sets_the_time_limit_of_the_config():
    env = scopegym.make(STEER, config={"max_steps": 7})
    assert env.spec.max_episode_steps == 7 == env.unwrapped.max_episode_steps
    env.close()


@pytest.mark.parametrize("tid", IDS)
def test_check_env_passes_without_warnings(tid):
    env = gym.make(tid)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)
    env.close()


@pytest.mark.parametrize("tid", IDS)
def test_types_render_and_close(tid):
    env = gym.make(tid, render_mode="rgb_array")
    obs, info = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    assert isinstance(info, dict)
    obs, r, te, tr, info = env.step(env.action_space.sample())
    assert type(r) is float and type(te) is bool and type(tr) is bool
    assert env.observation_space.contains(obs)
    img = env.render()
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert env.metadata["render_modes"] == ["rgb_array"] and env.metadata["render_fps"] > 0
    env.close()
    env.close()


def test_module_prefix_form_in_a_fresh_interpreter():
    code = (
        "import gymnasium as gym, sys\n"
        "assert 'scopegym' not in sys.modules\n"
        f"env = gym.make('scopegym:{STEER}')\n"
        "obs, _ = env.reset(seed=0)\n"
        "print(obs.shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(10,)"


def test_time_limit_is_the_engines():
    env = gym.make(STEER)
    env.reset(seed=1)
    n, tr, te = 0, False, False
    while not (te or tr):
        _, _, te, tr, _ = env.step(np.zeros(3, dtype=np.float32))
        n += 1
    assert te or n == env.unwrapped.max_episode_steps


def rollout_single(seed, steps):
    env = gym.make(STEER)
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for _ in range(steps):
        obs, r, te, tr, _ = env.step(env.action_space.sample())
        out.append(obs.copy())
        out.append(r)
        if te or tr:
            obs, _ = env.reset()
            out.append(obs)
    return out


def test_same_seed_same_trajectory_single():
    a, b = rollout_single(5, 150), rollout_single(5, 150)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = rollout_single(6, 150)
    assert not np.array_equal(a[0], c[0])


def test_same_seed_same_trajectory_vector_and_single_agree():
    n, steps = 4, 60
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(steps, n, 3)).astype(np.float32)
    runs = []
    for _ in range(2):
        v = gym.make_vec(STEER, num_envs=n, vectorization_mode="vector_entry_point")
        obs, _ = v.reset(seed=10)
        traj = [obs.copy()]
        for t in range(steps):
            obs, r, te, tr, _ = v.step(actions[t])
            traj += [obs.copy(), r.copy(), te.copy(), tr.copy()]
        runs.append(traj)
        v.close()
    for x, y in zip(*runs):
        np.testing.assert_array_equal(x, y)
    # Env i of the vector env is the single env seeded 10 + i (until its first episode ends).
    for i in range(n):
        env = gym.make(STEER)
        obs, _ = env.reset(seed=10 + i)
        np.testing.assert_array_equal(obs, runs[0][0][i])
        for t in range(steps):
            obs, r, te, tr, _ = env.step(actions[t, i])
            np.testing.assert_array_equal(obs, runs[0][1 + 4 * t][i])
            assert r == runs[0][2 + 4 * t][i]
            if te or tr:
                break


def test_make_vec_is_the_native_vector_env():
    v = gym.make_vec(STEER, num_envs=8, vectorization_mode="vector_entry_point")
    assert isinstance(v, scopegym.ScopegymVectorEnv) and isinstance(v, gym.vector.VectorEnv)
    assert v.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    obs, infos = v.reset(seed=0)
    assert obs.shape == (8, 10) and obs.dtype == np.float32
    assert v.observation_space.contains(obs)
    obs, r, te, tr, infos = v.step(v.action_space.sample())
    assert r.shape == (8,) and r.dtype == np.float64 and te.dtype == np.bool_ and tr.dtype == np.bool_
    for k, val in infos.items():
        if not k.startswith("_"):
            assert val.shape == (8,) and infos["_" + k].dtype == np.bool_
    assert scopegym.make_vec(STEER, 2).num_envs == 2
    v.close()
    v.close()


@pytest.mark.parametrize("tid", ["scopegym/PfmDomainWriting-v1", "scopegym/SpmTipConditioning-v2"])
def test_vector_observations_match_the_declared_space(tid):
    v = scopegym.make_vec(tid, 2)
    obs, _ = v.reset(seed=0)
    assert v.observation_space.contains(obs)
    obs, *_ = v.step(v.action_space.sample())
    assert v.observation_space.contains(obs)


def test_float32_observations_are_not_copied():
    v = scopegym.make_vec(STEER, 4)
    obs, _ = v.reset(seed=0)
    assert obs.base is not None and obs.base.flags.owndata  # a view of the array the engine filled
    obs, *_ = v.step(np.zeros((4, 3), dtype=np.float32))
    assert obs.base is not None


def run_until_done(v, steps=400):
    for _ in range(steps):
        obs, r, te, tr, infos = v.step(np.zeros((v.num_envs, 3), dtype=np.float32))
        if (te | tr).any():
            return obs, r, te, tr, infos
    raise AssertionError("no episode ended")


def test_autoreset_next_step():
    v = scopegym.make_vec(STEER, 2, autoreset_mode="NextStep", config={"max_steps": 5})
    v.reset(seed=0)
    _, _, te, tr, _ = run_until_done(v)
    done = te | tr
    obs, r, te2, tr2, infos = v.step(np.zeros((2, 3), dtype=np.float32))
    assert np.all(r[done] == 0) and not (te2 | tr2)[done].any()
    assert infos["_episode_seed"][done].all()


def test_autoreset_same_step():
    v = scopegym.make_vec(STEER, 2, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, config={"max_steps": 5})
    assert v.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    v.reset(seed=0)
    obs, _, te, tr, infos = run_until_done(v)
    done = te | tr
    assert (infos["_final_obs"] == done).all() and (infos["_final_info"] == done).all()
    for i in np.flatnonzero(done):
        assert v.single_observation_space.contains(infos["final_obs"][i])
    assert isinstance(infos["final_info"], dict)


def test_autoreset_disabled_and_reset_mask():
    v = scopegym.make_vec(STEER, 2, autoreset_mode="Disabled", config={"max_steps": 5})
    v.reset(seed=0)
    _, _, te, tr, _ = run_until_done(v)
    with pytest.raises(scopegym.ResetNeeded):
        v.step(np.zeros((2, 3), dtype=np.float32))
    v.reset(options={"reset_mask": te | tr})
    v.reset(seed=3)
    v.step(np.zeros((2, 3), dtype=np.float32))


def test_gil_is_released_while_stepping():
    v = scopegym.make_vec(STEER, 256)
    v.reset(seed=0)
    actions = np.zeros((256, 3), dtype=np.float32)
    ticks = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(time.perf_counter())

    # One long native call: a batch of envs at one step each is fast, so step a slow task (64
    # full-fidelity PFM steps take about 0.1 s on two threads here, ten times the floor below;
    # 64 StemAutofocus steps took 4-6 ms, under it).
    slow = scopegym.make_vec("scopegym/PfmDomainWriting-v1", 64)
    slow.reset(seed=0)
    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.01)
    t0 = time.perf_counter()
    slow.step(np.zeros(slow.action_space.shape, dtype=np.float32))
    t1 = time.perf_counter()
    stop.set()
    t.join()
    inside = [x for x in ticks if t0 < x < t1]
    assert t1 - t0 > 0.01, "the native step is too short to observe"
    assert len(inside) > 100, f"the Python thread ran {len(inside)} times during a {t1 - t0:.4f} s native step"
    v.step(actions)


def test_config_and_scenario_pass_through(tmp_path):
    env = gym.make(STEER, config={"max_steps": 7})
    assert env.unwrapped.max_episode_steps == 7
    p = tmp_path / "s.toml"
    p.write_text('name = "x"\n[task]\nmax_steps = 9\n')
    env = gym.make(STEER, scenario=str(p))
    assert env.unwrapped.max_episode_steps == 9
    env = gym.make(STEER, scenario=p, config={"max_steps": 4})  # config wins
    assert env.unwrapped.max_episode_steps == 4
    q = tmp_path / "whole.toml"
    q.write_text("max_steps = 11\n")
    assert gym.make(STEER, scenario=q).unwrapped.max_episode_steps == 11
    v = gym.make_vec(STEER, num_envs=2, config={"max_steps": 3})
    assert v.max_episode_steps == 3


def test_bad_inputs_raise_the_documented_exceptions():
    env = gym.make(STEER).unwrapped
    env.reset(seed=0)
    with pytest.raises(scopegym.InvalidAction, match=r"action\[1\].*finite"):
        env.step(np.array([0.0, np.nan, 0.5], dtype=np.float32))
    with pytest.raises(scopegym.InvalidAction, match=r"expected shape \(3,\)") as e:
        env.step(np.zeros(4, dtype=np.float32))
    assert isinstance(e.value, ValueError)
    with pytest.raises(ValueError, match="dtype"):
        env.step(np.array(["a", "b", "c"]))
    with pytest.raises(scopegym.InvalidAction):
        env.step(np.zeros(3, dtype=np.complex64))
    with pytest.raises(scopegym.UnknownTask):
        scopegym.make_vec("scopegym/Nope-v1", 2)
    with pytest.raises(scopegym.UnknownTask):
        scopegym.ScopegymEnv("scopegym/Nope-v1")
    with pytest.raises(scopegym.UnknownTask):
        scopegym.make("scopegym/Nope-v1")
    with pytest.raises(gym.error.Error):
        gym.make("scopegym/Nope-v1")  # Gymnasium's own lookup error comes first
    with pytest.raises(scopegym.InvalidConfig, match="no_such_key"):
        gym.make(STEER, config={"no_such_key": 1})
    with pytest.raises(scopegym.InvalidConfig):
        scopegym.make_vec(STEER, 2, config={"no_such_key": 1})
    with pytest.raises(scopegym.InvalidConfig):
        gym.make(STEER, scenario="/nonexistent/file.toml")
    v = scopegym.make_vec(STEER, 4)
    v.reset(seed=0)
    with pytest.raises(scopegym.InvalidAction, match=r"expected shape \(4, 3\)"):
        v.step(np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(scopegym.InvalidAction, match="finite"):
        v.step(np.full((4, 3), np.nan, dtype=np.float32))
    with pytest.raises(scopegym.InvalidArgument):
        scopegym.make_vec(STEER, 0)
    fresh = gym.make(STEER).unwrapped
    with pytest.raises(scopegym.ResetNeeded):
        fresh.step(np.zeros(3, dtype=np.float32))
    for cls in (scopegym.InvalidAction, scopegym.InvalidConfig, scopegym.UnknownTask, scopegym.NativePanic):
        assert issubclass(cls, scopegym.ScopegymError)


def test_discrete_actions():
    env = gym.make("scopegym/SpmTipConditioning-v2").unwrapped
    env.reset(seed=0)
    env.step(3)
    env.step(np.int64(2))
    with pytest.raises(scopegym.InvalidAction):
        env.step(2.5)
    with pytest.raises(scopegym.InvalidAction):
        env.step(99)


def test_a_panic_becomes_an_exception():
    from scopegym import _native

    with pytest.raises(scopegym.NativePanic, match="deliberate"):
        _native._panic_for_test()
    # the interpreter is still alive
    assert gym.make(STEER).reset(seed=0)[0].shape == (10,)


def test_normalized_actions_map_to_physical_bounds():
    env = gym.make(STEER).unwrapped
    phys = env.physical_action_space
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    raw = scopegym.ScopegymEnv(STEER, normalize_actions=False)
    assert raw.action_space == phys
    env.reset(seed=0)
    a = env.heuristic_action(env.reset(seed=0)[0])
    assert env.action_space.contains(a)


def test_retired_ids_name_their_replacement() -> None:
    # StemAutofocus-v1 was retired when the step-8 physics fixes changed its dynamics.
    old, new = "scopegym/StemAutofocus-v1", "scopegym/StemAutofocus-v2"
    assert old not in scopegym.task_ids() and new in scopegym.task_ids()
    for build in (lambda: scopegym.make(old), lambda: scopegym.make_vec(old, 2), lambda: scopegym.ScopegymEnv(old)):
        with pytest.raises(scopegym.RetiredTask, match="StemAutofocus-v2") as e:
            build()
        assert isinstance(e.value, scopegym.UnknownTask) and isinstance(e.value, LookupError)
    # Gymnasium's own registry knows the newer version and says so.
    with pytest.raises(gym.error.DeprecatedEnv, match="StemAutofocus-v2"):
        gym.make(old)
