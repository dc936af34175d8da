#!/usr/bin/env bash
# One-command, idempotent set-up of the suite on a fresh Debian 12 machine:
#   1. apt packages: OpenMPI and compilers for the Horovod build; with KITS_SETUP_TEST=1 (what
#      `make test` sets) also SLURM, munge, strace and shellcheck for the scheduler tests. Without
#      root or password-less sudo (a cluster login node) apt is skipped, and the build tools must
#      already be on PATH (e.g. after the site's `module add`);
#   2. a virtual environment in .venv with the pinned requirements.txt;
#   3. Horovod built from source against that TensorFlow, with MPI and Gloo;
#   4. the suite itself, editable (`pip install -e . --no-deps`): the kits-* commands in .venv/bin.
# A second run finds everything in place (stamp file keyed on the inputs) and takes seconds.
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL=2

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
HOROVOD_VERSION="0.28.1"
BUILD_PACKAGES=(openmpi-bin libopenmpi-dev cmake g++ make procps)
TEST_PACKAGES=(slurm-wlm munge strace shellcheck)
APT_PACKAGES=("${BUILD_PACKAGES[@]}")
[[ "${KITS_SETUP_TEST:-0}" == 1 ]] && APT_PACKAGES+=("${TEST_PACKAGES[@]}")

log() { printf '[setup] %s\n' "$*"; }
# The editable install points at this checkout (a moved or second checkout needs its own).
suite_installed() {
    [[ -x "$VENV/bin/kits-train" ]] && (cd / && "$VENV/bin/python" -c \
        "import sys, train; sys.exit(not train.__file__.startswith(sys.argv[1]))" "$ROOT/") \
        >/dev/null 2>&1
}

# --- 1. apt ---------------------------------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
SUDO=""
[[ $(id -u) -ne 0 ]] && SUDO="sudo"
if ((${#missing[@]})) && [[ -n "$SUDO" ]] && ! sudo -n true 2>/dev/null; then
    log "no root and no password-less sudo: not installing ${missing[*]}"
    for tool in mpicc mpirun cmake g++; do
        command -v "$tool" >/dev/null || {
            echo "[setup] error: $tool is not on PATH; load the site's modules first (e.g." \
                "module add openmpi cmake gcc) or install: ${missing[*]}" >&2
            exit 2
        }
    done
elif ((${#missing[@]})); then
    log "installing apt packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "apt packages present"
fi

# --- 2. venv + pinned requirements ----------------------------------------------------------
STAMP="$VENV/.suite-setup-stamp"
want_stamp="$( (cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml"; echo "horovod==$HOROVOD_VERSION"
    "$PYTHON" --version) | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]] \
    && "$VENV/bin/python" -c "import horovod.tensorflow" >/dev/null 2>&1 \
    && suite_installed; then
    log "virtual environment up to date ($VENV)"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating virtual environment $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade "pip==25.3" "setuptools<81" wheel
log "installing pinned requirements"
"$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt"

# --- 3. Horovod from source -----------------------------------------------------------------
# No wheels exist for 0.28.1; it must be compiled against the installed TensorFlow (rebuild after
# any TensorFlow change, hence the stamp above includes requirements.txt).
if ! "$VENV/bin/python" -c "import horovod.tensorflow" >/dev/null 2>&1; then
    log "building Horovod $HOROVOD_VERSION with MPI and Gloo (2-4 minutes)"
    HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
    HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
        "$VENV/bin/python" -m pip install -q --no-build-isolation --no-cache-dir "horovod==$HOROVOD_VERSION"
fi
"$VENV/bin/horovodrun" --check-build | sed 's/^/[setup] /'

# --- 4. the suite's commands (kits-train, kits-predict, ...) ---------------------------------
log "installing the suite (editable) and its kits-* commands"
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
echo "$want_stamp" > "$STAMP"
log "done"
