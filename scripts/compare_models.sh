#!/usr/bin/env bash
# The thesis's comparison (its Tables 5.1 and 5.2) made by the suite: `make compare`.
#
#   1. data: the training recipe of scripts/train_weights.sh, by the same commands into the same
#      folders (so either script reuses what the other made): synthetic CT rendered with domain
#      randomisation around real KiTS19 label maps, HU window $HU_WINDOW, 128x128 slices (2D) and
#      32-slice blocks (Unet3D); with REAL_CT, the real development slices of the split's "train"
#      ids are the 2D models' --data and the synthetic set their --mix-data;
#   2. every model of models.MODEL_NAMES trained by train.train on $RANKS Horovod ranks (mpirun),
#      all on the same data and split with ONE BUDGET of training samples, SAMPLES CT slices per
#      model (reproducible, unlike a wall-clock limit): a 2D sample is a slice, a Unet3D sample a
#      block of 32. The first epoch tells how many samples an epoch holds; the run then trains
#      the whole epochs that reach SAMPLES (the table lists samples, slices and wall time).
#      Widths are reduced as stated in widths() below (MODEL_OPTIONS_<model> overrides them);
#   3. (unet3d) train.select_checkpoint on the whole synthetic validation volumes, as
#      train_weights.sh does;
#   4. train.evaluate on the held-out synthetic test cases -> OUT/MODEL/evaluation/; with
#      REAL_CT, on the real validation slices (the split's "val" ids present in REAL_CT, 2D models
#      only: they are single slices) -> OUT/MODEL/evaluation_real/; with REAL_VOLUMES, every
#      model (Unet3D too) on whole real CT volumes, post-processed -> OUT/MODEL/evaluation_volume/;
#   5. the table: python -m train.compare -> OUT/results.md.
# Stopped at any point, the script continues where it was when started again: a model whose
# run folder holds checkpoints/latest.json trains on with --resume, a finished one is skipped,
# an evaluation newer than the weights it scored is kept.
#
# Environment (defaults in brackets):
#   QUICK [0]             1: the machinery only, in a few minutes on 2 cores: a few small
#                         analytic synthetic cases (no label maps needed), tiny models, a few
#                         steps; REAL_CT defaults to the ten committed real slices
#                         (tests/data/real_ct_slices, all of them validation cases)
#   OUT [compare_runs; QUICK: compare_quick]  run folders OUT/MODEL/ and OUT/results.md
#   MODELS [all seven]    comma-separated subset of models.MODEL_NAMES
#   LABELS [kits19/data]  KiTS19 label maps, as for scripts/train_weights.sh (relative paths
#                         here are taken from the checkout)
#   REAL_CT []            real CT slices (case_XXXXX_sNNN folders), e.g. the real development set
#   REAL_SPLIT [preprocess/real_ct_dev_split.json]  which real case ids train and which validate
#   REAL_VOLUMES []       real CT volumes with kidney masks, never trained on (case_XXXXX folders
#                         in any orientation), e.g. a folder whose case_00000 links to the
#                         real-ct-dev RAS volume (totalsegmentator-example/example_ct)
#   WORK [weights_work; QUICK: OUT/work]  generated CT and datasets
#   SAMPLES [5120]        the budget: CT slices trained on per model (40 epochs of the 2D
#                         models' 128 samples; Unet2D at base_filters 32 does about 7 samples/s
#                         with validation on 2 cores: about 13 minutes a model)
#   EPOCHS [from SAMPLES; QUICK 2]  a fixed number of epochs for every model instead
#   RANKS [2]  BATCH [16; QUICK 4] per rank (2D)  LR [4e-4] per rank (2D)  LR_3D [3e-4] (batch 1)
#   MAX_STEPS [0: whole epochs; QUICK 2]  MAX_STEPS_3D [30; QUICK 2]  steps per epoch at most
#   TIME_LIMIT [0: none]  seconds of training per model and call (continued by the next call)
#   HU_WINDOW [-79 304]  MIX_FRACTION [0.5]  TUMOR_FACTOR [3 with real training slices, else 1]
#   MODEL_OPTIONS_<model>  e.g. MODEL_OPTIONS_pspnet_b=width=0.5 (defaults in widths() below)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 TF_CPP_MIN_LOG_LEVEL=2

QUICK="${QUICK:-0}"
RANKS="${RANKS:-2}"
REAL_SPLIT="${REAL_SPLIT:-preprocess/real_ct_dev_split.json}"
LABELS="${LABELS:-kits19/data}"
read -r HU_MIN HU_MAX <<<"${HU_WINDOW:--79 304}"
MODELS="${MODELS:-$("$PY" -c 'import models; print(",".join(models.MODEL_NAMES))')}"
if [[ "$QUICK" == 1 ]]; then
    OUT="${OUT:-compare_quick}" REAL_CT="${REAL_CT-tests/data/real_ct_slices}"
    EPOCHS="${EPOCHS-2}" BATCH="${BATCH:-4}" MAX_STEPS="${MAX_STEPS:-2}"
    MAX_STEPS_3D="${MAX_STEPS_3D:-2}"
else
    OUT="${OUT:-compare_runs}" REAL_CT="${REAL_CT:-}"
    EPOCHS="${EPOCHS:-}" BATCH="${BATCH:-16}" MAX_STEPS="${MAX_STEPS:-0}"
    MAX_STEPS_3D="${MAX_STEPS_3D:-30}"
fi
WORK="${WORK:-$([[ "$QUICK" == 1 ]] && echo "$OUT/work" || echo weights_work)}"
[[ -z "$REAL_CT" || -d "$REAL_CT" ]] || { echo "error: REAL_CT folder $REAL_CT not found" >&2; exit 2; }
REAL_VOLUMES="${REAL_VOLUMES:-}" VOLUME_CASES=""
if [[ -n "$REAL_VOLUMES" ]]; then
    VOLUME_CASES="$("$PY" -c 'import sys
from preprocess.kits import CaseError, list_cases
try:
    print(",".join(map(str, list_cases(sys.argv[1]))))
except CaseError as exc:
    sys.exit(f"error: REAL_VOLUMES: {exc}")' "$REAL_VOLUMES")" || exit 2
fi
QUICK_TAG=""
[[ "$QUICK" == 1 ]] && QUICK_TAG=" (QUICK)"
MPIRUN=(mpirun -np "$RANKS" --oversubscribe --bind-to none)
say() { printf '\n=== %s %s\n' "$(date +%T)" "$*"; }

# The width each model trains at. Full runs: the shipped weights' widths for the U-Nets (half
# and a quarter of the thesis's), the others cut to roughly the shipped Unet2D's compute per
# sample, so that the budget is not decided by size alone; QUICK: tiny, for the machinery.
widths() {
    if [[ "$QUICK" == 1 ]]; then
        case "$1" in
            unet2d | unet3d) echo base_filters=4 ;;
            denseunet_s | deeplabv3plus) echo width=0.125 ;;
            *) echo width=0.0625 ;;
        esac
    else
        case "$1" in
            unet2d) echo base_filters=32 ;;
            unet3d) echo base_filters=12 ;;
            pspnet_s | denseunet_s | deeplabv3plus) echo width=0.5 ;;
            pspnet_b | denseunet_b) echo width=0.25 ;;
        esac
    fi
}

# The splits (preprocess.splits.recipe_split, shared with train_weights.sh): real ids from
# REAL_SPLIT present in REAL_CT; synthetic cases from the label maps (QUICK: analytic ids 0-3
# train, 4 validation, 5 test).
"$PY" -c 'import models, sys
unknown = set(sys.argv[1].split(",")) - set(models.MODEL_NAMES)
known = ", ".join(models.MODEL_NAMES)
sys.exit(f"error: MODELS: unknown {chr(44).join(sorted(unknown))}; known: {known}" if unknown else 0)' \
    "$MODELS" || exit 2
if [[ "$QUICK" == 1 ]]; then
    SPLITS="$("$PY" -m preprocess.splits --real-split "$REAL_SPLIT" --real-ct "$REAL_CT")" || exit 2
    read -r _ _ _ REAL_TRAIN REAL_VAL <<<"$SPLITS"
    TRAIN=0,1,2,3 VAL=4 TEST=5
else
    [[ -d "$LABELS" ]] || { echo "error: label maps folder $LABELS not found (set LABELS)" >&2; exit 2; }
    SPLITS="$("$PY" -m preprocess.splits --labels "$LABELS" --real-split "$REAL_SPLIT" \
        --real-ct "$REAL_CT")" || exit 2
    read -r TRAIN VAL TEST REAL_TRAIN REAL_VAL <<<"$SPLITS"
fi
[[ "$REAL_TRAIN" == - ]] && REAL_TRAIN=""
[[ "$REAL_VAL" == - ]] && REAL_VAL=""
echo "models: $MODELS"
echo "synthetic cases: train $TRAIN; validation $VAL; test (held out) $TEST"
[[ -n "$REAL_CT" ]] && echo "real slices in $REAL_CT: train ${REAL_TRAIN:-none}; validation $REAL_VAL"

SYNTH="$WORK/kits_synthetic"
SLICES="$WORK/synth128" BLOCKS="$WORK/synth_blocks32" REAL_DATA="$WORK/real128"
say "1/5 data -> $WORK"
if [[ "$QUICK" == 1 ]]; then
    "${MPIRUN[@]}" "$PY" -m preprocess.synthetic --out "$SYNTH" --n-cases 6 --slices 24 \
        --size 128 --seed 0 --quiet
    BLOCK_ARGS=(--image-size 64 --depth 8 --overlap 4)
else
    "${MPIRUN[@]}" "$PY" -m preprocess.synthetic --labels "$LABELS" --cases "$TRAIN,$VAL,$TEST" \
        --out "$SYNTH" --size "${SIZE:-256}" --max-slices "${MAX_SLICES:-40}" \
        --randomize full --seed 0 --quiet
    BLOCK_ARGS=()
fi
SPLIT_ARGS=(--train-cases "$TRAIN" --val-cases "$VAL" --test-cases "$TEST")
if [[ ",$MODELS," == *,unet3d,* ]]; then
    "${MPIRUN[@]}" "$PY" -m preprocess.blocks --kits "$SYNTH" --out "$BLOCKS" "${BLOCK_ARGS[@]}" \
        --hu-window "$HU_MIN" "$HU_MAX" --shards "$RANKS" --keep-empty "${KEEP_EMPTY:-0.3}" \
        "${SPLIT_ARGS[@]}" --quiet
fi
"${MPIRUN[@]}" "$PY" -m preprocess.downsample --kits "$SYNTH" --out "$SLICES" \
    --hu-window "$HU_MIN" "$HU_MAX" --shards "$RANKS" --keep-empty "${KEEP_EMPTY:-0.3}" \
    "${SPLIT_ARGS[@]}" --quiet
DATA_2D="$SLICES" MIX=() TUMOR_2D="${TUMOR_FACTOR:-1}"
if [[ -n "$REAL_TRAIN" ]]; then
    "$PY" -m preprocess.downsample --kits "$REAL_CT" --out "$REAL_DATA" \
        --hu-window "$HU_MIN" "$HU_MAX" --shards "$RANKS" --keep-empty 1 \
        --train-cases "$REAL_TRAIN" --val-cases "$REAL_VAL" --test-cases "" --quiet
    DATA_2D="$REAL_DATA" TUMOR_2D="${TUMOR_FACTOR:-3}"
    MIX=(--mix-data "$SLICES" --mix-fraction "${MIX_FRACTION:-0.5}")
fi

# trained_epochs RUN: the epochs its latest checkpoint holds (0 without one)
trained_epochs() {
    "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["epoch"])' \
        "$1/checkpoints/latest.json" 2>/dev/null || echo 0
}

# budget_epochs RUN: the whole epochs that reach SAMPLES CT slices, from the epoch size its
# config.json records
budget_epochs() {
    "$PY" - "$1/config.json" "${SAMPLES:-5120}" <<'PYEOF'
import json, math, sys
config = json.load(open(sys.argv[1]))
depth = config["dataset"].get("block_depth") or 1  # a Unet3D sample is a block of slices
per_epoch = config["steps_per_epoch"] * config["train"]["batch_size"] * config["n_ranks"] * depth
print(max(1, math.ceil(int(sys.argv[2]) / per_epoch)))
PYEOF
}

# run_train MODEL DATASET RUN EPOCHS NOTE TRAIN_OPTIONS...: one call of train.train, continuing
# the run when it has a checkpoint
run_train() {
    local model="$1" dataset="$2" run="$3" epochs="$4" note="$5"
    shift 5
    local resume=()
    [[ -f "$run/checkpoints/latest.json" ]] && resume=(--resume)
    KITS_RUN_NOTE="$note" "${MPIRUN[@]}" "$PY" -m train.train --model "$model" \
        --data "$dataset" --out "$run" --epochs "$epochs" "$@" --warmup-epochs "${WARMUP:-1}" \
        --threads 1 --checkpoint-every 1 --time-limit "${TIME_LIMIT:-0}" \
        --early-stop-patience 0 --plateau-patience 25 --plateau-factor 0.5 --min-lr 2e-5 \
        --loss dice_ce --intensity-augment nnunet --bn-momentum 0.9 --verbose 0 "${resume[@]}"
}

# train MODEL RUN: train.train until the budget is spent, continuing an earlier call
train() {
    local model="$1" run="$2" options var="MODEL_OPTIONS_$1"
    options="${!var-$(widths "$model")}"
    local dataset="$DATA_2D" mix=("${MIX[@]}")
    local args=(--batch-size "$BATCH" --lr "${LR:-4e-4}" --max-steps "$MAX_STEPS"
        --tumor-factor "$TUMOR_2D" --keep-every 0)
    if [[ "$model" == unet3d ]]; then
        dataset="$BLOCKS" mix=() args=(--batch-size 1 --lr "${LR_3D:-3e-4}" --tumor-factor 1
            --max-steps "$MAX_STEPS_3D" --keep-every 3)
    fi
    args+=("${mix[@]}")
    [[ -n "$options" ]] && args+=(--model-option "$options")
    local note
    note="made by scripts/compare_models.sh${QUICK_TAG}: \
$model with options ${options:-none} on $(basename "$dataset")${mix[*]:+ mixed with \
$(basename "$SLICES")}; synthetic cases train $TRAIN, validation $VAL, test $TEST; real \
validation slices ${REAL_VAL:-none}"
    local epochs="$EPOCHS"
    if [[ -z "$epochs" ]]; then
        [[ -f "$run/config.json" ]] || run_train "$model" "$dataset" "$run" 1 "$note" "${args[@]}"
        epochs="$(budget_epochs "$run")"
    fi
    local done_epochs
    done_epochs="$(trained_epochs "$run")"
    if ((done_epochs >= epochs)); then
        echo "    $model: $done_epochs of $epochs epochs trained already"
        return
    fi
    run_train "$model" "$dataset" "$run" "$epochs" "$note" "${args[@]}"
}

# evaluate RUN OUT_DIR ARGS...: train.evaluate unless OUT_DIR is newer than the weights
evaluate() {
    local run="$1" out="$2"
    shift 2
    if [[ "$out/metrics.json" -nt "$run/checkpoints/best.weights.h5" ]]; then
        echo "    $out is up to date"
        return
    fi
    "$PY" -m train.evaluate --run "$run" --out "$out" --no-progress --overlays 0 "$@"
}

IFS=, read -r -a MODEL_LIST <<<"$MODELS"
for model in "${MODEL_LIST[@]}"; do
    run="$OUT/$model"
    say "2/5 training $model on $RANKS ranks -> $run"
    train "$model" "$run"
    if [[ "$model" == unet3d ]]; then
        say "3/5 $model: best weights chosen on the whole synthetic validation volumes $VAL"
        [[ "$run/selection.json" -nt "$run/checkpoints/latest.json" ]] ||
            "$PY" -m train.select_checkpoint --run "$run" --kits "$SYNTH" --cases "$VAL" \
                --postprocess
    fi
    data="$SLICES" real="$REAL_CT"
    [[ "$model" == unet3d ]] && data="$BLOCKS" real=""  # the real slices are single slices
    say "4/5 evaluating $model: held-out synthetic cases $TEST${real:+, real slices $REAL_VAL}\
${REAL_VOLUMES:+, real volumes $VOLUME_CASES}"
    evaluate "$run" "$run/evaluation" --kits "$SYNTH" --cases "$TEST" --data "$data" --postprocess
    if [[ -n "$real" ]]; then
        evaluate "$run" "$run/evaluation_real" --kits "$real" --cases "$REAL_VAL" --volumes-only
    fi
    if [[ -n "$REAL_VOLUMES" ]]; then
        evaluate "$run" "$run/evaluation_volume" --kits "$REAL_VOLUMES" --cases "$VOLUME_CASES" \
            --volumes-only --postprocess
    fi
done

say "5/5 the table -> $OUT/results.md"
"$PY" -m train.compare --runs "$OUT" --models "$MODELS" --output "$OUT/results.md"
cat "$OUT/results.md"
