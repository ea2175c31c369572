"""The whole story of a study, from the index, the job table, the result records and the audit trail:
what was received from whom (with hashes), when it was completed, which rule and rule set routed it,
every job attempt with model, weights and software, the result UIDs and file hashes, and every
delivery with the PACS's confirmation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, or_, select

from segnode.db.models import AUDIT_EVENTS as EVENTS
from segnode.db.models import DECISIONS, INSTANCES, SERIES
from segnode.flow import input_hash
from segnode.jobs.queue import list_jobs
from segnode.datadir import LABELS_FILE, RECORD_FILE, DataDir, dicom_names



def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def trace(conn: Connection, data: DataDir, study_uid: str) -> dict[str, Any]:
    """Everything known about a study, as a JSON-ready dict: series (instances, senders, input hash,
    completion, routing), jobs (with their result files' hashes) and the audit events naming them.

    Args:
        conn: a connection to the node's database.
        data: the data directory holding results/<job id>/ (files are hashed, so this reads them all).
        study_uid: Study Instance UID.

    Returns:
        {"study_uid", "series": [...], "jobs": [...], "events": [...]}. Times are ISO 8601 UTC as
        stored; senders are peer labels without their port; `input_sha256` is the current index's
        (flow.input_hash), comparable with the jobs'. A job's "result" (software, device, notes,
        outputs, files_sha256: file name -> sha256 or None when missing) is present when its
        segmentation.json is. Events: those whose objects' JSON contains the study's or a series' UID
        as text (LIKE '%uid%') or names one of the jobs as "job_id", in sequence order. An unknown
        study has no series and no jobs.
    """
    rows = conn.execute(select(INSTANCES).where(INSTANCES.c.study_uid == study_uid).order_by(INSTANCES.c.id)).all()
    series: dict[str, dict[str, Any]] = {}
    for r in rows:
        s = series.setdefault(r.series_uid, {"series_uid": r.series_uid, "modality": r.modality, "instances": 0,
                                             "senders": set(), "first_received": r.received_at, "hashes": []})
        s["instances"] += 1
        s["senders"].add(r.source.rsplit(":", 1)[0])  # the sender without its ephemeral port
        s["last_received"] = r.received_at
        s["hashes"].append((r.sop_instance_uid, r.sha256))
    for uid, s in series.items():
        s["senders"] = sorted(s["senders"])
        s["input_sha256"] = input_hash(s.pop("hashes"))  # as the job's input hash
        state = conn.execute(select(SERIES).where(SERIES.c.series_uid == uid)).first()
        s["completion"] = None if state is None else {
            "state": state.state, "generation": state.generation, "completed_at": state.completed_at,
            "completed_by": state.completed_by, "instances": state.instances}
        s["routing"] = [{"generation": d.generation, "rules": json.loads(d.rules), "models": json.loads(d.models),
                         "ruleset_sha256": d.ruleset_sha256, "decided_at": d.decided_at}
                        for d in conn.execute(select(DECISIONS)
                                              .where(DECISIONS.c.series_uid == uid).order_by(DECISIONS.c.id))]
    jobs = [job.as_dict() for job in list_jobs(conn, study_uid=study_uid)]
    for job in jobs:
        job["destinations"] = json.loads(job["destinations"])
        record_path = data.path(job["output"]) / RECORD_FILE if job["output"] else None
        if record_path is not None and record_path.is_file():
            record = json.loads(record_path.read_text())
            job["result"] = {"software": record.get("software"), "device": record.get("device"),
                             "notes": record.get("notes"), "outputs": record.get("outputs", {}),
                             "files_sha256": {name: _sha256(data.path(job["output"]) / name)
                                              for name in [LABELS_FILE, *dicom_names(record)]}}
    patterns = [f'%"{study_uid}"%', *(f'%"{uid}"%' for uid in series)]  # quoted: 1.2.3 must not match 1.2.34
    for job in jobs:
        patterns += [f'%"job_id":{job["id"]},%', f'%"job_id":{job["id"]}}}%']
    events = [{"seq": e.seq, "time": e.time, "event": e.event_name, "outcome": e.outcome, "detail": e.detail}
              for e in conn.execute(select(EVENTS).where(or_(*(EVENTS.c.objects.like(p) for p in patterns)))
                                    .order_by(EVENTS.c.seq))]
    return {"study_uid": study_uid, "series": list(series.values()), "jobs": jobs, "events": events}


def render(story: dict[str, Any]) -> list[str]:
    """`trace`'s result as the lines `segnode audit trace` prints (hashes shortened to 16 hex digits)."""
    out = [f"study {story['study_uid']}"]
    for s in story["series"]:
        out.append(f"  series {s['series_uid']} ({s['modality']}): {s['instances']} instance(s) from "
                   f"{', '.join(s['senders'])}, {s['first_received']} .. {s['last_received']}, "
                   f"input sha256 {s['input_sha256'][:16]}...")
        c = s["completion"]
        if c:
            out.append(f"    completion: {c['state']} (generation {c['generation']}, by {c['completed_by'] or '-'} "
                       f"at {c['completed_at'] or '-'})")
        for d in s["routing"]:
            out.append(f"    routing (generation {d['generation']}): rules {', '.join(d['rules']) or '(none)'} -> "
                       f"{', '.join(d['models']) or 'ignored'}; rule set sha256 {d['ruleset_sha256'][:16]}...")
    for j in story["jobs"]:
        what = (f"deliver job {j['parent_job']}'s results to {j['destination']}" if j["kind"] == "deliver" else
                f"{j['model']} {j['model_version']} (weights sha256 {j['weights_sha256'][:16]}...) by rule {j['rule']}")
        out.append(f"  job {j['id']}: {what}: {j['state']} after {j['attempts']} attempt(s)"
                   + (f"; last error: {j['last_error']}" if j["last_error"] else ""))
        result = j.get("result")
        if result:
            out.append(f"    software {result['software']['name']} {result['software']['version']}, "
                       f"device {result['device']}")
            for kind, info in result["outputs"].items():
                if isinstance(info, dict) and "sop_instance_uid" in info:
                    out.append(f"    {kind.upper()} {info['sop_instance_uid']} sha256 "
                               f"{(result['files_sha256'].get(info['file']) or '?')[:16]}...")
            if result["outputs"].get("secondary_capture"):
                out.append(f"    contour images (secondary capture): {len(result['outputs']['secondary_capture'])}")
            if "areas_cm2" in result["outputs"]:
                out.append("    areas: " + ", ".join(f"{k} {v:.1f} cm²" for k, v in result["outputs"]["areas_cm2"].items()))
            if "volumes_ml" in result["outputs"]:
                out.append("    volumes: " + ", ".join(f"{k} {v:.1f} mL"
                                                        for k, v in result["outputs"]["volumes_ml"].items()))
    out.append("  audit events:")
    for e in story["events"]:
        out.append(f"    {e['seq']:6d} {e['time']} {e['event']}{'' if e['outcome'] == 0 else ' (failure)'}: "
                   f"{e['detail']}")
    return out
