"""Gymnasium spaces from the engine's JSON, and the flat float32 form the engine exchanges."""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
from gymnasium import spaces

from ._errors import InvalidAction

__all__ = ["from_json", "decoder", "encoder", "flat_len"]


def _bound(v: Any) -> float:
    if isinstance(v, str):
        return float(v)  # "inf" / "-inf"
    return float(v)


def from_json(text: str | dict[str, Any]) -> spaces.Space[Any]:
    """The Gymnasium space of the engine's JSON (Dict subspaces as ordered pairs)."""
    d = json.loads(text) if isinstance(text, str) else text
    t = d["type"]
    if t == "Box":
        dtype = np.dtype(d["dtype"])
        shape = tuple(d["shape"])
        low = np.array([_bound(v) for v in d["low"]], dtype=np.float64).reshape(shape)
        high = np.array([_bound(v) for v in d["high"]], dtype=np.float64).reshape(shape)
        return spaces.Box(low=low.astype(dtype), high=high.astype(dtype), shape=shape, dtype=dtype)
    if t == "Discrete":
        return spaces.Discrete(int(d["n"]), start=int(d.get("start", 0)))
    if t == "MultiDiscrete":
        return spaces.MultiDiscrete(np.array(d["nvec"], dtype=np.int64))
    if t == "MultiBinary":
        return spaces.MultiBinary(int(d["n"]))
    if t == "Dict":
        sub = d["subspaces"]
        pairs = sub if isinstance(sub, list) else list(sub.items())
        return spaces.Dict([(k, from_json(v)) for k, v in pairs])
    raise ValueError(f"unknown space type {t!r}")


def flat_len(space: spaces.Space[Any]) -> int:
    """Number of float32 values of one flattened element."""
    if isinstance(space, spaces.Box):
        return int(np.prod(space.shape, dtype=np.int64))
    if isinstance(space, spaces.Discrete):
        return 1
    if isinstance(space, spaces.MultiDiscrete):
        return int(space.nvec.size)
    if isinstance(space, spaces.MultiBinary):
        return int(np.prod(space.shape, dtype=np.int64))
    if isinstance(space, spaces.Dict):
        return sum(flat_len(s) for s in space.spaces.values())
    raise TypeError(f"unsupported space {space}")


Decoder = Callable[[np.ndarray], Any]


def decoder(space: spaces.Space[Any]) -> Decoder:
    """A function from flat float32 values ``(*batch, flat_len)`` to elements of ``space``
    (batched when ``batch`` is not empty); float32 Boxes come out as views, without copying."""
    if isinstance(space, spaces.Box):
        shape = space.shape
        if space.dtype == np.float32:
            return lambda f: f.reshape(f.shape[:-1] + shape)
        dt = space.dtype
        return lambda f: f.reshape(f.shape[:-1] + shape).astype(dt)
    if isinstance(space, spaces.Discrete):
        return lambda f: f[..., 0].astype(np.int64) if f.ndim > 1 else np.int64(f[0])
    if isinstance(space, (spaces.MultiDiscrete, spaces.MultiBinary)):
        dt = space.dtype
        return lambda f: f.astype(dt)
    if isinstance(space, spaces.Dict):
        parts = []
        k = 0
        for key, s in space.spaces.items():
            n = flat_len(s)
            parts.append((key, k, k + n, decoder(s)))
            k += n
        return lambda f: {key: dec(f[..., a:b]) for key, a, b, dec in parts}
    raise TypeError(f"unsupported space {space}")


def _as_numeric(x: Any, field: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "biuf":
        raise InvalidAction(f"invalid action: {field}: expected a real number array, got dtype {a.dtype}")
    return a


def encoder(space: spaces.Space[Any], batch: int | None = None) -> Callable[[Any], np.ndarray]:
    """A function from actions (one, or ``batch`` of them) to flat contiguous float32 values
    ``(batch, flat_len)`` (or ``(flat_len,)``); wrong dtypes and shapes raise
    :class:`InvalidAction` (a ``ValueError``) naming the expected shape."""
    pre: tuple[int, ...] = () if batch is None else (batch,)
    name = "action" if batch is None else "actions"

    def expect(a: np.ndarray, shape: tuple[int, ...], field: str) -> None:
        if a.shape != shape:
            raise InvalidAction(f"invalid action: {field}: expected shape {shape}, got {a.shape}")

    if isinstance(space, spaces.Box):
        shape = pre + space.shape
        n = flat_len(space)

        def enc_box(x: Any, field: str = name) -> np.ndarray:
            if type(x) is np.ndarray and x.dtype == np.float32 and x.shape == shape and x.flags.c_contiguous:
                return x.reshape(pre + (n,))
            a = _as_numeric(x, field)
            expect(a, shape, field)
            return np.ascontiguousarray(a, dtype=np.float32).reshape(pre + (n,))

        return enc_box
    if isinstance(space, (spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)):
        shape = pre + (() if isinstance(space, spaces.Discrete) else tuple(space.shape))
        n = flat_len(space)

        def enc_int(x: Any, field: str = name) -> np.ndarray:
            a = _as_numeric(x, field)
            if a.dtype.kind == "f":
                if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
                    raise InvalidAction(f"invalid action: {field}: expected whole numbers of shape {shape}, got {a}")
            expect(a, shape, field)
            return np.ascontiguousarray(a, dtype=np.float32).reshape(pre + (n,))

        return enc_int
    if isinstance(space, spaces.Dict):
        subs = [(k, encoder(s, batch)) for k, s in space.spaces.items()]

        def enc_dict(x: Any, field: str = name) -> np.ndarray:
            if not isinstance(x, dict) or set(x) != {k for k, _ in subs}:
                raise InvalidAction(f"invalid action: {field}: expected a dict with keys {[k for k, _ in subs]}")
            return np.concatenate([e(x[k], f"{field}.{k}") for k, e in subs], axis=-1)  # type: ignore[call-arg]

        return enc_dict
    raise TypeError(f"unsupported space {space}")


class ActionScale:
    """The affine map from a normalized ``[-1, 1]`` float32 Box action space to a task's
    physical Box (``low + (a + 1) * (high - low) / 2``), for Box action spaces with finite
    bounds other than ``[-1, 1]`` (as Gymnasium's checker and Stable-Baselines3 recommend)."""

    def __init__(self, space: spaces.Box) -> None:
        self.physical = space
        self.low = np.ascontiguousarray(space.low, dtype=np.float32).reshape(-1)
        self.half = (np.ascontiguousarray(space.high, dtype=np.float32).reshape(-1) - self.low) / np.float32(2)
        self.normalized = spaces.Box(-1.0, 1.0, shape=space.shape, dtype=np.float32)

    @staticmethod
    def needed(space: spaces.Space[Any]) -> bool:
        """Whether ``space`` is a float32 Box with finite bounds other than ``[-1, 1]``."""
        return (
            isinstance(space, spaces.Box)
            and space.dtype == np.float32
            and bool(np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high)))
            and not (np.all(space.low == -1.0) and np.all(space.high == 1.0))
        )

    def to_physical(self, flat: np.ndarray) -> np.ndarray:
        """Flat normalized actions ``(..., n)`` to physical ones."""
        return (flat + np.float32(1)) * self.half + self.low

    def to_normalized(self, flat: np.ndarray) -> np.ndarray:
        """Flat physical actions ``(..., n)`` to normalized ones."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.half > 0, (flat - self.low) / self.half - np.float32(1), np.float32(0)).astype(np.float32)
