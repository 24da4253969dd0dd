"""Terminal progress of a run: a Rich bar per job task (iterations, batches) with ETA."""

from __future__ import annotations

import threading
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TerminalProgress:
    """Shows job starts/ends as lines and job progress events as bars (thread-safe)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=not self.console.is_terminal,
        )
        self._tasks: dict[tuple[str, str], TaskID] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> TerminalProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def line(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def job_event(self, job: str, event: dict[str, Any]) -> None:
        if event.get("event") != "progress":
            return
        key = (job, str(event["task"]))
        with self._lock:
            if key not in self._tasks:
                self._tasks[key] = self.progress.add_task(f"{job}: {event['task']}", total=event["total"])
            self.progress.update(self._tasks[key], completed=event["done"], total=event["total"])
