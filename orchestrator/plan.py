"""Run-or-reuse decisions with their reasons (`flow plan`, and the runner at task time).

A job is reused when its key is recorded as done, its outputs verify on disk and the input
digests it consumed equal those of its inputs now. Otherwise it runs, and the reasons say why:
new, params changed (field old -> new), upstream changed, job version bumped, outputs missing or
changed on disk, previous attempt failed or unfinished, forced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator import choices, files
from orchestrator.store import Store
from orchestrator.workflow import Node, Workflow


@dataclass
class Decision:
    job: str
    key: str
    action: str  # "run" | "reuse"
    reasons: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def params_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`field old -> new` for every parameter that differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            out.append(f"{k} {_fmt(old.get(k, '<unset>'))} -> {_fmt(new.get(k, '<unset>'))}")
    return out


def why_new(store: Store, wf: Workflow, node: Node) -> list[str]:
    """Reasons a key not seen before differs from the previous job recorded under this name."""
    prev = store.latest_job_named(node.name, exclude_key=node.key)
    if prev is None:
        return ["new"]
    reasons = []
    if prev.type != node.type:
        return [f"job type changed: {prev.type} -> {node.type}"]
    if prev.version != node.job.version:
        reasons.append(f"job version bumped: {prev.version} -> {node.job.version}")
    diff = params_diff(prev.params, node.params_json())
    if diff:
        reasons.append("params changed: " + "; ".join(diff))
    prev_inputs = {i.slot: i.artifact_key for i in store.inputs_of(prev.key)}
    changed = [
        f"{slot} ({node.inputs[slot]})"
        for slot, key in node.input_keys.items()
        if prev_inputs.get(slot) != key
    ]
    if changed:
        reasons.append("upstream changed: " + ", ".join(changed))
    return reasons or ["no matching record"]


def verify_outputs(store: Store, key: str) -> list[str]:
    """Problems with the recorded outputs of a done job (refreshing mtimes when content is equal)."""
    problems = []
    for art in store.artifacts_of(key):
        found, refreshed = files.verify(store.project_dir, art.files)
        problems += found
        if not found and refreshed != art.files:
            store.update_artifact_files(art.key, refreshed)
    return problems


def input_changes(store: Store, node: Node) -> list[str]:
    """Inputs whose artifact digest differs from the digest this job consumed."""
    consumed = {i.slot: i.artifact_sha256 for i in store.inputs_of(node.key)}
    out = []
    for slot, akey in node.input_keys.items():
        art = store.artifact(akey)
        if art is None or consumed.get(slot) != art.sha256:
            out.append(f"{slot} ({node.inputs[slot]})")
    return out


def decide(store: Store, wf: Workflow, node: Node, forced: bool = False) -> Decision:
    """Run or reuse `node` given the store as it is now."""
    job = store.job(node.key)
    if job is None:
        return Decision(node.name, node.key, "run", why_new(store, wf, node))
    if forced:
        return Decision(node.name, node.key, "run", ["forced"])
    if job.status == "failed":
        return Decision(node.name, node.key, "run", [f"previous attempt failed: {job.error}"])
    if job.status != "done":
        return Decision(node.name, node.key, "run", ["previous attempt did not finish"])
    problems = verify_outputs(store, node.key)
    if problems:
        return Decision(node.name, node.key, "run", ["outputs " + "; ".join(problems)])
    changed = input_changes(store, node)
    if changed:
        return Decision(node.name, node.key, "run", ["upstream outputs changed: " + ", ".join(changed)])
    return Decision(node.name, node.key, "reuse", ["key and verified outputs found"])


def plan(store: Store, wf: Workflow, force: set[str] | None = None) -> list[Decision]:
    """Decisions for every job in topological order, as `flow run` would take them now.

    A job whose key is unchanged but whose upstream reruns with the same key is shown as reuse,
    pending the upstream's outputs: it reruns only if they come out different (early cutoff).
    """
    force = force or set()
    decisions: dict[str, Decision] = {}
    for name in wf.order:
        node = wf.nodes[name]
        if choices.needs_choice(node):
            decisions[name] = Decision(name, node.key, "run", [
                "waits for a choice: the flow run pauses with a form in the Prefect UI"
                " (or record it first with `flow choose`)"])
            continue
        d = decide(store, wf, node, forced=name in force)
        if d.action == "reuse":
            pending = [up for up in sorted(wf.ancestors(name)) if decisions[up].action == "run"]
            if pending:
                d.reasons = [
                    f"reused if the outputs of {', '.join(pending)} come out identical; runs otherwise"
                ]
        decisions[name] = d
    return [decisions[n] for n in wf.order]
