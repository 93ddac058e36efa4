"""Suite wall time on Ray: ``scopegym suite --ray local --ray-cpus W`` for W = 1 and 2 local
workers on the same selection, each into a fresh output folder (nothing reused).

The time is the whole command: planning, starting a local Ray (a few seconds), the jobs (one
Ray task per task, agent and seed, each a ``scopegym job`` process), gathering and scoring.
With ``--plain`` it also times the suite without Ray. Run:
``python benches/python/bench_ray_suite.py [--bin PATH] [--tasks A,B] [--agents raster]
[--seeds 5] [--budget small] [--workers 1,2] [--json]`` (the binary: ``--bin``, else
``$SCOPEGYM_BIN``, else ``scopegym`` on ``PATH``; needs ``pip install scopegym[ray]``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def timed(cmd: list[str]) -> float:
    env = {**os.environ, "SCOPEGYM_PYTHON": sys.executable}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--bin", default=os.environ.get("SCOPEGYM_BIN") or shutil.which("scopegym") or "scopegym")
    p.add_argument("--tasks", default="PfmDomainWriting,SpmTipConditioning")
    p.add_argument("--agents", default="raster")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--budget", default="small")
    p.add_argument("--workers", default="1,2", help="local Ray CPUs to time (comma-separated)")
    p.add_argument("--plain", action="store_true", help="also time the suite without Ray")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    base = [args.bin, "suite", "--budget", args.budget, "--tasks", args.tasks, "--agents", args.agents,
            "--seeds", str(args.seeds)]  # fmt: skip
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        if args.plain:
            rows["no ray"] = timed([*base, "--out", f"{d}/plain"])
        for w in (int(v) for v in args.workers.split(",")):
            rows[f"{w} workers"] = timed([*base, "--ray", "local", "--ray-cpus", str(w), "--out", f"{d}/ray{w}"])
    if args.json:
        print(json.dumps({"command": base, "wall_s": rows}))
        return
    print(f"suite wall time ({' '.join(base[1:])}):")
    first = next(iter(v for k, v in rows.items() if k != "no ray"), None)
    for k, v in rows.items():
        ratio = f"  ({first / v:.2f}x the first Ray setting)" if first and k != "no ray" else ""
        print(f"{k:>10}: {v:7.1f} s{ratio}")


if __name__ == "__main__":
    main()
