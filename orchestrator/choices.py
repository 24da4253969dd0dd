"""Interactive choices (Select 2D classes...): recorded in the store, applied as params.

A job type with an `Interaction` asks for a choice when its params still lack it. The answer
is stored for the job's name and the digest of its input keys, and every later load of the
workflow applies it as `--set` values: it enters the job key and the provenance, and a rerun
does not ask again unless the content of the inputs changed.
"""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator import workflow as wfmod
from orchestrator.canonical import canonical_json, sha256_text
from orchestrator.store import Store
from orchestrator.workflow import Node, Workflow

MAX_ROUNDS = 16


def inputs_digest(node: Node, store: Store) -> str | None:
    """Digest of the content of the job's inputs (None while any is missing).

    Content, not keys: a rerun upstream that renumbers classes must ask again.
    """
    digests = {}
    for slot, key in node.input_keys.items():
        art = store.artifact(key)
        if art is None:
            return None
        digests[slot] = art.sha256
    return sha256_text(canonical_json(digests))


def needs_choice(node: Node) -> bool:
    return node.job.interaction is not None and node.job.interaction.needs_input(node.params)


def as_sets(name: str, params: dict) -> list[str]:
    return [f"{name}.{k}={json.dumps(v)}" for k, v in sorted(params.items())]


def load(path: Path | str, sets: list[str], project: Path | str | None, store: Store) -> Workflow:
    """The workflow with every recorded choice that matches its inputs applied."""
    extra: list[str] = []
    wf = wfmod.load(path, [*sets, *extra], project)
    for _ in range(MAX_ROUNDS):
        added = []
        for name in wf.order:
            node = wf.nodes[name]
            digest = inputs_digest(node, store) if needs_choice(node) else None
            if digest is not None:
                chosen = store.choice(name, digest)
                if chosen is not None:
                    added += as_sets(name, chosen)
        if not added:
            break
        extra += added
        wf = wfmod.load(path, [*sets, *extra], project)
    return wf
