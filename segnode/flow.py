"""The hand-offs of segnode's flow: open this module first.

A study travels through these records, each the output of one stage and the input of the next:

    StoreResult      listener (segnode.ingest): one instance spooled, indexed and audited - or refused
                     with its DIMSE status - whether it came over C-STORE or STOW-RS
    CompletedSeries  completion (segnode.completion): one version (generation) of a series, its instances
                     in arrival order, once its study has gone quiet, reached its count, or was asked for
    RoutingDecision  router (segnode.routing): the rules that applied and the models they start
    JobSpec -> Job   queue (segnode.jobs): one model on one series version, or one delivery of a job's
                     results; `Job` is a row of the queue, read-only
    Segmentation     engine (segnode.inference): a label map in the series' own voxel grid
    SegmentedSeries  the label map with the volume it came from and its files (labels.nii.gz, record)
    EncodedResults   outputs (segnode.outputs): DICOM-SEG, TID 1500 SR and contour images written
    DeliveryReceipt  delivery (segnode.delivery): what the destination answered, how arrival was confirmed

The records are frozen - a stage that needs a changed one makes a new one - except the engine's Timings
and Segmentation, which it fills in as it goes. Nothing here imports another segnode module at run time,
so every stage can depend on this one and none on each other's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Sequence

if TYPE_CHECKING:
    import numpy as np

    from segnode.imaging.volume import Volume


def utc_now() -> str:
    """The one timestamp format written anywhere: ISO 8601, UTC, microseconds (sorts as text)."""
    return utc_iso(datetime.now(timezone.utc))


def seconds_since(stamp: str) -> float:
    """Seconds from a `utc_now` timestamp until now (negative if it lies ahead)."""
    return (datetime.now(timezone.utc) - datetime.fromisoformat(stamp)).total_seconds()


def utc_iso(moment: datetime) -> str:
    """`moment` in the format of `utc_now`."""
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


# -- listener -------------------------------------------------------------------------------------
class StoreOutcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # identical bytes were already stored: acknowledged, nothing written
    OVERWRITTEN = "overwritten"  # different bytes for a known SOP Instance UID: the old version kept aside
    FAILED = "failed"


@dataclass(frozen=True)
class StoreResult:
    """What the listener answers for one instance. `status` is the DIMSE status (PS3.4 B.2.3); STOW-RS
    reuses it as the Failure Reason (0008,1197)."""

    status: int
    comment: str = ""
    outcome: StoreOutcome = StoreOutcome.STORED
    sop_class_uid: str = ""
    sop_instance_uid: str = ""

    @classmethod
    def success(cls, outcome: StoreOutcome, *, sop_class_uid: str, sop_instance_uid: str) -> "StoreResult":
        return cls(0x0000, "", outcome, sop_class_uid, sop_instance_uid)

    @classmethod
    def refused(cls, status: int, comment: str, *, sop_class_uid: str = "",
                sop_instance_uid: str = "") -> "StoreResult":
        """A refusal: `status` is a DIMSE failure status, `comment` says why (it reaches the sender)."""
        return cls(status, comment, StoreOutcome.FAILED, sop_class_uid, sop_instance_uid)

    @property
    def ok(self) -> bool:
        return self.status == 0x0000


# -- completion -----------------------------------------------------------------------------------
class SeriesInstance(NamedTuple):
    sop_instance_uid: str
    sha256: str  # of the stored file
    path: str  # relative to the data directory


def input_hash(instances: Sequence[tuple[str, str]]) -> str:
    """sha256 over a series' (SOP Instance UID, content sha256) pairs, in UID order: the identity of
    a series version, whatever order its instances arrived in."""
    digest = hashlib.sha256()
    for uid, sha in sorted(instances):
        digest.update(f"{uid}:{sha}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True, kw_only=True)
class CompletedSeries:
    """One version of a series as the index holds it: instances in arrival order, the first one's
    sender as the store recorded it (e.g. 'dimse:CT1@10.0.0.5:40112')."""

    series_uid: str
    study_uid: str
    generation: int
    instances: tuple[SeriesInstance, ...]
    source: str

    @property
    def input_sha256(self) -> str:
        return input_hash([(i.sop_instance_uid, i.sha256) for i in self.instances])


# -- routing ----------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RoutingDecision:
    """The router's answer for one series version, as recorded with the rule set's sha256."""

    series_uid: str
    generation: int
    ruleset_sha256: str
    rules: tuple[str, ...]  # names of the rules applied, in order
    models: tuple[str, ...]  # the models they start (empty: ignored)

    @property
    def ignored(self) -> bool:
        return not self.models


# -- queue ------------------------------------------------------------------------------------------
class JobKind(StrEnum):
    SEGMENT = "segment"  # run a model on a series version; results in results/<job id>/
    DELIVER = "deliver"  # send a segment job's results to one destination


class JobState(StrEnum):
    """queued -> running -> succeeded | failed (retried after backoff) -> ... -> dead; superseded when
    the series changed before the job ran (a newer job covers the new input)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"
    SUPERSEDED = "superseded"


RUNNABLE = (JobState.QUEUED, JobState.FAILED)
WORKER_NAME = r"^[\x21-\x7e]{1,100}$"  # a worker's name in leases and the audit: printable ASCII, no spaces


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """What the router (or a finished job) asks the queue for."""

    kind: JobKind = JobKind.SEGMENT
    series_uid: str
    study_uid: str
    generation: int
    model: str
    model_version: str
    weights_sha256: str
    input_sha256: str
    instances: int
    rule: str
    ruleset_sha256: str
    destinations: tuple[str, ...] = ()
    priority: int = 0
    destination: str = ""  # deliver: where to
    parent_job: int | None = None  # deliver: the segment job whose results go there
    parent_key: str = ""  # deliver: that job's idempotency key
    assumed_spacing_mm: float | None = None  # the rule lets images without a pixel spacing be read at this one

    def key(self) -> str:
        """The idempotency key: same series, same model version and weights, same instances (and the same
        assumed spacing, if any): the same job; for a delivery: the same results to the same destination."""
        if self.kind == JobKind.DELIVER:
            key = "\n".join(["deliver", self.parent_key, self.destination])
        else:
            key = "\n".join([self.series_uid, self.model, self.model_version, self.weights_sha256, self.input_sha256])
            if self.assumed_spacing_mm is not None:
                key += f"\nassumed spacing {self.assumed_spacing_mm:g}"
        return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Job(JobSpec):
    """One row of the job queue, read-only: the spec it was queued with and its state. Times:
    `next_run_at` and `lease_expires_at` in epoch seconds, `created_at`/`updated_at` as `utc_now` writes
    them; `output` relative to the data directory."""

    id: int
    state: JobState
    idempotency_key: str
    attempts: int
    max_attempts: int
    next_run_at: float = 0.0
    lease_owner: str = ""
    lease_expires_at: float = 0.0
    last_error: str = ""
    output: str = ""
    supersedes: int | None = None
    created_at: str = ""
    updated_at: str = ""

    def key(self) -> str:
        """The key it was queued under (a delivery's cannot be recomputed: its parent's key is not stored)."""
        return self.idempotency_key

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Job":
        """From a `jobs` row (SQLAlchemy mapping); `destinations` is stored as JSON text."""
        values = dict(row)
        values["kind"] = JobKind(values["kind"])
        values["state"] = JobState(values["state"])
        values["destinations"] = tuple(json.loads(values["destinations"] or "[]"))
        return cls(**values)

    def delivery(self, destination: str) -> JobSpec:
        """The delivery job that sends this (segment) job's results to `destination`."""
        spec = {f.name: getattr(self, f.name) for f in fields(JobSpec)}
        return JobSpec(**{**spec, "kind": JobKind.DELIVER, "destinations": (destination,), "destination": destination,
                          "parent_job": self.id, "parent_key": self.idempotency_key})

    def as_dict(self) -> dict[str, Any]:
        """The row as the REST API and `segnode jobs list --json` show it: the table's columns."""
        out = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "parent_key"}  # not a column
        out.update(kind=str(self.kind), state=str(self.state), destinations=json.dumps(list(self.destinations)))
        return out


# -- inference --------------------------------------------------------------------------------------
@dataclass
class Timings:
    """Seconds per stage of one segmentation; on a GPU each stage is synchronized before it is timed."""

    read: float = 0.0  # DICOM -> volume, filled in by callers that read
    preprocess: float = 0.0  # upload, resample to the model grid, normalize
    windows: float = 0.0  # sliding window: network and accumulation
    resample: float = 0.0  # logits back to the source grid, argmax, download
    postprocess: float = 0.0  # connected components

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.__dict__.items()}

    def __str__(self) -> str:
        total = sum(self.__dict__.values())
        return ", ".join(f"{k} {v:.2f} s" for k, v in self.__dict__.items()) + f"; total {total:.2f} s"


@dataclass
class Segmentation:
    """The engine's output. `labels`: uint8, the source volume's shape (slices, rows, cols) and
    geometry; values are the manifest's label values, 0 background. `notes`: what was done to the
    input that a reader of the result must know (e.g. a gantry tilt resampled)."""

    labels: np.ndarray
    timings: Timings
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class SegmentedSeries:
    """One series through one model: the volume read, its segmentation, and the files written
    (labels.nii.gz and segmentation.json, the record of what produced them)."""

    volume: "Volume"
    segmentation: Segmentation
    labels_path: Path
    record_path: Path


# -- outputs ----------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class EncodedResults:
    """The DICOM results written beside the label map, with their SOP Instance UIDs."""

    seg: Path
    sr: Path
    seg_uid: str
    sr_uid: str
    volumes_ml: Mapping[str, float]  # per label name; empty for a projection image
    areas_cm2: Mapping[str, float] = field(default_factory=dict)  # per label name, projection images only
    overlays: tuple[Path, ...] = ()  # secondary-capture contour images, when configured


# -- delivery ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DeliveryReceipt:
    """`answers`: SOP Instance UID -> what the destination said; `confirmed`: how arrival was checked."""

    answers: Mapping[str, str] = field(default_factory=dict)
    confirmed: str = ""
