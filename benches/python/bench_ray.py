"""RLlib sampling speed: scopegym's native vector env inside the env runners against Gymnasium's
SyncVectorEnv over the same task.

For each vectorization mode ("native": ``gym_env_vectorize_mode="vector_entry_point"``, the
creator returns :class:`scopegym.ray.RayVectorEnv`, one Rust call per vector step on one
thread; "sync": RLlib's default, ``SyncVectorEnv`` over single :class:`scopegym.ScopegymEnv`)
and each number of envs per env runner, it times ``EnvRunner.sample(num_timesteps=STEPS)``
with the PPO module's exploring actions (RLlib's connectors and module inference included):

- ``1 runner``: one SingleAgentEnvRunner in this process (no Ray actors);
- ``R runners``: a local Ray with R CPUs and a PPO algorithm with R remote env runners, all
  sampling at once (``foreach_env_runner``), so env steps/s is their total.

The median of ``--repeats`` timed samples after one warm-up sample is reported. Run:
``python benches/python/bench_ray.py [--task ID] [--num-envs 4,16,64] [--steps 8192]
[--repeats 3] [--runners 2] [--json]`` (needs ``pip install scopegym[ray]``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from typing import Any

import ray
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

import scopegym.ray as sray


def config(task: str, mode: str, num_envs: int, runners: int) -> Any:
    c = PPOConfig().env_runners(num_env_runners=runners, num_envs_per_env_runner=num_envs).debugging(seed=0)
    sray.configure(c, task)
    if mode == "sync":
        c.env_runners(gym_env_vectorize_mode="sync")
    return c


def timed(sample: Any, repeats: int) -> float:
    sample()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sample()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def in_process(task: str, mode: str, num_envs: int, steps: int, repeats: int) -> float:
    runner = SingleAgentEnvRunner(config=config(task, mode, num_envs, 0), worker_index=1)
    try:
        return steps / timed(lambda: runner.sample(num_timesteps=steps), repeats)
    finally:
        runner.stop()


def on_ray(task: str, mode: str, num_envs: int, steps: int, repeats: int, runners: int) -> float:
    algo = config(task, mode, num_envs, runners).build_algo()
    try:
        group = algo.env_runner_group

        def sample() -> None:
            group.foreach_env_runner(lambda r: len(r.sample(num_timesteps=steps)), local_env_runner=False)

        return runners * steps / timed(sample, repeats)
    finally:
        algo.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--task", default="scopegym/StemDopantSteer-v1")
    p.add_argument("--num-envs", default="4,16,64", help="envs per env runner (comma-separated)")
    p.add_argument("--steps", type=int, default=8192, help="env steps per runner per timed sample")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--runners", type=int, default=2, help="remote env runners (and local Ray CPUs)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="scopegym.ray: a second single")
    sizes = [int(v) for v in args.num_envs.split(",")]
    rows: list[dict[str, Any]] = []
    for n in sizes:
        for mode in ("native", "sync"):
            rows.append({"setup": "1 runner", "num_envs": n, "mode": mode,
                         "steps_per_s": in_process(args.task, mode, n, args.steps, args.repeats)})  # fmt: skip
    ray.init(num_cpus=args.runners, include_dashboard=False, log_to_driver=False)
    try:
        for n in sizes:
            for mode in ("native", "sync"):
                sps = on_ray(args.task, mode, n, args.steps, args.repeats, args.runners)
                rows.append({"setup": f"{args.runners} runners", "num_envs": n, "mode": mode, "steps_per_s": sps})
    finally:
        ray.shutdown()
    if args.json:
        print(json.dumps({"task": args.task, "steps": args.steps, "repeats": args.repeats, "rows": rows}))
        return
    print(f"RLlib sampling on {args.task}: env steps/s (median of {args.repeats} x {args.steps} steps per runner)")
    print(f"{'setup':>10} {'envs/runner':>11} {'native':>10} {'sync':>10} {'ratio':>6}")
    for setup in dict.fromkeys(r["setup"] for r in rows):
        for n in sizes:
            by = {r["mode"]: r["steps_per_s"] for r in rows if r["setup"] == setup and r["num_envs"] == n}
            print(f"{setup:>10} {n:>11} {by['native']:>10.0f} {by['sync']:>10.0f} {by['native'] / by['sync']:>6.2f}")


if __name__ == "__main__":
    main()
