"""First schema of the provenance store.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("workflow_name", sa.String, nullable=False),
        sa.Column("workflow_path", sa.String, nullable=False),
        sa.Column("workflow_text", sa.Text, nullable=False),
        sa.Column("command", sa.Text, nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("ended_at", sa.DateTime, nullable=True),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("code_version", sa.String, nullable=False),
        sa.Column("host", sa.String, nullable=False),
        sa.Column("prefect_flow_run_id", sa.String, nullable=True),
    )
    op.create_table(
        "jobs",
        sa.Column("key", sa.String, primary_key=True),
        sa.Column("name", sa.String, nullable=False, index=True),
        sa.Column("type", sa.String, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("directory", sa.String, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=True),
        sa.Column("ended_at", sa.DateTime, nullable=True),
        sa.Column("duration_s", sa.Float, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("backend", sa.String, nullable=True),
        sa.Column("host", sa.String, nullable=True),
        sa.Column("peak_rss_mb", sa.Float, nullable=True),
        sa.Column("prefect_task_run_id", sa.String, nullable=True),
    )
    op.create_table(
        "run_jobs",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("job_key", sa.String, sa.ForeignKey("jobs.key"), primary_key=True),
        sa.Column("name", sa.String, nullable=False),
        sa.Column("action", sa.String, nullable=False),
        sa.Column("reasons", sa.JSON, nullable=False),
    )
    op.create_table(
        "artifacts",
        sa.Column("key", sa.String, primary_key=True),
        sa.Column("job_key", sa.String, sa.ForeignKey("jobs.key"), nullable=False, index=True),
        sa.Column("slot", sa.String, nullable=False),
        sa.Column("kind", sa.String, nullable=False),
        sa.Column("handle", sa.JSON, nullable=False),
        sa.Column("files", sa.JSON, nullable=False),
        sa.Column("sha256", sa.String, nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "job_inputs",
        sa.Column("job_key", sa.String, sa.ForeignKey("jobs.key"), primary_key=True),
        sa.Column("slot", sa.String, primary_key=True),
        sa.Column("artifact_key", sa.String, sa.ForeignKey("artifacts.key"), nullable=False, index=True),
        sa.Column("artifact_sha256", sa.String, nullable=False),
    )
    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_key", sa.String, sa.ForeignKey("jobs.key"), nullable=False, index=True),
        sa.Column("name", sa.String, nullable=False),
        sa.Column("iteration", sa.Integer, nullable=True),
        sa.Column("value", sa.JSON, nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.DateTime, nullable=False),
        sa.Column("kind", sa.String, nullable=False),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=True),
        sa.Column("job_key", sa.String, sa.ForeignKey("jobs.key"), nullable=True),
        sa.Column("message", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("events", "metrics", "job_inputs", "artifacts", "run_jobs", "jobs", "runs"):
        op.drop_table(table)
