"""The demo's viewer server (nginx serving OHIF and proxying the PACS's DICOMweb): what goes into its
configuration is checked, and it is really our nginx that answers."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import httpx
import pytest

from peers import orthanc
from segnode.demo.viewer import ohif
from segnode.tools import ToolMissing


def test_the_viewer_proxies_dicomweb_with_the_host_kept_from_a_folder_with_spaces(tmp_path):
    with orthanc(tmp_path / "pacs") as pacs, ohif(tmp_path / "a folder; with {braces}", f"{pacs.url}/dicom-web/") as v:
        assert httpx.get(f"{v.url}/dicom-web/studies", timeout=10).status_code == 200
        assert "window.location.origin + '/dicom-web'" in httpx.get(f"{v.url}/app-config.js").text
        page = httpx.get(v.study_url("1.2.3"), timeout=10)  # OHIF's own route: the single page
        assert page.status_code == 200 and "<html" in page.text.lower()


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/dicom-web/; } location = /pwned { return 200 INJECTED; } location /x/ { proxy_pass http://a/",
    "http://127.0.0.1:9/dicom-web/$host", "http://127.0.0.1:9/dicom web/", "http://user:pw@127.0.0.1:9/dicom-web/",
])
def test_a_url_that_could_rewrite_the_configuration_is_refused(tmp_path, url):
    with pytest.raises(ToolMissing, match="cannot be proxied"):
        with ohif(tmp_path / "v", url):
            pass


def test_another_server_on_the_port_is_not_taken_for_the_viewer(tmp_path):
    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"someone else")

        def log_message(self, *args: object) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ToolMissing, match="nginx did not start to serve OHIF on port .*Address already in use"):
            with ohif(Path(tmp_path) / "v", "http://127.0.0.1:9/dicom-web/", port=other.server_address[1]):
                pass
    finally:
        other.shutdown()
