"""``scopegym mcp`` through the official Python MCP SDK (stdio client): a scripted episode of
two tasks gives the observations and rewards of ``gymnasium.make`` for the same seeds and
actions, and malformed or out-of-limit calls are tool errors after which the server still
answers."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import scopegym  # noqa: F401  (registers the ids)

mcp = pytest.importorskip("mcp", reason="the MCP SDK (requirements-dev.txt: mcp)")

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("SCOPEGYM_BIN", str(ROOT / "target" / "debug" / "scopegym"))


def _episode_seed(run_seed: int, i: int) -> int:
    # The suite's episode seeds: episode i of run seed s resets with s * 1 000 000 + i.
    return run_seed * 1_000_000 + i


def _structured(r) -> dict:
    assert not r.is_error, r.content
    return r.structured_content


def _error(r) -> str:
    assert r.is_error, r.structured_content
    return r.content[0].text


async def _episode(task: str, run_seed: int, steps: int, record: Path) -> None:
    params = mcp.StdioServerParameters(
        command=BIN, args=["mcp", "--task", task, "--seed", str(run_seed), "--record", str(record)]
    )
    async with mcp.Client(params) as c:
        names = {t.name for t in (await c.list_tools()).tools}
        assert {"reset", "step", "episode_score", "acquire_frame", "move_probe", "make_safe"} <= names

        env = gym.make(task, difficulty="medium", split="test")
        obs, _ = env.reset(seed=_episode_seed(run_seed, 0))
        s = _structured(await c.call_tool("reset", {"include_observation": True}))
        assert s["seed"] == _episode_seed(run_seed, 0)
        np.testing.assert_array_equal(np.asarray(s["observation"], dtype=np.float32), obs.ravel())
        ret = 0.0
        for t in range(steps):
            a = env.unwrapped.heuristic_action(obs)
            obs, reward, terminated, truncated, _ = env.step(a)
            action = a.tolist() if isinstance(a, np.ndarray) else int(a)
            s = _structured(await c.call_tool("step", {"action": action, "include_observation": True}))
            assert "refused" not in s, s
            assert s["reward"] == reward, t
            np.testing.assert_array_equal(np.asarray(s["observation"], dtype=np.float32), obs.ravel())
            assert (s["terminated"], s["truncated"]) == (terminated, truncated)
            ret += reward
            if terminated or truncated:
                break
        assert _structured(await c.call_tool("episode_score", {}))["return"] == pytest.approx(ret, abs=0)

        # Strict JSON has no NaN: a client sends it as null or a string; both are tool errors.
        assert "action" in _error(await c.call_tool("step", {"action": None}))
        assert "action" in _error(await c.call_tool("step", {"action": "NaN"}))
        assert "action" in _error(await c.call_tool("step", {"action": [[1, 2], [3]]}))
        assert "NoSuchTask" in _error(await c.call_tool("reset", {"task": "scopegym/NoSuchTask-v1"}))
        moved = _error(await c.call_tool("move_probe", {"x_m": 1.0, "y_m": 0.0}))
        assert "spm.scanner_range" in moved or "position" in moved, moved
        if "Stem" in task:
            assert "stem.aberration_step_max.c10" in _error(await c.call_tool("set_defocus", {"defocus_m": 1.0}))
        else:
            assert "spm.bias_window" in _error(await c.call_tool("set_bias", {"bias_v": 100.0}))
        frame = await c.call_tool("acquire_frame", {})
        assert _structured(frame)["rows"] > 0
        assert any(getattr(b, "mime_type", None) == "image/png" for b in frame.content)


@pytest.mark.parametrize(
    ("task", "run_seed"), [("scopegym/SpmTipConditioning-v2", 3), ("scopegym/StemAutofocus-v2", 5)]
)
def test_mcp_tools_match_gymnasium_and_refuse_bad_calls(task: str, run_seed: int, tmp_path: Path) -> None:
    if not Path(BIN).exists():
        pytest.skip(f"no scopegym binary at {BIN} (set SCOPEGYM_BIN)")
    asyncio.run(_episode(task, run_seed, 5, tmp_path))
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert any(c["tool"] == "step" and c["ok"] for c in calls)
    assert any(c["tool"] == "move_probe" and not c["ok"] for c in calls)


def test_mcp_over_streamable_http_scores_the_episode_on_ctrl_c(tmp_path: Path) -> None:
    import signal
    import subprocess

    if not Path(BIN).exists():
        pytest.skip(f"no scopegym binary at {BIN} (set SCOPEGYM_BIN)")
    task = "scopegym/SpmTipConditioning-v2"
    proc = subprocess.Popen(
        [BIN, "mcp", "--task", task, "--http", "127.0.0.1:0", "--record", str(tmp_path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        url = line.strip().rsplit(" on ", 1)[1]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/mcp"), line

        async def run() -> list[float]:
            async with mcp.Client(url) as c:
                _structured(await c.call_tool("reset", {}))
                return [_structured(await c.call_tool("step", {"action": a}))["reward"] for a in (4, 0)]

        rewards = asyncio.run(run())
        env = gym.make(task, difficulty="medium", split="test")
        env.reset(seed=0)
        assert rewards == [env.step(a)[1] for a in (4, 0)]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    # Ctrl-C scores the episode in progress into results.json.
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["agent"] == "llm" and res["env_id"] == task
    assert [e["rewards"] for e in res["per_seed"][0]["episodes"]] == [rewards]
