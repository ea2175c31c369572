"""Tables. A constraint naming convention keeps Alembic migrations stable across backends."""

from __future__ import annotations

from typing import cast

from sqlalchemy import BigInteger, Float, Index, Integer, MetaData, String, Table, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Instance(Base):
    """One stored SOP instance: where its bytes are and what they are."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    patient_key: Mapped[str] = mapped_column(String(64), default="")
    source: Mapped[str] = mapped_column(String(200), default="")
    version: Mapped[int] = mapped_column(Integer, default=1)
    received_at: Mapped[str] = mapped_column(String(40), index=True, doc="UTC, ISO 8601")


class SupersededInstance(Base):
    """An older version of an instance replaced by different bytes; its file is kept aside."""

    __tablename__ = "superseded_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    superseded_at: Mapped[str] = mapped_column(String(40), doc="UTC, ISO 8601")


class AuditEvent(Base):
    """Append-only, hash-chained audit event (DICOM audit message vocabulary)."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    time: Mapped[str] = mapped_column(String(40))
    event_id: Mapped[str] = mapped_column(String(16))
    event_name: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(1))
    outcome: Mapped[int] = mapped_column(Integer)
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    actor: Mapped[str] = mapped_column(Text)
    objects: Mapped[str] = mapped_column(Text)
    detail: Mapped[str] = mapped_column(Text, default="")
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))

    __table_args__ = (Index("ix_audit_events_event_id", "event_id"),)


class SeriesState(Base):
    """Where a series stands between arrival and routing. A series reopens (its generation goes up)
    when instances arrive after it was completed."""

    __tablename__ = "series"

    series_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), doc="open | complete | refused (set aside: cannot be routed)")
    generation: Mapped[int] = mapped_column(Integer, default=1)
    instances: Mapped[int] = mapped_column(Integer, default=0, doc="instance count when last completed")
    last_received_at: Mapped[str] = mapped_column(String(40), default="", doc="newest arrival accounted for")
    completed_at: Mapped[str | None] = mapped_column(String(40), nullable=True)
    completed_by: Mapped[str] = mapped_column(String(16), default="", doc="quiet | expected | manual")
    complete_requested: Mapped[int] = mapped_column(Integer, default=0, doc="1: complete at the next poll")


class RoutingDecisionRow(Base):
    """What the rules decided for one generation of a series, and under which rule set."""

    __tablename__ = "routing_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    ruleset_sha256: Mapped[str] = mapped_column(String(64))
    rules: Mapped[str] = mapped_column(Text, doc="JSON: names of the rules applied")
    models: Mapped[str] = mapped_column(Text, doc="JSON: model names, empty when ignored")
    decided_at: Mapped[str] = mapped_column(String(40))


class JobRow(Base):
    """One model run over one version of a series' instances, or the delivery of its results to one
    destination: both share the queue's claiming, leases, retries and dead letters."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="segment", doc="segment | deliver")
    destination: Mapped[str] = mapped_column(String(64), default="", doc="deliver: the destination's name")
    parent_job: Mapped[int | None] = mapped_column(Integer, nullable=True, doc="deliver: the job whose result it sends")
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True,
                                                 doc="sha256 of series + model version + instance hashes")
    series_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    generation: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    input_sha256: Mapped[str] = mapped_column(String(64), doc="sha256 over the instances' (UID, sha256)")
    instances: Mapped[int] = mapped_column(Integer)
    rule: Mapped[str] = mapped_column(String(64))
    ruleset_sha256: Mapped[str] = mapped_column(String(64))
    destinations: Mapped[str] = mapped_column(Text, default="[]")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), index=True, doc="queued | running | succeeded | failed | dead")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    next_run_at: Mapped[float] = mapped_column(Float, default=0.0, doc="epoch seconds")
    lease_owner: Mapped[str] = mapped_column(String(64), default="")
    lease_expires_at: Mapped[float] = mapped_column(Float, default=0.0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    output: Mapped[str] = mapped_column(String(512), default="", doc="result folder, relative to the data dir")
    supersedes: Mapped[int | None] = mapped_column(Integer, nullable=True, doc="the job whose result this replaces")
    assumed_spacing_mm: Mapped[float | None] = mapped_column(Float, nullable=True,
                                                             doc="pixel spacing its rule lets it assume (mm)")
    created_at: Mapped[str] = mapped_column(String(40))
    updated_at: Mapped[str] = mapped_column(String(40))


def _table(model: type[Base]) -> Table:
    return cast(Table, model.__table__)


# The tables for Core statements (the hot paths and the queue use Core, not the ORM)
INSTANCES = _table(Instance)
SUPERSEDED = _table(SupersededInstance)
AUDIT_EVENTS = _table(AuditEvent)
SERIES = _table(SeriesState)
DECISIONS = _table(RoutingDecisionRow)
JOBS = _table(JobRow)
