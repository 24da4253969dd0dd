"""JobContext (DESIGN.md §4): what a running job gets from whoever runs it.

Events (progress, metrics, plots, logs) go to an `emit` callback as small JSON-able dicts.
The orchestrator's worker process writes them as JSON lines to its parent; a plain script
can pass `print` or collect them in a list.

A job writes everything under `work_dir` (a temporary directory that the orchestrator renames
to `final_dir` once the job returns). Artifact handles must name the final location: build
them with `ctx.ref(path)`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.artifacts import resolve
from jobs.errors import JobCancelled

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Event = dict[str, Any]
CANCEL_FILE = "CANCEL"


class _EmitHandler(logging.Handler):
    def __init__(self, emit: Callable[[Event], None]) -> None:
        super().__init__(logging.INFO)
        self._emit = emit

    def emit(self, record: logging.LogRecord) -> None:
        self._emit({"event": "log", "level": record.levelname, "message": record.getMessage()})


class JobContext:
    """Directory, logger, progress, metrics, plots, seed, backend and cancellation of one job."""

    def __init__(
        self,
        *,
        name: str,
        project_dir: Path,
        work_dir: Path,
        final_dir: Path,
        seed: int = 0,
        emit: Callable[[Event], None] | None = None,
        backend: str | None = None,
    ) -> None:
        self.name = name
        self.project_dir = Path(project_dir).resolve()
        self.work_dir = Path(work_dir).resolve()
        self.final_dir = Path(final_dir).resolve()
        self.seed = seed
        self._emit = emit or (lambda event: None)
        self._backend = backend
        self._last_progress: dict[str, float] = {}
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log = logging.getLogger(f"cryodag.job.{name}")
        self.log.setLevel(logging.INFO)
        self.log.propagate = False
        self.log.handlers = [_EmitHandler(self._emit)]

    # -- files -------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """Absolute path of a file the job writes, inside its (temporary) work directory."""
        p = self.work_dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def ref(self, path: Path | str) -> str:
        """Project-relative path of `path` (under work_dir) as it will be after the rename."""
        rel = Path(path).resolve().relative_to(self.work_dir)
        return (self.final_dir / rel).relative_to(self.project_dir).as_posix()

    def resolve(self, rel: str) -> Path:
        """Absolute path of a project-relative file named in an input artifact."""
        return resolve(self.project_dir, rel)

    @property
    def checkpoint_dir(self) -> Path:
        """Where iterative jobs keep checkpoints; survives a crash, so a rerun resumes."""
        d = self.work_dir / "checkpoints"
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- randomness and backend ---------------------------------------------------------
    def rng(self, stream: int = 0) -> np.random.Generator:
        """A generator derived from the job seed and a stream number (per-batch streams)."""
        return np.random.default_rng([self.seed, stream])

    @property
    def backend(self) -> str:
        from kernels import backend

        return self._backend or backend.name()

    # -- events -------------------------------------------------------------------------
    def progress(self, task: str, done: int, total: int, **extra: Any) -> None:
        """Report `done` of `total` units of `task` (iterations, batches). Rate-limited."""
        now = time.monotonic()
        last = self._last_progress.get(task, 0.0)
        if done < total and now - last < 0.5:
            return
        self._last_progress[task] = now
        self._emit({"event": "progress", "task": task, "done": done, "total": total, **extra})

    def metric(self, name: str, value: float | list[float], iteration: int | None = None) -> None:
        """Record a metric (a number or a short list, e.g. class sizes) at an iteration."""
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        self._emit({"event": "metric", "name": name, "value": value, "iteration": iteration})

    def plot(self, name: str, fig: Figure, caption: str = "") -> Path:
        """Save a figure as `plots/<name>.png` in the job directory and announce it."""
        import matplotlib.pyplot as plt

        path = self.path(f"plots/{name}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        self._emit({"event": "plot", "name": name, "path": self.ref(path), "caption": caption})
        return path

    def check_cancelled(self) -> None:
        """Raise JobCancelled if a cancellation was requested (a CANCEL file in work_dir)."""
        if (self.work_dir / CANCEL_FILE).exists():
            raise JobCancelled(f"job {self.name} cancelled")
