"""Checksums and verification of artifact files (sha256, size, mtime; lenient re-hash)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_record(project_dir: Path, rel: str, actual: Path | None = None) -> dict[str, Any]:
    """{path, size, sha256, mtime_ns} of a project-relative file (read from `actual` if given)."""
    p = actual or project_dir / rel
    st = p.stat()
    return {"path": rel, "size": st.st_size, "sha256": sha256_file(p), "mtime_ns": st.st_mtime_ns}


def digest(records: list[dict[str, Any]]) -> str:
    """One sha256 over the (path, sha256) of every file of an artifact."""
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r["path"]):
        h.update(f"{r['path']}\0{r['sha256']}\n".encode())
    return h.hexdigest()


def verify(project_dir: Path, records: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Check recorded files against the disk.

    Returns (problems, refreshed records). A file whose size and mtime match is trusted; one
    whose mtime changed is re-hashed and accepted if its content is identical.
    """
    problems: list[str] = []
    refreshed: list[dict[str, Any]] = []
    for r in records:
        p = project_dir / r["path"]
        if not p.is_file():
            problems.append(f"missing {r['path']}")
            continue
        st = p.stat()
        if st.st_size != r["size"]:
            problems.append(f"changed {r['path']}")
            continue
        if st.st_mtime_ns != r["mtime_ns"]:
            if sha256_file(p) != r["sha256"]:
                problems.append(f"changed {r['path']}")
                continue
            r = {**r, "mtime_ns": st.st_mtime_ns}
        refreshed.append(r)
    return problems, refreshed
