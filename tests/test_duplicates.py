"""Duplicates are stored once; different bytes for a known instance overwrite and keep the old."""

from __future__ import annotations

import concurrent.futures

from pydicom import dcmread

from tests.conftest import audit_events, instances, storescu


def test_same_bytes_are_acknowledged_and_stored_once(node, ct_files):
    for _ in range(3):
        assert storescu(node.dimse.port, ct_files).returncode == 0
    rows = instances(node)
    assert len(rows) == len(ct_files) and {r.version for r in rows} == {1}
    files = [p for p in (node.settings.data_dir / "spool").rglob("*.dcm")]
    assert len(files) == len(ct_files)
    duplicates = [e for e in audit_events(node) if e.detail.startswith("duplicate")]
    assert len(duplicates) == 2 * len(ct_files)


def test_different_bytes_overwrite_and_keep_the_old_version(node, ct_files, tmp_path):
    assert storescu(node.dimse.port, ct_files[:1]).returncode == 0
    first = instances(node)[0]
    ds = dcmread(ct_files[0])
    ds.SeriesDescription = "corrected"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    assert storescu(node.dimse.port, [changed]).returncode == 0
    rows = instances(node)
    assert len(rows) == 1 and rows[0].version == 2 and rows[0].sha256 != first.sha256
    assert dcmread(node.settings.data_dir / rows[0].path).SeriesDescription == "corrected"
    kept = list((node.settings.data_dir / "superseded").iterdir())
    assert len(kept) == 1 and dcmread(kept[0]).SeriesDescription == "Synthetic abdomen"
    overwrite = [e for e in audit_events(node) if e.action == "U"]
    assert len(overwrite) == 1 and first.sha256 in overwrite[0].detail


def test_twenty_senders_five_times_each_store_one_copy(node, ct_files):
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(lambda i: [storescu(node.dimse.port, ct_files, aet=f"SCU{i}").returncode
                                         for _ in range(5)], range(20)))
    assert codes == [[0] * 5] * 20
    rows = instances(node)
    assert len(rows) == len(ct_files) and {r.version for r in rows} == {1}
    assert len(list((node.settings.data_dir / "spool").rglob("*.dcm"))) == len(ct_files)
    assert list((node.settings.data_dir / "tmp").iterdir()) == []
    transferred = [e for e in audit_events(node) if e.event_id == "110104" and e.outcome == 0]
    assert len(transferred) == 20 * 5 * len(ct_files)
