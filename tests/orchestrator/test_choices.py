"""Interactive steps: the flow pauses with a form; the answer becomes params (key, provenance)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from cli_helpers import FLOW, Flow, _actions, _run

from orchestrator.store import Store

WF = """\
name: pick
project: ./proj
jobs:
  a: {type: toy_make, params: {value: 2.0}}
  p: {type: toy_pick, inputs: {particles: a.particles}}
  q: {type: toy_add, inputs: {particles: p.particles}}
"""

API = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect.flow_runs import resume_flow_run
async def main():
    async with get_client() as c:
        fr = await c.read_flow_run(sys.argv[1])
        print(json.dumps({"state": fr.state.type.value}))
        if sys.argv[2] == "resume" and fr.state.type.value == "PAUSED":
            await resume_flow_run(fr.id, run_input={"keep": [3, 4]})
            print(json.dumps({"resumed": True}))
asyncio.run(main())
"""


def _api(flow: Flow, flow_run_id: str, action: str) -> list[dict]:
    r = subprocess.run([sys.executable, "-c", API, flow_run_id, action], env=flow.env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_paused_flow_takes_the_answer_from_the_ui_and_reuses_it(flow_run_cli: Flow) -> None:
    (flow_run_cli.cwd / "wf.yaml").write_text(WF)
    plan = {p["job"]: p for p in json.loads(flow_run_cli("plan", "wf.yaml", "--json").out)}
    assert plan["p"]["action"] == "run" and "waits for a choice" in plan["p"]["reasons"][0]
    proc = subprocess.Popen([FLOW, "run", "wf.yaml"], cwd=flow_run_cli.cwd, env=flow_run_cli.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    resumed = False
    while not resumed and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(1.0)
        runs = Store(flow_run_cli.cwd / "proj").runs(1) if (flow_run_cli.cwd / "proj").exists() else []
        if runs and runs[0].prefect_flow_run_id:
            resumed = any(r.get("resumed") for r in _api(flow_run_cli, runs[0].prefect_flow_run_id, "resume"))
    assert resumed, "the flow run never paused for the choice"
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    store = Store(flow_run_cli.cwd / "proj")
    assert store.find_job("p").params["keep"] == [3, 4]
    assert (flow_run_cli.cwd / "proj" / store.find_job("q").directory / "particles.star").read_text() == "8.0\n"
    _run(flow_run_cli)  # no pause: the recorded choice is applied, everything is reused
    assert _actions(flow_run_cli.cwd) == dict.fromkeys("apq", "reused")


def test_flow_choose_records_the_answer_without_the_ui(flow_run_cli: Flow) -> None:
    (flow_run_cli.cwd / "wf.yaml").write_text(WF)
    r = flow_run_cli("choose", "wf.yaml", "p", "keep=[5]")
    assert r.code == 2 and "no results yet" in r.err
    _run(flow_run_cli, "--only", "a")
    assert flow_run_cli("choose", "wf.yaml", "p", "keep=[x]").code == 2
    r = flow_run_cli("choose", "wf.yaml", "p", "keep=[5]")
    assert r.code == 0, r.err
    _run(flow_run_cli)
    assert _actions(flow_run_cli.cwd) == {"a": "reused", "p": "executed", "q": "executed"}
    assert Store(flow_run_cli.cwd / "proj").find_job("p").params["keep"] == [5]
