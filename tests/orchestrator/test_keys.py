"""Job keys: stable across formatting and processes; changed by every param and upstream."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import toy_jobs

from orchestrator import workflow as wfmod
from orchestrator.canonical import canonical_json

BASE = """\
name: keys
project: ./proj
jobs:
  a: {type: toy_make, params: {value: 2.5, count: 4}}
  b: {type: toy_add, inputs: {particles: a.particles}, params: {add: 1.0}}
  c: {type: toy_add, inputs: {particles: b.particles}}
"""

REFORMATTED = """\
# the same workflow, written differently
jobs:
  c:
    inputs:   {particles: b.particles}     # trailing comment
    type: toy_add
  b:
    params:
      add: 1            # int for a float field
    inputs:
      particles: a.particles
    type: toy_add
  a:
    params: {count: 4, value: 2.50}
    type: toy_make
project: ./proj
name: keys
"""


@pytest.fixture(autouse=True)
def _toys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYODAG_JOB_MODULES", toy_jobs.MODULES)


def _keys(tmp_path: Path, text: str, sets: list[str] | None = None) -> dict[str, str]:
    p = tmp_path / f"wf{abs(hash(text)) % 10**8}.yaml"
    p.write_text(text)
    wf = wfmod.load(p, sets)
    return {n: wf.nodes[n].key for n in wf.order}


def test_formatting_order_and_comments_do_not_change_keys(tmp_path: Path) -> None:
    assert _keys(tmp_path, BASE) == _keys(tmp_path, REFORMATTED)


def test_explicit_defaults_equal_implicit(tmp_path: Path) -> None:
    explicit = BASE.replace("{add: 1.0}", "{add: 1.0, seed: 0}")
    assert _keys(tmp_path, BASE) == _keys(tmp_path, explicit)


@pytest.mark.parametrize(
    ("job", "param", "value", "changed"),
    [
        ("a", "value", "2.6", {"a", "b", "c"}),
        ("a", "count", "5", {"a", "b", "c"}),
        ("a", "seed", "1", {"a", "b", "c"}),
        ("a", "sleep_s", "0.1", {"a", "b", "c"}),
        ("b", "add", "2.0", {"b", "c"}),
        ("b", "seed", "7", {"b", "c"}),
        ("c", "add", "0.5", {"c"}),
    ],
)
def test_every_param_change_changes_its_key_and_those_below(
    tmp_path: Path, job: str, param: str, value: str, changed: set[str]
) -> None:
    before = _keys(tmp_path, BASE)
    after = _keys(tmp_path, BASE, [f"{job}.{param}={value}"])
    assert {n for n in before if before[n] != after[n]} == changed


def test_rewiring_changes_keys(tmp_path: Path) -> None:
    before = _keys(tmp_path, BASE)
    after = _keys(tmp_path, BASE.replace("c: {type: toy_add, inputs: {particles: b.particles}}",
                                         "c: {type: toy_add, inputs: {particles: a.particles}}"))
    assert before["c"] != after["c"] and before["b"] == after["b"]


def test_keys_stable_across_processes(tmp_path: Path) -> None:
    p = tmp_path / "wf.yaml"
    p.write_text(BASE)
    here = str(Path(toy_jobs.__file__).parent)
    code = (
        f"import sys; sys.path.insert(0, {here!r}); from orchestrator import workflow as w;"
        f"wf = w.load({str(p)!r}); print(','.join(wf.nodes[n].key for n in sorted(wf.nodes)))"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"CRYODAG_JOB_MODULES": toy_jobs.MODULES, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    keys = _keys(tmp_path, BASE)
    assert outs.pop().strip() == ",".join(keys[n] for n in sorted(keys))


def test_canonical_json_floats_and_order() -> None:
    assert canonical_json({"b": 0.1, "a": [1.0, 2]}) == '{"a":[1.0,2],"b":0.1}'
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})
