"""Recording episodes into Minari-compatible datasets (DESIGN.md §8)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Union

import gymnasium as gym
import numpy as np

from . import _native, _spaces
from ._errors import InvalidArgument
from .env import ScopegymEnv

__all__ = ["record", "default_dataset_path"]

Policy = Union[str, Callable[[Any], Any]]


def default_dataset_path(dataset_id: str) -> Path:
    """Where Minari looks for ``dataset_id``: ``$MINARI_DATASETS_PATH`` (default
    ``~/.minari/datasets``) / ``dataset_id``."""
    root = os.environ.get("MINARI_DATASETS_PATH") or os.path.join(os.path.expanduser("~"), ".minari", "datasets")
    return Path(root) / dataset_id


def record(
    env_id: str,
    episodes: int,
    *,
    seed: int = 0,
    policy: Policy = "random",
    path: str | os.PathLike[str] | None = None,
    dataset_id: str | None = None,
    config: dict[str, Any] | None = None,
    scenario: str | os.PathLike[str] | None = None,
) -> Path:
    """Runs ``episodes`` episodes of ``env_id`` and writes a Minari-compatible dataset.

    Episode ``i`` resets with ``seed + i``. ``policy`` is ``"random"`` (the action space sampled
    from ``seed``), ``"heuristic"`` (the task's rule of thumb) or a callable ``obs -> action`` (actions in the task's physical units, the dataset's action
    space).
    The dataset goes to ``path`` (default: Minari's datasets folder / ``dataset_id``, so
    ``minari.load_dataset(dataset_id)`` finds it); ``dataset_id`` defaults to
    ``scopegym/<Task>/<policy>-v1``. Each finished episode is durable before the next starts.
    Returns the dataset folder.
    """
    if not isinstance(episodes, (int, np.integer)) or episodes < 1:
        raise InvalidArgument(f"invalid argument episodes: must be a positive integer, got {episodes!r}")
    if isinstance(policy, str) and policy not in ("random", "heuristic"):
        raise InvalidArgument(f"invalid argument policy: expected 'random', 'heuristic' or a callable, got {policy!r}")
    name = env_id.split("/", 1)[-1].rsplit("-v", 1)[0]
    agent = policy if isinstance(policy, str) else getattr(policy, "__name__", "policy")
    dataset_id = dataset_id or f"scopegym/{name}/{agent}-v1"
    out = Path(path) if path is not None else default_dataset_path(dataset_id)
    env = ScopegymEnv(env_id, config=config, scenario=scenario, normalize_actions=False)
    spec_kwargs: dict[str, Any] = {}
    if config is not None:
        spec_kwargs["config"] = config
    if scenario is not None:
        spec_kwargs["scenario"] = os.fspath(scenario)
    try:
        spec = gym.spec(env_id)
        env_spec = gym.envs.registration.EnvSpec(
            id=spec.id,
            entry_point=spec.entry_point,
            vector_entry_point=spec.vector_entry_point,
            kwargs={**spec.kwargs, **spec_kwargs},
            max_episode_steps=None,
            disable_env_checker=spec.disable_env_checker,
        ).to_json()
    except gym.error.Error:
        env_spec = None
    prov: dict[str, Any] = {
        "env_id": env_id,
        "agent": agent,
        "seed": seed,
        "max_episode_steps": env.max_episode_steps,
        "config": config if config is not None else "defaults of the registered task",
        "algorithm_name": agent,
    }
    if scenario is not None:
        prov["scenario"] = os.fspath(scenario)
    if env_spec is not None:
        prov["env_spec"] = env_spec
    rec = _native.NativeRecorder(str(out), dataset_id, env.native, json.dumps(prov))
    obs_enc = _spaces.encoder(env.observation_space)
    act_enc = _spaces.encoder(env.action_space)
    env.action_space.seed(seed)
    for i in range(int(episodes)):
        ep_seed = seed + i
        obs, _ = env.reset(seed=ep_seed)
        observations = [obs_enc(obs)]
        actions, rewards, terms, truncs = [], [], [], []
        while True:
            if policy == "random":
                a = env.action_space.sample()
            elif policy == "heuristic":
                a = env.heuristic_action(obs)
            else:
                a = policy(obs)  # type: ignore[operator]
            flat_a = act_enc(a)
            obs, r, term, trunc, _ = env.step(a)
            actions.append(flat_a)
            observations.append(obs_enc(obs))
            rewards.append(float(r))
            terms.append(term)
            truncs.append(trunc)
            if term or trunc:
                break
        rec.write_episode(
            ep_seed,
            np.stack(observations).astype(np.float32, copy=False),
            np.stack(actions).astype(np.float32, copy=False),
            np.asarray(rewards, dtype=np.float64),
            np.asarray(terms, dtype=bool),
            np.asarray(truncs, dtype=bool),
        )
    env.close()
    return out
