"""Real Prefect flow runs: reuse, partial reruns, failures, kills, JSON shapes, Prefect API, Dask."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import FLOW, WF, Flow, _actions, _run, _setup, _value

from orchestrator.store import Store


def test_rerun_reuses_all_then_set_reruns_only_the_branch(flow_run_cli: Flow) -> None:
    _setup(flow_run_cli)
    _run(flow_run_cli)
    assert _actions(flow_run_cli.cwd) == dict.fromkeys("abcd", "executed")
    assert _value(flow_run_cli.cwd, "d") == 4.0
    err = _run(flow_run_cli)
    assert _actions(flow_run_cli.cwd) == dict.fromkeys("abcd", "reused")
    assert "reused" in err
    _run(flow_run_cli, "--set", "b.add=3")
    assert _actions(flow_run_cli.cwd) == {"a": "reused", "b": "executed", "c": "reused", "d": "executed"}
    assert _value(flow_run_cli.cwd, "d") == 6.0
    # the old branch and the new one coexist; going back reuses the old one
    _run(flow_run_cli)
    assert _actions(flow_run_cli.cwd) == dict.fromkeys("abcd", "reused")


def test_plan_json_and_deleted_or_altered_outputs(flow_run_cli: Flow) -> None:
    _setup(flow_run_cli)
    plan = json.loads(flow_run_cli("plan", "wf.yaml", "--json").out)
    assert [(p["action"], p["reasons"]) for p in plan] == [("run", ["new"])] * 4
    assert not (flow_run_cli.cwd / "proj").exists(), "planning must not create the project"
    _run(flow_run_cli)
    r = flow_run_cli("plan", "wf.yaml", "--set", "c.add=7", "--json")
    plan = json.loads(r.out)
    assert [p["job"] for p in plan] == ["a", "b", "c", "d"]
    assert all(set(p) == {"job", "key", "action", "reasons"} for p in plan)
    by_job = {p["job"]: p for p in plan}
    assert by_job["c"]["action"] == "run" and by_job["c"]["reasons"] == ["params changed: add 5.0 -> 7.0"]
    assert by_job["a"]["action"] == by_job["d"]["action"] == "reuse"

    store = Store(flow_run_cli.cwd / "proj")
    b_dir = flow_run_cli.cwd / "proj" / store.find_job("b").directory
    (b_dir / "particles.star").unlink()
    plan = {p["job"]: p for p in json.loads(flow_run_cli("plan", "wf.yaml", "--json").out)}
    assert plan["b"]["action"] == "run" and "missing" in plan["b"]["reasons"][0]
    _run(flow_run_cli)
    # b is deterministic: it reran with identical bytes, so d (below it) is reused (early cutoff)
    assert _actions(flow_run_cli.cwd) == {"a": "reused", "b": "executed", "c": "reused", "d": "reused"}

    (b_dir / "particles.star").write_text("9.0\n")
    plan = {p["job"]: p for p in json.loads(flow_run_cli("plan", "wf.yaml", "--json").out)}
    assert plan["b"]["action"] == "run" and "changed" in plan["b"]["reasons"][0]
    _run(flow_run_cli)
    assert _actions(flow_run_cli.cwd)["b"] == "executed"
    assert _value(flow_run_cli.cwd, "d") == 4.0


def test_force_reruns_one_job_and_below_when_its_outputs_change(flow_run_cli: Flow) -> None:
    _setup(flow_run_cli, WF.replace("{value: 2.0}", "{value: 2.0, nondeterministic: false}"))
    _run(flow_run_cli)
    _run(flow_run_cli, "--force", "b")
    assert _actions(flow_run_cli.cwd) == {"a": "reused", "b": "executed", "c": "reused", "d": "reused"}
    _setup(flow_run_cli, WF.replace("{value: 2.0}", "{value: 2.0, nondeterministic: true}"))
    _run(flow_run_cli)
    _run(flow_run_cli, "--force", "a")
    # a's bytes differ, so b and c rerun; b's output is the same number again, so d is reused
    assert _actions(flow_run_cli.cwd) == {"a": "executed", "b": "executed", "c": "executed", "d": "reused"}


def test_failed_job_stops_its_branch_and_next_run_reuses_the_rest(flow_run_cli: Flow) -> None:
    _setup(flow_run_cli)
    err = _run(flow_run_cli, "--set", "b.add=nan", expect=2)  # NaN cannot be keyed: usage error
    assert "add" in err
    _setup(flow_run_cli, WF + "  e: {type: toy_make, params: {fail: true}}\n"
           "  f: {type: toy_add, inputs: {particles: e.particles}}\n")
    err = _run(flow_run_cli, expect=1)
    assert "toy failure" in err
    actions = _actions(flow_run_cli.cwd)
    assert actions == {"a": "executed", "b": "executed", "c": "executed", "d": "executed", "e": "failed"}
    store = Store(flow_run_cli.cwd / "proj")
    assert store.find_job("e").status == "failed" and "toy failure" in store.find_job("e").error
    assert store.find_job("f") is None
    _setup(flow_run_cli, WF + "  e: {type: toy_make, params: {fail: false}}\n"
           "  f: {type: toy_add, inputs: {particles: e.particles}}\n")
    _run(flow_run_cli)
    assert _actions(flow_run_cli.cwd) == {**dict.fromkeys("abcd", "reused"), "e": "executed", "f": "executed"}


def test_bad_input_in_a_job_exits_2_and_records_nothing_complete(flow_run_cli: Flow) -> None:
    _setup(flow_run_cli, "name: t\nproject: ./proj\njobs:\n  a: {type: toy_make, params: {bad_input: true}}\n")
    err = _run(flow_run_cli, expect=2)
    assert "x.star', row 3: missing rlnDefocusU" in err
    store = Store(flow_run_cli.cwd / "proj")
    assert store.find_job("a").status == "failed"
    assert store.artifacts_of(store.find_job("a").key) == []
    assert not any((flow_run_cli.cwd / "proj" / "jobs").glob("a-*"))


def test_sigkill_of_a_job_fails_cleanly_and_next_run_completes(flow_run_cli: Flow) -> None:
    _setup(flow_run_cli)
    env = {**flow_run_cli.env, "TOY_EXTRA_SLEEP_S": "60"}
    proc = subprocess.Popen([FLOW, "run", "wf.yaml"], cwd=flow_run_cli.cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    pid_files: list[Path] = []
    while not pid_files and time.monotonic() < deadline:
        pid_files = list((flow_run_cli.cwd / "proj" / "jobs" / ".tmp").glob("a-*/child.pid"))
        time.sleep(0.2)
    assert pid_files, "job a never started"
    time.sleep(0.3)
    os.kill(int(pid_files[0].read_text()), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    assert "SIGKILL" in err
    db = sqlite3.connect(flow_run_cli.cwd / "proj" / "provenance.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT status FROM jobs WHERE name='a'").fetchone()[0] == "failed"
    assert db.execute("SELECT count(*) FROM artifacts").fetchone()[0] == 0
    db.close()
    _run(flow_run_cli)
    assert _actions(flow_run_cli.cwd) == dict.fromkeys("abcd", "executed")


def test_status_show_lineage_json_shapes(flow_run_cli: Flow) -> None:
    _setup(flow_run_cli)
    _run(flow_run_cli)
    status = json.loads(flow_run_cli("status", "--project", "proj", "--json").out)
    assert set(status) == {"project", "runs", "jobs"}
    assert {j["job"] for j in status["jobs"]} == set("abcd")
    assert set(status["jobs"][0]) >= {"job", "type", "key", "status", "directory", "duration_s"}
    show = json.loads(flow_run_cli("show", "d", "--project", "proj", "--json").out)
    assert show["params"] == {"add": 1.0, "seed": 0}
    assert show["inputs"][0]["from_job"] == "b" and show["inputs"][0]["slot"] == "particles"
    out = show["outputs"][0]
    assert out["kind"] == "ParticleSet" and out["files"][0]["size"] > 0 and len(out["files"][0]["sha256"]) == 64
    assert show["metrics"]["value"][-1]["value"] == 4.0
    assert show["status"] == "done" and show["duration_s"] > 0
    show_key = json.loads(flow_run_cli("show", show["key"][:12], "--project", "proj", "--json").out)
    assert show_key["job"] == "d"
    a_show = json.loads(flow_run_cli("show", "a", "--project", "proj", "--json").out)
    assert any("made 2.0" in line for line in a_show["log_tail"])
    up = json.loads(flow_run_cli("lineage", "d", "--project", "proj", "--json").out)
    assert [(j["job"], j["depth"]) for j in up["jobs"]] == [("b", 1), ("a", 2)]
    down = json.loads(flow_run_cli("lineage", "a", "--down", "--project", "proj", "--json").out)
    assert {(j["job"], j["depth"]) for j in down["jobs"]} == {("b", 1), ("c", 1), ("d", 2)}
    assert flow_run_cli("show", "zz", "--project", "proj").code == 2


def test_prefect_api_has_the_flow_run_and_one_task_run_per_job(flow_run_cli: Flow) -> None:
    _setup(flow_run_cli)
    _run(flow_run_cli)
    run = Store(flow_run_cli.cwd / "proj").runs(1)[0]
    assert run.prefect_flow_run_id
    code = (
        "import asyncio, json, sys\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId\n"
        "async def main():\n"
        "    async with get_client() as c:\n"
        "        fr = await c.read_flow_run(sys.argv[1])\n"
        "        trs = await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])))\n"
        "        print(json.dumps({'name': fr.name, 'state': fr.state.type.value,\n"
        "                          'tasks': sorted((t.name, t.state.type.value) for t in trs)}))\n"
        "asyncio.run(main())\n"
    )
    import sys

    r = subprocess.run([sys.executable, "-c", code, run.prefect_flow_run_id], env=flow_run_cli.env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(r.stdout.strip().splitlines()[-1])
    assert data["name"] == "toy" and data["state"] == "COMPLETED"
    assert [tuple(t) for t in data["tasks"]] == [(n, "COMPLETED") for n in "abcd"]


@pytest.mark.slow
def test_dask_executor_runs_the_same_flow(flow_run_cli: Flow) -> None:
    _setup(flow_run_cli)
    _run(flow_run_cli, "--executor", "dask", timeout=400)
    assert _actions(flow_run_cli.cwd) == dict.fromkeys("abcd", "executed")
    _run(flow_run_cli)
    assert _actions(flow_run_cli.cwd) == dict.fromkeys("abcd", "reused")
