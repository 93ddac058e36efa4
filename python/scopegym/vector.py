"""The native Rust vector env as a :class:`gymnasium.vector.VectorEnv`."""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from . import _native, _spaces
from ._errors import InvalidArgument, ResetNeeded
from .env import RENDER_FPS, check_reset_options, config_json, level_config

__all__ = ["ScopegymVectorEnv"]

_MODES = {
    "NextStep": AutoresetMode.NEXT_STEP,
    "SameStep": AutoresetMode.SAME_STEP,
    "Disabled": AutoresetMode.DISABLED,
    AutoresetMode.NEXT_STEP: AutoresetMode.NEXT_STEP,
    AutoresetMode.SAME_STEP: AutoresetMode.SAME_STEP,
    AutoresetMode.DISABLED: AutoresetMode.DISABLED,
    "next_step": AutoresetMode.NEXT_STEP,
    "same_step": AutoresetMode.SAME_STEP,
    "disabled": AutoresetMode.DISABLED,
}
_NATIVE_NAME = {
    AutoresetMode.NEXT_STEP: "NextStep",
    AutoresetMode.SAME_STEP: "SameStep",
    AutoresetMode.DISABLED: "Disabled",
}


class ScopegymVectorEnv(VectorEnv[Any, Any, Any]):
    """``num_envs`` copies of a task stepped by the Rust engine: one native call per vector
    step, with the GIL released, on ``threads`` threads (default: every core); observations come back as NumPy arrays the engine wrote into
    directly (float32 Box observations without any further copy). Env ``i`` is seeded
    ``seed + i``. Box actions are normalized to ``[-1, 1]`` as in :class:`scopegym.ScopegymEnv`
    (``normalize_actions=False``: physical units). Build it with ``gymnasium.make_vec(id, num_envs=N)`` or
    :func:`scopegym.make_vec`.
    """

    metadata: dict[str, Any] = {
        "render_modes": ["rgb_array"],
        "render_fps": RENDER_FPS,
        "autoreset_mode": AutoresetMode.NEXT_STEP,
    }

    def __init__(
        self,
        task_id: str,
        num_envs: int = 1,
        render_mode: str | None = None,
        config: dict[str, Any] | None = None,
        scenario: str | os.PathLike[str] | None = None,
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        threads: int | None = None,
        max_episode_steps: int | None = None,
        normalize_actions: bool = True,
        difficulty: str | None = None,
        split: str | None = None,
    ) -> None:
        mode = _MODES.get(autoreset_mode)  # type: ignore[call-overload]
        if mode is None:
            raise InvalidArgument(
                f"invalid argument autoreset_mode: expected NextStep, SameStep or Disabled, got {autoreset_mode!r}"
            )
        if render_mode is not None and render_mode != "rgb_array":
            raise InvalidArgument(f"invalid argument render_mode: expected 'rgb_array' or None, got {render_mode!r}")
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise InvalidArgument(f"invalid argument num_envs: must be a positive integer, got {num_envs!r}")
        if threads is None:
            threads = os.cpu_count() or 1
        if not isinstance(threads, (int, np.integer)) or threads < 1:
            raise InvalidArgument(f"invalid argument threads: must be a positive integer, got {threads!r}")
        config = level_config(config, difficulty, split)
        self._build = (task_id, int(num_envs), None if scenario is None else os.fspath(scenario), _NATIVE_NAME[mode], int(threads))
        self._config = config
        self._native: _native.NativeVectorEnv | None = self._make_native(config)
        self.task_id = task_id
        self.num_envs = int(num_envs)
        self.render_mode = render_mode
        self.metadata = {**type(self).metadata, "autoreset_mode": mode}
        self.single_observation_space = _spaces.from_json(self._native.observation_space_json)
        physical = _spaces.from_json(self._native.action_space_json)
        scale = _spaces.ActionScale(physical) if normalize_actions and _spaces.ActionScale.needed(physical) else None  # type: ignore[arg-type]
        self.single_physical_action_space = physical
        self.single_action_space = physical if scale is None else scale.normalized
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.max_episode_steps: int = self._native.max_episode_steps
        registered = gym.registry.get(task_id)
        default_steps = None if registered is None else registered.max_episode_steps
        if max_episode_steps is not None and max_episode_steps not in (self.max_episode_steps, default_steps):
            raise InvalidArgument(
                f"invalid argument max_episode_steps: the task truncates after {self.max_episode_steps} steps; "
                "set its time limit through config"
            )
        self._decode = _spaces.decoder(self.single_observation_space)
        # Normalized actions are mapped to physical ones natively (the same float32 arithmetic
        # as ActionScale.to_physical), saving NumPy temporaries on every step.
        self._encode = _spaces.encoder(self.single_action_space, self.num_envs)
        self._scale = scale
        if scale is not None:
            self._native.set_action_scale(scale.low, scale.half)
        self._obs_len = _spaces.flat_len(self.single_observation_space)

    def _make_native(self, config: dict[str, Any] | None) -> _native.NativeVectorEnv:
        task_id, num_envs, scenario, mode, threads = self._build
        return _native.NativeVectorEnv(task_id, num_envs, config_json(config), scenario, mode, threads)

    @property
    def native(self) -> _native.NativeVectorEnv:
        """The native vector env (raises :class:`scopegym.ResetNeeded` after ``close``)."""
        if self._native is None:
            raise ResetNeeded(f"{self.task_id}: the vector environment is closed")
        return self._native

    def _infos(self, infos: dict[str, Any]) -> dict[str, Any]:
        if "final_obs" not in infos and not any(k.startswith("final_info.") for k in infos):
            return infos
        out: dict[str, Any] = {}
        final: dict[str, Any] = {}
        for k, v in infos.items():
            if k == "final_obs":
                obs = np.empty(self.num_envs, dtype=object)
                for i, f in enumerate(v):
                    if f is not None:
                        obs[i] = self._decode(np.asarray(f, dtype=np.float32))
                out["final_obs"] = obs
            elif k.startswith("final_info."):
                final[k[len("final_info.") :]] = v
            elif k.startswith("_final_info."):
                final["_" + k[len("_final_info.") :]] = v
            else:
                out[k] = v
        if "final_obs" in out:
            out["final_info"] = final
            out["_final_info"] = out["_final_obs"]
        return out

    def reset(
        self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        mask = None
        level = check_reset_options(options, extra=("reset_mask",))
        if level and level_config(self._config, **level) != self._config:
            config = level_config(self._config, **level)
            rebuilt = self._make_native(config)
            if (rebuilt.observation_space_json, rebuilt.action_space_json) != (
                self.native.observation_space_json,
                self.native.action_space_json,
            ):
                raise InvalidArgument(f"invalid argument options: {level} changes the task's spaces; make a new env")
            if self._scale is not None:
                rebuilt.set_action_scale(self._scale.low, self._scale.half)
            self._native, self._config = rebuilt, config
        if options is not None and "reset_mask" in options:
            mask = np.ascontiguousarray(options["reset_mask"], dtype=bool)
            if mask.shape != (self.num_envs,):
                raise InvalidArgument(
                    f"invalid argument reset_mask: expected shape ({self.num_envs},), got {mask.shape}"
                )
        if isinstance(seed, (list, tuple)):
            if len(seed) != self.num_envs:
                raise InvalidArgument(f"invalid argument seed: expected {self.num_envs} seeds, got {len(seed)}")
            # Env i gets base + i: reset each env on its own with base = seed_i - i.
            result = None
            for i, s in enumerate(seed):
                if mask is not None and not mask[i]:
                    continue
                m = np.zeros(self.num_envs, dtype=bool)
                m[i] = True
                result = self.native.reset(None if s is None else (int(s) - i) % 2**64, m)
            if result is None:
                result = self.native.reset(None, np.zeros(self.num_envs, dtype=bool))
            obs, _, _, _, infos = result
        else:
            if seed is not None and seed < 0:
                raise InvalidArgument(f"invalid argument seed: must be non-negative, got {seed}")
            obs, _, _, _, infos = self.native.reset(seed, mask)
        return self._decode(obs), self._infos(infos)

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        obs, rewards, terminated, truncated, infos = self.native.step(self._encode(actions))
        if self.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP:
            infos = self._infos(infos)
        return self._decode(obs), rewards, terminated, truncated, infos

    def render(self) -> tuple[np.ndarray, ...] | None:  # type: ignore[override]
        if self.render_mode is None:
            return None
        return tuple(self.native.render(i) for i in range(self.num_envs))

    def close_extras(self, **kwargs: Any) -> None:
        self._native = None
