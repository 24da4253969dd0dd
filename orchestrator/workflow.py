"""Workflow YAML -> validated model -> DAG with content-addressed job keys (DESIGN.md §5).

Everything here runs before any compute. Every problem found is collected and reported at once,
each message naming the job and the field; `UsageError` carries them (exit code 2).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs import registry
from jobs.base import JobParams, JobType
from orchestrator.canonical import artifact_key, job_key
from orchestrator.errors import UsageError

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class ExecutorSpec(BaseModel):
    """Where tasks run: threads in this process (local) or a Dask cluster (dask)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["local", "dask"] = "local"
    address: str | None = Field(None, description="Dask scheduler address; a LocalCluster if unset")
    max_workers: int = Field(4, ge=1, description="Jobs that may run at once (local executor)")
    n_workers: int = Field(2, ge=1, description="Workers of the LocalCluster (dask executor)")


class JobEntry(BaseModel):
    """One job of the YAML: its type, params and inputs (`other_job.slot`)."""

    model_config = ConfigDict(extra="forbid")
    type: str
    params: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, str] = Field(default_factory=dict)


class WorkflowFile(BaseModel):
    """The YAML file as written."""

    model_config = ConfigDict(extra="forbid")
    name: str
    project: str = "./cryodag_project"
    description: str = ""
    defaults: dict[str, Any] = Field(default_factory=dict)
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    jobs: dict[str, JobEntry]


@dataclass(frozen=True)
class InputRef:
    """An input slot wired to `job.slot` upstream."""

    job: str
    slot: str

    def __str__(self) -> str:
        return f"{self.job}.{self.slot}"


@dataclass
class Node:
    """A validated job of the workflow, with its key."""

    name: str
    job: JobType
    params: JobParams
    inputs: dict[str, InputRef]
    key: str = ""
    input_keys: dict[str, str] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return self.job.name

    def params_json(self) -> dict[str, Any]:
        return self.params.model_dump(mode="json")

    def output_key(self, slot: str) -> str:
        return artifact_key(self.key, slot)

    @property
    def upstream(self) -> set[str]:
        return {ref.job for ref in self.inputs.values()}


@dataclass
class Workflow:
    """A validated workflow: nodes in topological order, project directory, executor."""

    name: str
    path: Path
    text: str
    project: Path
    executor: ExecutorSpec
    nodes: dict[str, Node]
    order: list[str]

    def descendants(self, name: str) -> set[str]:
        out: set[str] = set()
        frontier = [name]
        while frontier:
            current = frontier.pop()
            for n in self.order:
                if current in self.nodes[n].upstream and n not in out:
                    out.add(n)
                    frontier.append(n)
        return out

    def ancestors(self, name: str) -> set[str]:
        out: set[str] = set()
        frontier = [name]
        while frontier:
            for up in self.nodes[frontier.pop()].upstream:
                if up not in out:
                    out.add(up)
                    frontier.append(up)
        return out


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _pydantic_problems(prefix: str, err: ValidationError, field_prefix: str = "") -> list[str]:
    problems = []
    for e in err.errors():
        loc = field_prefix + ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field is missing"
        problems.append(f"{prefix}field '{loc}': {msg}")
    return problems


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """`JOB.PARAM=VALUE` strings -> {job: {param: value}}; VALUE is read as a YAML scalar."""
    out: dict[str, dict[str, Any]] = {}
    problems = []
    for item in items:
        lhs, sep, rhs = item.partition("=")
        job, dot, param = lhs.partition(".")
        if not sep or not dot or not job or not param:
            problems.append(f"--set '{item}': expected JOB.PARAM=VALUE")
            continue
        try:
            value = yaml.safe_load(rhs) if rhs.strip() else ""
        except yaml.YAMLError:
            value = rhs
        out.setdefault(job.strip(), {})[param.strip()] = value
    if problems:
        raise UsageError(problems)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"workflow file '{path}' not found")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"workflow file '{path}': invalid YAML{where}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"workflow file '{path}': expected a mapping with 'name' and 'jobs'")
    return data


def load(
    path: Path | str,
    sets: list[str] | None = None,
    project: Path | str | None = None,
) -> Workflow:
    """Read, validate and key a workflow. Raises UsageError listing every problem."""
    path = Path(path)
    data = _read_yaml(path)
    try:
        wf = WorkflowFile.model_validate(data)
    except ValidationError as err:
        raise UsageError(_pydantic_problems(f"workflow '{path}': ", err)) from None

    overrides = parse_set(sets or [])
    problems: list[str] = []
    types = registry.names()

    for job in overrides:
        if job not in wf.jobs:
            problems.append(f"--set: unknown job '{job}'{_suggest(job, list(wf.jobs))}")
    global_defaults = {k: v for k, v in wf.defaults.items() if not isinstance(v, dict)}
    type_defaults = {k: v for k, v in wf.defaults.items() if isinstance(v, dict)}
    for t in type_defaults:
        if t not in types:
            problems.append(f"defaults: unknown job type '{t}'{_suggest(t, types)}")
    if global_defaults:
        known = {f for t in types for f in registry.get(t).params.model_fields}
        for k in global_defaults:
            if k not in known:
                problems.append(f"defaults: field '{k}': no job type has this parameter{_suggest(k, sorted(known))}")

    nodes: dict[str, Node] = {}
    for name, entry in wf.jobs.items():
        where = f"job '{name}': "
        if not NAME_RE.match(name):
            problems.append(f"{where}invalid job name (letters, digits and '_', starting with a letter)")
            continue
        if entry.type not in types:
            problems.append(f"{where}field 'type': unknown job type '{entry.type}'{_suggest(entry.type, types)}")
            continue
        jt = registry.get(entry.type)
        fields = jt.params.model_fields
        merged = {k: v for k, v in global_defaults.items() if k in fields}
        merged.update(type_defaults.get(entry.type, {}))
        merged.update(entry.params)
        merged.update(overrides.get(name, {}))
        try:
            params = jt.params.model_validate(merged)
        except ValidationError as err:
            problems.extend(_pydantic_problems(where, err, "params."))
            continue
        inputs: dict[str, InputRef] = {}
        for slot, ref in entry.inputs.items():
            if slot not in jt.inputs:
                problems.append(
                    f"{where}field 'inputs.{slot}': job type '{jt.name}' has no input slot '{slot}'"
                    f" (slots: {', '.join(jt.inputs) or 'none'})"
                )
                continue
            up, dot, up_slot = str(ref).partition(".")
            if not dot or not up or not up_slot:
                problems.append(f"{where}field 'inputs.{slot}': '{ref}' is not of the form JOB.SLOT")
                continue
            inputs[slot] = InputRef(up, up_slot)
        for slot, spec in jt.inputs.items():
            if slot not in entry.inputs and not spec.optional:
                problems.append(f"{where}field 'inputs.{slot}': required input is not wired")
        nodes[name] = Node(name=name, job=jt, params=params, inputs=inputs)
    for name, node in nodes.items():
        for slot, ref in node.inputs.items():
            where = f"job '{name}': field 'inputs.{slot}': "
            if ref.job not in wf.jobs:
                problems.append(f"{where}unknown upstream job '{ref.job}'{_suggest(ref.job, list(wf.jobs))}")
            elif ref.job == name:
                problems.append(f"{where}a job cannot take its own output")
    if problems:
        raise UsageError(problems)

    try:
        order = list(TopologicalSorter({n: nodes[n].upstream for n in nodes}).static_order())
    except CycleError as exc:
        cycle = " -> ".join(exc.args[1])
        raise UsageError(f"jobs form a cycle: {cycle}") from None

    provides: dict[tuple[str, str], frozenset[str]] = {}
    for name in order:
        node = nodes[name]
        for slot, ref in node.inputs.items():
            up = nodes[ref.job]
            where = f"job '{name}': field 'inputs.{slot}': "
            if ref.slot not in up.job.outputs:
                problems.append(
                    f"{where}job '{ref.job}' ({up.type}) has no output '{ref.slot}'"
                    f" (outputs: {', '.join(up.job.outputs)})"
                )
                continue
            want = node.job.inputs[slot]
            got_kind = up.job.output_kind(ref.slot)
            if got_kind != want.kind_name():
                problems.append(f"{where}'{ref}' is a {got_kind}, slot needs a {want.kind_name()}")
                continue
            missing = want.requires - provides[(ref.job, ref.slot)]
            if missing:
                problems.append(
                    f"{where}'{ref}' lacks required columns {sorted(missing)}"
                    f" (it provides {sorted(provides[(ref.job, ref.slot)])})"
                )
        for out in node.job.outputs:
            got = frozenset(node.job.adds.get(out, frozenset()))
            passed = node.job.passes.get(out)
            if passed and passed in node.inputs:
                ref = node.inputs[passed]
                got |= provides.get((ref.job, ref.slot), frozenset())
            provides[(name, out)] = got
    if problems:
        raise UsageError(problems)

    for name in order:
        node = nodes[name]
        node.input_keys = {
            slot: nodes[ref.job].output_key(ref.slot) for slot, ref in sorted(node.inputs.items())
        }
        node.key = job_key(node.type, node.job.version, node.params_json(), node.input_keys)

    project_dir = Path(project) if project is not None else Path(wf.project)
    return Workflow(
        name=wf.name,
        path=path.resolve(),
        text=path.read_text(),
        project=project_dir.resolve(),
        executor=wf.executor,
        nodes=nodes,
        order=order,
    )
