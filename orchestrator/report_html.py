"""`flow report`: one self-contained HTML page of a project (inline CSS and SVG, PNGs as data URIs).

Sections: a header (project, time, version, jobs by status), the job graph (SVG, layered by
topological depth), one section per job in topological order, and the provenance of the final
maps (VolumeSet outputs no job consumes) as the chain of ancestor jobs from `Store.lineage`.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from importlib.metadata import version
from pathlib import Path
from typing import Any

from orchestrator.canonical import canonical_json, sha256_text
from orchestrator.reporting import human_size, last_metrics, thumbnail_uri
from orchestrator.store import Store
from orchestrator.store.models import Job

#: Largest plot embedded in the page (bytes); bigger ones are listed by name only.
MAX_PLOT_BYTES = 2_000_000
#: Graph node size and gaps (SVG px).
NODE_W, NODE_H, GAP_X, GAP_Y = 180, 44, 24, 48
STATUS_FILL = {"done": "#d8f0dc", "failed": "#f6d3d6", "running": "#fdf1c7"}

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } code { font-size: 0.9em; } tr.set td { font-weight: bold; }
.job { border: 1px solid #ddd; border-radius: 6px; padding: 0 1em 1em; margin: 1em 0; }
.status-done { color: #1b7a2f; } .status-failed { color: #b3261e; } .status-running { color: #8a6d00; }
.plots img { max-width: 480px; margin: 0.3em; border: 1px solid #eee; } .error { color: #b3261e; }
svg text { font-family: system-ui, sans-serif; }
"""


@dataclass
class Graph:
    """Jobs of a project in topological order, their depth (0 = no inputs) and input edges."""

    jobs: list[Job]
    depth: dict[str, int]
    edges: list[tuple[str, str, str]]  # (from key, to key, input slot)
    consumed: set[str]  # artifact keys some job took as input


def job_graph(store: Store) -> Graph:
    """The store's jobs and input edges, ordered topologically (ties: oldest first)."""
    jobs = store.jobs()
    index = {j.key: i for i, j in enumerate(jobs)}
    edges: list[tuple[str, str, str]] = []
    consumed: set[str] = set()
    for j in jobs:
        for inp in store.inputs_of(j.key):
            art = store.artifact(inp.artifact_key)
            if art is not None:
                edges.append((art.job_key, j.key, inp.slot))
                consumed.add(art.key)
    ups: dict[str, set[str]] = {j.key: set() for j in jobs}
    downs: dict[str, list[str]] = {j.key: [] for j in jobs}
    for src, dst, _ in edges:
        if src not in ups[dst]:
            downs[src].append(dst)
        ups[dst].add(src)
    waiting = {k: len(v) for k, v in ups.items()}
    ready = [(index[k], k) for k, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: list[str] = []
    depth: dict[str, int] = {}
    while ready:
        _, key = heapq.heappop(ready)
        order.append(key)
        depth[key] = 1 + max((depth[u] for u in ups[key]), default=-1)
        for child in downs[key]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, (index[child], child))
    return Graph([jobs[index[k]] for k in order], depth, edges, consumed)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def graph_svg(graph: Graph) -> str:
    """The job graph as inline SVG: one row per depth, edges as curves from upstream to downstream."""
    layers: dict[int, list[str]] = {}
    for j in graph.jobs:
        layers.setdefault(graph.depth[j.key], []).append(j.key)
    widest = max(len(keys) for keys in layers.values())
    width = widest * (NODE_W + GAP_X) + GAP_X
    height = len(layers) * (NODE_H + GAP_Y) + GAP_Y
    pos: dict[str, tuple[float, float]] = {}
    for d, keys in layers.items():
        x0 = (width - len(keys) * (NODE_W + GAP_X) + GAP_X) / 2
        for i, key in enumerate(keys):
            pos[key] = (x0 + i * (NODE_W + GAP_X), GAP_Y + d * (NODE_H + GAP_Y))
    parts = [
        f'<svg class="graph" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#666"/></marker></defs>',
    ]
    for src, dst, slot in graph.edges:
        (xs, ys), (xd, yd) = pos[src], pos[dst]
        x1, y1, x2, y2 = xs + NODE_W / 2, ys + NODE_H, xd + NODE_W / 2, yd
        ym = (y1 + y2) / 2
        parts.append(
            f'<path class="edge" data-from="{src}" data-to="{dst}" d="M{x1:.0f},{y1:.0f} C{x1:.0f},{ym:.0f} '
            f'{x2:.0f},{ym:.0f} {x2:.0f},{y2:.0f}" fill="none" stroke="#666" marker-end="url(#arrow)">'
            f"<title>{escape(slot)}</title></path>"
        )
    for j in graph.jobs:
        x, y = pos[j.key]
        fill = STATUS_FILL.get(j.status, "#e4e4e4")
        parts.append(
            f'<a href="#job-{j.key}"><g class="node" data-key="{j.key}">'
            f"<title>{escape(j.name)} ({escape(j.type)}) {j.status} {j.key}</title>"
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{NODE_W}" height="{NODE_H}" rx="6" fill="{fill}" stroke="#888"/>'
            f'<text x="{x + NODE_W / 2:.0f}" y="{y + 18:.0f}" text-anchor="middle" font-size="13" '
            f'font-weight="bold">{escape(_short(j.name, 22))}</text>'
            f'<text x="{x + NODE_W / 2:.0f}" y="{y + 35:.0f}" text-anchor="middle" font-size="11">'
            f"{escape(_short(j.type, 16))} · {j.key[:8]}</text></g></a>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _when(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC") if t is not None else "—"


def _value(v: Any) -> str:
    text = str(v if not isinstance(v, list) or len(v) <= 12 else f"{v[:12]} ... ({len(v)})")
    return escape(text)


def param_defaults(type_name: str) -> dict[str, Any] | None:
    """Current defaults (JSON values) of a job type's params; None if the type is not importable."""
    from pydantic_core import to_jsonable_python

    from jobs import registry

    try:
        jt = registry.get(type_name)
    except (KeyError, ImportError):
        return None
    return {
        name: to_jsonable_python(f.get_default(call_default_factory=True))
        for name, f in jt.params.model_fields.items()
        if not f.is_required()
    }


def params_table(params: dict[str, Any], defaults: dict[str, Any] | None) -> str:
    """Params as a table; with known defaults, a value that differs from its default is bold."""
    if defaults is None:
        rows = [f"<tr><td>{escape(k)}</td><td>{_value(v)}</td></tr>" for k, v in sorted(params.items())]
        return "<table><tr><th>param</th><th>value</th></tr>" + "".join(rows) + "</table>"
    rows = []
    for k, v in sorted(params.items()):
        default = _value(defaults[k]) if k in defaults else "(required)"
        css = ' class="set"' if k not in defaults or defaults[k] != v else ""
        rows.append(f"<tr{css}><td>{escape(k)}</td><td>{_value(v)}</td><td>{default}</td></tr>")
    return "<table><tr><th>param</th><th>value</th><th>default</th></tr>" + "".join(rows) + "</table>"


def _link(store: Store, key: str, slot: str) -> str:
    job = store.job(key)
    name = job.name if job else key[:12]
    return f'<a href="#job-{key}">{escape(name)}</a>.{escape(slot)}'


def job_section(store: Store, job: Job, defaults: dict[str, Any] | None) -> str:
    """Name, type, status, key, timings, params, inputs, outputs, last metrics and plots of one job."""
    duration = f"{job.duration_s:.1f} s" if job.duration_s is not None else "—"
    parts = [
        f'<section class="job" id="job-{job.key}">',
        f"<h3>{escape(job.name)} <small>({escape(job.type)} v{job.version})</small></h3>",
        f'<p>status <b class="status-{escape(job.status)}">{escape(job.status)}</b>, key <code>{job.key}</code>'
        f"<br>started {_when(job.started_at)}, ended {_when(job.ended_at)}, duration {duration}</p>",
    ]
    if job.error:
        parts.append(f'<p class="error">error: {escape(job.error)}</p>')
    parts.append(params_table(job.params, defaults))
    links = []
    for inp in store.inputs_of(job.key):
        art = store.artifact(inp.artifact_key)
        if art is not None:
            links.append(f"{escape(inp.slot)} ← {_link(store, art.job_key, art.slot)}")
    if links:
        parts.append("<p>inputs: " + ", ".join(links) + "</p>")
    outs = store.artifacts_of(job.key)
    if outs:
        rows = "".join(
            f"<tr><td>{escape(a.slot)}</td><td>{escape(a.kind)}</td><td>{len(a.files)}</td>"
            f"<td>{human_size(a.size_bytes)}</td><td><code>{a.sha256[:12]}</code></td></tr>"
            for a in outs
        )
        parts.append("<table><tr><th>output</th><th>kind</th><th>files</th><th>size</th><th>sha256</th></tr>"
                     + rows + "</table>")
    metrics = last_metrics(store, job.key)
    if metrics:
        rows = "".join(f"<tr><td>{escape(k)}</td><td>{_value(v)}</td></tr>" for k, v in metrics.items())
        parts.append("<table><tr><th>metric (last)</th><th>value</th></tr>" + rows + "</table>")
    parts += [plots_html(store.project_dir / job.directory / "plots"), "</section>"]
    return "\n".join(p for p in parts if p)


def plots_html(plot_dir: Path) -> str:
    """The PNGs of a job's plots/ directory as embedded images (too large ones named only)."""
    items = []
    for png in sorted(plot_dir.glob("*.png")):
        uri = thumbnail_uri(png, MAX_PLOT_BYTES)
        name = escape(png.stem)
        if uri is None:
            items.append(f"<p>{name}: not embedded ({human_size(png.stat().st_size)})</p>")
        else:
            items.append(f'<figure><img src="{uri}" alt="{name}"><figcaption>{name}</figcaption></figure>')
    return '<div class="plots">' + "".join(items) + "</div>" if items else ""


def params_hash(params: dict[str, Any]) -> str:
    """Short sha256 of the canonical JSON of a job's params (12 hex digits)."""
    return sha256_text(canonical_json(params))[:12]


def provenance_section(store: Store, graph: Graph) -> str:
    """For each VolumeSet output no job consumes: the map and the chain of jobs it came from."""
    parts = ["<h2>Provenance of the final maps</h2>"]
    finals = [
        (j, a) for j in graph.jobs for a in store.artifacts_of(j.key)
        if a.kind == "VolumeSet" and a.key not in graph.consumed
    ]
    if not finals:
        return parts[0] + "<p>No final map (no VolumeSet output that no job consumes).</p>"
    for job, art in finals:
        res = [v.get("resolution_A") for v in art.handle.get("volumes", [])]
        res_text = ", ".join(f"{r:.2f} Å" for r in res if r is not None) or "—"
        parts.append(
            f'<h3 class="provenance">{escape(job.name)}.{escape(art.slot)}</h3>'
            f"<p>artifact <code>{art.key}</code>, sha256 <code>{art.sha256[:16]}</code>, "
            f"{len(res)} map(s), resolution {res_text}</p>"
        )
        chain = [(job.key, "", 0), *store.lineage(job.key)]
        rows = []
        for key, slot, depth in chain:
            j = store.job(key)
            rows.append(
                f'<tr class="chain"><td>{depth}</td><td><a href="#job-{key}">{escape(j.name)}</a></td>'
                f"<td>{escape(j.type)} v{j.version}</td><td><code>{key[:16]}</code></td>"
                f"<td><code>{params_hash(j.params)}</code></td><td>{escape(slot)}</td></tr>"
            )
        parts.append(
            "<table><tr><th>depth</th><th>job</th><th>type</th><th>key</th><th>params sha256</th>"
            "<th>via input slot</th></tr>" + "".join(rows) + "</table>"
        )
    return "\n".join(parts)


def header_html(store: Store, graph: Graph) -> str:
    """Title, project path, generation time, cryodag version and the number of jobs by status."""
    counts = Counter(j.status for j in graph.jobs)
    by_status = ", ".join(f'<span class="status-{escape(s)}">{n} {escape(s)}</span>' for s, n in sorted(counts.items()))
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        f"<h1>cryodag project report</h1><p>project <code>{escape(str(store.project_dir))}</code><br>"
        f"generated {now} by cryodag {escape(version('cryodag'))}<br>"
        f"{len(graph.jobs)} jobs: {by_status}</p>"
    )


def build(store: Store) -> str:
    """The whole HTML page of a project with at least one job."""
    graph = job_graph(store)
    defaults = {t: param_defaults(t) for t in {j.type for j in graph.jobs}}
    sections = [job_section(store, j, defaults[j.type]) for j in graph.jobs]
    return "\n".join([
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>cryodag report: {escape(store.project_dir.name)}</title><style>{CSS}</style></head><body>",
        header_html(store, graph),
        "<h2>Job graph</h2>",
        graph_svg(graph),
        "<h2>Jobs</h2><p>Bold params differ from the job type's current default.</p>",
        *sections,
        provenance_section(store, graph),
        "</body></html>\n",
    ])


def write(store: Store, target: Path) -> Path:
    """Write the report to `target` through a temporary file renamed when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(build(store), encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
