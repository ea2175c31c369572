#!/usr/bin/env bash
# Install everything segnode needs on a fresh Debian machine; fast when already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for bin in /usr/bin/storescu /usr/bin/echoscu /usr/bin/dciodvfy /usr/sbin/Orthanc /usr/bin/openssl /usr/sbin/nginx /usr/bin/chromium \
        /usr/sbin/rsyslogd /usr/lib/rabbitmq/bin/rabbitmq-server; do
    [ -x "$bin" ] || need_apt+=("$bin")
done
[ -e /usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so ] || compgen -G "/usr/lib/*/rsyslog/lmnsd_gtls.so" >/dev/null \
    || need_apt+=(rsyslog-gnutls)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(dicomweb)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need_apt+=(postgresql)
command -v docker-compose >/dev/null || need_apt+=(docker-compose)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing Debian packages (missing: ${need_apt[*]})"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    # nginx serves OHIF for the demo and the browser tests; chromium is the browser Playwright drives;
    # rsyslog (+ gnutls) is the ATNA audit collector of the tests (started by them, not as a service);
    # rabbitmq-server is the Celery broker of the tests (tests/broker.py runs private ones on free ports)
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq orthanc orthanc-dicomweb dcmtk dicom3tools openssl postgresql \
        docker-compose nginx chromium rsyslog rsyslog-gnutls rabbitmq-server >/dev/null
fi

PY="${PYTHON:-python3}"
# torch==2.13.0 is a CPU build on local disk; an unpinned torch would pull a multi-GB CUDA build.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
# nnU-Net's networks (runtime) and nnunetv2 (the test/bench reference) without their declared dependencies:
# timm -> torchvision would replace the CPU torch with a CUDA build; what they need is in pyproject.toml
"$PY" -m pip install -q --no-deps "dynamic-network-architectures==0.4.4" "nnunetv2==2.8.1"
"$PY" -m pip install -q -e ".[test]"
PYTHON="$PY" bash scripts/install_ohif.sh  # the viewer (npm's @ohif/app dist) for the demo and browser tests
echo "setup: done"
