"""Set-up shared by the Python package's tests."""

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _sb3_logs_in_pytest_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Stable-Baselines3 creates a logger folder (``SB3-<date>``) in the system's temporary
    directory for every training run unless ``SB3_LOGDIR`` names one. The tests point it into
    pytest's own temporary tree, which pytest prunes, so CI runs leave nothing in ``/tmp``."""
    patch = pytest.MonkeyPatch()
    patch.setenv("SB3_LOGDIR", str(tmp_path_factory.mktemp("sb3-logs")))
    yield
    patch.undo()
