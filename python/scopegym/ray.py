"""scopegym on Ray: every task as an RLlib environment, stepped by the native vector env.

Ray is optional (``pip install scopegym[ray]``): ``import scopegym`` never imports it, and this
module imports it only inside :func:`register` and :func:`configure`. Typical use::

    from ray.rllib.algorithms.ppo import PPOConfig
    import scopegym.ray

    scopegym.ray.register()                      # tune.register_env for every task id
    config = scopegym.ray.configure(
        PPOConfig().env_runners(num_env_runners=2, num_envs_per_env_runner=4),
        "scopegym/StemDopantSteer-v1",
    )
    algo = config.build_algo()

**Vectorization.** :func:`register` gives RLlib an env creator for each id. RLlib's
``SingleAgentEnvRunner`` builds its environments with ``gymnasium.make_vec`` in the mode
``config.gym_env_vectorize_mode``. In the mode ``"vector_entry_point"`` (what :func:`configure`
sets) RLlib calls the creator once with ``num_envs`` in its config, and the creator returns
scopegym's native vector env (:class:`RayVectorEnv`, a :class:`scopegym.ScopegymVectorEnv`):
one call into Rust per vector step, with the GIL released. In RLlib's default mode ``"sync"``
RLlib calls the creator once per env and steps the single envs one after the other in
Gymnasium's ``SyncVectorEnv`` (slower; the creator warns when it is asked for a second single
env in one process). So ``PPOConfig().environment("scopegym/StemDopantSteer-v1")`` works after
:func:`register`, and adding ``.env_runners(gym_env_vectorize_mode="vector_entry_point")``
(or calling :func:`configure`) makes it step in Rust.

**Spaces.** Observations are the task's own observation space, unchanged (a ``Box`` for most
tasks; ``Dict`` observation tasks need a flattening connector such as RLlib's
``FlattenObservations`` for the default MLP module). ``Box`` actions are normalized to
``[-1, 1]`` exactly as :func:`scopegym.make_vec` does (affinely mapped onto the task's physical
bounds in Rust); RLlib's defaults (``normalize_actions=True``) clip the policy's samples to
``[-1, 1]``, which the map sends onto the physical bounds. Discrete actions are unchanged.

**Seeding.** With ``config.debugging(seed=s)`` RLlib seeds env runner ``w`` (``w = 0`` is the
local runner, ``1..num_env_runners`` the remote ones) with ``s + w`` (plus ``1_000_000`` on
evaluation runners) and resets its vector env once with that seed. :class:`RayVectorEnv` turns
that seed into per-env seeds that never overlap between runners: env ``i`` (``0 <= i < N``,
``N = num_envs_per_env_runner``) of runner ``w`` is seeded

    seed(w, i) = (s + w) * N + i        (evaluation runners: (s + w + 1_000_000) * N + i)

(:func:`env_seed`), so runner ``w``'s first observations are those of
``scopegym.make(id).reset(seed=seed(w, i))``. Later episodes continue each env's own random
stream, so a run is reproducible given ``s``, ``N`` and the number of runners. (RLlib's plain
``s + w + i`` would give runner ``w``'s env ``i + 1`` and runner ``w + 1``'s env ``i`` the same
episodes.) The ``"sync"`` mode keeps RLlib's own ``s + w + i``.

``env_config`` (``config.environment(id, env_config={...})``) takes the keyword arguments of
:func:`scopegym.make_vec`: ``config``, ``scenario``, ``difficulty``, ``split``, and ``threads``
(Rust threads per env runner, default 1: RLlib reserves one CPU per env runner); any other key is
an :class:`scopegym.InvalidArgument` naming it.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import gymnasium as gym

from ._errors import InvalidArgument
from .vector import ScopegymVectorEnv

__all__ = ["register", "configure", "make_env", "env_seed", "RayVectorEnv", "ENV_CONFIG_KEYS", "EVALUATION_SEED_OFFSET"]

#: The keys ``env_config`` may hold (passed on to :func:`scopegym.make_vec` / :func:`scopegym.make`).
ENV_CONFIG_KEYS = ("config", "scenario", "difficulty", "split", "threads")

#: What RLlib adds to an evaluation env runner's seed.
EVALUATION_SEED_OFFSET = 1_000_000

# How many single (non-vector) envs this process has built; the second one triggers a warning.
_single_builds = 0


def env_seed(seed: int, worker_index: int, vector_index: int, num_envs: int, evaluation: bool = False) -> int:
    """The seed of env ``vector_index`` of env runner ``worker_index`` when the algorithm's
    seed is ``seed`` and every runner steps ``num_envs`` envs: ``(seed + worker_index) *
    num_envs + vector_index`` (``seed + worker_index + 1_000_000`` in the parentheses on
    evaluation runners)."""
    for name, value, low in (("seed", seed, 0), ("worker_index", worker_index, 0), ("num_envs", num_envs, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InvalidArgument(f"invalid argument {name}: expected an integer >= {low}, got {value!r}")
    if not isinstance(vector_index, int) or isinstance(vector_index, bool) or not 0 <= vector_index < num_envs:
        raise InvalidArgument(
            f"invalid argument vector_index: expected an integer in [0, {num_envs}), got {vector_index!r}"
        )
    runner_seed = seed + worker_index + (EVALUATION_SEED_OFFSET if evaluation else 0)
    return runner_seed * num_envs + vector_index


class RayVectorEnv(ScopegymVectorEnv):
    """The native vector env as RLlib's env runners use it: a :class:`scopegym.ScopegymVectorEnv`
    whose integer reset seed ``r`` (the env runner's seed) seeds env ``i`` with ``r * num_envs + i``
    (see :func:`env_seed`); a list of seeds or ``None`` passes through unchanged."""

    def reset(
        self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        if isinstance(seed, int) and not isinstance(seed, bool):
            if seed < 0:
                raise InvalidArgument(f"invalid argument seed: must be non-negative, got {seed}")
            seed = seed * self.num_envs
        return super().reset(seed=seed, options=options)


def _env_kwargs(env_id: str, env_config: Mapping[str, Any] | None) -> tuple[dict[str, Any], int | None]:
    if env_config is None:
        env_config = {}
    if not isinstance(env_config, Mapping):
        raise InvalidArgument(f"invalid argument env_config: expected a dict, got {type(env_config).__name__}")
    kwargs = dict(env_config)
    num_envs = kwargs.pop("num_envs", None)
    unknown = sorted(str(k) for k in kwargs if k not in ENV_CONFIG_KEYS)
    if unknown:
        raise InvalidArgument(
            f"invalid argument env_config: unknown key(s) {unknown} for {env_id}; accepted: {', '.join(ENV_CONFIG_KEYS)}"
        )
    return kwargs, num_envs


def make_env(env_id: str, env_config: Mapping[str, Any] | None = None) -> gym.Env[Any, Any] | RayVectorEnv:
    """RLlib's env creator for ``env_id`` (what :func:`register` registers, bound to the id).

    With ``num_envs`` in ``env_config`` (RLlib's ``"vector_entry_point"`` mode) it returns a
    :class:`RayVectorEnv` of that many envs on ``threads`` Rust threads (default 1); without,
    one :func:`scopegym.make` env."""
    global _single_builds
    from . import _check_id, make

    _check_id(env_id)
    kwargs, num_envs = _env_kwargs(env_id, env_config)
    threads = kwargs.pop("threads", 1)
    if num_envs is None:
        _single_builds += 1
        if _single_builds == 2:
            warnings.warn(
                f"scopegym.ray: a second single {env_id} env in this process; if RLlib vectorizes them "
                "(gym_env_vectorize_mode='sync'), set gym_env_vectorize_mode='vector_entry_point' "
                "(scopegym.ray.configure does) to step scopegym's native vector env",
                stacklevel=2,
            )
        return make(env_id, **kwargs)
    if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
        raise InvalidArgument(f"invalid argument num_envs: must be a positive integer, got {num_envs!r}")
    return RayVectorEnv(env_id, num_envs=num_envs, threads=threads, **kwargs)


def _tune() -> Any:
    try:
        return importlib.import_module("ray.tune")
    except ImportError as e:
        raise ImportError("scopegym.ray needs Ray: pip install 'scopegym[ray]'") from e


def register(env_ids: Iterable[str] | None = None) -> list[str]:
    """Registers ``env_ids`` (default: every id in :func:`scopegym.task_ids`) with
    ``ray.tune.register_env``, each with :func:`make_env` bound to its id, and returns them.
    Call it in the driver before building an algorithm or starting a Tune run (Ray ships the
    registry to its workers)."""
    from . import _check_id, task_ids

    tune = _tune()
    if isinstance(env_ids, str):
        raise InvalidArgument(f"invalid argument env_ids: expected a list of task ids, got the string {env_ids!r}")
    ids = task_ids() if env_ids is None else list(env_ids)
    for env_id in ids:
        _check_id(env_id)
    for env_id in ids:
        tune.register_env(env_id, functools.partial(make_env, env_id))
    return ids


def configure(algo_config: Any, env_id: str, env_config: Mapping[str, Any] | None = None) -> Any:
    """``algo_config`` (an RLlib ``AlgorithmConfig``) set to train on ``env_id`` (registered
    first if it is not) with env runners stepping scopegym's native vector env
    (``gym_env_vectorize_mode="vector_entry_point"``); returns the same config object."""
    from . import _check_id

    _check_id(env_id)
    if not hasattr(algo_config, "environment") or not hasattr(algo_config, "env_runners"):
        raise InvalidArgument(
            f"invalid argument algo_config: expected an RLlib AlgorithmConfig, got {type(algo_config).__name__}"
        )
    if env_config is not None and isinstance(env_config, Mapping) and "num_envs" in env_config:
        raise InvalidArgument(
            "invalid argument env_config: num_envs is set by RLlib; use .env_runners(num_envs_per_env_runner=...)"
        )
    _env_kwargs(env_id, env_config)
    register([env_id])
    return algo_config.environment(env_id, env_config=dict(env_config or {})).env_runners(
        gym_env_vectorize_mode=gym.VectorizeMode.VECTOR_ENTRY_POINT
    )
