"""Policies on instruments through the safety guard: ``scopegym deploy`` against the Python
reference STEM gateway (the heuristic and a PPO TorchScript export), and
``gymnasium.make(id, driver=...)`` on the gateway, on the fake Nanonis controller and on the
guarded simulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import scopegym

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("SCOPEGYM_BIN", str(ROOT / "target" / "debug" / "scopegym"))
GATEWAY = ROOT / "drivers" / "python" / "stem_gateway.py"
AUTOFOCUS = "scopegym/StemAutofocus-v2"
WRITING = "scopegym/PfmDomainWriting-v1"

# Limits a careful lab would widen only for a simulator: a huge dose budget, long frames.
STEM_LIMITS = """
[stem]
dose_budget = "1e12 e/Å^2"
max_frame_time = "100 s"
max_exposure = "1 s"
blank_outside_acquisition = true
[stem.aberration_step_max]
c10 = "1 µm"
c12 = "1 µm"
c21 = "10 µm"
c23 = "10 µm"
c30 = "100 µm"
c50 = "10 mm"
"""
SPM_LIMITS = """
[spm]
bias_window = ["-10 V", "10 V"]
pulse_bias_max = "9 V"
pulse_width_max = "100 ms"
scanner_range = ["10 µm", "10 µm"]
"""


def _serve(cmd: list[str]) -> Iterator[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def gateway() -> Iterator[str]:
    for port in _serve([sys.executable, str(GATEWAY), "--task", AUTOFOCUS, "--port", "0"]):
        yield f"stem-gateway://127.0.0.1:{int(port)}"


@pytest.fixture
def fake_nanonis() -> Iterator[str]:
    yield from _serve([BIN, "fake-nanonis", WRITING])


def _limits(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "limits.toml"
    p.write_text(text, encoding="utf-8")
    return p


def _deploy(*args: str) -> dict:
    out = subprocess.run([BIN, "deploy", *args, "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_deploy_runs_the_heuristic_and_a_ppo_export_through_the_python_gateway(gateway: str, tmp_path: Path) -> None:
    limits = _limits(tmp_path, STEM_LIMITS)
    log = tmp_path / "heuristic.jsonl"
    r = _deploy(AUTOFOCUS, "--driver", gateway, "--agent", "heuristic", "--limits", str(limits), "--log", str(log))
    ep = r["episodes"][0]
    assert ep["steps"] >= 2 and ep["refused"] is None, r
    lines = _audit(log)
    assert sum(line["command"] == "acquire_frame" for line in lines) >= ep["steps"]
    assert all(line["result"] == "ok" for line in lines), [x for x in lines if x["result"] != "ok"]

    # A PPO policy trained briefly on the simulator, exported as TorchScript by `scopegym run`.
    cfg = tmp_path / "ppo.toml"
    cfg.write_text("num_steps = 16\nnum_envs = 2\n", encoding="utf-8")
    train = tmp_path / "train"
    out = subprocess.run(
        [BIN, "run", AUTOFOCUS, "--agent", "ppo", "--steps", "32", "--seeds", "1", "--episodes", "1",
         "--config", str(cfg), "--out", str(train)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    policy = train / "checkpoints" / "seed0" / "ppo.pt"
    assert policy.is_file()
    log2 = tmp_path / "ppo.jsonl"
    r = _deploy(AUTOFOCUS, "--driver", gateway, "--policy", str(policy), "--limits", str(limits), "--log", str(log2))
    ep = r["episodes"][0]
    assert ep["steps"] >= 1, r
    assert any(line["command"] == "set_aberrations" for line in _audit(log2))


def test_gymnasium_make_on_the_gateway_matches_the_simulator(gateway: str, tmp_path: Path) -> None:
    limits = _limits(tmp_path, STEM_LIMITS)
    log = tmp_path / "audit.jsonl"
    real = gym.make(AUTOFOCUS, driver=gateway, limits=limits, audit_log=log)
    sim = gym.make(AUTOFOCUS)
    try:
        a, _ = real.reset(seed=7)
        b, _ = sim.reset(seed=7)
        np.testing.assert_array_equal(a, b)
        for _ in range(3):
            act = sim.unwrapped.heuristic_action(b)  # type: ignore[attr-defined]
            a, ra, ta, _, info = real.step(act)
            b, rb, tb, _, _ = sim.step(act)
            np.testing.assert_array_equal(a, b)
            assert ra == rb and ta == tb
            assert "is_success" in info and "refused" not in info
            if tb:
                break
    finally:
        real.close()
        sim.close()
    commands = [line["command"] for line in _audit(log)]
    assert commands[0] == "new_episode" and "acquire_frame" in commands


def test_gymnasium_make_on_the_fake_nanonis_controller(fake_nanonis: str, tmp_path: Path) -> None:
    assert fake_nanonis.startswith("nanonis://127.0.0.1:")
    with pytest.raises(scopegym.InvalidArgument, match="limits"):
        gym.make(WRITING, driver=fake_nanonis)
    env = gym.make(WRITING, driver=fake_nanonis, limits=_limits(tmp_path, SPM_LIMITS), watchdog=30.0)
    try:
        obs, _ = env.reset(seed=0)
        steps = 0
        while True:
            obs, reward, terminated, truncated, info = env.step(env.unwrapped.heuristic_action(obs))  # type: ignore[attr-defined]
            steps += 1
            assert np.isfinite(reward) and "refused" not in info
            if terminated or truncated:
                break
        assert steps >= 1
    finally:
        env.close()


def test_a_refused_command_ends_the_episode_with_the_reason(tmp_path: Path) -> None:
    strict = _limits(tmp_path, SPM_LIMITS.replace('"9 V"', '"1 V"'))
    log = tmp_path / "audit.jsonl"
    env = gym.make(WRITING, driver="sim", limits=strict, audit_log=log)
    try:
        env.reset(seed=0)
        # Half-scale bias: 7.5 V on the task's ±15 V range, below the task's breakdown but
        # beyond the 1 V limit: never sent.
        obs, reward, terminated, truncated, info = env.step(np.array([0.0, 0.0, 0.5, -1.0], dtype=np.float32))
        assert terminated and not truncated and reward == 0.0
        assert info["refused"] is True and info["is_success"] is False
        assert info["refused_limit"] == "spm.pulse_bias_max"
        assert "1 V" in info["refused_reason"]
        with pytest.raises(scopegym.ResetNeeded):
            env.step(np.zeros(4, dtype=np.float32))
    finally:
        env.close()
    refused = [line for line in _audit(log) if line["result"] == "refused"]
    assert len(refused) == 1 and refused[0]["limit"] == "spm.pulse_bias_max"
    with pytest.raises(scopegym.InvalidArgument, match="driver"):
        gym.make(WRITING, driver="ftp://nowhere")
    with pytest.raises(scopegym.InvalidArgument, match="need a driver"):
        gym.make(WRITING, dry_run=True)
