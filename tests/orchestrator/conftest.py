"""Fixtures for orchestrator tests: toy job types, one Prefect server per session, a CLI runner."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import toy_jobs  # noqa: E402

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


@pytest.fixture(scope="session")
def toy_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for `flow` subprocesses: toy job types importable and registered."""
    env = dict(os.environ)
    env["CRYODAG_JOB_MODULES"] = toy_jobs.MODULES
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
    return env


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory, toy_env: dict[str, str]) -> Iterator[str]:
    """One `prefect server start` for the session (reference/prefect.md §2, strategy D)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**toy_env, "PREFECT_HOME": str(home)}
    log = open(home / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
        stdout=log, stderr=log, env=env,
    )
    deadline = time.monotonic() + 120
    while not _healthy(api):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"Prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.3)
    toy_env["PREFECT_API_URL"] = api
    toy_env["PREFECT_HOME"] = str(home)
    yield api
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


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


@pytest.fixture
def flow_cli(tmp_path: Path, toy_env: dict[str, str]) -> Flow:
    """The CLI without a Prefect server (validate, plan, show...)."""
    return Flow(tmp_path, toy_env)


@pytest.fixture
def flow_run_cli(tmp_path: Path, toy_env: dict[str, str], prefect_api: str) -> Flow:
    """The CLI against the session's Prefect server."""
    return Flow(tmp_path, dict(toy_env))
