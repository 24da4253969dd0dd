"""Store: the provenance database of one project (SQLite, WAL, foreign keys, busy timeout).

One writer: the orchestrator process (writes are serialised by a lock and kept short; no
transaction is held across a compute job). Lineage is a recursive query over job_inputs.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from orchestrator.store.models import Artifact, Choice, Event, Job, JobInput, Metric, Run, RunJob

DB_NAME = "provenance.sqlite"
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


#: Most recently used first (a key used again after a branch switch counts as recent).
_latest = func.coalesce(Job.started_at, Job.created_at).desc()


def _pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 30})
    event.listen(engine, "connect", _pragmas)
    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (never a silent re-create)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Store:
    """Read and write the provenance of one project directory."""

    def __init__(self, project_dir: Path | str, *, create: bool = True) -> None:
        self.project_dir = Path(project_dir).resolve()
        self.path = self.project_dir / DB_NAME
        if not create and not self.path.exists():
            raise FileNotFoundError(f"no cryodag project at '{self.project_dir}' ({DB_NAME} missing)")
        self.project_dir.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(self.path)
        migrate(self.engine)
        self._lock = threading.Lock()

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A short write transaction (serialised within this process)."""
        with self._lock, Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    def read(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # -- runs ------------------------------------------------------------------------------
    def begin_run(self, *, name: str, path: str, text_: str, command_: str, code_version: str) -> int:
        with self.write() as s:
            run = Run(
                workflow_name=name,
                workflow_path=path,
                workflow_text=text_,
                command=command_,
                started_at=now(),
                status="running",
                code_version=code_version,
                host=socket.gethostname(),
            )
            s.add(run)
            s.flush()
            run_id = run.id
            s.add(Event(ts=now(), kind="run_started", run_id=run_id, message=command_))
        return run_id

    def set_run_prefect_id(self, run_id: int, flow_run_id: str) -> None:
        with self.write() as s:
            s.get(Run, run_id).prefect_flow_run_id = flow_run_id

    def end_run(self, run_id: int, status: str) -> None:
        with self.write() as s:
            run = s.get(Run, run_id)
            run.status, run.ended_at = status, now()
            s.add(Event(ts=now(), kind=f"run_{status}", run_id=run_id, message=""))

    def record_run_job(self, run_id: int, key: str, name: str, action: str, reasons: list[str]) -> None:
        with self.write() as s:
            s.merge(RunJob(run_id=run_id, job_key=key, name=name, action=action, reasons=reasons))

    def runs(self, limit: int = 20) -> list[Run]:
        with self.read() as s:
            return list(s.scalars(select(Run).order_by(Run.id.desc()).limit(limit)))

    def run_jobs(self, run_id: int) -> list[RunJob]:
        with self.read() as s:
            return list(s.scalars(select(RunJob).where(RunJob.run_id == run_id)))

    # -- jobs ------------------------------------------------------------------------------
    def job(self, key: str) -> Job | None:
        with self.read() as s:
            return s.get(Job, key)

    def find_job(self, ref: str) -> Job | None:
        """A job by full key, key prefix (>= 6 chars) or workflow job name (latest)."""
        with self.read() as s:
            job = s.get(Job, ref)
            if job is None and len(ref) >= 6:
                job = s.scalars(select(Job).where(Job.key.like(f"{ref}%"))).first()
            if job is None:
                job = s.scalars(
                    select(Job).where(Job.name == ref).order_by(_latest)
                ).first()
            return job

    def latest_job_named(self, name: str, exclude_key: str | None = None) -> Job | None:
        """The most recent job recorded for workflow job `name` (other than `exclude_key`)."""
        with self.read() as s:
            q = select(Job).where(Job.name == name)
            if exclude_key:
                q = q.where(Job.key != exclude_key)
            return s.scalars(q.order_by(_latest)).first()

    def jobs(self) -> list[Job]:
        with self.read() as s:
            return list(s.scalars(select(Job).order_by(Job.created_at)))

    def job_started(
        self, *, key: str, name: str, type_: str, version: int, params: dict, directory: str,
        run_id: int | None, backend: str | None = None,
    ) -> None:
        with self.write() as s:
            job = s.get(Job, key)
            if job is None:
                job = Job(key=key, created_at=now())
                s.add(job)
            job.name, job.type, job.version, job.params = name, type_, version, params
            job.directory, job.status, job.started_at = directory, "running", now()
            job.ended_at = job.duration_s = job.error = None
            job.backend, job.host = None, socket.gethostname()
            s.execute(Metric.__table__.delete().where(Metric.job_key == key))
            s.add(Event(ts=now(), kind="job_started", run_id=run_id, job_key=key, message=name))

    def set_job_backend(self, key: str, backend: str) -> None:
        with self.write() as s:
            s.get(Job, key).backend = backend

    def set_task_run_id(self, key: str, task_run_id: str) -> None:
        with self.write() as s:
            s.get(Job, key).prefect_task_run_id = task_run_id

    def job_finished(
        self, *, key: str, run_id: int | None, outputs: list[dict[str, Any]],
        inputs: list[dict[str, str]], duration_s: float, peak_rss_mb: float | None,
    ) -> None:
        """Record a completed job: its artifacts and the input digests it consumed."""
        with self.write() as s:
            job = s.get(Job, key)
            job.status, job.ended_at = "done", now()
            job.duration_s, job.peak_rss_mb = duration_s, peak_rss_mb
            s.execute(JobInput.__table__.delete().where(JobInput.job_key == key))
            for out in outputs:
                s.merge(Artifact(job_key=key, created_at=now(), **out))
            s.flush()
            for inp in inputs:
                s.add(JobInput(job_key=key, **inp))
            s.add(Event(ts=now(), kind="job_done", run_id=run_id, job_key=key, message=job.name))

    def job_failed(self, key: str, error: str, run_id: int | None, duration_s: float) -> None:
        with self.write() as s:
            job = s.get(Job, key)
            job.status, job.error, job.ended_at, job.duration_s = "failed", error, now(), duration_s
            s.add(Event(ts=now(), kind="job_failed", run_id=run_id, job_key=key, message=error))

    def add_event(self, kind: str, message: str, run_id: int | None = None, key: str | None = None) -> None:
        with self.write() as s:
            s.add(Event(ts=now(), kind=kind, run_id=run_id, job_key=key, message=message))

    # -- artifacts, inputs, metrics --------------------------------------------------------
    def artifacts_of(self, key: str) -> list[Artifact]:
        with self.read() as s:
            return list(s.scalars(select(Artifact).where(Artifact.job_key == key)))

    def artifact(self, key: str) -> Artifact | None:
        with self.read() as s:
            return s.get(Artifact, key)

    def update_artifact_files(self, key: str, files: list[dict[str, Any]]) -> None:
        """Refresh recorded mtimes after a lenient verification found identical content."""
        with self.write() as s:
            s.get(Artifact, key).files = files

    def inputs_of(self, key: str) -> list[JobInput]:
        with self.read() as s:
            return list(s.scalars(select(JobInput).where(JobInput.job_key == key)))

    def add_metric(self, key: str, name: str, value: Any, iteration: int | None) -> None:
        with self.write() as s:
            s.add(Metric(job_key=key, name=name, value=value, iteration=iteration))

    def metrics_of(self, key: str) -> list[Metric]:
        with self.read() as s:
            return list(s.scalars(select(Metric).where(Metric.job_key == key).order_by(Metric.id)))

    # -- interactive choices ---------------------------------------------------------------
    def record_choice(self, name: str, inputs_digest: str, params: dict, source: str) -> None:
        with self.write() as s:
            s.add(Choice(job_name=name, inputs_digest=inputs_digest, params=params, source=source,
                         created_at=now()))
            s.add(Event(ts=now(), kind="choice", message=f"{name}: {params} ({source})"))

    def choice(self, name: str, inputs_digest: str) -> dict | None:
        """The latest choice recorded for job `name` given inputs with this digest."""
        with self.read() as s:
            row = s.scalars(
                select(Choice).where(Choice.job_name == name, Choice.inputs_digest == inputs_digest)
                .order_by(Choice.id.desc())
            ).first()
            return None if row is None else dict(row.params)

    # -- lineage ---------------------------------------------------------------------------
    def lineage(self, key: str, down: bool = False) -> list[tuple[str, str, int]]:
        """(job key, via slot, depth) of every ancestor (or descendant) job, by recursive query.

        A job reached along several paths is listed once, at its smallest depth.
        """
        if down:
            step = """SELECT ji.job_key, ji.slot, l.depth + 1 FROM job_inputs ji
                      JOIN artifacts a ON a.key = ji.artifact_key JOIN lineage l ON a.job_key = l.key"""
        else:
            step = """SELECT a.job_key, ji.slot, l.depth + 1 FROM job_inputs ji
                      JOIN artifacts a ON a.key = ji.artifact_key JOIN lineage l ON ji.job_key = l.key"""
        sql = text(
            f"""WITH RECURSIVE lineage(key, slot, depth) AS (
                    SELECT :key, '', 0 UNION {step})
                SELECT key, slot, MIN(depth) FROM lineage WHERE depth > 0
                GROUP BY key ORDER BY MIN(depth), key"""
        )
        with self.engine.connect() as conn:
            return [(r[0], r[1], r[2]) for r in conn.execute(sql, {"key": key})]
