"""Type stubs of the extension module ``scopegym._native`` (the Rust engine's bindings)."""

from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any, final

import numpy as np
import numpy.typing as npt

__all__ = ["__version__", "task_specs", "retired_tasks", "_panic_for_test", "NativeEnv", "NativeVectorEnv", "NativeRecorder", "BayesOpt", "StemSim"]

__version__: str

def task_specs() -> list[tuple[str, str, str, int]]:
    """The registered tasks as ``(id, instrument, description)``."""

def retired_tasks() -> list[tuple[str, str, str]]:
    """The retired task ids as ``(old id, current id, what changed)``."""

def _panic_for_test() -> None:
    """Panics inside the engine's guard (raises ``NativePanic``)."""

@final
class NativeEnv:
    """One environment; observations and actions cross as flat float32 arrays."""

    def __new__(
        cls,
        env_id: str,
        config_json: str | None = None,
        scenario: str | PathLike[str] | None = None,
        driver: str | None = None,
        limits: str | PathLike[str] | None = None,
        dry_run: bool = False,
        audit_log: str | PathLike[str] | None = None,
        watchdog: float | None = None,
    ) -> NativeEnv: ...
    @property
    def id(self) -> str: ...
    @property
    def observation_space_json(self) -> str: ...
    @property
    def action_space_json(self) -> str: ...
    @property
    def max_episode_steps(self) -> int: ...
    def reset(self, seed: int | None = None) -> tuple[npt.NDArray[np.float32], dict[str, object]]: ...
    def step(
        self, action: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], float, bool, bool, dict[str, object]]: ...
    def render(self) -> npt.NDArray[np.uint8]: ...
    def heuristic_action(self, obs: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...

@final
class NativeVectorEnv:
    """The engine's vector env: one native call per vector step, without the GIL."""

    def __new__(
        cls,
        env_id: str,
        num_envs: int,
        config_json: str | None = None,
        scenario: str | PathLike[str] | None = None,
        autoreset_mode: str = "NextStep",
        threads: int = 1,
    ) -> NativeVectorEnv: ...
    @property
    def num_envs(self) -> int: ...
    @property
    def autoreset_mode(self) -> str: ...
    @property
    def action_len(self) -> int: ...
    @property
    def observation_space_json(self) -> str: ...
    @property
    def action_space_json(self) -> str: ...
    @property
    def max_episode_steps(self) -> int: ...
    def set_action_scale(
        self, low: npt.NDArray[np.float32] | None = None, half: npt.NDArray[np.float32] | None = None
    ) -> None: ...
    def reset(
        self, seed: int | None = None, mask: npt.NDArray[np.bool_] | None = None
    ) -> tuple[
        npt.NDArray[np.float32],
        npt.NDArray[np.float64],
        npt.NDArray[np.bool_],
        npt.NDArray[np.bool_],
        dict[str, npt.NDArray[np.generic]],
    ]: ...
    def step(
        self, actions: npt.NDArray[np.float32]
    ) -> tuple[
        npt.NDArray[np.float32],
        npt.NDArray[np.float64],
        npt.NDArray[np.bool_],
        npt.NDArray[np.bool_],
        dict[str, npt.NDArray[np.generic]],
    ]: ...
    def render(self, i: int) -> npt.NDArray[np.uint8]: ...

@final
class NativeRecorder:
    """The engine's Minari-compatible dataset writer."""

    def __new__(cls, dir: str | PathLike[str], dataset_id: str, env: NativeEnv, provenance_json: str) -> NativeRecorder: ...
    @property
    def episodes(self) -> int: ...
    @property
    def metadata_json(self) -> str: ...
    def set_reference_scores(self, env: NativeEnv, episodes: int) -> None: ...
    def write_episode(
        self,
        seed: int,
        observations: npt.NDArray[np.float32],
        actions: npt.NDArray[np.float32],
        rewards: npt.NDArray[np.float64],
        terminations: npt.NDArray[np.bool_],
        truncations: npt.NDArray[np.bool_],
        infos: Sequence[Mapping[str, object]] | None = None,
    ) -> None: ...
    @staticmethod
    def repair(dir: str | PathLike[str]) -> str: ...

@final
class BayesOpt:
    """The Rust ask/tell Bayesian optimizer (maximizes; see :func:`scopegym.bo.minimize`)."""

    def __new__(
        cls,
        bounds: Sequence[tuple[float, float]],
        n_initial: int,
        acquisition: str,
        seed: int,
        kernel: str,
        xi: float,
        beta: float,
    ) -> BayesOpt: ...
    def ask(self) -> list[float]: ...
    def tell(self, x: Sequence[float], y: float) -> None: ...
    @property
    def n_observations(self) -> int: ...

@final
class StemSim:
    """The bare STEM simulator a task runs on (for the reference STEM gateway,
    ``drivers/python/stem_gateway.py``); methods mirror the gateway protocol. A
    ``PhysicsError`` it raises has a ``kind`` attribute: ``"refused"``, ``"invalid_argument"``,
    ``"invalid_parameter"`` or ``"invalid_quantity"``."""

    def __new__(cls, task_id: str, config_json: str | None = None, scenario: str | PathLike[str] | None = None) -> StemSim: ...
    def info(self) -> tuple[str, bool]: ...
    def clock(self) -> float: ...
    def beam_energy(self) -> float: ...
    def beam_current(self) -> float: ...
    def scan(self) -> dict[str, Any]: ...
    def configure_scan(
        self,
        rows: int,
        cols: int,
        pixel_size: float,
        dwell_time: float,
        flyback_time: float,
        center: tuple[float, float],
    ) -> dict[str, Any]: ...
    def acquire_frame(self) -> tuple[npt.NDArray[np.float32], dict[str, Any]]: ...
    def probe_position(self) -> tuple[float, float]: ...
    def move_probe(self, x: float, y: float) -> None: ...
    def acquire_point(self, dwell_time: float) -> float: ...
    def acquire_spectrum(self, exposure: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32]]: ...
    def aberrations(self) -> dict[str, float]: ...
    def set_aberrations(self, values: Mapping[str, float]) -> dict[str, float]: ...
    def blanked(self) -> bool: ...
    def set_blanked(self, blanked: bool) -> None: ...
    def make_safe(self) -> None: ...
    def start_episode(self, seed: int) -> dict[str, float]: ...
