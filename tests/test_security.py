"""Allow list, TLS, and PHI kept out of logs."""

from __future__ import annotations

import logging
import ssl
import subprocess
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from testdata import ct_series
from tests.conftest import audit_events, echoscu, eventually, instances, storescu


def _security_alerts(node) -> list:
    return [e for e in audit_events(node) if e.event_id == "110113"]


def test_allow_list_accepts_listed_peer_and_rejects_others(start_node, ct_files):
    node = start_node(dimse={"allowed_peers": [{"ae_title": "GOODSCU", "hosts": ["127.0.0.1/32"]}]})
    assert storescu(node.dimse.port, ct_files, aet="GOODSCU").returncode == 0
    bad = echoscu(node.dimse.port, aet="BADSCU")
    assert bad.returncode != 0 and "Calling AE Title Not Recognized" in bad.stdout + bad.stderr
    assert len(instances(node)) == len(ct_files)
    alerts = _security_alerts(node)
    assert len(alerts) == 1 and '"ae_title":"BADSCU"' in alerts[0].actor and "allow list" in alerts[0].detail


def test_allow_list_checks_the_address_not_just_the_ae_title(start_node):
    node = start_node(dimse={"allowed_peers": [{"ae_title": "GOODSCU", "hosts": ["10.0.0.0/8"]}]})
    spoofed = echoscu(node.dimse.port, aet="GOODSCU")  # right AE title, wrong address
    assert spoofed.returncode != 0 and "Calling AE Title Not Recognized" in spoofed.stdout + spoofed.stderr
    assert len(_security_alerts(node)) == 1


def test_empty_allow_list_accepts_nobody(start_node):
    node = start_node(dimse={"allowed_peers": []})
    assert echoscu(node.dimse.port).returncode != 0


def _tls_node(start_node, pki, require_client_cert: bool):
    return start_node(dimse={"tls": {"enabled": True, "cert_file": str(pki["server_crt"]),
                                     "key_file": str(pki["server_key"]), "ca_file": str(pki["ca_crt"]),
                                     "require_client_cert": require_client_cert}})


def _pynetdicom_echo(port: int, ctx: ssl.SSLContext) -> bool:
    ae = AE("TLSSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SEGNODE", tls_args=(ctx, "127.0.0.1"))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def test_tls_accepts_tls_peers_and_refuses_plain_tcp(start_node, pki, ct_files):
    node = _tls_node(start_node, pki, require_client_cert=False)
    ctx = ssl.create_default_context(cafile=str(pki["ca_crt"]))
    assert _pynetdicom_echo(node.dimse.port, ctx)
    result = storescu(node.dimse.port, ct_files, "+tla", "+cf", str(pki["ca_crt"]))  # dcmtk, anonymous TLS
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(instances(node)) == len(ct_files)
    assert echoscu(node.dimse.port).returncode != 0  # plain TCP is refused
    # the peer gives up before the node has recorded the failed handshake
    eventually(lambda: any("TLS handshake failed" in e.detail for e in _security_alerts(node)))


def test_tls_client_certificate_required(start_node, pki):
    node = _tls_node(start_node, pki, require_client_cert=True)
    anonymous = echoscu(node.dimse.port, "+tla", "+cf", str(pki["ca_crt"]))
    assert anonymous.returncode != 0
    with_cert = echoscu(node.dimse.port, "+tls", str(pki["client_key"]), str(pki["client_crt"]),
                        "+cf", str(pki["ca_crt"]))
    assert with_cert.returncode == 0, with_cert.stdout + with_cert.stderr


def test_tls_below_1_2_is_refused(start_node, pki):
    node = _tls_node(start_node, pki, require_client_cert=False)
    ctx = ssl.create_default_context(cafile=str(pki["ca_crt"]))
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    assert not _pynetdicom_echo(node.dimse.port, ctx)
    ok = ssl.create_default_context(cafile=str(pki["ca_crt"]))
    assert _pynetdicom_echo(node.dimse.port, ok)


def test_patient_identity_never_reaches_a_log(node, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    name, pid, birth = "Sensitive^Patricia", "PID-SECRET-4711", "19511231"
    files = []
    for ds in ct_series(n_slices=3, rows=16, cols=16, seed=99, patient_name=name, patient_id=pid):
        ds.PatientBirthDate = birth
        files.append(tmp_path / f"{ds.InstanceNumber}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    assert storescu(node.dimse.port, files).returncode == 0
    ae = AE("PYSCU")  # pynetdicom on our side of the test too: its identifier logging must be off
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="SEGNODE")
    bad = next(ct_series(n_slices=1, rows=16, cols=16, seed=98, patient_name=name, patient_id=pid))
    bad.SeriesInstanceUID = "not/a/uid"
    assert assoc.send_c_store(bad).Status != 0
    assoc.release()
    text = caplog.text + "".join(e.actor + e.objects + e.detail for e in audit_events(node))
    assert "refused an instance" in caplog.text  # the logs did capture the traffic
    for secret in (name, "Sensitive", pid, birth):
        assert secret not in text
