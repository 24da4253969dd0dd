"""GPU leases: jobs that declare a GPU never share a device, and each sees only its own."""

from __future__ import annotations

import pytest
from cli_helpers import Flow, _run

from orchestrator.execute import ALLOCATOR_ENV, child_env
from orchestrator.store import Store

WF = """\
name: gpus
project: ./proj
jobs:
  g1: {type: toy_gpu, params: {sleep_s: 1.5, seed: 1}}
  g2: {type: toy_gpu, params: {sleep_s: 1.5, seed: 2}}
"""


def _intervals(flow: Flow) -> dict[str, tuple[str, float, float]]:
    store = Store(flow.cwd / "proj")
    out = {}
    for name in ("g1", "g2"):
        dev, start, end = (flow.cwd / "proj" / store.find_job(name).directory / "particles.star").read_text().split()
        out[name] = (dev, float(start), float(end))
    return out


@pytest.mark.parametrize("n_gpus", [1, 2])
def test_gpu_jobs_get_their_own_device(flow_run_cli: Flow, n_gpus: int) -> None:
    (flow_run_cli.cwd / "wf.yaml").write_text(WF)
    _run(flow_run_cli, extra_env={"CRYODAG_GPUS": str(n_gpus)})
    (d1, s1, e1), (d2, s2, e2) = _intervals(flow_run_cli).values()
    if n_gpus == 1:
        assert d1 == d2 == "0"
        assert e1 <= s2 or e2 <= s1, "two jobs ran on one GPU at the same time"
    else:
        assert {d1, d2} == {"0", "1"}


def test_job_environment_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Allocator defaults < the user's environment < the device lease."""
    monkeypatch.setenv("MALLOC_TOP_PAD_", "4096")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    env = child_env({"CUDA_VISIBLE_DEVICES": "1"})
    assert env["MALLOC_TOP_PAD_"] == "4096"
    assert env["MALLOC_MMAP_THRESHOLD_"] == ALLOCATOR_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
