"""Invalid workflows: each exits 2 with one message per problem naming job and field, no traceback;
the shipped workflows validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.workflow import load

GOOD = {
    "a": "{type: toy_make, params: {value: 2.0}}",
    "b": "{type: toy_add, inputs: {particles: a.particles}}",
}


def _wf(jobs: dict[str, str], head: str = "name: bad\nproject: ./proj\n") -> str:
    return head + "jobs:\n" + "".join(f"  {k}: {v}\n" for k, v in jobs.items())


CASES = [
    ("unknown job type", _wf({**GOOD, "b": "{type: toy_addd, inputs: {particles: a.particles}}"}),
     ["job 'b'", "field 'type'", "toy_addd", "did you mean 'toy_add'"]),
    ("unknown param", _wf({**GOOD, "a": "{type: toy_make, params: {valeu: 2.0}}"}),
     ["job 'a'", "params.valeu", "unknown field"]),
    ("ill-typed param", _wf({**GOOD, "a": "{type: toy_make, params: {count: many}}"}),
     ["job 'a'", "params.count", "integer"]),
    ("out-of-range param", _wf({**GOOD, "a": "{type: toy_make, params: {count: 0}}"}),
     ["job 'a'", "params.count", "greater than or equal to 1"]),
    ("unknown upstream", _wf({**GOOD, "b": "{type: toy_add, inputs: {particles: x.particles}}"}),
     ["job 'b'", "inputs.particles", "unknown upstream job 'x'"]),
    ("unknown upstream slot", _wf({**GOOD, "b": "{type: toy_add, inputs: {particles: a.volumes}}"}),
     ["job 'b'", "inputs.particles", "has no output 'volumes'"]),
    ("bad reference form", _wf({**GOOD, "b": "{type: toy_add, inputs: {particles: a}}"}),
     ["job 'b'", "inputs.particles", "JOB.SLOT"]),
    ("unknown input slot", _wf({**GOOD, "b": "{type: toy_add, inputs: {particles: a.particles, mask: a.particles}}"}),
     ["job 'b'", "inputs.mask", "no input slot 'mask'"]),
    ("missing required input", _wf({**GOOD, "b": "{type: toy_add}"}),
     ["job 'b'", "inputs.particles", "required input is not wired"]),
    ("slot of the wrong kind", _wf({**GOOD, "m": "{type: toy_mask, inputs: {particles: a.particles}}",
                                    "b": "{type: toy_add, inputs: {particles: m.mask}}"}),
     ["job 'b'", "inputs.particles", "is a Mask, slot needs a ParticleSet"]),
    ("missing required columns", _wf({**GOOD, "b": "{type: toy_needs_poses, inputs: {particles: a.particles}}"}),
     ["job 'b'", "inputs.particles", "lacks required columns ['alignments3D']"]),
    ("cycle", _wf({"a": "{type: toy_add, inputs: {particles: b.particles}}",
                   "b": "{type: toy_add, inputs: {particles: a.particles}}"}),
     ["cycle", "a", "b"]),
    ("unknown top-level key", _wf(GOOD, "name: bad\nprojet: ./proj\n"), ["field 'projet'", "unknown field"]),
    ("missing jobs", "name: bad\n", ["field 'jobs'", "missing"]),
    ("invalid YAML", "name: bad\njobs: {a: [\n", ["invalid YAML", "line"]),
    ("unknown defaults job type", _wf(GOOD, "name: bad\ndefaults: {toy_mak: {value: 1}}\n"),
     ["defaults", "toy_mak"]),
    ("misspelled global default", _wf(GOOD, "name: bad\ndefaults: {sede: 5}\n"),
     ["defaults", "field 'sede'", "did you mean 'seed'"]),
    ("bad job name", _wf({**GOOD, "1st": "{type: toy_make}"}), ["job '1st'", "invalid job name"]),
]


@pytest.mark.parametrize(("label", "text", "expected"), CASES, ids=[c[0] for c in CASES])
def test_invalid_workflow_exits_2_naming_job_and_field(flow_cli, label: str, text: str, expected: list[str]) -> None:
    (flow_cli.cwd / "wf.yaml").write_text(text)
    for command in (["validate", "wf.yaml"], ["plan", "wf.yaml"]):
        r = flow_cli(*command)
        assert r.code == 2, (label, r.out, r.err)
        for fragment in expected:
            assert fragment in r.err, (label, fragment, r.err)
        assert "Traceback" not in r.err + r.out
    assert not (flow_cli.cwd / "proj").exists(), "nothing may be created for an invalid workflow"


def test_several_problems_reported_at_once(flow_cli) -> None:
    text = _wf({"a": "{type: toy_make, params: {valeu: 1, count: x}}", "b": "{type: nope}"})
    (flow_cli.cwd / "wf.yaml").write_text(text)
    r = flow_cli("validate", "wf.yaml")
    assert r.code == 2
    assert "params.valeu" in r.err and "params.count" in r.err and "job 'b'" in r.err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "zz.value=1"], "unknown job 'zz'"),
        (["--set", "a.nope=1"], "params.nope"),
        (["--set", "a.value"], "JOB.PARAM=VALUE"),
        (["--force", "zz"], "--force: unknown job 'zz'"),
    ],
)
def test_bad_command_line_exits_2(flow_cli, args: list[str], fragment: str) -> None:
    (flow_cli.cwd / "wf.yaml").write_text(_wf(GOOD))
    r = flow_cli("plan", "wf.yaml", *args)
    assert r.code == 2 and fragment in r.err, r.err


def test_missing_workflow_file(flow_cli) -> None:
    r = flow_cli("validate", "nope.yaml")
    assert r.code == 2 and "nope.yaml" in r.err and "not found" in r.err


def test_valid_workflow_lists_jobs(flow_cli) -> None:
    (flow_cli.cwd / "wf.yaml").write_text(_wf(GOOD))
    r = flow_cli("validate", "wf.yaml")
    assert r.code == 0 and "valid" in r.out and "toy_add" in r.out


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "workflows").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_workflows_validate(path: Path) -> None:
    """Every YAML in workflows/ loads: job types, params, wiring and required columns check out."""
    wf = load(path, [])
    assert wf.order and all(wf.nodes[n].key for n in wf.order)
