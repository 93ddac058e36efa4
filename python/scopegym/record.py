"""Recording episodes into Minari-compatible datasets (DESIGN.md §8)."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any, Callable, Union

import gymnasium as gym
import numpy as np

from . import _native, _spaces
from ._errors import InvalidArgument
from .env import ScopegymEnv, level_config

__all__ = ["record", "repair_dataset", "default_dataset_path", "MINARI_FORMAT_VERSION"]

Policy = Union[str, Callable[[Any], Any]]


def default_dataset_path(dataset_id: str) -> Path:
    """Where Minari looks for ``dataset_id``: ``$MINARI_DATASETS_PATH`` (default
    ``~/.minari/datasets``) / ``dataset_id``."""
    root = os.environ.get("MINARI_DATASETS_PATH") or os.path.join(os.path.expanduser("~"), ".minari", "datasets")
    return Path(root) / dataset_id


#: The oldest Minari release whose dataset format scopegym writes; the ``minari_version`` of a
#: dataset recorded where Minari is not installed.
MINARI_FORMAT_VERSION = "0.5.0"


def _minari_version() -> str:
    """The installed Minari's version (what Minari checks datasets against), else
    :data:`MINARI_FORMAT_VERSION`."""
    try:
        return importlib.metadata.version("minari")
    except importlib.metadata.PackageNotFoundError:
        return MINARI_FORMAT_VERSION


def _env_spec(env_id: str, extra: dict[str, Any]) -> str | None:
    """The Gymnasium EnvSpec (JSON) that rebuilds the recorded env: physical actions
    (``normalize_actions=False``, the stored convention) and ``extra`` kwargs. No
    ``max_episode_steps``: the engine truncates at the configured limit itself, and Gymnasium's
    ``TimeLimit`` would also flag ``truncated`` on an episode that terminates at its last step,
    which the stored flags (the engine's) do not."""
    try:
        spec = gym.spec(env_id)
    except gym.error.Error:
        return None
    return gym.envs.registration.EnvSpec(
        id=spec.id,
        entry_point=spec.entry_point,
        vector_entry_point=spec.vector_entry_point,
        kwargs={**spec.kwargs, "normalize_actions": False, **extra},
        max_episode_steps=None,
        disable_env_checker=spec.disable_env_checker,
    ).to_json()


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
    difficulty: str | None = None,
    split: str | None = None,
    author: str = "scopegym",
    description: str | None = None,
    reference_episodes: int = 20,
) -> Path:
    """Runs ``episodes`` episodes of ``env_id`` and writes a Minari-compatible dataset.

    Episode ``i`` resets with ``seed + i``. ``policy`` is ``"random"`` (the action space sampled
    from ``seed``), ``"heuristic"`` (the task's rule of thumb) or a callable ``obs -> action``
    (actions in the task's physical units, the dataset's action space). ``config``,
    ``scenario``, ``difficulty`` and ``split`` configure the task as in ``gymnasium.make``.
    The dataset goes to ``path`` (default: Minari's datasets folder / ``dataset_id``, so
    ``minari.load_dataset(dataset_id)`` finds it); ``dataset_id`` defaults to
    ``scopegym/<Task>/<policy>-v1``. Each finished episode is durable before the next starts
    (a crash loses at most the episode in progress; :func:`repair_dataset` fixes the rest).

    The metadata carries what Minari reads: ``env_spec`` (``recover_environment()`` rebuilds
    the task with this config and physical actions, ``normalize_actions=False``, the stored
    convention), ``eval_env_spec`` (the same on the held-out ``test`` split), ``author``,
    ``description`` (default: task, policy, seeds, config), ``minari_version`` (the installed
    Minari's, else ``"0.5.0"``), ``requirements``, ``dataset_size``, and the reference scores
    ``ref_min_score`` / ``ref_max_score`` (mean returns of random actions and of the task's
    heuristic over seeds ``0..reference_episodes`` on the same config; 0 skips them) with which
    ``minari.get_normalized_score`` normalizes returns. Each episode's numeric and boolean info
    values become its ``infos`` group. Returns the dataset folder.
    """
    if not isinstance(episodes, (int, np.integer)) or episodes < 1:
        raise InvalidArgument(f"invalid argument episodes: must be a positive integer, got {episodes!r}")
    if not isinstance(reference_episodes, (int, np.integer)) or reference_episodes < 0:
        raise InvalidArgument(
            f"invalid argument reference_episodes: must be a non-negative integer, got {reference_episodes!r}"
        )
    if isinstance(policy, str) and policy not in ("random", "heuristic"):
        raise InvalidArgument(f"invalid argument policy: expected 'random', 'heuristic' or a callable, got {policy!r}")
    name = env_id.split("/", 1)[-1].rsplit("-v", 1)[0]
    agent = policy if isinstance(policy, str) else getattr(policy, "__name__", "policy")
    dataset_id = dataset_id or f"scopegym/{name}/{agent}-v1"
    out = Path(path) if path is not None else default_dataset_path(dataset_id)
    config = level_config(config, difficulty, split)
    env = ScopegymEnv(env_id, config=config, scenario=scenario, normalize_actions=False)
    spec_kwargs: dict[str, Any] = {}
    if config is not None:
        spec_kwargs["config"] = config
    if scenario is not None:
        # Absolute, so the recovered env finds it from any working directory.
        spec_kwargs["scenario"] = os.path.abspath(os.fspath(scenario))
    env_spec = _env_spec(env_id, spec_kwargs)
    eval_env_spec = _env_spec(env_id, {**spec_kwargs, "config": level_config(config, split="test")})
    what = "the task's heuristic" if policy == "heuristic" else (
        "uniformly random actions" if policy == "random" else f"the policy {agent!r}"
    )
    prov: dict[str, Any] = {
        "env_id": env_id,
        "agent": agent,
        "algorithm_name": agent,
        "seed": seed,
        "max_episode_steps": env.max_episode_steps,
        "config": config if config is not None else "defaults of the registered task",
        "author": author,
        "description": description
        or (
            f"Episodes of {env_id} acted by {what}; episode i resets with seed {seed} + i. Actions are "
            f"stored in the task's physical units (normalize_actions=False); config "
            f"{json.dumps(config) if config is not None else 'the defaults (difficulty medium, split train)'}"
            f"{'' if scenario is None else ', scenario ' + os.fspath(scenario)}. Recorded by scopegym.record "
            f"(scopegym {_native.__version__})."
        ),
        "minari_version": _minari_version(),
        "requirements": [f"scopegym=={_native.__version__}"],
    }
    if scenario is not None:
        prov["scenario"] = os.path.abspath(os.fspath(scenario))
    if env_spec is not None:
        prov["env_spec"] = env_spec
    if eval_env_spec is not None:
        prov["eval_env_spec"] = eval_env_spec
    rec = _native.NativeRecorder(str(out), dataset_id, env.native, json.dumps(prov))
    if reference_episodes > 0:
        ref_env = ScopegymEnv(env_id, config=config, scenario=scenario, normalize_actions=False)
        rec.set_reference_scores(ref_env.native, int(reference_episodes))
        ref_env.close()
    obs_enc = _spaces.encoder(env.observation_space)
    act_enc = _spaces.encoder(env.action_space)
    env.action_space.seed(seed)
    for i in range(int(episodes)):
        ep_seed = seed + i
        obs, info = env.reset(seed=ep_seed)
        observations = [obs_enc(obs)]
        infos = [info]
        actions, rewards, terms, truncs = [], [], [], []
        while True:
            if policy == "random":
                a = env.action_space.sample()
            elif policy == "heuristic":
                a = env.heuristic_action(obs)
            else:
                a = policy(obs)  # type: ignore[operator]
            flat_a = act_enc(a)
            obs, r, term, trunc, info = env.step(a)
            actions.append(flat_a)
            observations.append(obs_enc(obs))
            rewards.append(float(r))
            terms.append(term)
            truncs.append(trunc)
            infos.append(info)
            if term or trunc:
                break
        rec.write_episode(
            ep_seed,
            np.stack(observations).astype(np.float32, copy=False),
            np.stack(actions).astype(np.float32, copy=False),
            np.asarray(rewards, dtype=np.float64),
            np.asarray(terms, dtype=bool),
            np.asarray(truncs, dtype=bool),
            infos,
        )
    env.close()
    return out


def repair_dataset(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Rebuilds ``path/data/main_data.hdf5`` and the counts in ``metadata.json`` from the
    episode files after a crash (unfinished temporary files are removed; episode files that do
    not read back, or follow a missing one, move to ``path/unlinked/``). Returns
    ``{"episodes", "steps", "removed", "moved"}``."""
    result: dict[str, Any] = json.loads(_native.NativeRecorder.repair(os.fspath(path)))
    return result
