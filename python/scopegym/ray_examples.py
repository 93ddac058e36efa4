"""Ray Tune sweeps over scopegym tasks, with the best configurations written with provenance.

Two sweeps, run by ``python -m scopegym.ray_examples --out DIR``:

- **PPO** (RLlib) on one task (default ``scopegym/StemDopantSteer-v1``): a grid over the
  learning rate (``--lrs``), each trial ``--ppo-iterations`` training iterations of
  ``--batch`` env steps on ``--env-runners`` env runners stepping the native vector env
  (:func:`scopegym.ray.configure`), seeded ``--seed``; the metric is RLlib's
  ``env_runners/episode_return_mean`` at the last iteration (maximized).
- **BO agent** on another task (default ``scopegym/PfmSpectroscopyExplore-v1``): a grid over
  the Rust ``bo`` agent's acquisition settings (``--acquisitions``, each ``name`` or
  ``ucb:BETA``; ``--xis``), each trial one ``scopegym run <task> --agent bo --config ...
  --seeds S --episodes E`` (the ``scopegym`` command line: ``--scopegym-bin``, else
  ``$SCOPEGYM_BIN``, else ``scopegym`` on ``PATH``); the metric is that run's mean evaluation
  return (``summary.return_mean`` of its ``results.json``, maximized).

``DIR/best.json`` then holds, per sweep, the best configuration and its metric, every trial's
configuration and metric, the search space, the metric's name and mode, the seeds, and the
provenance (scopegym and Ray versions, the git commit of the working directory's clone when
there is one, the command line, the time). Tune's own records go to ``DIR/tune``. ``--address``
joins a running Ray cluster (``auto`` or ``HOST:PORT``) instead of starting a local one with
``--num-cpus``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__, _check_id
from . import ray as sray
from ._errors import InvalidArgument
from .bo import ACQUISITIONS

__all__ = ["main", "sweep_ppo", "sweep_bo", "parse_acquisition", "provenance"]

PPO_METRIC = "env_runners/episode_return_mean"
BO_METRIC = "return_mean"


def _tune() -> Any:
    try:
        return importlib.import_module("ray.tune")
    except ImportError as e:
        raise ImportError("scopegym.ray_examples needs Ray: pip install 'scopegym[ray]'") from e


def git_commit() -> str | None:
    """The commit checked out in the current directory's git clone, or ``None``."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def git_dirty() -> bool | None:
    """Whether the current directory's clone has uncommitted changes (``None``: not a clone)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def provenance(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """scopegym and Ray versions, the git commit (when known), the command line (``argv``,
    default ``sys.argv[1:]``) and the time."""
    ray_mod = importlib.import_module("ray")
    return {
        "scopegym_version": __version__,
        "ray_version": ray_mod.__version__,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "command": [sys.executable, "-m", "scopegym.ray_examples", *(sys.argv[1:] if argv is None else argv)],
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def parse_acquisition(text: str) -> dict[str, Any]:
    """``"logei"`` → ``{"acquisition": "logei"}``; ``"ucb:2"`` → UCB with β = 2, as the ``bo``
    agent's config TOML writes it. Unknown names raise :class:`scopegym.InvalidArgument`."""
    name, _, beta = text.partition(":")
    if name not in ACQUISITIONS:
        raise InvalidArgument(f"invalid argument acquisitions: unknown {name!r}; expected one of {', '.join(ACQUISITIONS)}")
    if not beta:
        return {"acquisition": name}
    if name != "ucb":
        raise InvalidArgument(f"invalid argument acquisitions: only ucb takes a parameter, got {text!r}")
    try:
        value = float(beta)
    except ValueError as e:
        raise InvalidArgument(f"invalid argument acquisitions: β in {text!r} is not a number") from e
    if not value >= 0:
        raise InvalidArgument(f"invalid argument acquisitions: β in {text!r} must be >= 0")
    return {"acquisition": {"ucb": {"beta": value}}}


def _toml(settings: dict[str, Any]) -> str:
    lines = []
    for key, value in settings.items():
        if isinstance(value, dict):
            ((name, params),) = value.items()
            inner = ", ".join(f"{k} = {float(v)!r}" for k, v in params.items())
            lines.append(f"{key} = {{ {name} = {{ {inner} }} }}")
        elif isinstance(value, str):
            lines.append(f"{key} = {json.dumps(value)}")
        else:
            lines.append(f"{key} = {value!r}")
    return "\n".join(lines) + "\n"


def _bo_trial(config: dict[str, Any]) -> None:
    """One Tune trial: the ``bo`` agent with ``config["agent"]`` on ``config["task"]``."""
    tune = _tune()
    with tempfile.TemporaryDirectory(prefix="scopegym-bo-") as tmp:
        agent_toml = Path(tmp) / "agent.toml"
        agent_toml.write_text(_toml(config["agent"]))
        cmd = [
            config["bin"], "run", config["task"], "--agent", "bo", "--config", str(agent_toml),
            "--seeds", str(config["seeds"]), "--episodes", str(config["episodes"]), "--out", str(Path(tmp) / "run"),
        ]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
        results = json.loads((Path(tmp) / "run" / "results.json").read_text())
    summary = results["summary"]
    tune.report({BO_METRIC: float(summary["return_mean"]), "return_ci95": float(summary["return_ci95"])})


def _scopegym_bin(path: str | None) -> str:
    found = path or os.environ.get("SCOPEGYM_BIN") or shutil.which("scopegym")
    if not found or not os.access(found, os.X_OK):
        raise InvalidArgument(
            f"invalid argument scopegym_bin: no scopegym command line at {found!r} "
            "(pass --scopegym-bin, set SCOPEGYM_BIN, or put scopegym on PATH)"
        )
    return os.path.abspath(found)


def _metric(metrics: dict[str, Any], name: str) -> float | None:
    """``metrics[name]``, or the nested ``metrics["a"]["b"]`` for ``"a/b"`` (Tune's reports)."""
    if name in metrics:
        value: Any = metrics[name]
    else:
        value = metrics
        for part in name.split("/"):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
    return None if value is None else float(value)


def _best(results: Any, metric: str, space: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    trials: list[dict[str, Any]] = []
    for r in results:
        if r.error is not None:
            trials.append({"config": {k: r.config.get(k) for k in keys}, "error": str(r.error)})
        else:
            trials.append({"config": {k: r.config.get(k) for k in keys}, metric: _metric(r.metrics, metric)})
    ok = [t for t in trials if t.get(metric) is not None]
    if not ok:
        raise RuntimeError(f"no trial reported {metric}: {trials}")
    best = max(ok, key=lambda t: t[metric])
    return {"best_config": best["config"], "best_metric": best[metric], "metric": metric, "mode": "max",
            "search_space": space, "trials": trials}  # fmt: skip


def sweep_ppo(
    task: str, lrs: Sequence[float], iterations: int, batch: int, env_runners: int, num_envs: int, seed: int, storage: Path
) -> dict[str, Any]:
    """The PPO learning-rate sweep on ``task``; returns its ``best.json`` entry."""
    _check_id(task)
    if not lrs or any(not lr > 0 for lr in lrs):
        raise InvalidArgument(f"invalid argument lrs: expected positive learning rates, got {list(lrs)}")
    for name, value in (("ppo_iterations", iterations), ("batch", batch), ("num_envs", num_envs)):
        if value < 1:
            raise InvalidArgument(f"invalid argument {name}: must be >= 1, got {value}")
    if env_runners < 0:
        raise InvalidArgument(f"invalid argument env_runners: must be >= 0, got {env_runners}")
    tune = _tune()
    ppo = importlib.import_module("ray.rllib.algorithms.ppo")
    config = (
        ppo.PPOConfig()
        .env_runners(num_env_runners=env_runners, num_envs_per_env_runner=num_envs)
        .training(train_batch_size_per_learner=batch, minibatch_size=min(256, batch), num_epochs=6,
                  lr=tune.grid_search([float(lr) for lr in lrs]))
        .debugging(seed=seed)
    )  # fmt: skip
    sray.configure(config, task)
    tuner = tune.Tuner(
        "PPO",
        param_space=config,
        tune_config=tune.TuneConfig(metric=PPO_METRIC, mode="max"),
        run_config=tune.RunConfig(
            name="ppo", storage_path=str(storage), stop={"training_iteration": iterations}, verbose=0
        ),
    )
    space = {"lr": [float(lr) for lr in lrs]}
    fixed = {"training_iteration": iterations, "train_batch_size_per_learner": batch, "minibatch_size": min(256, batch),
             "num_epochs": 6, "num_env_runners": env_runners, "num_envs_per_env_runner": num_envs}  # fmt: skip
    entry = _best(tuner.fit(), PPO_METRIC, space, ["lr"])
    return {"task": task, "algorithm": "PPO (RLlib)", "fixed": fixed, "seeds": [seed], **entry}


def sweep_bo(
    task: str, acquisitions: Sequence[str], xis: Sequence[float], seeds: int, episodes: int, scopegym_bin: str | None,
    storage: Path,
) -> dict[str, Any]:  # fmt: skip
    """The ``bo`` agent's acquisition sweep on ``task``; returns its ``best.json`` entry."""
    _check_id(task)
    settings = [parse_acquisition(a) for a in acquisitions]
    if not settings:
        raise InvalidArgument("invalid argument acquisitions: expected at least one")
    if not xis or any(not xi >= 0 for xi in xis):
        raise InvalidArgument(f"invalid argument xis: expected margins >= 0, got {list(xis)}")
    for name, value in (("bo_seeds", seeds), ("bo_episodes", episodes)):
        if value < 1:
            raise InvalidArgument(f"invalid argument {name}: must be >= 1, got {value}")
    binary = _scopegym_bin(scopegym_bin)
    tune = _tune()
    agents = [{**s, "xi": float(xi)} for s in settings for xi in xis]
    space = {"agent": agents}
    tuner = tune.Tuner(
        _bo_trial,
        param_space={"agent": tune.grid_search(agents), "task": task, "seeds": seeds, "episodes": episodes, "bin": binary},
        tune_config=tune.TuneConfig(metric=BO_METRIC, mode="max"),
        run_config=tune.RunConfig(name="bo", storage_path=str(storage), verbose=0),
    )
    entry = _best(tuner.fit(), BO_METRIC, space, ["agent"])
    return {"task": task, "algorithm": "bo agent (scopegym run --agent bo)", "seeds": list(range(seeds)),
            "episodes_per_seed": episodes, **entry}  # fmt: skip


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line (``python -m scopegym.ray_examples --help``); returns what it wrote."""
    p = argparse.ArgumentParser(prog="python -m scopegym.ray_examples", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (best.json, tune/)")
    p.add_argument("--address", default=None, help="join this Ray cluster (auto or HOST:PORT) instead of a local one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: every core)")
    p.add_argument("--seed", type=int, default=0, help="PPO seed (RLlib's config.seed)")
    p.add_argument("--skip", choices=["ppo", "bo"], action="append", default=[], help="leave out a sweep")
    p.add_argument("--ppo-task", default="scopegym/StemDopantSteer-v1")
    p.add_argument("--lrs", type=_floats, default=[3e-4, 1e-3, 3e-3], help="learning rates (comma-separated)")
    p.add_argument("--ppo-iterations", type=int, default=30)
    p.add_argument("--batch", type=int, default=1024, help="env steps per PPO iteration")
    p.add_argument("--env-runners", type=int, default=1)
    p.add_argument("--num-envs", type=int, default=4, help="native envs per env runner")
    p.add_argument("--bo-task", default="scopegym/PfmSpectroscopyExplore-v1")
    p.add_argument("--acquisitions", default="logei,ei,ucb:1,ucb:4,thompson", help="name or ucb:BETA, comma-separated")
    p.add_argument("--xis", type=_floats, default=[0.0], help="EI/LogEI/PI margins (comma-separated)")
    p.add_argument("--bo-seeds", type=int, default=5, help="seeds 0..N-1 per BO trial")
    p.add_argument("--bo-episodes", type=int, default=2, help="evaluation episodes per seed")
    p.add_argument("--scopegym-bin", default=None, help="the scopegym command line (default: $SCOPEGYM_BIN or PATH)")
    args = p.parse_args(argv)
    ray_mod = importlib.import_module("ray")
    args.out.mkdir(parents=True, exist_ok=True)
    storage = (args.out / "tune").resolve()
    started = not ray_mod.is_initialized()
    if started:
        ray_mod.init(address=args.address, num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        written: dict[str, Any] = {"provenance": provenance(argv)}
        if "ppo" not in args.skip:
            written["ppo"] = sweep_ppo(args.ppo_task, args.lrs, args.ppo_iterations, args.batch, args.env_runners,
                                       args.num_envs, args.seed, storage)  # fmt: skip
        if "bo" not in args.skip:
            written["bo"] = sweep_bo(args.bo_task, args.acquisitions.split(","), args.xis, args.bo_seeds,
                                     args.bo_episodes, args.scopegym_bin, storage)  # fmt: skip
    finally:
        if started:
            ray_mod.shutdown()
    path = args.out / "best.json"
    path.write_text(json.dumps(written, indent=2) + "\n")
    for name in ("ppo", "bo"):
        if name in written:
            w = written[name]
            print(f"{name} on {w['task']}: best {w['metric']} = {w['best_metric']:.4g} with {w['best_config']}")
    print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
