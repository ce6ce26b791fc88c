#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the whole test suite.
# Extra arguments go to pytest, e.g.:
#   ./scripts/test.sh -m 'not netns'          # unit tier only
#   ./scripts/test.sh tests/test_interop.py -k roaming
#   ./scripts/test.sh --a-impl=wireguard-go   # check the interop tests
#                                                  # against wireguard-go
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$REPO/scripts/root.sh"
as_root "$@"
"$REPO/scripts/setup.sh"
cd "$REPO"
exec "$REPO/.venv/bin/python" -m pytest -ra tests/ "$@"
