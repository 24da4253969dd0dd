"""Overhead of `flow run`: every job reused, and one trivial job, with and without a running
Prefect server. Prints a markdown table.

    .venv/bin/python bench/orchestration.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLOW = str(Path(sys.executable).parent / "flow")
TOYS = HERE.parent / "tests" / "orchestrator"
WF = """\
name: bench
project: ./proj
jobs:
  a: {type: toy_make, params: {value: 1.0}}
  b: {type: toy_add, inputs: {particles: a.particles}}
  c: {type: toy_add, inputs: {particles: a.particles}, params: {add: 2.0}}
  d: {type: toy_add, inputs: {particles: b.particles}}
"""


def _env() -> dict[str, str]:
    sys.path.insert(0, str(TOYS))
    import toy_jobs

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(CRYODAG_JOB_MODULES=toy_jobs.MODULES, PYTHONPATH=str(TOYS),
               PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="WARNING")
    return env


def _timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def _job_seconds(cwd: Path, env: dict[str, str], job: str) -> float:
    out = subprocess.run([FLOW, "show", job, "--project", "proj", "--json"], cwd=cwd, env=env,
                         check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)["duration_s"])


def _measure(cwd: Path, env: dict[str, str], repeat: int) -> dict[str, list[float]]:
    run = [FLOW, "run", "wf.yaml"]
    _timed(run, cwd, env)  # first run executes the 4 jobs (and migrates the Prefect DB)
    reused = [_timed(run, cwd, env) for _ in range(repeat)]
    forced, child = [], []
    for _ in range(repeat):
        forced.append(_timed([*run, "--force", "d"], cwd, env))
        child.append(_job_seconds(cwd, env, "d"))
    return {"all 4 jobs reused": reused, "one trivial job forced (3 reused)": forced,
            "trivial job in its child process": child}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    env = _env()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp) / "temp-server"
        cwd.mkdir()
        (cwd / "wf.yaml").write_text(WF)
        for what, times in _measure(cwd, env, args.repeat).items():
            rows.append(("temporary server (none running)", what, times))
        cwd = Path(tmp) / "with-ui"
        cwd.mkdir()
        (cwd / "wf.yaml").write_text(WF)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        subprocess.run([FLOW, "ui", "--project", "proj", "--port", str(port), "--background"],
                       cwd=cwd, env=env, check=True, capture_output=True)
        pid = json.loads((cwd / "proj" / ".prefect" / "ui.json").read_text())["pid"]
        try:
            for what, times in _measure(cwd, env, args.repeat).items():
                rows.append(("`flow ui` server running", what, times))
        finally:
            os.kill(pid, signal.SIGTERM)
    print(f"repeats: {args.repeat}; load average at end: {os.getloadavg()[0]:.2f}\n")
    print("| Prefect server | measured | median (s) | min (s) | max (s) |")
    print("|---|---|---|---|---|")
    for server, what, times in rows:
        print(f"| {server} | {what} | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} |")


if __name__ == "__main__":
    main()
