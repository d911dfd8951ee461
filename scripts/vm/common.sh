# Shared helpers for the kernel VM test scripts. Sourced, not run.
# shellcheck shell=bash

VM_SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$VM_SCRIPTS/../.." && pwd)
# shellcheck disable=SC2034 # used by the scripts that source this file
VM_CACHE=${WG_NAMESPACE_VM_CACHE:-${HOME:-/root}/.cache/wg-namespace-vm}
# The directory for per-run output (initramfs, console log). Under target/ so `cargo clean`
# removes it and git ignores it.
# shellcheck disable=SC2034
VM_OUT=${WG_NAMESPACE_VM_OUT:-$REPO_ROOT/target/kernel-vm}

vm_log() {
    printf 'wg-namespace-vm: %s\n' "$*" >&2
}

vm_die() {
    printf 'wg-namespace-vm: error: %s\n' "$*" >&2
    exit 1
}

# need_tool COMMAND DEBIAN-PACKAGE: fail with the package to install when COMMAND is missing.
# Looks in the sbin directories too, which a non-login PATH may lack.
need_tool() {
    local cmd=$1 pkg=$2 dir
    if command -v "$cmd" >/dev/null 2>&1; then
        return 0
    fi
    for dir in /usr/local/sbin /usr/sbin /sbin; do
        if [ -x "$dir/$cmd" ]; then
            PATH=$PATH:$dir
            return 0
        fi
    done
    vm_die "'$cmd' not found: install the Debian package '$pkg' (apt-get install --no-install-recommends $pkg)"
}

# need_file PATH DEBIAN-PACKAGE: same for a file that must exist.
need_file() {
    [ -e "$1" ] || vm_die "'$1' not found: install the Debian package '$2' (apt-get install --no-install-recommends $2)"
}

# Seconds since the epoch with milliseconds, for phase timings.
now_ms() {
    date +%s%3N
}
