"""Fixtures for orchestrator tests: toy job types, one Prefect server per session, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import toy_jobs  # noqa: E402
from cli_helpers import PREFECT, Flow, _free_port, _healthy  # noqa: E402


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


@pytest.fixture
def flow_cli(tmp_path: Path, toy_env: dict[str, str]) -> Flow:
    """The CLI without a Prefect server (validate, plan, show...)."""
    return Flow(tmp_path, toy_env)


@pytest.fixture
def flow_run_cli(tmp_path: Path, toy_env: dict[str, str], prefect_api: str) -> Flow:
    """The CLI against the session's Prefect server."""
    return Flow(tmp_path, dict(toy_env))
