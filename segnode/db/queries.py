"""Reads of the instance index shared by the stages, the REST API and the CLI."""

from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import Connection, func, select

from segnode.db.models import INSTANCES, Instance
from segnode.flow import CompletedSeries, SeriesInstance



def list_studies(conn: Connection, study_uids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Studies with their series and instance counts, in the shape GET /api/studies returns.

    Args:
        conn: a connection.
        study_uids: only these studies (None: all).

    Returns:
        [{"study_uid", "series": [{"series_uid", "modality", "instances"}]}], ordered by UID; the
        counts are index rows (one per SOP Instance UID, overwritten versions not counted).
    """
    stmt = select(Instance.study_uid, Instance.series_uid, func.max(Instance.modality), func.count())
    if study_uids is not None:
        stmt = stmt.where(Instance.study_uid.in_(study_uids))
    rows = conn.execute(stmt.group_by(Instance.study_uid, Instance.series_uid)
                        .order_by(Instance.study_uid, Instance.series_uid)).all()
    studies: dict[str, dict[str, Any]] = {}
    for study_uid, series_uid, modality, count in rows:
        study = studies.setdefault(study_uid, {"study_uid": study_uid, "series": []})
        study["series"].append({"series_uid": series_uid, "modality": modality, "instances": count})
    return list(studies.values())


def completed_series(conn: Connection, series_uid: str, generation: int) -> CompletedSeries:
    """The instances the index holds for a series, in arrival order, as version `generation`.

    Args:
        conn: any connection; read inside the completing transaction, it sees that transaction's view.
        series_uid: Series Instance UID.
        generation: the version number to stamp on the record (the series table's), not looked up.

    Returns:
        A CompletedSeries; its `instances` is empty when the index holds none (unknown series). Its
        `source` is the first instance's sender (Peer.label).
    """
    rows = conn.execute(select(INSTANCES.c.sop_instance_uid, INSTANCES.c.sha256, INSTANCES.c.path,
                               INSTANCES.c.study_uid, INSTANCES.c.source)
                        .where(INSTANCES.c.series_uid == series_uid).order_by(INSTANCES.c.id)).all()
    return CompletedSeries(series_uid=series_uid, study_uid=rows[0].study_uid if rows else "", generation=generation,
                           instances=tuple(SeriesInstance(r.sop_instance_uid, r.sha256, r.path) for r in rows),
                           source=rows[0].source if rows else "")
