#!/usr/bin/env bash
# Type-check the package and run the test suite on any machine: installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TCP_NODELAY=1
"${PYTHON:-python3}" -m mypy  # the package's types ([tool.mypy] in pyproject.toml)
exec "${PYTHON:-python3}" -m pytest -q "$@"
