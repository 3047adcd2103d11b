#!/usr/bin/env bash
# Install what a fresh Debian/Ubuntu machine needs. Safe to run again: installed things are skipped.
#
#   bash launch/setup.sh          Python requirements (pip install -r requirements.txt), and
#                                 tcmalloc where apt-get can install it (CPU runs use it; without
#                                 it they fall back to another allocator, with a warning)
#   bash launch/setup.sh --test   also the system packages the test suite drives for real:
#                                 Slurm + munge (a single-node cluster), Open MPI, tcmalloc
#
# Environment: PYTHON (interpreter whose pip is used, default python3).
set -euo pipefail

PYTHON=${PYTHON:-python3}
TEST_PACKAGES=(slurm-wlm munge openmpi-bin libopenmpi-dev libtcmalloc-minimal4)
RUN_PACKAGES=(libtcmalloc-minimal4)  # launch/pretrain.sh preloads it for CPU runs (docs/benchmarks.md)

log() { echo "[setup] $*" >&2; }
die() { echo "[setup] error: $*" >&2; exit 2; }

with_test=0
for arg in "$@"; do
    case "$arg" in
        --test) with_test=1 ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$arg' (valid: --test, --help)" ;;
    esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON='$PYTHON' not found; install Python >= 3.10 or set PYTHON"

install_system_packages() {  # required|optional package...
    local need=$1 missing=() pkg
    shift
    # Optional packages never fail the setup: a warning says what the run loses without them.
    fail() { if [[ $need == required ]]; then die "$*"; else log "warning: $* (CPU runs fall back to a slower allocator)"; fi; }
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "system packages present: $*"
        return
    fi
    command -v apt-get >/dev/null 2>&1 || { fail "apt-get not found; install ${missing[*]} with your package manager"; return 0; }
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        if [[ $need == required ]]; then
            command -v sudo >/dev/null 2>&1 || die "installing ${missing[*]} needs root (no sudo found)"
            sudo=(sudo)
        else
            # Never a password prompt for an optional package.
            sudo -n true 2>/dev/null || { fail "installing ${missing[*]} needs root (no password-less sudo)"; return 0; }
            sudo=(sudo -n)
        fi
    fi
    log "apt-get install ${missing[*]}"
    if ! { "${sudo[@]}" apt-get update -qq &&
           DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
        fail "apt-get install ${missing[*]} failed"
    fi
}

# System packages first: mpi4py (in requirements.txt) builds against Open MPI when no wheel fits.
if [[ $with_test -eq 1 ]]; then
    install_system_packages required "${TEST_PACKAGES[@]}"
else
    install_system_packages optional "${RUN_PACKAGES[@]}"
fi

log "pip install -r requirements.txt"
pip_flags=(--quiet --disable-pip-version-check)
[[ $(id -u) -eq 0 ]] && pip_flags+=(--root-user-action=ignore)  # containers and CI run as root
"$PYTHON" -m pip install "${pip_flags[@]}" -r "$root/requirements.txt"
log "done"
