"""What an audit event says, typed: its type (a code with its meaning), the action, the outcome.

Types are the DICOM audit message vocabulary (DCM codes, PS3.15 A.5 / PS3.16 CID 400s) where one
exists; segnode's own steps between receiving and delivering, which no DICOM event type covers,
have codes of their own ("SN-..."). Actions and outcomes are those of RFC 3881 / PS3.15.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, Mapping


@dataclass(frozen=True)
class EventType:
    code: str
    display: str


APPLICATION_ACTIVITY = EventType("110100", "Application Activity")
BEGIN_TRANSFERRING = EventType("110102", "Begin Transferring DICOM Instances")
INSTANCES_TRANSFERRED = EventType("110104", "DICOM Instances Transferred")
SECURITY_ALERT = EventType("110113", "Security Alert")
SERIES_COMPLETE = EventType("SN-COMPLETE", "Series Complete")
SERIES_REOPENED = EventType("SN-REOPEN", "Series Reopened")
ROUTING_DECISION = EventType("SN-ROUTE", "Routing Decision")
JOB_EVENT = EventType("SN-JOB", "Job State Change")


class Action(StrEnum):
    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    EXECUTE = "E"


class Outcome(IntEnum):
    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


@dataclass(frozen=True, kw_only=True)
class Event:
    """What to record; the trail adds time, sequence and hashes.

    `actor`: who acted (component, peer address, AE title, user) - never patient data.
    `objects`: what it acted on (UIDs, hashes, job ids). `status`: the DIMSE status answered, if any.
    """

    type: EventType
    action: Action
    outcome: Outcome = Outcome.SUCCESS
    actor: Mapping[str, Any]
    objects: Mapping[str, Any] = field(default_factory=dict)
    status: int | None = None
    detail: str = ""
