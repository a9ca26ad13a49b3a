#!/usr/bin/env bash
# Installs everything the test suite needs, then runs it. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
# The integration tests run a real Prometheus server (Debian package; not on PyPI). Installed only when missing.
if ! command -v prometheus >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
python3 -m pytest "$@"
