"""`flow report`: one self-contained HTML page with the job graph, the jobs and the provenance of the maps.

The project is built without Prefect: each job of a toy workflow runs through orchestrator.execute.
`toy_map` (defined here, imported by the job workers as `test_report:MAP`) writes a VolumeSet and a plot.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import toy_jobs
from cli_helpers import Flow

from jobs.artifacts import ParticleSet, Volume, VolumeSet
from jobs.base import JobParams, JobType, Slot
from jobs.context import JobContext
from orchestrator import workflow as wfmod
from orchestrator.canonical import canonical_json, sha256_text
from orchestrator.execute import JobError, execute
from orchestrator.store import Store


class MapParams(JobParams):
    resolution_A: float = 8.0


def run_map(params: MapParams, inputs: dict, ctx: JobContext) -> dict:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0.0, 0.5], [1.0, 0.1])
    ctx.plot("fsc", fig)
    ctx.metric("resolution_A", params.resolution_A)
    path = ctx.path("map.mrc")
    path.write_bytes(b"map")
    return {"map": VolumeSet(volumes=[Volume(map=ctx.ref(path), resolution_A=params.resolution_A)], box=8,
                             pixel_size=1.0)}


MAP = JobType("toy_map", MapParams, {"particles": Slot(ParticleSet)}, {"map": VolumeSet}, 1, run_map)
MODULES = toy_jobs.MODULES + ",toy_map=test_report:MAP"

WF = """\
name: report
jobs:
  a: {type: toy_make, params: {value: 2.0}}
  b: {type: toy_add, inputs: {particles: a.particles}, params: {add: 1.5}}
  c: {type: toy_add, inputs: {particles: a.particles}}
  m: {type: toy_map, inputs: {particles: b.particles}, params: {resolution_A: 6.5}}
  e: {type: toy_make, params: {fail: true}}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, toy_env: dict[str, str]) -> Path:
    """A project where a, b, c, m are done and e failed."""
    root = tmp_path_factory.mktemp("report")
    (root / "wf.yaml").write_text(WF)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYODAG_JOB_MODULES", MODULES)
        mp.setenv("PYTHONPATH", toy_env["PYTHONPATH"])
        wf = wfmod.load(root / "wf.yaml", [], root / "proj")
        store = Store(wf.project)
        for name in wf.order:
            if name == "e":
                with pytest.raises(JobError, match="toy failure"):
                    execute(store, wf, wf.nodes[name], None, lambda event: None)
            else:
                execute(store, wf, wf.nodes[name], None, lambda event: None)
    return wf.project


@pytest.fixture
def flow(tmp_path: Path, toy_env: dict[str, str]) -> Flow:
    return Flow(tmp_path, {**toy_env, "CRYODAG_JOB_MODULES": MODULES})


def test_report_is_self_contained_with_graph_jobs_plots_and_provenance(project: Path, flow: Flow) -> None:
    r = flow("report", "--project", str(project))
    assert r.code == 0, r.err[-2000:]
    target = project / "report.html"
    assert r.out.strip() == str(target)
    assert not list(project.glob(".report.html.*"))
    page = target.read_text()
    for bad in ('src="http', 'href="http', "<script", "<link"):
        assert bad not in page
    store = Store(project)
    keys = {n: store.find_job(n).key for n in "abcme"}
    # header: jobs by status
    assert "5 jobs" in page and "4 done" in page and "1 failed" in page
    # graph: one node per job, the three edges
    svg = page[page.index("<svg"):page.index("</svg>")]
    assert sorted(re.findall(r'class="node" data-key="(\w+)"', svg)) == sorted(keys.values())
    edges = set(re.findall(r'class="edge" data-from="(\w+)" data-to="(\w+)"', svg))
    assert edges == {(keys["a"], keys["b"]), (keys["a"], keys["c"]), (keys["b"], keys["m"])}
    # job sections in topological order, with params (set vs default), metrics, the failure
    starts = {n: page.index(f'<section class="job" id="job-{k}">') for n, k in keys.items()}
    assert starts["a"] < starts["b"] < starts["m"] and starts["a"] < starts["c"]
    for n, k in keys.items():
        assert f"<h3>{n} <small>" in page and k in page
    section = {n: page[s:page.index("</section>", s)] for n, s in starts.items()}
    assert '<tr class="set"><td>add</td><td>1.5</td><td>1.0</td></tr>' in section["b"]
    assert "<tr><td>add</td><td>1.0</td><td>1.0</td></tr>" in section["c"]
    assert "<td>value</td><td>3.5</td>" in section["b"]
    assert "<td>resolution_A</td><td>6.5</td>" in section["m"]
    assert "toy failure" in section["e"] and "status-failed" in section["e"]
    # plots embedded only where a job wrote one
    assert section["m"].count('<img src="data:image/png;base64,iVBOR') == 1
    assert "<img" not in section["b"]
    # provenance of the final map: m <- b <- a, with types, keys and params hashes
    prov = page[page.index("Provenance of the final maps"):]
    assert "m.map" in prov and "6.50 Å" in prov
    chain = re.findall(r'<tr class="chain"><td>(\d+)</td><td><a href="#job-(\w+)">(\w+)</a></td>', prov)
    assert chain == [("0", keys["m"], "m"), ("1", keys["b"], "b"), ("2", keys["a"], "a")]
    a = store.job(keys["a"])
    assert sha256_text(canonical_json(a.params))[:12] in prov and "toy_make v1" in prov


def test_report_output_option(project: Path, flow: Flow) -> None:
    r = flow("report", "-p", str(project), "--output", "out/r.html")
    assert r.code == 0, r.err[-2000:]
    assert r.out.strip() == str(flow.cwd / "out" / "r.html")
    assert "<svg" in (flow.cwd / "out" / "r.html").read_text()


def test_report_without_store_or_jobs_exits_2(flow: Flow) -> None:
    r = flow("report", "--project", "missing")
    assert r.code == 2 and "no cryodag project" in r.err
    assert not (flow.cwd / "missing").exists()
    Store(flow.cwd / "empty")
    r = flow("report", "--project", "empty")
    assert r.code == 2 and r.err.strip() == f"error: no jobs recorded in project '{flow.cwd / 'empty'}'; run a " \
        "workflow first"
    assert not (flow.cwd / "empty" / "report.html").exists()
