"""The Prefect runner (DESIGN.md §7): one flow run per `flow run`, one task per job.

Tasks are submitted with their upstream futures, so independent branches run concurrently.
cryodag's store decides reuse at task time (Prefect caching off); a reused job finishes in a
`Reused` state. Each executed job runs in a child process (orchestrator.execute); its logs,
progress and metrics stream into the Prefect logs, a progress artifact and the store, and it
publishes a markdown artifact. The same flow runs on threads (local) or Dask (prefect-dask).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from importlib.metadata import version
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.flow_runs import pause_flow_run
from prefect.input.run_input import run_input_subclass_from_type
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from orchestrator import choices
from orchestrator import plan as planning
from orchestrator.execute import INPUT_ERROR_PREFIX, JobError, execute
from orchestrator.progress import TerminalProgress
from orchestrator.reporting import job_markdown
from orchestrator.store import Store
from orchestrator.workflow import ExecutorSpec, Node, Workflow

#: How long an interactive step waits for its answer in the Prefect UI (seconds).
CHOICE_TIMEOUT_S = 7 * 24 * 3600
#: Terminal progress of the current `flow run` (local executor only; None in Dask workers).
SINK: TerminalProgress | None = None
_STORES: dict[str, Store] = {}


def _context(workflow_path: str, sets: tuple[str, ...], project: str) -> tuple[Workflow, Store]:
    """The workflow (with the choices recorded so far) and the store of this process."""
    if project not in _STORES:
        _STORES[project] = Store(project)
    store = _STORES[project]
    return choices.load(workflow_path, list(sets), project, store), store


def _ask(store: Store, node: Node) -> None:
    """Pause the flow run with the job's form; record the answer as the job's choice."""
    from jobs.artifacts import Artifact

    inputs = {slot: Artifact.load(store.artifact(key).handle) for slot, key in node.input_keys.items()}
    model, description = node.job.interaction.form(node.params, inputs, store.project_dir)
    form = run_input_subclass_from_type(model).with_initial_data(description=description)
    if SINK is not None:
        SINK.line(f"[yellow]waiting[/] {node.name}: answer the form of the paused flow run in the Prefect UI")
    answer = pause_flow_run(wait_for_input=form, timeout=CHOICE_TIMEOUT_S, poll_interval=2, key=node.name)
    params = {k: v for k, v in answer.model_dump().items() if k in model.model_fields}
    store.record_choice(node.name, choices.inputs_digest(node, store), params, "prefect-ui")
    get_run_logger().info("%s: choice recorded: %s", node.name, params)


def _artifact_key(name: str, suffix: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", f"{name}-{suffix}".lower())


class _UIEvents:
    """Forwards job events to the Prefect logger, a progress artifact and the terminal."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.log = get_run_logger()
        self.progress_id = create_progress_artifact(progress=0.0, description=f"{name} progress")
        self.plots: list[str] = []
        self._last_ui = 0.0
        self._last_logged: dict[str, int] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "log":
            self.log.log(getattr(__import__("logging"), event.get("level", "INFO"), 20), event["message"])
        elif kind == "plot":
            self.plots.append(event["path"])
        elif kind == "progress":
            done, total = int(event["done"]), max(int(event["total"]), 1)
            decile = 10 * done // total
            if self._last_logged.get(event["task"]) != decile:
                self._last_logged[event["task"]] = decile
                self.log.info("%s: %d/%d", event["task"], done, total)
            now = time.monotonic()
            if now - self._last_ui > 1.0 or done >= total:
                self._last_ui = now
                update_progress_artifact(artifact_id=self.progress_id, progress=100.0 * done / total)
        if SINK is not None:
            SINK.job_event(self.name, event)


@task(name="job", cache_policy=NO_CACHE, persist_result=False)
def job_task(
    name: str,
    workflow_path: str,
    sets: tuple[str, ...],
    project: str,
    run_id: int,
    forced: bool,
    upstream: dict[str, Any],
) -> Any:
    """Reuse or run workflow job `name`; returns its output handles (small JSON dicts)."""
    wf, store = _context(workflow_path, sets, project)
    node = wf.nodes[name]
    if choices.needs_choice(node):
        if not os.environ.get("PREFECT_API_URL"):
            message = (f"job '{name}' needs a choice, but no Prefect server is up to ask it: start "
                       f"`flow ui` and rerun, or record it with `flow choose WORKFLOW {name} PARAM=VALUE`")
            store.add_event("choice_needed", message, run_id)
            get_run_logger().error(message)
            if SINK is not None:
                SINK.line(f"[red]failed[/] {message}")
            return Failed(message=message)
        _ask(store, node)
        wf, store = _context(workflow_path, sets, project)
        node = wf.nodes[name]
    log = get_run_logger()
    ctx = get_run_context()
    decision = planning.decide(store, wf, node, forced=forced)
    if decision.action == "reuse":
        store.record_run_job(run_id, node.key, name, "reused", decision.reasons)
        handles = {a.slot: a.handle for a in store.artifacts_of(node.key)}
        log.info("reused %s (key %s)", name, node.key[:12])
        if SINK is not None:
            SINK.line(f"[green]reused[/] {name}")
        return Completed(name="Reused", message=f"reused {node.key[:12]}", data=handles)
    log.info("running %s (key %s): %s", name, node.key[:12], "; ".join(decision.reasons))
    if SINK is not None:
        SINK.line(f"[cyan]running[/] {name}: {'; '.join(decision.reasons)}")
    events = _UIEvents(name)
    try:
        outputs = execute(store, wf, node, run_id, on_event=events, reasons=decision.reasons)
    except JobError as exc:
        if store.job(node.key) is not None:
            store.record_run_job(run_id, node.key, name, "failed", decision.reasons)
        else:
            store.add_event("job_not_run", f"{name}: {exc}", run_id)
        create_markdown_artifact(markdown=job_markdown(store, node.key), key=_artifact_key(name, "summary"))
        if SINK is not None:
            SINK.line(f"[red]failed[/] {name}: {exc}")
        log.error("job %s failed: %s", name, exc)
        return Failed(message=str(exc))
    store.set_task_run_id(node.key, str(ctx.task_run.id))
    create_markdown_artifact(
        markdown=job_markdown(store, node.key, events.plots),
        key=_artifact_key(name, "summary"),
        description=f"{name}: params, inputs, outputs, metrics",
    )
    if SINK is not None:
        job = store.job(node.key)
        SINK.line(f"[green]done[/] {name} in {job.duration_s:.1f} s")
    return outputs


@flow(name="cryodag")
def pipeline(
    workflow_path: str, sets: tuple[str, ...], project: str, run_id: int,
    selected: list[str], force: list[str],
) -> Any:
    """Submit every selected job with its upstream futures; fail if any job failed."""
    wf, store = _context(workflow_path, sets, project)
    store.set_run_prefect_id(run_id, str(get_run_context().flow_run.id))
    futures: dict[str, Any] = {}
    for name in wf.order:
        if name not in selected:
            continue
        node = wf.nodes[name]
        upstream = {up: futures[up] for up in sorted(node.upstream) if up in futures}
        futures[name] = job_task.with_options(task_run_name=name).submit(
            name, workflow_path, sets, project, run_id, name in force, upstream
        )
    states = {}
    for name, fut in futures.items():
        fut.wait()
        states[name] = fut.state.name
    failed = [n for n, s in states.items() if s not in ("Completed", "Reused")]
    if failed:
        return Failed(message=f"jobs did not complete: {', '.join(failed)}")
    return states


def _task_runner(executor: ExecutorSpec) -> Any:
    if executor.type == "dask":
        from prefect_dask import DaskTaskRunner

        if executor.address:
            return DaskTaskRunner(address=executor.address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": executor.n_workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            }
        )
    return ThreadPoolTaskRunner(max_workers=executor.max_workers)


def run(
    wf: Workflow,
    *,
    sets: list[str],
    only: list[str],
    force: list[str],
    executor: ExecutorSpec,
    progress: TerminalProgress | None = None,
) -> int:
    """Run the workflow as one Prefect flow run; returns the exit code (0, 1 or 2)."""
    global SINK
    store = Store(wf.project)
    selected = set(wf.order)
    if only:
        selected = set(only)
        for name in only:
            selected |= wf.ancestors(name)
    run_id = store.begin_run(
        name=wf.name, path=str(wf.path), text_=wf.text,
        command_=shlex.join(["flow", *sys.argv[1:]]), code_version=version("cryodag"),
    )
    SINK = progress if executor.type == "local" else None
    try:
        state = pipeline.with_options(
            flow_run_name=wf.name, task_runner=_task_runner(executor)
        )(str(wf.path), tuple(sets), str(wf.project), run_id, sorted(selected), sorted(force),
          return_state=True)
    finally:
        SINK = None
    wf = choices.load(wf.path, sets, wf.project, store)
    jobs = {n: store.job(wf.nodes[n].key) for n in wf.order if n in selected}
    ok = state.is_completed() and all(j is not None and j.status == "done" for j in jobs.values())
    store.end_run(run_id, "completed" if ok else "failed")
    recorded = {rj.name for rj in store.run_jobs(run_id)}
    for name, job in jobs.items():
        if name in recorded:
            continue
        if job is not None:
            store.record_run_job(run_id, job.key, name, "not run", ["an upstream job failed"])
        else:
            store.add_event("job_not_run", f"{name}: an upstream job failed", run_id)
    if ok:
        return 0
    input_errors = [
        j for j in jobs.values()
        if j is not None and j.status == "failed" and (j.error or "").startswith(INPUT_ERROR_PREFIX)
    ]
    return 2 if input_errors else 1
