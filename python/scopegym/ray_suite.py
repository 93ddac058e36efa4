"""Runs scopegym's one-seed jobs as Ray tasks: the driver of ``scopegym suite --ray`` and
``scopegym run --ray``.

The command line splits its runs into one job per (task, agent, seed), writes each job's spec
to ``JOBS/NAME.spec.json`` and starts this driver (the ``scopegym`` binary carries this file
and runs it with ``python -c``; ``python -m scopegym.ray_suite`` is the same program)::

    python -m scopegym.ray_suite --address local --num-cpus 2 --bin /path/to/scopegym \\
        --jobs OUT/jobs NAME ...

Per name, one Ray task (one CPU) runs ``BIN job SPEC --out RECORD`` in a subprocess, in a
temporary folder of whichever node it lands on, and returns the record's text; the driver
writes it to ``JOBS/NAME.json`` (a temporary file, then renamed) as soon as it arrives, so a
finished job is never lost and a rerun of the command reuses it. ``--address local`` starts a
Ray on this machine with ``--num-cpus`` CPUs (default: all); ``auto`` or ``HOST:PORT`` joins a
running cluster, whose every node needs the scopegym binary at the same path.

Faults: a worker process that dies mid-job (killed, out of memory, node lost) makes Ray run the
task again on another worker (``MAX_RETRIES`` times); the job's subprocess dies with its worker
(Linux: a parent-death signal). A job whose own process is killed by a signal is submitted again
(``MAX_RETRIES`` times). A job that fails (an error of the run) is reported and not retried;
the others still run and are saved. Exit status: 0 when every job finished, 1 otherwise, 3
without Ray. The module imports nothing of scopegym, and Ray only inside :func:`main`.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: How many times a job is run again after its worker or its process died.
MAX_RETRIES = 3

#: What the command line prints when Ray is missing.
NO_RAY = "--ray needs Ray in this Python: pip install 'scopegym[ray]'"


def _die_with_parent() -> None:
    """In the job's process before it runs the binary: die (SIGKILL) when the worker dies."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))


def run_job(binary: str, name: str, spec: str) -> tuple[str, str, int]:
    """Runs one job (the Ray task): ``("ok", record text, pid)``, ``("killed", why, pid)`` when
    its process died of a signal, or ``("failed", its error, pid)``, with the worker's pid."""
    pid = os.getpid()
    with tempfile.TemporaryDirectory(prefix="scopegym-job-") as d:
        spec_path = Path(d) / "spec.json"
        spec_path.write_text(spec)
        record = Path(d) / "record.json"
        proc = subprocess.run(
            [binary, "job", str(spec_path), "--out", str(record)],
            capture_output=True,
            text=True,
            preexec_fn=_die_with_parent,
        )
        if proc.returncode < 0:
            return "killed", f"{name}: its process was killed by signal {-proc.returncode}", pid
        if proc.returncode != 0:
            return "failed", f"{name}: {proc.stderr.strip()[-4000:]}", pid
        return "ok", record.read_text(), pid


def write_atomically(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path``, then renames it over ``path``."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scopegym.ray_suite", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--address", required=True, help="local (start a Ray here), auto or HOST:PORT (join)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    p.add_argument("--bin", required=True, help="the scopegym binary (same path on every node)")
    p.add_argument("--jobs", required=True, help="the folder of the job specs and records")
    p.add_argument("names", nargs="*", help="the jobs to run (NAME.spec.json in --jobs)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import ray
    except ImportError:
        print(NO_RAY, file=sys.stderr)
        return 3
    jobs = Path(args.jobs)
    specs = {n: (jobs / f"{n}.spec.json").read_text() for n in args.names}
    quiet: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if args.address == "local":
        ray.init(address="local", num_cpus=args.num_cpus, **quiet)
    else:
        ray.init(address=args.address, **quiet)
    t0 = time.monotonic()
    failures: list[str] = []
    try:
        task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(run_job)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        print(f"ray: {len(specs)} jobs on {cpus} CPUs", file=sys.stderr, flush=True)
        pending: dict[Any, str] = {task.remote(args.bin, n, s): n for n, s in specs.items()}
        tries = dict.fromkeys(specs, 0)
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(ready[0])
            try:
                status, text, pid = ray.get(ready[0])
            except Exception as e:  # the task's worker died more than MAX_RETRIES times
                status, text, pid = "failed", f"{name}: {type(e).__name__}: {e}", 0
            if status == "killed" and tries[name] < MAX_RETRIES:
                tries[name] += 1
                print(f"ray: {text}; running it again", file=sys.stderr, flush=True)
                pending[task.remote(args.bin, name, specs[name])] = name
                continue
            if status == "ok":
                write_atomically(jobs / f"{name}.json", text)
                done += 1
                print(
                    f"ray: {done}/{len(specs)} {name} ({time.monotonic() - t0:.1f} s, worker pid {pid})",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                failures.append(text)
                print(f"ray: failed: {text}", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    if failures:
        print(f"ray: {len(failures)} of {len(specs)} jobs failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
