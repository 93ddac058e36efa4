"""The exception hierarchy of scopegym, rooted at :class:`ScopegymError`.

The native module raises these classes: each engine error maps to one, and a Rust panic becomes
:class:`NativePanic` (the interpreter never aborts). Input errors also derive from the matching
built-in exception (``ValueError``, ``LookupError``, ...), so generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
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


class ScopegymError(Exception):
    """Base class of every scopegym error."""


class InvalidAction(ScopegymError, ValueError):
    """An action is not in the action space: NaN/inf, wrong shape or dtype, out-of-range
    discrete value. The message names the offending element and the expected shape."""


class InvalidConfig(ScopegymError, ValueError):
    """A task config or scenario file holds an unknown key or an out-of-range value."""


class UnknownTask(ScopegymError, LookupError):
    """No task is registered under this id."""


class RetiredTask(UnknownTask):
    """The id names a retired version of a task (its dynamics, reward or spaces changed); the
    message names the current ``-vN`` id."""


class ResetNeeded(ScopegymError, RuntimeError):
    """``step`` was called before ``reset`` or after the episode ended."""


class InvalidArgument(ScopegymError, ValueError):
    """An argument is out of range (number of envs, mask length, autoreset mode, ...)."""


class PhysicsError(ScopegymError, RuntimeError):
    """The simulated instrument refused or failed."""


class DatasetError(ScopegymError, OSError):
    """Writing a dataset failed (the folder already holds one, I/O or HDF5 error)."""


class DriverError(ScopegymError, RuntimeError):
    """A real-instrument driver failed (connection, timeout, protocol, recording); a network
    driver tried to make the instrument safe (tip withdrawn, beam blanked) before raising."""


class NativePanic(ScopegymError, RuntimeError):
    """The Rust engine panicked (a bug): the call was abandoned; reset the environment."""
