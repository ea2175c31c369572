"""Hostile and careless HTTP peers: idle connections, headers trickled a byte at a time, bodies that stop
half-way, and more connections than the node should hold. Each is cut off at its bound while an ordinary
client is served (loopback only, bounded loops)."""

from __future__ import annotations

import os
import socket
import time

import httpx

from tests.test_stow import _series, part10

LIMITS = {"header_timeout": 1.0, "body_idle_timeout": 1.0, "keep_alive_timeout": 1.0, "max_connections": 8}


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the node closes `sock` (recv gives b"" or an error), failing after `seconds`."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, socket.timeout) as exc:
        if isinstance(exc, socket.timeout):
            raise AssertionError(f"still open after {seconds} s") from exc
    return time.monotonic() - start


def _healthy(node) -> bool:
    return httpx.get(f"http://127.0.0.1:{node.http_port}/healthz", timeout=5).status_code == 200


def test_a_silent_connection_is_closed_after_the_header_timeout(start_node):
    node = start_node(http=LIMITS)
    sock = socket.create_connection(("127.0.0.1", node.http_port))
    assert _closed_within(sock, 5) < 3
    assert _healthy(node)


def test_headers_trickled_a_byte_at_a_time_are_cut_off_at_the_header_timeout(start_node):
    node = start_node(http=LIMITS)
    sock = socket.create_connection(("127.0.0.1", node.http_port))
    start = time.monotonic()
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 100 + b"\r\n\r\n"
    try:
        for byte in request:  # a byte every 0.2 s: 27 s for the whole request
            sock.sendall(bytes([byte]))
            time.sleep(0.2)
            if time.monotonic() - start > 8:
                break
    except OSError:
        pass
    assert time.monotonic() - start < 4  # the node closed it at ~1 s; sending then failed
    sock.close()
    assert _healthy(node)


def test_a_body_that_stops_half_way_is_closed_and_its_part_dropped(start_node):
    node = start_node(http=LIMITS)
    raw = part10(_series(1, seed=81)[0])
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + raw[: len(raw) // 2]
    sock = socket.create_connection(("127.0.0.1", node.http_port))
    sock.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                 b"Content-Type: multipart/related; type=\"application/dicom\"; boundary=b\r\n\r\n" % (len(raw) * 2)
                 + body)
    assert _closed_within(sock, 6) < 4
    tmp = node.settings.data_dir / "tmp"
    deadline = time.monotonic() + 5
    while list(tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp.iterdir()) == []
    assert _healthy(node)


def test_connections_over_the_cap_are_closed_and_descriptors_stay_flat(start_node):
    """A peer opening connections without end: the node holds at most max_connections, closes the rest on
    accept, and serves again once the idle ones time out."""
    node = start_node(http=LIMITS)
    before = len(os.listdir("/proc/self/fd"))  # the node runs in this process
    socks = [socket.create_connection(("127.0.0.1", node.http_port)) for _ in range(40)]
    time.sleep(0.5)
    held = len(os.listdir("/proc/self/fd")) - before - len(socks)  # the node's side of each open connection
    assert held <= LIMITS["max_connections"] + 2, held
    for sock in socks:
        sock.close()
    deadline = time.monotonic() + 5
    while not _try_healthy(node) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _healthy(node)
    time.sleep(1.5)
    assert len(os.listdir("/proc/self/fd")) <= before + 2


def test_a_health_check_gets_in_while_idle_peers_fill_every_connection(start_node):
    """/healthz was unreachable while max_connections idle peers (reconnecting just under header_timeout) held
    every slot: when full, the connection that has owed its request headers longest makes room."""
    node = start_node(http=dict(LIMITS, header_timeout=30.0))
    idle = [socket.create_connection(("127.0.0.1", node.http_port)) for _ in range(LIMITS["max_connections"])]
    time.sleep(0.3)
    for _ in range(3):
        assert _healthy(node)
    assert _closed_within(idle[0], 5) < 5  # the oldest idle one went first
    for sock in idle:
        sock.close()


def test_a_request_under_way_is_never_closed_for_a_newcomer(start_node):
    """Only connections waiting for headers make room: an upload in progress keeps its connection."""
    node = start_node(http=dict(LIMITS, max_connections=2, body_idle_timeout=30.0))
    raw = part10(_series(1, seed=82)[0])
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + raw + b"\r\n--b--\r\n"
    uploads = [socket.create_connection(("127.0.0.1", node.http_port)) for _ in range(2)]
    for sock in uploads:  # headers and half the body, then a pause
        sock.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                     b"Content-Type: multipart/related; type=\"application/dicom\"; boundary=b\r\n\r\n" % len(body)
                     + body[: len(body) // 2])
    time.sleep(0.3)
    assert not _try_healthy(node)  # both slots busy with requests: the newcomer is refused
    for sock in uploads:
        sock.sendall(body[len(body) // 2:])
        sock.settimeout(10)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.close()


def _try_healthy(node) -> bool:
    try:
        return _healthy(node)
    except httpx.HTTPError:
        return False


def test_a_body_trickled_just_inside_the_stall_timeout_is_cut_off_at_the_minimum_rate(start_node):
    """A byte every 0.5 s never stalls for body_idle_timeout (1 s), so it held its connection for ever: enough
    of them locked /healthz out. Once the body has been arriving for body_idle_timeout it must average
    min_body_rate."""
    node = start_node(http=dict(LIMITS, min_body_rate=1000))
    sock = socket.create_connection(("127.0.0.1", node.http_port))
    sock.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                 b"Content-Type: multipart/related; type=\"application/dicom\"; boundary=b\r\n\r\n--b\r\n")
    start = time.monotonic()
    try:
        while time.monotonic() - start < 8:
            time.sleep(0.5)
            sock.sendall(b"x")
    except OSError:
        pass
    assert time.monotonic() - start < 5  # closed at ~1 s + what it sent / 1000 bytes/s
    sock.close()
    assert _healthy(node)


def test_a_slow_but_steady_upload_is_not_cut_off(start_node):
    """The body timeout is for stalls, not for slow links: a body arriving in pieces, each within the
    timeout and above the minimum rate, is stored however long it takes in all."""
    node = start_node(http=dict(LIMITS, min_body_rate=100))
    raw = part10(_series(1, seed=82)[0])
    body = (b"--b\r\nContent-Type: application/dicom\r\n\r\n" + raw + b"\r\n--b--\r\n")
    pieces = [body[i:i + len(body) // 6 + 1] for i in range(0, len(body), len(body) // 6 + 1)]

    def slowly():
        for piece in pieces:
            time.sleep(0.5)  # 3 s in all, more than every timeout
            yield piece

    rsp = httpx.post(f"http://127.0.0.1:{node.http_port}/dicom-web/studies", content=slowly(), timeout=30,
                     headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
    assert rsp.status_code == 200


def test_every_refusal_is_audited_and_many_in_one_request_are_counted_not_listed(node):
    """HTTP 400/404/415 wrote no audit event; one 0.6 MB request of 10,000 empty parts wrote 10,000."""
    from segnode.dicom import status as st
    from tests.conftest import audit_events

    url = f"http://127.0.0.1:{node.http_port}"
    before = len(audit_events(node))
    assert httpx.post(f"{url}/dicom-web/studies", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415
    assert httpx.get(f"{url}/no/such/route").status_code == 404
    assert httpx.post(f"{url}/dicom-web/studies/not-a-uid", content=b"x",
                      headers={"Content-Type": "multipart/related; boundary=b"}).status_code == 400
    refused = [e for e in audit_events(node)[before:] if '"http_status"' in (e.objects or "")]
    assert sorted(e.objects.split('"http_status":')[1][:3] for e in refused) == ["400", "404", "415"]

    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n\r\n" * 10_000 + b"--b--\r\n"
    assert len(body) < 700_000
    before = len(audit_events(node))
    rsp = httpx.post(f"{url}/dicom-web/studies", content=body, timeout=120,
                     headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
    assert rsp.status_code == 409 and len(rsp.json()["00081198"]["Value"]) == 10_000  # each part answered
    events = audit_events(node)[before:]
    assert len(events) == 2, [e.detail for e in events]  # the first refusal in full, then one count
    assert events[0].status == st.CANNOT_UNDERSTAND
    assert "9999 more instances refused in this STOW-RS request (0xC210 x9999)" in events[1].detail
