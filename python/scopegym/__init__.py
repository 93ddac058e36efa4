"""scopegym: microscopy simulation environments (STEM, AFM, STM, PFM) for reinforcement
learning, on a Rust engine.

``import scopegym`` registers every task with Gymnasium::

    import gymnasium as gym
    import scopegym

    env = gym.make("scopegym/StemDopantSteer-v1")
    obs, info = env.reset(seed=0)
    envs = gym.make_vec("scopegym/StemDopantSteer-v1", num_envs=16)  # native Rust vector env
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym

from . import _native, bo
from ._errors import (
    DatasetError,
    DriverError,
    InvalidAction,
    InvalidArgument,
    InvalidConfig,
    NativePanic,
    PhysicsError,
    ResetNeeded,
    RetiredTask,
    ScopegymError,
    UnknownTask,
)
from .env import ScopegymEnv, config_json, level_config
from .record import record
from .vector import ScopegymVectorEnv

__version__: str = _native.__version__

__all__ = [
    "ScopegymEnv",
    "ScopegymVectorEnv",
    "make",
    "make_vec",
    "bo",
    "record",
    "task_ids",
    "ScopegymError",
    "InvalidAction",
    "InvalidConfig",
    "UnknownTask",
    "RetiredTask",
    "ResetNeeded",
    "InvalidArgument",
    "PhysicsError",
    "DatasetError",
    "DriverError",
    "NativePanic",
]


_SPECS = _native.task_specs()


def task_ids() -> list[str]:
    """The registered task ids."""
    return [t[0] for t in _SPECS]


_RETIRED = {old: (new, why) for old, new, why in _native.retired_tasks()}


def _check_id(env_id: str) -> None:
    if env_id in _RETIRED:
        new, why = _RETIRED[env_id]
        raise RetiredTask(f"task id {env_id!r} is retired: use {new!r} ({why})")
    if env_id not in task_ids():
        raise UnknownTask(f"unknown task id {env_id!r}; registered: {', '.join(task_ids())}")


def make(env_id: str, **kwargs: Any) -> gym.Env[Any, Any]:
    """``gymnasium.make(env_id, **kwargs)`` for a scopegym task (raises :class:`UnknownTask`
    for an unknown id), with Gymnasium's time limit set to the configured task's own (a config
    may change ``max_steps`` or a budget)."""
    _check_id(env_id)
    if "max_episode_steps" not in kwargs:
        keys = ("config", "scenario", "difficulty", "split")
        probe = _native.NativeEnv(
            env_id,
            config_json(level_config(kwargs.get("config"), kwargs.get("difficulty"), kwargs.get("split"))),
            None if kwargs.get("scenario") is None else os.fspath(kwargs["scenario"]),
        ) if any(kwargs.get(k) is not None for k in keys) else None
        if probe is not None:
            kwargs["max_episode_steps"] = probe.max_episode_steps
    return gym.make(env_id, **kwargs)


def make_vec(
    env_id: str,
    num_envs: int = 1,
    *,
    autoreset_mode: str | gym.vector.AutoresetMode = gym.vector.AutoresetMode.NEXT_STEP,
    threads: int | None = None,
    config: dict[str, Any] | None = None,
    scenario: str | os.PathLike[str] | None = None,
    render_mode: str | None = None,
    normalize_actions: bool = True,
    difficulty: str | None = None,
    split: str | None = None,
) -> ScopegymVectorEnv:
    """The native Rust vector env of ``num_envs`` copies of ``env_id`` (what
    ``gymnasium.make_vec(env_id, num_envs, vectorization_mode="vector_entry_point")``
    returns, without Gymnasium's spec bookkeeping), stepped on ``threads`` threads (default:
    every core)."""
    _check_id(env_id)
    return ScopegymVectorEnv(
        env_id,
        num_envs=num_envs,
        render_mode=render_mode,
        config=config,
        scenario=scenario,
        autoreset_mode=autoreset_mode,
        threads=threads,
        normalize_actions=normalize_actions,
        difficulty=difficulty,
        split=split,
    )


def _register() -> None:
    for env_id, _instrument, _description, max_steps in _SPECS:
        if env_id in gym.registry:
            continue
        gym.register(
            id=env_id,
            entry_point="scopegym.env:ScopegymEnv",
            vector_entry_point="scopegym.vector:ScopegymVectorEnv",
            kwargs={"task_id": env_id},
            # The engine truncates at the same step (Gymnasium's TimeLimit is then a no-op that
            # gives env.spec.max_episode_steps); scopegym.make sets it for configs that change it.
            max_episode_steps=max_steps,
        )


_register()
