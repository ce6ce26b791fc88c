#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the demo: a wgebpf host and
# a wireguard-go host in two network namespaces, traffic through the tunnel,
# `wg show` of both sides. It removes everything it made when it ends.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$REPO/scripts/root.sh"
as_root "$@"
"$REPO/scripts/setup.sh"
exec "$REPO/.venv/bin/wgebpf" demo "$@"
