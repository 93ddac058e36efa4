"""Each task as a :class:`gymnasium.Env`: a thin Python shell over the Rust environment."""

from __future__ import annotations

import json
import os
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np

from . import _native, _spaces
from ._errors import InvalidArgument, ResetNeeded

__all__ = ["ScopegymEnv", "config_json", "level_config", "RESET_OPTIONS"]

RENDER_FPS = 4

#: The keys ``reset(options=...)`` accepts: the task's difficulty level and parameter split.
RESET_OPTIONS = ("difficulty", "split")


def level_config(
    config: dict[str, Any] | None, difficulty: str | None = None, split: str | None = None
) -> dict[str, Any] | None:
    """``config`` with ``difficulty`` and ``split`` set where given (``None``: unchanged)."""
    if difficulty is None and split is None:
        return config
    if config is not None and not isinstance(config, dict):
        raise InvalidArgument(f"invalid argument config: expected a dict, got {type(config).__name__}")
    out = dict(config or {})
    if difficulty is not None:
        out["difficulty"] = difficulty
    if split is not None:
        out["split"] = split
    return out


def check_reset_options(options: dict[str, Any] | None, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The level options in ``options`` (``difficulty``, ``split``); any other key than those and
    ``extra`` is an :class:`InvalidArgument` naming it."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidArgument(f"invalid argument options: expected a dict, got {type(options).__name__}")
    unknown = sorted(str(k) for k in options if k not in RESET_OPTIONS and k not in extra)
    if unknown:
        raise InvalidArgument(
            f"invalid argument options: unknown key(s) {unknown}; accepted: {', '.join(RESET_OPTIONS + extra)}"
        )
    return {k: options[k] for k in RESET_OPTIONS if k in options}


def config_json(config: dict[str, Any] | None) -> str | None:
    """The task config as JSON for the native module (``None``: the task's defaults)."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise InvalidArgument(f"invalid argument config: expected a dict, got {type(config).__name__}")
    return json.dumps(config)


class ScopegymEnv(gym.Env[Any, Any]):
    """A scopegym task. Build it with ``gymnasium.make("scopegym/<Task>-v1", config={...},
    scenario="file.toml", difficulty="medium", split="train", render_mode="rgb_array")``.

    ``difficulty`` (``"easy"``, ``"medium"``, ``"hard"``) picks the task's domain-randomization
    ranges and ``split`` (``"train"``, ``"test"``) the disjoint parameter bands episodes draw
    from (held-out evaluation); both may also change at ``reset(options={"difficulty": ...,
    "split": ...})``, which rebuilds the task (pass a seed to reproduce the episodes).

    The Rust engine enforces the task's time limit (``truncated=True`` after
    ``max_episode_steps``), checks actions (:class:`scopegym.InvalidAction`) and seeds itself
    from ``reset(seed=...)``. ``config`` is merged over the scenario file's ``[task]`` table (or
    its whole content when it has none).

    Box action spaces with finite bounds are exposed normalized to ``[-1, 1]`` (mapped
    affinely onto the task's physical bounds, ``physical_action_space``), as Gymnasium's
    checker and Stable-Baselines3 recommend; ``normalize_actions=False`` exposes the physical
    space instead.

    ``driver`` runs the task on an instrument instead of its bare simulator, behind the safety
    guard: ``"sim"`` (the simulator, guarded), ``"nanonis://HOST:PORT"``,
    ``"stem-gateway://HOST:PORT"`` or ``"replay:FILE"``. ``limits`` is a limits TOML file
    (required for real instruments), ``dry_run`` checks and logs every command but sends none
    that changes the instrument, ``audit_log`` appends a JSON line per command, and
    ``watchdog`` (seconds) makes the instrument safe when no step comes for that long. A
    command outside the limits is never sent: the step ends the episode (``terminated``,
    reward 0) with ``info["refused"]``, ``info["refused_limit"]`` and
    ``info["refused_reason"]``. ``close()`` makes the instrument safe.
    """

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": RENDER_FPS}

    def __init__(
        self,
        task_id: str,
        render_mode: str | None = None,
        config: dict[str, Any] | None = None,
        scenario: str | os.PathLike[str] | None = None,
        normalize_actions: bool = True,
        difficulty: str | None = None,
        split: str | None = None,
        driver: str | None = None,
        limits: str | os.PathLike[str] | None = None,
        dry_run: bool = False,
        audit_log: str | os.PathLike[str] | None = None,
        watchdog: float | None = None,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise InvalidArgument(
                f"invalid argument render_mode: expected one of {self.metadata['render_modes']} or None, got {render_mode!r}"
            )
        config = level_config(config, difficulty, split)
        self._scenario = None if scenario is None else os.fspath(scenario)
        self._config = config
        self._driver: dict[str, Any] = {}
        if driver is not None:
            self._driver = {
                "driver": driver,
                "limits": None if limits is None else os.fspath(limits),
                "dry_run": bool(dry_run),
                "audit_log": None if audit_log is None else os.fspath(audit_log),
                "watchdog": watchdog,
            }
        elif limits is not None or dry_run or audit_log is not None or watchdog is not None:
            raise InvalidArgument("invalid argument driver: limits, dry_run, audit_log and watchdog need a driver")
        self._native: _native.NativeEnv | None = _native.NativeEnv(
            task_id, config_json(config), self._scenario, **self._driver
        )
        self.task_id = task_id
        self.render_mode = render_mode
        self.observation_space = _spaces.from_json(self._native.observation_space_json)
        physical = _spaces.from_json(self._native.action_space_json)
        self._scale = _spaces.ActionScale(physical) if normalize_actions and _spaces.ActionScale.needed(physical) else None  # type: ignore[arg-type]
        self.physical_action_space = physical
        self.action_space = physical if self._scale is None else self._scale.normalized
        self.max_episode_steps: int = self._native.max_episode_steps
        registered = gym.registry.get(task_id)
        if registered is not None and (registered.max_episode_steps or 0) < self.max_episode_steps:
            gym.logger.warn(
                f"{task_id}: this config runs {self.max_episode_steps} steps per episode, more than the "
                f"registered {registered.max_episode_steps}; pass max_episode_steps={self.max_episode_steps} "
                "to gymnasium.make (or use scopegym.make, which does)"
            )
        self._decode = _spaces.decoder(self.observation_space)
        enc = _spaces.encoder(self.action_space)
        scale = self._scale
        self._encode = enc if scale is None else (lambda a: scale.to_physical(enc(a)))
        self._obs_encode = _spaces.encoder(self.observation_space)

    @property
    def native(self) -> _native.NativeEnv:
        """The native environment (raises :class:`scopegym.ResetNeeded` after ``close``)."""
        if self._native is None:
            raise ResetNeeded(f"{self.task_id}: the environment is closed")
        return self._native

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None and seed < 0:
            raise InvalidArgument(f"invalid argument seed: must be non-negative, got {seed}")
        level = check_reset_options(options)
        if level and level_config(self._config, **level) != self._config:
            config = level_config(self._config, **level)
            if self._driver:
                raise InvalidArgument(
                    "invalid argument options: difficulty and split select simulator parameters; "
                    "make a new env to change them on a driver"
                )
            rebuilt = _native.NativeEnv(self.task_id, config_json(config), self._scenario)
            if (rebuilt.observation_space_json, rebuilt.action_space_json) != (
                self.native.observation_space_json,
                self.native.action_space_json,
            ):
                raise InvalidArgument(f"invalid argument options: {level} changes the task's spaces; make a new env")
            self._native, self._config = rebuilt, config
        obs, info = self.native.reset(seed)
        return self._decode(obs), info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.native.step(self._encode(action))
        return self._decode(obs), reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:  # type: ignore[override]
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; make the env with render_mode='rgb_array'")
            return None
        return self.native.render()

    def heuristic_action(self, obs: Any) -> Any:
        """The task's expert rule of thumb for ``obs``."""
        flat = self.native.heuristic_action(self._obs_encode(obs))
        if self._scale is not None:
            flat = self._scale.to_normalized(flat)
        return _spaces.decoder(self.action_space)(flat)

    def close(self) -> None:
        self._native = None
        super().close()
