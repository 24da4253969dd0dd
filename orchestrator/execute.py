"""Execute one job in a child process and record it (Prefect-independent).

Outputs are written in `jobs/.tmp/<job>-<key>` and renamed to `jobs/<job>-<key>` only when the
job has succeeded and every output file has been checksummed; then the store row is written.
A crash or kill at any point leaves no half-written result that looks complete.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jobs.context import CANCEL_FILE
from orchestrator import files, gpus
from orchestrator.store import Store
from orchestrator.worker import ERROR_FILE
from orchestrator.workflow import Node, Workflow

EventSink = Callable[[dict[str, Any]], None]
LOG_FILE = "job.log"
#: Prefix of the recorded error of a job that failed on bad input (exit code 2 of `flow run`).
INPUT_ERROR_PREFIX = "bad input: "


class JobError(Exception):
    """The job failed; `input_error` is True for bad input (exit code 2 of the worker)."""

    def __init__(self, message: str, input_error: bool = False) -> None:
        super().__init__(message)
        self.input_error = input_error


def job_dirname(node: Node) -> str:
    return f"{node.name}-{node.key[:10]}"


def final_dir(project: Path, node: Node) -> Path:
    return project / "jobs" / job_dirname(node)


def work_dir(project: Path, node: Node) -> Path:
    return project / "jobs" / ".tmp" / job_dirname(node)


def _input_handles(store: Store, node: Node) -> tuple[dict[str, Any], list[dict[str, str]]]:
    handles, consumed = {}, []
    for slot, akey in node.input_keys.items():
        art = store.artifact(akey)
        if art is None:
            raise JobError(f"job '{node.name}': input '{slot}' ({node.inputs[slot]}) has no result")
        handles[slot] = art.handle
        consumed.append({"slot": slot, "artifact_key": akey, "artifact_sha256": art.sha256})
    return handles, consumed


def _output_records(
    project: Path, work: Path, final: Path, outputs: dict[str, dict[str, Any]], node: Node
) -> list[dict[str, Any]]:
    """Artifact rows: per-file records read from the work dir for files of this job."""
    from jobs.artifacts import Artifact

    final_rel = final.relative_to(project).as_posix() + "/"
    rows = []
    for slot, handle in outputs.items():
        art = Artifact.load(handle)
        recs = []
        for rel in art.files():
            actual = work / rel[len(final_rel):] if rel.startswith(final_rel) else project / rel
            if not actual.is_file():
                raise JobError(f"job '{node.name}': output '{slot}' names missing file {rel}")
            recs.append(files.file_record(project, rel, actual))
        rows.append(
            {
                "key": node.output_key(slot),
                "slot": slot,
                "kind": art.kind,
                "handle": handle,
                "files": recs,
                "sha256": files.digest(recs),
                "size_bytes": sum(r["size"] for r in recs),
            }
        )
    return rows


def _publish(work: Path, final: Path) -> None:
    """Rename the finished work dir into place (replacing an older copy of the same key)."""
    if final.exists():
        trash = final.parent / ".trash" / f"{final.name}-{time.time_ns()}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        final.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    work.rename(final)
    for name in ("worker.pid", "spec.json"):
        (final / name).unlink(missing_ok=True)


def _wait(proc: subprocess.Popen) -> tuple[int, float | None]:
    """Wait for the child; return (exit status, peak RSS in MB)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024.0


@contextmanager
def _exclusive(lock_path: Path, node: Node) -> Iterator[None]:
    """Hold an exclusive lock on a job key: two runs never execute the same key at once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobError(f"job '{node.name}' (key {node.key[:12]}) is running in another process") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clean(work: Path) -> None:
    """Remove what a previous attempt left in the work dir, except its checkpoints and log."""
    if not work.exists():
        return
    for p in work.iterdir():
        if p.name in ("checkpoints", LOG_FILE):
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _stop(proc: subprocess.Popen, work: Path) -> None:
    """Ask the job to stop (CANCEL file, SIGTERM), then kill it."""
    (work / CANCEL_FILE).touch()
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _failure(work: Path, rc: int) -> tuple[str, bool]:
    err_file = work / ERROR_FILE
    if err_file.exists():
        err = json.loads(err_file.read_text())
        return err["message"], err["kind"] == "input"
    if rc < 0:
        return f"job process killed by {signal.Signals(-rc).name}", False
    return f"job process exited with code {rc} without a result", False


# glibc malloc for job processes (a user's own MALLOC_* settings win). By default every NumPy
# temporary above the dynamic mmap threshold (<= 32 MB) is a fresh mmap the kernel zero-fills
# and a free trims the heap back: homo_refine, 2 iterations on the demo, spent 6.9 s in the
# kernel (435,000 page faults) per 38 s of user time; with these, 1.1 s (58,000). Only where
# memory comes from changes, not the arithmetic.
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(256 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_TOP_PAD_": str(256 << 20),
}


def child_env(lease: dict[str, str]) -> dict[str, str]:
    """Environment of a job process: allocator defaults, this process's, the device lease."""
    return {**ALLOCATOR_ENV, **os.environ, **lease, "PYTHONUNBUFFERED": "1"}


def execute(
    store: Store,
    wf: Workflow,
    node: Node,
    run_id: int | None,
    on_event: EventSink,
    reasons: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run `node` now; return its output handles. Raises JobError on failure.

    With a `run_id`, the run records that it executed this job for `reasons`. Bad input is
    recorded with the error prefixed by INPUT_ERROR_PREFIX.
    """
    project = wf.project
    work, final = work_dir(project, node), final_dir(project, node)
    handles, consumed = _input_handles(store, node)
    with _exclusive(work.parent / f"{work.name}.lock", node), gpus.lease(project, node.job.gpu) as env:
        return _run_child(store, node, run_id, on_event, reasons, handles, consumed, work, final, env)


def _run_child(
    store: Store, node: Node, run_id: int | None, on_event: EventSink, reasons: list[str] | None,
    handles: dict[str, Any], consumed: list[dict[str, str]], work: Path, final: Path,
    env: dict[str, str],
) -> dict[str, dict[str, Any]]:
    project = store.project_dir
    _clean(work)
    work.mkdir(parents=True, exist_ok=True)
    spec = {
        "name": node.name,
        "type": node.type,
        "params": node.params_json(),
        "inputs": handles,
        "project_dir": str(project),
        "work_dir": str(work),
        "final_dir": str(final),
    }
    (work / "spec.json").write_text(json.dumps(spec, indent=1))
    store.job_started(
        key=node.key, name=node.name, type_=node.type, version=node.job.version,
        params=node.params_json(), directory=final.relative_to(project).as_posix(), run_id=run_id,
    )
    if run_id is not None:
        store.record_run_job(run_id, node.key, node.name, "executed", reasons or [])
    t0 = time.monotonic()
    outputs: dict[str, dict[str, Any]] | None = None
    with open(work / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.worker", str(work / "spec.json")],
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=project,
            env=child_env(env),
        )
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                try:
                    event = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                kind = event.get("event")
                if kind == "result":
                    outputs = event["outputs"]
                elif kind == "started":
                    store.set_job_backend(node.key, event["backend"])
                elif kind == "metric":
                    store.add_metric(node.key, event["name"], event["value"], event.get("iteration"))
                elif kind == "log":
                    log.write(f"[{event['level']}] {event['message']}\n".encode())
                    log.flush()
                on_event(event)
            rc, peak_rss = _wait(proc)
        except BaseException as exc:
            _stop(proc, work)
            message = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
            store.job_failed(node.key, message, run_id, time.monotonic() - t0)
            if isinstance(exc, Exception):
                raise JobError(message) from exc
            raise
    duration = time.monotonic() - t0
    if rc != 0 or outputs is None:
        message, input_error = _failure(work, rc)
        store.job_failed(node.key, (INPUT_ERROR_PREFIX if input_error else "") + message, run_id, duration)
        raise JobError(message, input_error)
    try:
        rows = _output_records(project, work, final, outputs, node)
        _publish(work, final)
    except (JobError, OSError) as exc:
        store.job_failed(node.key, str(exc), run_id, duration)
        raise JobError(str(exc)) from exc
    store.job_finished(
        key=node.key, run_id=run_id, outputs=rows, inputs=consumed,
        duration_s=duration, peak_rss_mb=peak_rss,
    )
    return outputs
