"""ATNA: every audit event reaches a real syslog collector (Debian's rsyslog on loopback, TLS with
certificates made here), in order, also across a collector restart, with the chain's hashes."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import select

from peers import free_port, wait_port
from segnode.audit.atna import audit_message, syslog_message
from segnode.db.models import AuditEvent
from tests.conftest import eventually, storescu

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
SD = re.compile(rb'\[segnode@32473 seq="(\d+)" hash="([0-9a-f]{64})" prev="([0-9a-f]{64})"\]')


@contextmanager
def rsyslog(workdir: Path, port: int, pki: dict[str, Path] | None, udp: bool = False) -> Iterator[Path]:
    """rsyslogd in the foreground, receiving syslog over TLS (RFC 5425), plain TCP or UDP (`udp`) on `port` and
    writing each message's raw text as one line; yields that file."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "received.log"
    tls = (f'global(workDirectory="{workdir}" DefaultNetstreamDriver="gtls" '
           f'DefaultNetstreamDriverCAFile="{pki["ca_crt"]}" DefaultNetstreamDriverCertFile="{pki["server_crt"]}" '
           f'DefaultNetstreamDriverKeyFile="{pki["server_key"]}")\n'
           'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")\n'
           if pki else f'global(workDirectory="{workdir}")\nmodule(load="imtcp")\n')
    conf = workdir / "rsyslog.conf"
    if udp:
        tls = f'global(workDirectory="{workdir}")\nmodule(load="imudp")\n'
    conf.write_text(tls + f'input(type="{"imudp" if udp else "imtcp"}" port="{port}")\n'
                    'template(name="raw" type="string" string="%rawmsg%\\n")\n'
                    f'action(type="omfile" file="{out}" template="raw")\n')
    proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(conf), "-i", str(workdir / "rsyslogd.pid")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if udp:
            eventually(lambda: out.parent.joinpath("rsyslogd.pid").exists() or proc.poll() is not None, timeout=10)
            time.sleep(0.5)  # the pid file is written before the inputs open
        else:
            wait_port(port, proc, "rsyslogd")
        yield out
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _received(out: Path) -> list[tuple[int, str, bytes]]:
    if not out.exists():
        return []
    found = []
    for line in out.read_bytes().splitlines():
        m = SD.search(line)
        if m:
            found.append((int(m.group(1)), m.group(2).decode(), line))
    return found


def _events(node) -> list[AuditEvent]:
    with node.engine.connect() as conn:
        return list(conn.execute(select(AuditEvent.__table__).order_by(AuditEvent.seq)).all())


def _all_arrived(node, out: Path) -> list[tuple[int, str, bytes]] | None:
    events, got = _events(node), _received(out)
    return got if events and {seq for seq, _, _ in got} >= {e.seq for e in events} else None


@pytest.mark.parametrize("transport", ["tls", "tcp"])
def test_every_event_reaches_the_collector_in_order_across_a_restart(start_node, ct_files, pki, tmp_path, transport):
    port = free_port()
    dest = {"name": "arr", "host": "127.0.0.1", "port": port, "transport": transport, "ca_file": str(pki["ca_crt"])}
    pki = pki if transport == "tls" else None
    with rsyslog(tmp_path / "collector", port, pki) as out:
        node = start_node(audit={"syslog": [dest]})
        assert storescu(node.dimse.port, ct_files[:3]).returncode == 0
        eventually(lambda: _all_arrived(node, out), timeout=30)
    assert storescu(node.dimse.port, ct_files[3:]).returncode == 0  # the collector is down meanwhile
    assert node.atna[0].waiting() > 0
    with rsyslog(tmp_path / "collector", port, pki) as out:
        got = eventually(lambda: _all_arrived(node, out), timeout=60)
        events = {e.seq: e for e in _events(node)}
        cursor = node.settings.data.atna / "arr.cursor"  # confirmed once the connection outlives the batch
        eventually(lambda: cursor.exists() and int(cursor.read_text()) == max(events), timeout=10)
    first_seen = list(dict.fromkeys(seq for seq, _, _ in got))
    assert first_seen == sorted(first_seen) == sorted(events)  # every event, in order (a resent batch may repeat)
    for seq, digest, line in got:
        assert digest == events[seq].hash  # the chain as written: tampering on the node shows at the collector
        assert line.startswith(b"<85>1 ") and b" segnode " in line and b" IHE+RFC-3881 " in line
        message = ET.fromstring(line[line.index(b"<?xml"):])
        assert message.find("EventIdentification/EventID").get("csd-code") == events[seq].event_id
    stored = [e for e in events.values() if e.event_id == "110104" and e.outcome == 0]
    assert len(stored) == len(ct_files)


def test_udp_delivers_to_a_collector_that_listens(start_node, ct_files, tmp_path):
    port = free_port()
    with rsyslog(tmp_path / "collector", port, None, udp=True) as out:
        node = start_node(audit={"syslog": [{"name": "udp", "host": "127.0.0.1", "port": port, "transport": "udp"}]})
        assert storescu(node.dimse.port, ct_files[:2]).returncode == 0
        got = eventually(lambda: _all_arrived(node, out), timeout=30)
    assert [seq for seq, _, _ in got] == sorted(e.seq for e in _events(node) if e.seq <= got[-1][0])


def test_a_collector_that_is_down_delays_nothing_and_is_named_in_the_log(start_node, ct_files, pki, caplog):
    dest = {"name": "arr", "host": "127.0.0.1", "port": free_port(), "transport": "tls", "ca_file": str(pki["ca_crt"])}
    node = start_node(audit={"syslog": [dest]})
    assert storescu(node.dimse.port, ct_files).returncode == 0  # answered as usual
    eventually(lambda: "ATNA destination arr (127.0.0.1" in caplog.text, timeout=10)
    eventually(lambda: node.atna[0].waiting() >= len(ct_files), timeout=10)  # kept, to be sent later


def test_the_audit_message_says_what_the_event_says():
    row = {"seq": 7, "time": "2026-11-30T10:00:00.000001+00:00", "event_id": "110104",
           "event_name": "DICOM Instances Transferred", "action": "C", "outcome": 0, "status": 0,
           "actor": '{"ae_title":"CT1","host":"10.1.2.3","protocol":"dimse"}',
           "objects": '{"study_uid":"1.2.3","sop_instance_uid":"1.2.3.4","patient_key":"ab12"}',
           "detail": "a <b> & c", "prev_hash": "0" * 64, "hash": "1" * 64}
    message = ET.fromstring(audit_message(row, "SEGNODE"))
    event = message.find("EventIdentification")
    assert event.get("EventActionCode") == "C" and event.get("EventOutcomeIndicator") == "0"
    assert event.find("EventID").get("codeSystemName") == "DCM"
    assert event.find("EventOutcomeDescription").text == "a <b> & c"
    participant = message.find("ActiveParticipant")
    assert participant.get("UserID") == "CT1" and participant.get("NetworkAccessPointID") == "10.1.2.3"
    assert message.find("AuditSourceIdentification").get("AuditSourceID") == "SEGNODE"
    ids = {o.find("ParticipantObjectIDTypeCode").get("csd-code"): o.get("ParticipantObjectID")
           for o in message.findall("ParticipantObjectIdentification")}
    assert ids["110180"] == "1.2.3" and ids["2"] == "ab12"
    frame = syslog_message(row, "SEGNODE", "node1")
    assert frame.startswith(b"<85>1 2026-11-30T10:00:00.000001Z node1 segnode ")
    assert b'[segnode@32473 seq="7" hash="' + b"1" * 64 + b'"' in frame


@pytest.mark.parametrize("bad", [{"cert_file": "/x.pem"}, {"name": "a/b"}])
def test_bad_syslog_settings_are_refused_at_start(bad):
    from segnode.config import load_settings

    with pytest.raises(Exception, match="cert_file and key_file|name"):
        load_settings(None, {"audit": {"syslog": [{"name": "arr", "host": "h", **bad}]}})
