"""The provenance store: Alembic schema, pragmas, foreign keys, lineage by recursive query."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from orchestrator.store import Store


def _job(store: Store, key: str, name: str) -> None:
    store.job_started(key=key, name=name, type_="t", version=1, params={}, directory=f"jobs/{name}", run_id=None)


def _finish(store: Store, key: str, inputs: list[str]) -> None:
    store.job_finished(
        key=key, run_id=None, duration_s=1.0, peak_rss_mb=None,
        outputs=[{"key": f"art-{key}", "slot": "out", "kind": "ParticleSet", "handle": {}, "files": [],
                  "sha256": f"sha-{key}", "size_bytes": 0}],
        inputs=[{"slot": f"in{i}", "artifact_key": f"art-{k}", "artifact_sha256": f"sha-{k}"}
                for i, k in enumerate(inputs)],
    )


def test_schema_from_migration_with_wal_and_foreign_keys(tmp_path: Path) -> None:
    store = Store(tmp_path)
    db = sqlite3.connect(tmp_path / "provenance.sqlite")
    assert db.execute("SELECT version_num FROM alembic_version").fetchone() == ("0002",)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "jobs", "run_jobs", "artifacts", "job_inputs", "metrics", "events", "choices"} <= tables
    with pytest.raises(IntegrityError):
        store.add_metric("no-such-job", "x", 1.0, 0)
    Store(tmp_path)  # reopening migrates nothing and keeps data


def test_lineage_up_and_down(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for key, name, ups in [("a", "A", []), ("b", "B", ["a"]), ("c", "C", ["a"]), ("d", "D", ["b", "c"])]:
        _job(store, key, name)
        _finish(store, key, ups)
    assert [(k, d) for k, _, d in store.lineage("d")] == [("b", 1), ("c", 1), ("a", 2)]
    assert [(k, d) for k, _, d in store.lineage("a", down=True)] == [("b", 1), ("c", 1), ("d", 2)]
    assert store.find_job("D").key == "d"
    assert store.job("d").status == "done"
