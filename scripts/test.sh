#!/usr/bin/env bash
# Run the test suite on any machine: installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TCP_NODELAY=1
exec "${PYTHON:-python3}" -m pytest -q "$@"
