"""Execute one job in a child process and record it (Prefect-independent).

Outputs are written in `jobs/.tmp/<job>-<key>` and renamed to `jobs/<job>-<key>` only when the
job has succeeded and every output file has been checksummed; then the store row is written.
A crash or kill at any point leaves no half-written result that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator import files
from orchestrator.store import Store
from orchestrator.worker import ERROR_FILE
from orchestrator.workflow import Node, Workflow

EventSink = Callable[[dict[str, Any]], None]
LOG_FILE = "job.log"


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


def execute(
    store: Store,
    wf: Workflow,
    node: Node,
    run_id: int | None,
    on_event: EventSink,
    reasons: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run `node` now; return its output handles. Raises JobError on failure.

    With a `run_id`, the run records that it executed this job for `reasons`.
    """
    project = wf.project
    work, final = work_dir(project, node), final_dir(project, node)
    handles, consumed = _input_handles(store, node)
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", ERROR_FILE, "CANCEL"):
        (work / stale).unlink(missing_ok=True)
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
    from kernels import backend

    store.job_started(
        key=node.key, name=node.name, type_=node.type, version=node.job.version,
        params=node.params_json(), directory=final.relative_to(project).as_posix(),
        run_id=run_id, backend=backend.name(),
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
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                event = json.loads(raw)
            except json.JSONDecodeError:
                continue
            kind = event.get("event")
            if kind == "result":
                outputs = event["outputs"]
            elif kind == "metric":
                store.add_metric(node.key, event["name"], event["value"], event.get("iteration"))
            if kind == "log":
                log.write(f"[{event['level']}] {event['message']}\n".encode())
                log.flush()
            on_event(event)
        rc, peak_rss = _wait(proc)
    duration = time.monotonic() - t0
    if rc != 0 or outputs is None:
        err_file = work / ERROR_FILE
        if err_file.exists():
            err = json.loads(err_file.read_text())
            message, input_error = err["message"], err["kind"] == "input"
        elif rc < 0:
            message, input_error = f"job process killed by {signal.Signals(-rc).name}", False
        else:
            message, input_error = f"job process exited with code {rc} without a result", False
        store.job_failed(node.key, message, run_id, duration)
        raise JobError(message, input_error)
    try:
        rows = _output_records(project, work, final, outputs, node)
    except JobError as exc:
        store.job_failed(node.key, str(exc), run_id, duration)
        raise
    _publish(work, final)
    store.job_finished(
        key=node.key, run_id=run_id, outputs=rows, inputs=consumed,
        duration_s=duration, peak_rss_mb=peak_rss,
    )
    return outputs
