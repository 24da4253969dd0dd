"""Helpers shared by the orchestrator tests: the `flow` CLI as a subprocess and a few checks."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from orchestrator.store import Store

FLOW = str(Path(sys.executable).parent / "flow")
PREFECT = str(Path(sys.executable).parent / "prefect")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Flow:
    """Runs the `flow` CLI as a subprocess in a directory with a given environment."""

    cwd: Path
    env: dict[str, str]

    def __call__(self, *args: str, extra_env: dict[str, str] | None = None, timeout: float = 300) -> Result:
        p = subprocess.run(
            [FLOW, *args], cwd=self.cwd, env={**self.env, **(extra_env or {})},
            capture_output=True, text=True, timeout=timeout,
        )
        return Result(p.returncode, p.stdout, p.stderr)




WF = """\
name: toy
project: ./proj
jobs:
  a: {type: toy_make, params: {value: 2.0}}
  b: {type: toy_add, inputs: {particles: a.particles}, params: {add: 1.0}}
  c: {type: toy_add, inputs: {particles: a.particles}, params: {add: 5.0}}
  d: {type: toy_add, inputs: {particles: b.particles}}
"""


def _actions(cwd: Path) -> dict[str, str]:
    """Job -> action of the latest run, read from the store."""
    store = Store(cwd / "proj")
    run = store.runs(1)[0]
    return {rj.name: rj.action for rj in store.run_jobs(run.id)}


def _setup(flow: Flow, text: str = WF) -> None:
    (flow.cwd / "wf.yaml").write_text(text)


def _run(flow: Flow, *args: str, expect: int = 0, **kw) -> str:
    r = flow("run", "wf.yaml", *args, **kw)
    assert r.code == expect, r.err[-3000:]
    return r.err


def _value(cwd: Path, job: str) -> float:
    store = Store(cwd / "proj")
    j = store.find_job(job)
    return float((cwd / "proj" / j.directory / "particles.star").read_text().split()[0])


