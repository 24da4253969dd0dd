"""`flow ui` starts a local Prefect server; `flow run` of that project then reports to it."""

from __future__ import annotations

import json
import os
import signal
import urllib.request

from cli_helpers import WF, Flow, _free_port

from orchestrator.store import Store


def test_flow_ui_background_then_run_appears_in_it(flow_cli: Flow) -> None:
    env = {k: v for k, v in flow_cli.env.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    flow = Flow(flow_cli.cwd, env)
    (flow.cwd / "wf.yaml").write_text(WF)
    port = _free_port()
    r = flow("ui", "--project", "proj", "--port", str(port), "--background", timeout=180)
    assert r.code == 0, r.err
    assert f"http://127.0.0.1:{port}/runs" in r.out
    ui = json.loads((flow.cwd / "proj" / ".prefect" / "ui.json").read_text())
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as resp:
            assert json.loads(resp.read())["api_url"] == ui["api_url"], "the UI would call another server"
        r = flow("run", "wf.yaml")
        assert r.code == 0, r.err[-2000:]
        flow_run_id = Store(flow.cwd / "proj").runs(1)[0].prefect_flow_run_id
        req = urllib.request.Request(f"{ui['api_url']}/flow_runs/{flow_run_id}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            data = json.loads(resp.read())
        assert data["name"] == "toy" and data["state_type"] == "COMPLETED"
    finally:
        os.kill(ui["pid"], signal.SIGTERM)
