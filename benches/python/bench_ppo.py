"""PPO training speed (env steps per second, learning included) on StemDopantSteer-v1, side by
side in one run:

- Stable-Baselines3 PPO (PyTorch, CPU, one thread) on the Python package's Gymnasium env
  (``gymnasium.make("scopegym/StemDopantSteer-v1")`` x 8 in SB3's ``DummyVecEnv``: SB3 takes
  its own VecEnv, not a Gymnasium vector env; the env's steps are a few microseconds, a small
  part of either side's time);
- scopegym's Rust PPO (``agents/examples/ppo_speed.rs``, libtorch on one thread, the native
  vector env).

Both with CleanRL's settings: 8 envs x 128 steps, 4 epochs of 4 minibatches (batch 256),
lr 2.5e-4 (annealed on the Rust side, constant in SB3), gamma 0.99, GAE 0.95, clip 0.2,
entropy 0.01, value 0.5, max grad norm 0.5, 64-64 tanh actor and critic, orthogonal init.

Run (after ``source scripts/env.sh``):
``cargo build --release -p scopegym-agents --features torch --example ppo_speed`` then
``.venv/bin/python benches/python/bench_ppo.py [--steps 100000] [--json]``
(the example binary: ``$SCOPEGYM_PPO_SPEED``, else ``$CARGO_TARGET_DIR/release/examples/ppo_speed``,
else ``target/release/examples/ppo_speed``). Target: Rust >= 3x SB3.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import gymnasium as gym  # noqa: E402
import torch  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv  # noqa: E402

import scopegym  # noqa: E402, F401  (registers the envs)

ENV_ID = "scopegym/StemDopantSteer-v1"


def sb3_steps_per_s(steps: int) -> float:
    torch.set_num_threads(1)
    venv = DummyVecEnv([lambda: gym.make(ENV_ID) for _ in range(8)])
    model = PPO(
        "MlpPolicy",
        venv,
        learning_rate=2.5e-4,
        n_steps=128,
        batch_size=256,
        n_epochs=4,
        gamma=0.99,
        gae_lambda=0.95,
        clip_range=0.2,
        clip_range_vf=0.2,
        ent_coef=0.01,
        vf_coef=0.5,
        max_grad_norm=0.5,
        policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=torch.nn.Tanh),
        device="cpu",
        seed=0,
        verbose=0,
    )
    t0 = time.perf_counter()
    model.learn(total_timesteps=steps)
    return model.num_timesteps / (time.perf_counter() - t0)


def rust_steps_per_s(steps: int) -> float:
    exe = os.environ.get("SCOPEGYM_PPO_SPEED")
    if not exe:
        target = os.environ.get("CARGO_TARGET_DIR", "target")
        exe = os.path.join(target, "release", "examples", "ppo_speed")
    out = subprocess.run([exe, str(steps)], check=True, capture_output=True, text=True).stdout
    m = re.search(r"rust_ppo_steps_per_s (\S+)", out)
    if not m:
        raise RuntimeError(f"unexpected output of {exe}: {out!r}")
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rust = rust_steps_per_s(a.steps)
    sb3 = sb3_steps_per_s(a.steps)
    res = {"steps": a.steps, "rust_steps_per_s": rust, "sb3_steps_per_s": sb3, "ratio": rust / sb3}
    if a.json:
        print(json.dumps(res))
    else:
        print(f"PPO on {ENV_ID}, {a.steps} steps, one thread, learning included")
        print(f"{'scopegym (Rust, tch)':>24}: {rust:10.0f} steps/s")
        print(f"{'Stable-Baselines3':>24}: {sb3:10.0f} steps/s")
        print(f"{'ratio':>24}: {rust / sb3:10.1f}x")


if __name__ == "__main__":
    main()
