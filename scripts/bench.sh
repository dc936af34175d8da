#!/usr/bin/env bash
# `make bench`: every benchmark at full size, in order, then a table of targets against results.
#   1. bench.preprocess  loading and preprocessing of real-geometry cases, 1 vs 2 ranks
#   2. bench.train       training samples/s and scaling (unet2d, unet3d), input pipeline, epochs
#   3. bench.predict     seconds per volume and the network's share (unet2d, unet3d)
# Results: bench/results/<name>.json (one file each). Long: roughly an hour on two
# cores, mostly full-size Unet3D training steps. Run it on a quiet machine; the JSON records the
# load average so a busy run can be recognised.
#
# Environment:
#   BENCH_CACHE=DIR    generated input data kept here and reused (default: a temporary folder)
#   BENCH_ONLY="preprocess train"   run only these benchmarks (the table shows all results)
#   BENCH_ARGS_PREPROCESS, BENCH_ARGS_TRAIN, BENCH_ARGS_PREDICT   extra options, e.g.
#       BENCH_ARGS_TRAIN="--models unet2d --compare-bind" make bench
#   BENCH_QUICK=1      the small versions (smoke check, minutes; numbers not meaningful)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="$ROOT/.venv/bin/python"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 TF_CPP_MIN_LOG_LEVEL=2

ONLY="${BENCH_ONLY:-preprocess train predict}"
COMMON=()
[[ -n "${BENCH_CACHE:-}" ]] && COMMON+=(--cache "$BENCH_CACHE")
[[ "${BENCH_QUICK:-0}" == 1 ]] && COMMON+=(--quick)

failed=()
for name in $ONLY; do
    var="BENCH_ARGS_${name^^}"
    # shellcheck disable=SC2206  # word splitting of the extra options is intended
    extra=(${!var:-})
    printf '\n=== bench.%s %s\n' "$name" "${COMMON[*]} ${extra[*]}"
    start=$SECONDS
    if ! "$PY" -m "bench.$name" "${COMMON[@]}" "${extra[@]}"; then
        failed+=("$name")
    fi
    printf '=== bench.%s: %d s\n' "$name" $((SECONDS - start))
done

printf '\n=== summary (bench/results/*.json; Markdown for the README: python -m bench.report)\n\n'
"$PY" -m bench.report --format text || failed+=(report)

if ((${#failed[@]})); then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
