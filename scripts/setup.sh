#!/usr/bin/env bash
# Set up everything wgebpf needs on a Debian 12 (bookworm) amd64 machine.
# Run as root. Idempotent: a second run changes nothing and takes seconds.
#
#   1. Debian packages (apt-get update only when something is missing)
#   2. /lib/modules/$(uname -r)/{build,source} -> Debian's kernel headers,
#      which bcc needs to compile eBPF C at run time (see README, Set-up,
#      and docs/platform-notes.md, item 5)
#   3. a virtual environment at REPO/.venv from /usr/bin/python3 with
#      --system-site-packages, so it sees Debian's bcc; wgebpf installed
#      into it in editable mode with its extras: test, and bench (matplotlib,
#      which only `wgebpf bench` needs)
#   4. /usr/local/bin/wgebpf and wgebpf-go -> REPO/.venv/bin/
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$REPO/scripts/root.sh"
as_root "$@"
VENV="$REPO/.venv"
STAMP="$VENV/.wgebpf-setup-stamp"
LOG="$(mktemp /tmp/wgebpf-setup.XXXXXX.log)"
trap 'rm -f "$LOG"' EXIT

# bpfcc-tools is not needed by wgebpf itself; it is there for debugging
# (execsnoop, tcpdrop...). --no-install-recommends below keeps
# wireguard-tools from pulling in wireguard-dkms and a compiler.
PACKAGES=(
    python3-bpfcc libbpfcc bpfcc-tools linux-headers-amd64
    python3-venv python3-nftables nftables
    wireguard-go wireguard-tools
    iperf3 iputils-ping iproute2 tcpdump bpftool bird2 prometheus ethtool
)

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

# Run a command with its output kept in $LOG; on failure show its tail and
# return 1, so the caller can `|| die` with what it was trying to do.
quietly() {
    if ! "$@" >"$LOG" 2>&1; then
        printf 'setup: command failed: %s\n' "$*" >&2
        tail -n 30 "$LOG" | sed 's/^/    /' >&2
        return 1
    fi
}

[[ -r /etc/debian_version ]] || die "this script is for Debian 12 (bookworm)"
[[ "$(dpkg --print-architecture)" == amd64 ]] || die "this script is for amd64"
case "$(cat /etc/debian_version)" in
    12*|bookworm*) ;;
    *) say "warning: tested on Debian 12, this is Debian $(cat /etc/debian_version)" ;;
esac

# -- 1. Debian packages --------------------------------------------------------

missing=()
for pkg in "${PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    quietly apt-get update -q || die "apt-get update failed (network? apt sources?)"
    quietly apt-get install -y -q --no-install-recommends "${missing[@]}" \
        || die "could not install: ${missing[*]}"
fi

# -- 2. Kernel headers for bcc -------------------------------------------------
# The running kernel has no headers of its own. Debian's linux-headers-amd64
# (6.1) serves, because our eBPF programs only use stable UAPI structs; bcc
# finds them through /lib/modules/$(uname -r)/{build,source}.

kver="$(uname -r)"
# The version linux-headers-amd64 points at, e.g. "6.1.0-56".
hver="$(dpkg-query -W -f='${Depends}' linux-headers-amd64 \
        | sed -n 's/^linux-headers-\([0-9][^ ,]*\)-amd64.*/\1/p')"
if [[ -z "$hver" ]]; then
    # Fall back on the newest header tree present.
    newest="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)"
    hver="${newest#/usr/src/linux-headers-}"
    hver="${hver%-amd64}"
fi
hdr_build="/usr/src/linux-headers-$hver-amd64"
hdr_source="/usr/src/linux-headers-$hver-common"
[[ -n "$hver" && -d "$hdr_build" && -d "$hdr_source" ]] \
    || die "kernel headers not found (expected $hdr_build and $hdr_source)"

# Link NAME to TARGET unless it already points there. A link that resolves
# to some other existing header tree (say, the running kernel's own) is
# left alone; an absent or dangling one is (re)made.
link_headers() {
    local name="/lib/modules/$kver/$1" target="$2"
    if [[ -L "$name" && "$(readlink "$name")" == "$target" ]]; then
        return
    fi
    if [[ -e "$name" && -d "$name/include" ]]; then
        say "keeping $name -> $(readlink -f "$name")"
        return
    fi
    if [[ -e "$name" && ! -L "$name" ]]; then
        die "$name exists and is not a header tree; move it away and re-run"
    fi
    mkdir -p "/lib/modules/$kver"
    ln -sfn "$target" "$name"
    say "linked $name -> $target"
}
link_headers build "$hdr_build"
link_headers source "$hdr_source"

# -- 3. Virtual environment ----------------------------------------------------

venv_ok() {
    [[ -x "$VENV/bin/python" && -f "$VENV/pyvenv.cfg" ]] || return 1
    grep -qx 'include-system-site-packages = true' "$VENV/pyvenv.cfg" || return 1
    grep -qx 'home = /usr/bin' "$VENV/pyvenv.cfg" || return 1
}
if ! venv_ok; then
    if [[ -e "$VENV" ]]; then
        say "replacing $VENV (not a --system-site-packages venv of /usr/bin/python3)"
        rm -rf "$VENV"
    fi
    say "creating $VENV"
    quietly /usr/bin/python3 -m venv --system-site-packages "$VENV" \
        || die "could not create the venv (is python3-venv installed?)"
fi

want="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want" != "$have" || ! -x "$VENV/bin/wgebpf" ]]; then
    say "installing wgebpf and its Python dependencies into $VENV"
    quietly "$VENV/bin/pip" install -q --disable-pip-version-check -e "$REPO[test,bench]" \
        || die "pip install -e '$REPO[test,bench]' failed (PyPI reachable?)"
    echo "$want" >"$STAMP"
fi

# bcc must be Debian's (python3-bpfcc). PyPI's "bcc" is an unrelated package
# and must never shadow it.
bcc_file="$("$VENV/bin/python" -c 'import bcc; print(bcc.__file__)' 2>/dev/null)" \
    || die "the venv cannot import bcc: is python3-bpfcc installed? (never 'pip install bcc')"
[[ "$bcc_file" == /usr/lib/python3/dist-packages/* ]] \
    || die "bcc comes from $bcc_file, not Debian's python3-bpfcc; run '$VENV/bin/pip uninstall bcc'"
quietly "$VENV/bin/python" -c '
from bcc import BPF
BPF(text="int probe(void *ctx) { return 0; }")
' || die "bcc cannot compile a trivial program: check the header links above"

# -- 4. wgebpf on PATH ---------------------------------------------------------

# wgebpf-go: wg-quick's userspace implementation (WG_QUICK_USERSPACE_IMPLEMENTATION=wgebpf-go)
for cmd in wgebpf wgebpf-go; do
    bin=/usr/local/bin/$cmd
    if [[ "$(readlink "$bin" 2>/dev/null || true)" != "$VENV/bin/$cmd" ]]; then
        [[ ! -e "$bin" || -L "$bin" ]] || die "$bin exists and is not a symlink; remove it and re-run"
        ln -sfn "$VENV/bin/$cmd" "$bin"
        say "linked $bin -> $VENV/bin/$cmd"
    fi
done
bin=/usr/local/bin/wgebpf

say "ready: $(command -v wgebpf || echo "$bin") (venv $VENV, kernel headers $hver)"
