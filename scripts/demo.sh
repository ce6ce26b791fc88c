#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the demo (wgebpf demo): a
# wgebpf hub and two wireguard-go peers in network namespaces, where routes
# choose the peer (via, replace, ECMP) and the routing table checks sources.
# --classic: the point-to-point demo (one wgebpf host, one wireguard-go host).
# It removes everything it made when it ends, also on Ctrl-C.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$REPO/scripts/root.sh"
as_root "$@"
"$REPO/scripts/setup.sh"
exec "$REPO/.venv/bin/wgebpf" demo "$@"
