"""SQLAlchemy 2 models of the index. Timestamps are epoch seconds (portable across engines)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DIGEST = String(71)


class Base(DeclarativeBase):
    pass


class BlobRow(Base):
    __tablename__ = "blobs"
    digest: Mapped[str] = mapped_column(DIGEST, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str | None] = mapped_column(String(32), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    touched_at: Mapped[float | None] = mapped_column(Float)  # last put or reference


class ManifestRow(Base):
    __tablename__ = "manifests"
    digest: Mapped[str] = mapped_column(DIGEST, ForeignKey("blobs.digest"), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), index=True)
    target: Mapped[str] = mapped_column(String(32))
    task: Mapped[str] = mapped_column(String(64))
    graph_count: Mapped[int] = mapped_column(Integer)
    total_size: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[str] = mapped_column(String(64))
    indexed_at: Mapped[float] = mapped_column(Float)


class ManifestBlobRow(Base):
    __tablename__ = "manifest_blobs"
    manifest_digest: Mapped[str] = mapped_column(
        DIGEST, ForeignKey("manifests.digest", ondelete="CASCADE"), primary_key=True
    )
    blob_digest: Mapped[str] = mapped_column(DIGEST, primary_key=True)
    role: Mapped[str] = mapped_column(String(32))
    __table_args__ = (Index("ix_manifest_blobs_blob", "blob_digest"),)


class TagRow(Base):
    __tablename__ = "tags"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    tag: Mapped[str] = mapped_column(String(128), primary_key=True)
    digest: Mapped[str] = mapped_column(DIGEST, index=True)
    updated_at: Mapped[float] = mapped_column(Float)


class TagHistoryRow(Base):
    __tablename__ = "tag_history"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255))
    tag: Mapped[str] = mapped_column(String(128))
    digest: Mapped[str] = mapped_column(DIGEST)
    previous_digest: Mapped[str | None] = mapped_column(DIGEST)
    at: Mapped[float] = mapped_column(Float)
    user: Mapped[str] = mapped_column(String(255))
    host: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text)
    event_digest: Mapped[str] = mapped_column(DIGEST, unique=True)
    __table_args__ = (Index("ix_tag_history_name_tag", "name", "tag"),)


class CompilationRow(Base):
    """One compile attempt of an HLO key (success or failure); filled by the pipeline."""

    __tablename__ = "compilations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    hlo_key: Mapped[str] = mapped_column(String(80), index=True)
    status: Mapped[str] = mapped_column(String(16))
    compiler: Mapped[str] = mapped_column(String(64))
    compiler_version: Mapped[str] = mapped_column(String(128))
    flags: Mapped[str] = mapped_column(Text)
    target: Mapped[str] = mapped_column(String(32))
    hlo_digest: Mapped[str] = mapped_column(DIGEST)
    executable_digest: Mapped[str | None] = mapped_column(DIGEST)
    executable_format: Mapped[str | None] = mapped_column(String(32))
    log_digest: Mapped[str | None] = mapped_column(DIGEST)
    seconds: Mapped[float] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    record_digest: Mapped[str] = mapped_column(DIGEST, unique=True)
    provenance: Mapped[str | None] = mapped_column(Text)


class RecipeRow(Base):
    """Direct key -> HLO key: what lets a cache hit skip tracing."""

    __tablename__ = "recipes"
    direct_key: Mapped[str] = mapped_column(String(80), primary_key=True)
    hlo_key: Mapped[str] = mapped_column(String(80), index=True)
    hlo_digest: Mapped[str] = mapped_column(DIGEST)
    signature: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class WeightsRow(Base):
    """Weights key -> the safetensors blob holding those weights (as the graphs name them)."""

    __tablename__ = "weights"
    weights_key: Mapped[str] = mapped_column(String(80), primary_key=True)
    digest: Mapped[str] = mapped_column(DIGEST)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)


class RunRow(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    started_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))
    spec_digest: Mapped[str | None] = mapped_column(DIGEST)
    host: Mapped[str] = mapped_column(String(255))
    user: Mapped[str] = mapped_column(String(255))
    summary: Mapped[str] = mapped_column(Text)
    record_digest: Mapped[str | None] = mapped_column(DIGEST)


class RunItemRow(Base):
    __tablename__ = "run_items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("runs.id", ondelete="CASCADE"), index=True
    )
    model: Mapped[str] = mapped_column(String(255))
    graph_kind: Mapped[str] = mapped_column(String(64))
    bucket: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    hit_kind: Mapped[str | None] = mapped_column(String(16))
    direct_key: Mapped[str | None] = mapped_column(String(80))
    hlo_key: Mapped[str | None] = mapped_column(String(80))
    trace_seconds: Mapped[float] = mapped_column(Float)
    compile_seconds: Mapped[float] = mapped_column(Float)
    log_digest: Mapped[str | None] = mapped_column(DIGEST)
    error: Mapped[str | None] = mapped_column(Text)


class LeaseRow(Base):
    """Who holds a key (e.g. `compile:<hlo key>`) until when; epoch seconds, database clock."""

    __tablename__ = "leases"
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
    acquired_at: Mapped[float] = mapped_column(Float)
