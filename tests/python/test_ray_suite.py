"""`scopegym suite --ray` and `scopegym run --ray`: the (task, agent, seed) jobs as Ray tasks on
a local Ray with 2 CPUs (started by the command's driver), with the same results as without
Ray, a Ray worker killed mid-job, and resuming from the output folder.

The binary comes from $SCOPEGYM_BIN (scripts/test.sh: the debug build); the driver runs on
this Python ($SCOPEGYM_PYTHON). Every command is bounded by a timeout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("SCOPEGYM_BIN", str(ROOT / "target" / "debug" / "scopegym"))
ENV = {**os.environ, "SCOPEGYM_PYTHON": sys.executable}
# Two tasks whose jobs take a few seconds each in a debug build; random, heuristic and raster;
# 2 seeds: 12 jobs.
SUITE = ["suite", "--budget", "small", "--tasks", "PfmDomainWriting,SpmTipConditioning", "--agents", "raster", "--seeds", "2"]
JOBS = 2 * 3 * 2
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs Ray: pip install 'scopegym[ray]'")


def cli(args: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=timeout, env=env or ENV)


def records(out: Path) -> list[Path]:
    return sorted(p for p in (out / "jobs").glob("*.json") if not p.name.endswith(".spec.json"))


@pytest.fixture(scope="module")
def local_suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The suite run without Ray (no Python involved)."""
    out = tmp_path_factory.mktemp("local")
    r = cli([*SUITE, "--out", str(out)], timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(records(out)) == JOBS
    return out


def job_processes() -> list[tuple[int, int, str]]:
    """(pid, parent pid, spec path) of every running `scopegym job` process."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if len(argv) > 2 and argv[0].decode() == os.path.realpath(BIN) and argv[1] == b"job":
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            found.append((int(d.name), ppid, argv[2].decode()))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@needs_ray
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker in /proc")
def test_suite_on_ray_survives_a_killed_worker_and_equals_the_local_run(local_suite: Path, tmp_path: Path) -> None:
    """While `suite --ray local --ray-cpus 2` runs, the Ray worker running the first job seen is
    killed (SIGKILL). The suite still finishes with all 12 job records, and its suite.json is
    byte for byte the one of the run without Ray (the same per-seed results, scores and
    intervals)."""
    out = tmp_path / "ray"
    proc = subprocess.Popen(
        [BIN, *SUITE, "--ray", "local", "--ray-cpus", "2", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    killed: tuple[int, int, str] | None = None
    name = ""
    try:
        deadline = time.monotonic() + 120
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            for job in job_processes():
                try:
                    spec = json.loads(Path(job[2]).read_text())
                except (OSError, ValueError):
                    continue
                name = f"{spec['env_id'].removeprefix('scopegym/')}.{spec['agent']}.seed{spec['seed']}"
                killed = job
                os.kill(job[1], signal.SIGKILL)
                break
            time.sleep(0.02)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "no job process was seen"
    print(stderr)
    assert proc.returncode == 0, stderr
    job_pid, worker_pid, _ = killed
    time.sleep(0.5)
    assert not alive(worker_pid)
    # The job's own process died with its worker (parent-death signal), and the job's record
    # came from another worker.
    assert not alive(job_pid)
    line = next(x for x in stderr.splitlines() if f" {name} (" in x)
    assert f"worker pid {worker_pid})" not in line, line
    assert len(records(out)) == JOBS
    assert (out / "suite.json").read_text() == (local_suite / "suite.json").read_text()
    assert "random" in stdout and "raster" in stdout
    # Every record equals the local one (the per-seed results).
    for a, b in zip(records(out), records(local_suite)):
        assert a.name == b.name and json.loads(a.read_text()) == json.loads(b.read_text())


@needs_ray
def test_a_suite_resumes_from_its_folder_and_refuses_another_budget(local_suite: Path, tmp_path: Path) -> None:
    """A copy of the local run's folder with two records deleted: `--ray local` runs only those
    two and gives the same suite.json; the same folder with another budget is refused."""
    out = tmp_path / "resume"
    (out / "jobs").mkdir(parents=True)
    recs = records(local_suite)
    for p in recs[2:]:
        (out / "jobs" / p.name).write_text(p.read_text())
    r = cli([*SUITE, "--ray", "local", "--ray-cpus", "2", "--out", str(out)], timeout=240)
    assert r.returncode == 0, r.stderr
    assert f"reusing {JOBS - 2} of {JOBS}" in r.stderr
    assert "ray: 2 jobs on 2 CPUs" in r.stderr
    assert (out / "suite.json").read_text() == (local_suite / "suite.json").read_text()
    # Without Ray too: nothing left to run, the same file.
    (out / "suite.json").unlink()
    r = cli([*SUITE, "--out", str(out)], timeout=120)
    assert r.returncode == 0, r.stderr
    assert (out / "suite.json").read_text() == (local_suite / "suite.json").read_text()
    # The full budget's jobs differ (episodes, train_steps): refused, naming the field.
    r = cli([*SUITE[:2], "full", *SUITE[3:], "--out", str(out)], timeout=120)
    assert r.returncode == 2
    assert "different episodes" in r.stderr, r.stderr


def test_restart_discards_jobs_saved_by_another_build(local_suite: Path, tmp_path: Path) -> None:
    """A folder whose saved jobs were made otherwise (here: one record's episodes changed, as a
    rebuild changes its commit) is refused, and `--restart` runs every job again, giving the
    local run's suite.json (no Ray needed)."""
    out = tmp_path / "restart"
    (out / "jobs").mkdir(parents=True)
    recs = records(local_suite)
    for p in recs:
        (out / "jobs" / p.name).write_text(p.read_text())
    stale = out / "jobs" / recs[0].name
    rec = json.loads(stale.read_text())
    rec["job"]["episodes"] += 1
    stale.write_text(json.dumps(rec))
    r = cli([*SUITE, "--out", str(out)], timeout=120)
    assert r.returncode == 2 and "--restart" in r.stderr, r.stderr
    r = cli([*SUITE, "--restart", "--out", str(out)], timeout=300)
    assert r.returncode == 0, r.stderr
    assert "reusing" not in r.stderr, r.stderr
    assert len(records(out)) == JOBS
    assert (out / "suite.json").read_text() == (local_suite / "suite.json").read_text()


@needs_ray
def test_run_on_ray_gives_the_same_results(tmp_path: Path) -> None:
    args = ["run", "scopegym/StemSparseScan-v2", "--agent", "random", "--seeds", "3", "--episodes", "2"]
    a = cli([*args, "--out", str(tmp_path / "a")], timeout=120)
    assert a.returncode == 0, a.stderr
    b = cli([*args, "--ray", "local", "--ray-cpus", "2", "--out", str(tmp_path / "b")], timeout=240)
    assert b.returncode == 0, b.stderr
    assert (tmp_path / "a" / "results.json").read_text() == (tmp_path / "b" / "results.json").read_text()
    assert len(records(tmp_path / "b")) == 3


def test_ray_without_ray_is_a_clear_error(tmp_path: Path) -> None:
    """No Python, or a Python without Ray: an error naming the install, exit status 1."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'ray'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    for python in (str(tmp_path / "missing"), str(fake)):
        r = cli(
            [*SUITE, "--ray", "local", "--out", str(tmp_path / "out")], timeout=60,
            env={**os.environ, "SCOPEGYM_PYTHON": python},
        )  # fmt: skip
        assert r.returncode == 1, r.stderr
        assert "pip install 'scopegym[ray]'" in r.stderr and "panicked" not in r.stderr
    r = cli([*SUITE, "--ray", "auto", "--ray-cpus", "2", "--out", str(tmp_path / "out")], timeout=60)
    assert r.returncode == 2 and "--ray-cpus" in r.stderr
