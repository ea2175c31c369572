"""Read-side queries shared by the REST API and the CLI."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, func, select

from segnode.db.models import Instance


def list_studies(conn: Connection) -> list[dict[str, Any]]:
    """Studies with their series and instance counts, in the shape GET /api/studies returns."""
    rows = conn.execute(
        select(Instance.study_uid, Instance.series_uid, func.max(Instance.modality), func.count())
        .group_by(Instance.study_uid, Instance.series_uid)
        .order_by(Instance.study_uid, Instance.series_uid)
    ).all()
    studies: dict[str, dict[str, Any]] = {}
    for study_uid, series_uid, modality, count in rows:
        study = studies.setdefault(study_uid, {"study_uid": study_uid, "series": []})
        study["series"].append({"series_uid": series_uid, "modality": modality, "instances": count})
    return list(studies.values())
