"""Tables of the provenance store. Schema changes go through Alembic migrations."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Run(Base):
    """One `flow run` invocation."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    workflow_name: Mapped[str] = mapped_column(String)
    workflow_path: Mapped[str] = mapped_column(String)
    workflow_text: Mapped[str] = mapped_column(Text)
    command: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[datetime] = mapped_column(DateTime)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    status: Mapped[str] = mapped_column(String, default="running")
    code_version: Mapped[str] = mapped_column(String, default="")
    host: Mapped[str] = mapped_column(String, default="")
    prefect_flow_run_id: Mapped[str | None] = mapped_column(String, nullable=True)


class Job(Base):
    """One job identity (its key) and the outcome of its latest execution."""

    __tablename__ = "jobs"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    name: Mapped[str] = mapped_column(String, index=True)
    type: Mapped[str] = mapped_column(String)
    version: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String, default="pending")
    directory: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    backend: Mapped[str | None] = mapped_column(String, nullable=True)
    host: Mapped[str | None] = mapped_column(String, nullable=True)
    peak_rss_mb: Mapped[float | None] = mapped_column(Float, nullable=True)
    prefect_task_run_id: Mapped[str | None] = mapped_column(String, nullable=True)


class RunJob(Base):
    """Which run used which job, and whether it executed or reused it (and why)."""

    __tablename__ = "run_jobs"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    job_key: Mapped[str] = mapped_column(ForeignKey("jobs.key"), primary_key=True)
    name: Mapped[str] = mapped_column(String)
    action: Mapped[str] = mapped_column(String)
    reasons: Mapped[list] = mapped_column(JSON)


class Artifact(Base):
    """An output of a job: handle JSON, per-file size/sha256/mtime, summary."""

    __tablename__ = "artifacts"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    job_key: Mapped[str] = mapped_column(ForeignKey("jobs.key"), index=True)
    slot: Mapped[str] = mapped_column(String)
    kind: Mapped[str] = mapped_column(String)
    handle: Mapped[dict] = mapped_column(JSON)
    files: Mapped[list] = mapped_column(JSON)
    sha256: Mapped[str] = mapped_column(String)
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class JobInput(Base):
    """An input edge: job slot <- artifact, with the artifact digest the job consumed."""

    __tablename__ = "job_inputs"
    job_key: Mapped[str] = mapped_column(ForeignKey("jobs.key"), primary_key=True)
    slot: Mapped[str] = mapped_column(String, primary_key=True)
    artifact_key: Mapped[str] = mapped_column(ForeignKey("artifacts.key"), index=True)
    artifact_sha256: Mapped[str] = mapped_column(String)


class Metric(Base):
    """A metric value a job reported (a number or a short list), per iteration."""

    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_key: Mapped[str] = mapped_column(ForeignKey("jobs.key"), index=True)
    name: Mapped[str] = mapped_column(String)
    iteration: Mapped[int | None] = mapped_column(Integer, nullable=True)
    value: Mapped[float | list] = mapped_column(JSON)


class Event(Base):
    """What happened, when (run started, job forced, job failed, outputs replaced...)."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(DateTime)
    kind: Mapped[str] = mapped_column(String)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), nullable=True)
    job_key: Mapped[str | None] = mapped_column(ForeignKey("jobs.key"), nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")


class Choice(Base):
    """A human choice (e.g. the classes kept in Select 2D) for a job given its inputs."""

    __tablename__ = "choices"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_name: Mapped[str] = mapped_column(String, index=True)
    inputs_digest: Mapped[str] = mapped_column(String)
    params: Mapped[dict] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime)
