# Sourced by the scripts that need root (setup.sh, test.sh, demo.sh):
#   . "$REPO/scripts/root.sh"; as_root "$@"
# As root: nothing happens. Otherwise the script runs again through sudo
# where there is one, or stops with one line saying what to do (a fresh
# Debian machine used as root has no sudo).
as_root() {
    [[ $EUID -eq 0 ]] && return 0
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -- "$0" "$@"
    fi
    printf '%s: needs root: run it as root (there is no sudo here)\n' "$(basename "$0")" >&2
    exit 1
}
