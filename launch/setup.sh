#!/usr/bin/env bash
# Install what a fresh Debian/Ubuntu machine needs. Safe to run again: installed things are skipped.
#
#   bash launch/setup.sh          Python requirements (pip install -r requirements.txt)
#   bash launch/setup.sh --test   also the system packages the test suite drives for real:
#                                 Slurm + munge (a single-node cluster), Open MPI, jemalloc
#
# Environment: PYTHON (interpreter whose pip is used, default python3).
set -euo pipefail

PYTHON=${PYTHON:-python3}
TEST_PACKAGES=(slurm-wlm munge openmpi-bin libopenmpi-dev libjemalloc2)

log() { echo "[setup] $*" >&2; }
die() { echo "[setup] error: $*" >&2; exit 2; }

with_test=0
for arg in "$@"; do
    case "$arg" in
        --test) with_test=1 ;;
        -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$arg' (valid: --test, --help)" ;;
    esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON='$PYTHON' not found; install Python >= 3.10 or set PYTHON"

install_system_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "system packages present: $*"
        return
    fi
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install ${missing[*]} with your package manager"
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "installing ${missing[*]} needs root (no sudo found)"
        sudo=(sudo)
    fi
    log "apt-get install ${missing[*]}"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# System packages first: mpi4py (in requirements.txt) builds against Open MPI when no wheel fits.
if [[ $with_test -eq 1 ]]; then
    install_system_packages "${TEST_PACKAGES[@]}"
fi

log "pip install -r requirements.txt"
pip_flags=(--quiet --disable-pip-version-check)
[[ $(id -u) -eq 0 ]] && pip_flags+=(--root-user-action=ignore)  # containers and CI run as root
"$PYTHON" -m pip install "${pip_flags[@]}" -r "$root/requirements.txt"
log "done"
