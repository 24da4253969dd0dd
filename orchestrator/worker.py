"""Child process that runs one job: `python -m orchestrator.worker SPEC.json`.

Events (progress, metrics, plots, logs, the result) go as JSON lines to the original stdout;
anything else the job or a library prints goes to stderr (the job log). Exit codes: 0 done,
2 bad input (JobInputError), 1 any other failure; `error.json` in the work dir says what.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, TextIO

from jobs import registry
from jobs.artifacts import Artifact
from jobs.context import JobContext
from jobs.errors import JobCancelled, JobInputError

ERROR_FILE = "error.json"
RESULT_FILE = "result.json"


def _event_stream() -> TextIO:
    """Keep fd 1 for events; point fd 1 (and sys.stdout) at stderr for everything else."""
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return events


def run_spec(spec: dict[str, Any], emit: Any) -> dict[str, dict[str, Any]]:
    """Run the job a spec describes and return its output handles as JSON dicts."""
    job = registry.get(spec["type"])
    params = job.params.model_validate(spec["params"])
    inputs = {slot: Artifact.load(h) for slot, h in spec["inputs"].items()}
    for slot, art in inputs.items():
        missing = job.inputs[slot].requires - art.provides
        if missing:
            raise JobInputError(
                f"job '{spec['name']}': input '{slot}' lacks required columns {sorted(missing)}"
            )
    ctx = JobContext(
        name=spec["name"],
        project_dir=Path(spec["project_dir"]),
        work_dir=Path(spec["work_dir"]),
        final_dir=Path(spec["final_dir"]),
        seed=params.seed,
        emit=emit,
    )
    emit({"event": "started", "backend": ctx.backend})
    outputs = job.run(params, inputs, ctx)
    if set(outputs) != set(job.outputs):
        raise RuntimeError(
            f"job type '{job.name}' returned outputs {sorted(outputs)}, declared {sorted(job.outputs)}"
        )
    for slot, art in outputs.items():
        if not isinstance(art, job.outputs[slot]):
            raise RuntimeError(f"output '{slot}' of '{job.name}' is a {type(art).__name__}")
    return {slot: art.model_dump(mode="json") for slot, art in outputs.items()}


def main(argv: list[str]) -> int:
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    work_dir = Path(spec["work_dir"])
    events = _event_stream()

    def emit(event: dict[str, Any]) -> None:
        events.write(json.dumps(event) + "\n")

    (work_dir / "worker.pid").write_text(str(os.getpid()))
    try:
        outputs = run_spec(spec, emit)
    except JobInputError as exc:
        (work_dir / ERROR_FILE).write_text(json.dumps({"kind": "input", "message": str(exc)}))
        return 2
    except JobCancelled as exc:
        (work_dir / ERROR_FILE).write_text(json.dumps({"kind": "cancelled", "message": str(exc)}))
        return 1
    except Exception as exc:
        traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}"
        (work_dir / ERROR_FILE).write_text(json.dumps({"kind": "error", "message": message}))
        return 1
    (work_dir / RESULT_FILE).write_text(json.dumps(outputs))
    emit({"event": "result", "outputs": outputs})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
