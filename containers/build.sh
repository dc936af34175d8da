#!/usr/bin/env bash
# Build the suite's Singularity/Apptainer image.
#
#   containers/build.sh [gpu|cpu] [OUTPUT.sif] [extra build options...]
#     gpu (default)  Singularity.def (CUDA 12.5, TensorFlow GPU, Horovod with NCCL) -> kits-suite.sif
#     cpu            containers/Singularity.cpu.def (CPU only)                     -> kits-suite-cpu.sif
#
# Uses apptainer if installed, else singularity (BUILDER=apptainer|singularity to choose).
# As root it builds directly; otherwise with --fakeroot (FAKEROOT=0 disables it, e.g. for
# `--remote` builds or sites where the admin set up setuid builds). Runs from the repository root,
# as the definitions' %files paths are relative to it. Needs network access to the registries
# the definitions pull from (Docker Hub, PyPI, Ubuntu/Debian archives).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
variant="${1:-gpu}"
case "$variant" in
gpu) def="Singularity.def" out_default="kits-suite.sif" ;;
cpu) def="containers/Singularity.cpu.def" out_default="kits-suite-cpu.sif" ;;
-h | --help)
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
*)
    echo "build.sh: unknown variant '$variant' (use gpu or cpu)" >&2
    exit 2
    ;;
esac
(($#)) && shift
out="${1:-$out_default}"
(($#)) && shift
[[ "$out" == /* ]] || out="$PWD/$out"

builder="${BUILDER:-}"
if [[ -z "$builder" ]]; then
    builder="$(command -v apptainer || command -v singularity || true)"
fi
if [[ -z "$builder" ]] || ! command -v "$builder" >/dev/null 2>&1; then
    cat >&2 <<MSG
build.sh: neither apptainer nor singularity is installed on this machine.
  - install Apptainer (https://apptainer.org/docs/admin/main/installation.html), or
  - build on a machine that has it and copy the .sif to the cluster (e.g. /storage/... on
    Metacentrum), or
  - run without a container: \`make setup\` creates .venv, and the job templates use it when
    IMAGE is not set.
MSG
    exit 127
fi

opts=()
if [[ "$(id -u)" -ne 0 && "${FAKEROOT:-1}" != 0 ]]; then
    opts+=(--fakeroot)
fi
cd "$ROOT"
echo "build.sh: $builder build ${opts[*]} $* $out $def" >&2
exec "$builder" build "${opts[@]}" "$@" "$out" "$def"
