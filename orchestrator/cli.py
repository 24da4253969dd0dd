"""The `flow` command line: validate, plan, run, choose, status, show, lineage, report, summary, jobs, ui,
simulate.

Exit codes: 0 success, 1 a job failed, 2 invalid input or usage (DESIGN.md §9). Tracebacks
only with --debug. `--json` outputs are documented in README.md (scripts depend on them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.errors import UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
STATE = {"debug": False}

ProjectOpt = Annotated[
    Path | None, typer.Option("--project", "-p", help="Project directory (default: ./cryodag_project)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (shape documented in README)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="JOB.PARAM=VALUE override (repeatable)")]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks")] = False) -> None:
    STATE["debug"] = debug


def _project(project: Path | None) -> Path:
    return (project or Path("cryodag_project")).resolve()


def _store(project: Path | None):  # noqa: ANN202 - Store imported lazily (import cost)
    from orchestrator.store import Store

    p = _project(project)
    try:
        return Store(p, create=False)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _iso(t: Any) -> str | None:
    return t.isoformat() + "Z" if t is not None else None


@app.command()
def validate(workflow: Path, set_: SetOpt = None) -> None:
    """Check a workflow (types, params, wiring, cycles) without running anything."""
    from orchestrator import workflow as wfmod

    wf = wfmod.load(workflow, set_ or [])
    out.print(f"[green]valid[/]: {wf.name}, {len(wf.nodes)} jobs, project {wf.project}")
    for name in wf.order:
        node = wf.nodes[name]
        wiring = ", ".join(f"{s} <- {r}" for s, r in node.inputs.items())
        out.print(f"  {name:<16} {node.type:<18} {node.key[:12]}  {wiring}")


@app.command()
def plan(
    workflow: Path,
    set_: SetOpt = None,
    force: Annotated[list[str] | None, typer.Option("--force", help="Job to rerun")] = None,
    project: ProjectOpt = None,
    json_: JsonOpt = False,
) -> None:
    """List every job with `run` or `reuse` and the reason."""
    from orchestrator import choices
    from orchestrator import plan as planning
    from orchestrator import workflow as wfmod
    from orchestrator.store import Store
    from orchestrator.store.db import DB_NAME

    wf = wfmod.load(workflow, set_ or [], project)
    _check_names(wf, force or [], "--force")
    with tempfile.TemporaryDirectory() as empty:
        # a project that does not exist yet is planned against an empty store, not created
        store = Store(wf.project if (wf.project / DB_NAME).exists() else empty)
        wf = choices.load(workflow, set_ or [], project, store)
        decisions = planning.plan(store, wf, set(force or []))
    if json_:
        _print_json([d.as_json() for d in decisions])
        return
    table = Table("job", "type", "key", "action", "reasons")
    for d in decisions:
        colour = "cyan" if d.action == "run" else "green"
        table.add_row(d.job, wf.nodes[d.job].type, d.key[:12], f"[{colour}]{d.action}[/]", "\n".join(d.reasons))
    out.print(table)


def _check_names(wf: Any, names: list[str], option: str) -> None:
    unknown = [n for n in names if n not in wf.nodes]
    if unknown:
        raise UsageError([f"{option}: unknown job '{n}' (jobs: {', '.join(wf.order)})" for n in unknown])


@app.command()
def run(
    workflow: Path,
    set_: SetOpt = None,
    only: Annotated[list[str] | None, typer.Option("--only", help="Run only this job (and what it needs)")] = None,
    force: Annotated[list[str] | None, typer.Option("--force", help="Rerun this job even if reusable")] = None,
    executor: Annotated[str | None, typer.Option("--executor", help="local or dask")] = None,
    address: Annotated[str | None, typer.Option("--address", help="Dask scheduler address")] = None,
    project: ProjectOpt = None,
) -> None:
    """Run the workflow as one Prefect flow run, reusing every job whose outputs exist."""
    from orchestrator import prefect_env
    from orchestrator import workflow as wfmod

    wf = wfmod.load(workflow, set_ or [], project)
    _check_names(wf, only or [], "--only")
    _check_names(wf, force or [], "--force")
    spec = wf.executor.model_copy()
    if executor is not None:
        if executor not in ("local", "dask"):
            raise UsageError(f"--executor: '{executor}' is not one of local, dask")
        spec.type = executor  # type: ignore[assignment]
    if address:
        spec.type, spec.address = "dask", address
    prefect_env.configure(wf.project)
    from orchestrator import runner
    from orchestrator.progress import TerminalProgress
    from orchestrator.store import Store

    with TerminalProgress(err) as progress:
        code = runner.run(wf, sets=set_ or [], only=only or [], force=force or [], executor=spec, progress=progress)
    from orchestrator import choices

    store = Store(wf.project)
    wf = choices.load(workflow, set_ or [], project, store)
    run_row = store.runs(1)[0]
    table = Table("job", "action", "reasons", title=f"run {run_row.id}: {run_row.status}")
    for rj in sorted(store.run_jobs(run_row.id), key=lambda r: wf.order.index(r.name) if r.name in wf.order else 0):
        table.add_row(rj.name, rj.action, "; ".join(rj.reasons))
    err.print(table)
    for j in (store.job(wf.nodes[n].key) for n in wf.order):
        if j is not None and j.status == "failed" and j.error:
            print(f"error in job '{j.name}': {j.error}", file=sys.stderr)
    raise typer.Exit(code)


@app.command()
def choose(
    workflow: Path,
    job: str,
    values: Annotated[list[str], typer.Argument(help="PARAM=VALUE answers, e.g. keep_classes=[1,3,4]")],
    set_: SetOpt = None,
    project: ProjectOpt = None,
) -> None:
    """Record the answer of an interactive job (e.g. select_2d) without the Prefect UI.

    Its inputs must exist (run the workflow up to it first); the answer becomes the job's params.
    """
    from orchestrator import choices
    from orchestrator import workflow as wfmod
    from orchestrator.store import Store

    wf = wfmod.load(workflow, set_ or [], project)
    _check_names(wf, [job], "JOB")
    store = Store(wf.project)
    wf = choices.load(workflow, set_ or [], project, store)
    node = wf.nodes[job]
    if node.job.interaction is None:
        raise UsageError(f"job '{job}' ({node.type}) asks no questions")
    missing = [str(node.inputs[s]) for s, k in node.input_keys.items() if store.artifact(k) is None]
    if missing:
        raise UsageError(f"job '{job}': inputs {missing} have no results yet; run the workflow with --only {job}")
    answers = wfmod.parse_set([f"{job}.{v}" for v in values])[job]
    wfmod.load(workflow, [*(set_ or []), *choices.as_sets(job, answers)], project)  # validates
    store.record_choice(job, choices.inputs_digest(node, store), answers, "cli")
    out.print(f"recorded for {job}: {answers}")


def _job_json(store: Any, job: Any) -> dict[str, Any]:
    return {
        "job": job.name, "type": job.type, "key": job.key, "status": job.status,
        "directory": job.directory, "started_at": _iso(job.started_at),
        "ended_at": _iso(job.ended_at), "duration_s": job.duration_s, "error": job.error,
    }


@app.command()
def status(project: ProjectOpt = None, json_: JsonOpt = False) -> None:
    """Runs and jobs recorded in the project."""
    store = _store(project)
    runs = store.runs(10)
    jobs = store.jobs()
    if json_:
        _print_json(
            {
                "project": str(store.project_dir),
                "runs": [
                    {"id": r.id, "workflow": r.workflow_name, "status": r.status,
                     "started_at": _iso(r.started_at), "ended_at": _iso(r.ended_at),
                     "prefect_flow_run_id": r.prefect_flow_run_id}
                    for r in runs
                ],
                "jobs": [_job_json(store, j) for j in jobs],
            }
        )
        return
    t = Table("run", "workflow", "status", "started", title=str(store.project_dir))
    for r in runs:
        t.add_row(str(r.id), r.workflow_name, r.status, str(r.started_at)[:19])
    out.print(t)
    t = Table("job", "type", "key", "status", "duration", "directory")
    for j in jobs:
        t.add_row(j.name, j.type, j.key[:12], j.status, f"{j.duration_s:.1f} s" if j.duration_s else "", j.directory)
    out.print(t)


def _find(store: Any, ref: str) -> Any:
    job = store.find_job(ref)
    if job is None:
        raise UsageError(f"no job named or keyed '{ref}' in {store.project_dir}")
    return job


@app.command()
def show(ref: str, project: ProjectOpt = None, json_: JsonOpt = False) -> None:
    """Params, inputs, outputs (sizes, checksums), timings, metrics and log tail of a job."""
    from orchestrator.execute import LOG_FILE

    store = _store(project)
    job = _find(store, ref)
    inputs = []
    for i in store.inputs_of(job.key):
        art = store.artifact(i.artifact_key)
        up = store.job(art.job_key) if art else None
        inputs.append({"slot": i.slot, "artifact": i.artifact_key, "from_job": up.name if up else None,
                       "from_slot": art.slot if art else None, "sha256": i.artifact_sha256})
    outputs = [
        {"slot": a.slot, "kind": a.kind, "artifact": a.key, "sha256": a.sha256, "size_bytes": a.size_bytes,
         "files": [{"path": f["path"], "size": f["size"], "sha256": f["sha256"]} for f in a.files],
         "summary": a.handle.get("summary", {})}
        for a in store.artifacts_of(job.key)
    ]
    metrics: dict[str, list[dict[str, Any]]] = {}
    for m in store.metrics_of(job.key):
        metrics.setdefault(m.name, []).append({"iteration": m.iteration, "value": m.value})
    log = store.project_dir / job.directory / LOG_FILE
    if not log.exists():
        log = store.project_dir / "jobs" / ".tmp" / Path(job.directory).name / LOG_FILE
    tail = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else []
    data = {
        **_job_json(store, job), "version": job.version, "params": job.params, "inputs": inputs,
        "outputs": outputs, "metrics": metrics, "backend": job.backend, "host": job.host,
        "peak_rss_mb": job.peak_rss_mb, "created_at": _iso(job.created_at), "log_tail": tail,
    }
    if json_:
        _print_json(data)
        return
    from orchestrator.reporting import job_markdown

    out.print(job_markdown(store, job.key))
    if tail:
        out.print("\nlog tail:\n" + "\n".join(tail))


@app.command()
def lineage(
    ref: str,
    down: Annotated[bool, typer.Option("--down", help="Descendants instead of ancestors")] = False,
    project: ProjectOpt = None,
    json_: JsonOpt = False,
) -> None:
    """The jobs a result came from (or, with --down, the jobs that used it)."""
    store = _store(project)
    job = _find(store, ref)
    rows = []
    for key, slot, depth in store.lineage(job.key, down=down):
        j = store.job(key)
        rows.append({"job": j.name, "type": j.type, "key": key, "slot": slot, "depth": depth, "status": j.status})
    if json_:
        _print_json({"job": job.name, "key": job.key, "direction": "down" if down else "up", "jobs": rows})
        return
    out.print(f"{job.name} ({job.type}) {job.key[:12]}")
    for r in rows:
        arrow = "used by" if down else "from"
        out.print(f"{'  ' * r['depth']}{arrow} {r['job']} ({r['type']}) {r['key'][:12]} via {r['slot']}")


@app.command()
def report(
    project: ProjectOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Default: PROJECT/report.html")] = None,
) -> None:
    """Write one self-contained HTML page: job graph, jobs (params, metrics, plots), provenance of final maps."""
    from orchestrator import report_html

    store = _store(project)
    if not store.jobs():
        raise UsageError(f"no jobs recorded in project '{store.project_dir}'; run a workflow first")
    print(report_html.write(store, (output or store.project_dir / "report.html").resolve()))


@app.command()
def summary(workflow: Path, set_: SetOpt = None, project: ProjectOpt = None, json_: JsonOpt = False) -> None:
    """Results of a workflow run on the demo dataset against its ground truth, with the demo's checks."""
    from jobs.errors import JobInputError
    from orchestrator import choices, demo_summary
    from orchestrator import workflow as wfmod

    store = _store(project or wfmod.load(workflow, set_ or []).project)
    wf = choices.load(workflow, set_ or [], store.project_dir, store)
    try:
        rows = demo_summary.summarise(store, wf)
    except (ValueError, JobInputError) as exc:
        raise UsageError(str(exc)) from None
    if json_:
        _print_json([vars(r) for r in rows])
        return
    table = Table("job", "type", "result", "check", "time", title=f"{wf.name} on the demo dataset vs truth")
    for r in rows:
        colour = {"PASS": "green", "FAIL": "red"}.get(r.check.split(" ")[0], "default")
        table.add_row(r.job, r.type, r.result, f"[{colour}]{r.check}[/]" if r.check else "",
                      "" if r.seconds is None else f"{r.seconds:.0f} s")
    Console(soft_wrap=True, width=max(out.width, 160)).print(table)
    out.print(f"Report: flow report --project {store.project_dir}")


UNITS = {"_A": "Å", "_px": "px", "_deg": "deg", "_kv": "kV", "_mm": "mm", "_um": "µm", "_s": "s"}


def _unit(name: str) -> str:
    return next((u for suffix, u in UNITS.items() if name.endswith(suffix)), "")


@app.command("jobs")
def jobs_(json_: JsonOpt = False) -> None:
    """Job types with their params, defaults, units and help (from the pydantic models)."""
    from jobs import registry

    data = []
    for name, jt in registry.all_types().items():
        params = []
        for pname, f in jt.params.model_fields.items():
            default = f.get_default(call_default_factory=True)
            params.append({"name": pname, "type": getattr(f.annotation, "__name__", str(f.annotation)),
                           "default": default, "unit": _unit(pname), "help": f.description or ""})
        data.append({"type": name, "version": jt.version, "summary": jt.summary,
                     "inputs": {s: {"kind": sl.kind_name(), "requires": sorted(sl.requires), "optional": sl.optional}
                                for s, sl in jt.inputs.items()},
                     "outputs": {s: jt.output_kind(s) for s in jt.outputs}, "params": params})
    if json_:
        _print_json(data)
        return
    for d in data:
        out.print(f"[bold]{d['type']}[/] v{d['version']}: {d['summary']}")
        ins = ", ".join(f"{s}: {v['kind']}{v['requires'] or ''}" for s, v in d["inputs"].items()) or "none"
        out.print(f"  inputs: {ins}; outputs: {', '.join(f'{s}: {k}' for s, k in d['outputs'].items())}")
        t = Table("param", "type", "default", "unit", "help")
        for p in d["params"]:
            t.add_row(p["name"], p["type"], repr(p["default"]), p["unit"], p["help"])
        out.print(t)


@app.command()
def ui(
    project: ProjectOpt = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1")] = 4200,
    background: Annotated[bool, typer.Option("--background", help="Return once the server is up")] = False,
) -> None:
    """Start a local Prefect server on 127.0.0.1 and print the URL of the flow runs."""
    from orchestrator import prefect_env

    p = _project(project)
    p.mkdir(parents=True, exist_ok=True)
    prefect_env.configure(p)
    api = f"http://127.0.0.1:{port}/api"
    home = prefect_env.prefect_home(p)
    home.mkdir(parents=True, exist_ok=True)
    if not prefect_env.server_healthy(api):
        log = open(home / "server.log", "ab")  # noqa: SIM115 - handed to the server process
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
             "--port", str(port), "--analytics-off"],
            stdout=log, stderr=log, start_new_session=background,
            env={**os.environ, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
                 "PREFECT_UI_API_URL": api},
        )
        deadline = time.monotonic() + 120
        while not prefect_env.server_healthy(api):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise UsageError(f"the Prefect server did not start; see {home / 'server.log'}")
            time.sleep(0.3)
        (home / prefect_env.UI_FILE).write_text(json.dumps({"api_url": api, "pid": proc.pid}))
    else:
        proc = None
    out.print(f"Prefect UI: http://127.0.0.1:{port}/runs  (API {api})")
    out.print(f"`flow run` for project {p} now reports to this server.")
    if background or proc is None:
        return
    try:
        proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)
    finally:
        (home / prefect_env.UI_FILE).unlink(missing_ok=True)


@app.command()
def simulate(
    out_dir: Path,
    preset: Annotated[str, typer.Option(help="Dataset preset (demo, tiny, small_states, small_motion)")] = "demo",
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
) -> None:
    """Write a simulated dataset with its ground truth (poses, states, t, volumes, CTF)."""
    from jobs import simulated_dataset

    if preset not in simulated_dataset.PRESETS:
        raise UsageError(f"--preset: unknown preset '{preset}' (presets: {', '.join(simulated_dataset.PRESETS)})")
    summary = simulated_dataset.write_preset(preset, out_dir, seed=seed)
    out.print(json.dumps(summary, indent=2, default=str))


def main() -> None:
    """Entry point of the `flow` console script."""
    debug = "--debug" in sys.argv
    try:
        code = app(standalone_mode=False)
    except UsageError as exc:
        if debug:
            raise
        for p in exc.problems:
            print(f"error: {p}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.BadParameter, typer.Abort) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # click usage errors and anything unexpected
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        if debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
