"""Initial index schema: blobs, manifests, tags, tag history, compilations, recipes, runs.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

DIGEST = sa.String(71)


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("digest", DIGEST, primary_key=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_blobs_kind", "blobs", ["kind"])
    op.create_table(
        "manifests",
        sa.Column("digest", DIGEST, sa.ForeignKey("blobs.digest"), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("target", sa.String(32), nullable=False),
        sa.Column("task", sa.String(64), nullable=False),
        sa.Column("graph_count", sa.Integer(), nullable=False),
        sa.Column("total_size", sa.BigInteger(), nullable=False),
        sa.Column("created", sa.String(64), nullable=False),
        sa.Column("indexed_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_manifests_name", "manifests", ["name"])
    op.create_table(
        "manifest_blobs",
        sa.Column(
            "manifest_digest",
            DIGEST,
            sa.ForeignKey("manifests.digest", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("blob_digest", DIGEST, primary_key=True),
        sa.Column("role", sa.String(32), nullable=False),
    )
    op.create_index("ix_manifest_blobs_blob", "manifest_blobs", ["blob_digest"])
    op.create_table(
        "tags",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("tag", sa.String(128), primary_key=True),
        sa.Column("digest", DIGEST, nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_tags_digest", "tags", ["digest"])
    op.create_table(
        "tag_history",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("tag", sa.String(128), nullable=False),
        sa.Column("digest", DIGEST, nullable=False),
        sa.Column("previous_digest", DIGEST, nullable=True),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("user", sa.String(255), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("event_digest", DIGEST, nullable=False, unique=True),
    )
    op.create_index("ix_tag_history_name_tag", "tag_history", ["name", "tag"])
    op.create_table(
        "compilations",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("hlo_key", sa.String(80), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("compiler", sa.String(64), nullable=False),
        sa.Column("compiler_version", sa.String(128), nullable=False),
        sa.Column("flags", sa.Text(), nullable=False),
        sa.Column("target", sa.String(32), nullable=False),
        sa.Column("hlo_digest", DIGEST, nullable=False),
        sa.Column("executable_digest", DIGEST, nullable=True),
        sa.Column("executable_format", sa.String(32), nullable=True),
        sa.Column("log_digest", DIGEST, nullable=True),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("record_digest", DIGEST, nullable=False, unique=True),
        sa.Column("provenance", sa.Text(), nullable=True),
    )
    op.create_index("ix_compilations_hlo_key", "compilations", ["hlo_key"])
    op.create_table(
        "recipes",
        sa.Column("direct_key", sa.String(80), primary_key=True),
        sa.Column("hlo_key", sa.String(80), nullable=False),
        sa.Column("hlo_digest", DIGEST, nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_recipes_hlo_key", "recipes", ["hlo_key"])
    op.create_table(
        "runs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("spec_digest", DIGEST, nullable=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("user", sa.String(255), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("record_digest", DIGEST, nullable=True),
    )
    op.create_table(
        "run_items",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "run_id", sa.String(64), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("graph_kind", sa.String(64), nullable=False),
        sa.Column("bucket", sa.String(64), nullable=False),
        sa.Column("target", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("hit_kind", sa.String(16), nullable=True),
        sa.Column("direct_key", sa.String(80), nullable=True),
        sa.Column("hlo_key", sa.String(80), nullable=True),
        sa.Column("trace_seconds", sa.Float(), nullable=False),
        sa.Column("compile_seconds", sa.Float(), nullable=False),
        sa.Column("log_digest", DIGEST, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_index("ix_run_items_run_id", "run_items", ["run_id"])


def downgrade() -> None:
    for table in (
        "run_items",
        "runs",
        "recipes",
        "compilations",
        "tag_history",
        "tags",
        "manifest_blobs",
        "manifests",
        "blobs",
    ):
        op.drop_table(table)
