"""Markdown summaries of jobs: the Prefect artifact of each job and `flow show` share them."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from orchestrator.store import Store


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def last_metrics(store: Store, key: str) -> dict[str, Any]:
    """Last reported value of every metric of a job."""
    out: dict[str, Any] = {}
    for m in store.metrics_of(key):
        out[m.name] = m.value
    return out


def thumbnail_uri(path: Path, max_bytes: int = 400_000) -> str | None:
    """A data URI of a PNG, if small enough to embed in a Prefect artifact."""
    if not path.is_file() or path.stat().st_size > max_bytes:
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def job_markdown(store: Store, key: str, plots: list[str] | None = None) -> str:
    """Params, inputs, outputs (sizes, checksums), timings, key metrics and plots of a job."""
    job = store.job(key)
    if job is None:
        return f"no job {key}"
    head = f"key `{job.key[:16]}`, status **{job.status}**"
    if job.duration_s is not None:
        head += f", {job.duration_s:.1f} s on {job.backend or '?'}"
    lines = [f"## {job.name} ({job.type} v{job.version})", "", head]
    lines += ["", "| param | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(job.params.items())]
    inputs = store.inputs_of(key)
    if inputs:
        lines += ["", "| input | from job | artifact |", "|---|---|---|"]
        for i in inputs:
            art = store.artifact(i.artifact_key)
            up = store.job(art.job_key) if art else None
            source = f"{up.name if up else '?'}.{art.slot if art else '?'}"
            lines.append(f"| {i.slot} | {source} | `{i.artifact_key[:12]}` |")
    outs = store.artifacts_of(key)
    if outs:
        lines += ["", "| output | kind | files | size | sha256 |", "|---|---|---|---|---|"]
        for a in outs:
            lines.append(
                f"| {a.slot} | {a.kind} | {len(a.files)} | {human_size(a.size_bytes)} | `{a.sha256[:12]}` |"
            )
    metrics = last_metrics(store, key)
    if metrics:
        lines += ["", "| metric (last) | value |", "|---|---|"]
        for k, v in metrics.items():
            shown = v if not isinstance(v, list) or len(v) <= 12 else f"{v[:12]} ... ({len(v)})"
            lines.append(f"| {k} | {shown} |")
    if job.error:
        lines += ["", f"**error:** {job.error}"]
    for rel in plots or []:
        uri = thumbnail_uri(store.project_dir / rel)
        if uri:
            lines += ["", f"![{Path(rel).stem}]({uri})"]
    return "\n".join(lines)
