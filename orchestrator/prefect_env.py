"""Offline-safe Prefect settings, applied before Prefect is imported (reference/prefect.md §3).

PREFECT_HOME goes under the project unless the user configured Prefect themselves; a server
started by `flow ui` for this project is used when it is up, so runs appear in its UI.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

UI_FILE = "ui.json"
USER_SETTINGS = ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_PROFILES_PATH", "PREFECT_PROFILE")


def prefect_home(project: Path) -> Path:
    return Path(os.environ.get("PREFECT_HOME") or project / ".prefect")


def server_healthy(api_url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def running_ui(project: Path) -> str | None:
    """API URL of the `flow ui` server of this project, if it is up."""
    f = prefect_home(project) / UI_FILE
    if not f.is_file():
        return None
    api = json.loads(f.read_text()).get("api_url")
    return api if api and server_healthy(api) else None


def configure(project: Path) -> None:
    """Set Prefect's environment for runs of `project` (call before importing prefect)."""
    if sys.stderr.isatty():
        # the terminal shows Rich progress bars; Prefect's INFO lines still reach the UI
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
    if not any(k in os.environ for k in USER_SETTINGS):
        home = project / ".prefect"
        home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(home)
    if "PREFECT_API_URL" not in os.environ:
        api = running_ui(project)
        if api:
            os.environ["PREFECT_API_URL"] = api
