"""OHIF, the viewer radiologists open, served for a PACS's DICOMweb by nginx (Debian package).

OHIF's built `dist/` (npm `@ohif/app`, installed by scripts/setup.sh) requests its assets from "/", so it
must sit at the root of an origin; the same origin proxies `/dicom-web/` to the PACS with the Host header
unchanged, because Orthanc writes retrieve URLs (RetrieveURL, BulkDataURI) from it. OHIF's own
`app-config.js` is replaced by one data source reading that proxy (facts in ../shared/VIEWER.md).
"""

from __future__ import annotations

import base64
import getpass
import os
import re
import secrets
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from segnode.demo.pacs import free_port, wait_http
from segnode.tools import ToolMissing

OHIF_VERSION = "3.13.2"
NGINX = "/usr/sbin/nginx"
INSTALL_HINT = "bash scripts/install_ohif.sh (OHIF's dist; nginx: apt-get install -y nginx)"
_URL = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~\-/]*)?$")  # what may enter nginx.conf as is
_UNSAFE_PATH = re.compile(r'["\\$\x00-\x1f\x7f]')  # inside nginx's double quotes: no quote, escape, variable


def ohif_dist() -> Path:
    """The OHIF dist folder, where scripts/install_ohif.sh unpacks npm's @ohif/app: $SEGNODE_OHIF_HOME/dist,
    else ~/.cache/segnode/ohif-VERSION/dist ($XDG_CACHE_HOME in place of ~/.cache when set).

    Raises:
        ToolMissing: no dist there (with the command that installs it).
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    dist = Path(os.environ.get("SEGNODE_OHIF_HOME") or cache / "segnode" / f"ohif-{OHIF_VERSION}") / "dist"
    if not (dist / "index.html").is_file():
        raise ToolMissing(f"OHIF {OHIF_VERSION} not found at {dist}; install it with: {INSTALL_HINT}")
    return dist


def app_config() -> str:
    """OHIF's window.config: one DICOMweb data source at this origin's /dicom-web (the nginx proxy), so the
    same files work behind any host name and port."""
    return """window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'segnode',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'segnode',
      configuration: {
        friendlyName: 'PACS (DICOMweb, proxied by segnode demo)',
        name: 'segnode',
        wadoUriRoot: window.location.origin + '/dicom-web',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""


def nginx_conf(workdir: Path, dist: Path, port: int, dicomweb: str, username: str | None = None,
               password: str | None = None) -> str:
    """nginx.conf serving `dist` at the root of 127.0.0.1:`port` and proxying /dicom-web/ to `dicomweb`
    (the PACS's DICOMweb root URL, e.g. http://127.0.0.1:8042/dicom-web/), with Basic credentials added
    when the PACS needs them. Temporary files, logs and the pid stay in `workdir`."""
    if not _URL.match(dicomweb) or "@" in dicomweb:
        raise ToolMissing(f"the PACS's DICOMweb URL {dicomweb!r} cannot be proxied: give http(s)://host[:port]/path "
                          f"(letters, digits and ._~-/ only; credentials apart)")
    for path in (workdir, dist):
        if _UNSAFE_PATH.search(str(path)):
            raise ToolMissing(f"cannot serve OHIF from {str(path)!r}: the path holds a quote, backslash, '$' or a "
                              f"control character; choose another folder")
    auth = ""
    if username:
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
        auth = f'proxy_set_header Authorization "Basic {token}";'
    user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""  # workers as the caller, who owns workdir
    temp = "\n    ".join(f'{kind}_temp_path "{workdir / kind}";' for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                              "scgi"))
    return f"""{user}
worker_processes 1;
daemon off;
pid "{workdir / 'nginx.pid'}";
error_log "{workdir / 'error.log'}" warn;
events {{ worker_connections 256; }}
http {{
    include /etc/nginx/mime.types;
    access_log "{workdir / 'access.log'}";
    {temp}
    client_max_body_size 0;
    server {{
        listen 127.0.0.1:{port};
        root "{dist}";
        location = /app-config.js {{ alias "{workdir / 'app-config.js'}"; add_header Cache-Control no-store; }}
        location = /segnode-viewer.txt {{ alias "{workdir / 'segnode-viewer.txt'}"; }}
        location /dicom-web/ {{
            proxy_pass {dicomweb.rstrip('/')}/;
            proxy_set_header Host $http_host;  # Orthanc writes its retrieve URLs from it
            {auth}
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
        location / {{ try_files $uri /index.html; }}  # OHIF's routes (/viewer?...) are the single page's
    }}
}}
"""


@dataclass
class Viewer:
    """A running OHIF: its origin, and the URL that opens one study."""

    url: str
    proc: subprocess.Popen[bytes]

    def study_url(self, study_uid: str) -> str:
        return f"{self.url}/viewer?StudyInstanceUIDs={quote(study_uid)}"


@contextmanager
def ohif(workdir: Path, dicomweb: str, username: str | None = None, password: str | None = None,
         port: int | None = None) -> Iterator[Viewer]:
    """Serve OHIF for the DICOMweb root `dicomweb` on 127.0.0.1 (a free port unless given) until the block
    ends.

    Raises:
        ToolMissing: nginx or OHIF's dist is not installed, the URL or a path cannot go into nginx's
            configuration, or nginx does not start (its own message).
    """
    if not Path(NGINX).exists():
        raise ToolMissing(f"nginx not found; install it with: {INSTALL_HINT}")
    dist = ohif_dist()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    (workdir / "app-config.js").write_text(app_config())
    nonce = secrets.token_hex(16)  # answered by our nginx only: another server on the port cannot pass for it
    (workdir / "segnode-viewer.txt").write_text(nonce)
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(workdir, dist, port, dicomweb, username, password))
    log = (workdir / "nginx.out").open("wb")
    proc = subprocess.Popen([NGINX, "-p", str(workdir), "-c", str(conf)], stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/segnode-viewer.txt", proc, "nginx (OHIF)", timeout=20, body=nonce)
        except (RuntimeError, TimeoutError) as exc:
            said = [line for line in (workdir / "nginx.out").read_text(errors="replace").splitlines() if "emerg" in line]
            raise ToolMissing(f"nginx did not start to serve OHIF on port {port}: {said[0] if said else exc}") from None
        yield Viewer(url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
