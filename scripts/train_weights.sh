#!/usr/bin/env bash
# How model_weights/ is made, and how to continue it: `make weights MODEL=unet2d` (or unet3d).
#
#   1. synthetic KiTS19-format CT rendered around real KiTS19 label maps (preprocess.synthetic
#      --labels), training cases only for training, other cases held out for validation and test;
#   2. preprocessing by the suite (2D slices for unet2d, 3D blocks for unet3d), 128x128;
#   3. train.train on $RANKS Horovod ranks (mpirun), the same path as the cluster jobs, for at
#      most $TIME_LIMIT seconds per call; a second call continues with --resume;
#   4. (unet3d) train.select_checkpoint: the kept epochs, best and latest scored on whole
#      validation volumes, the highest installed as best.weights.h5;
#   5. train.evaluate on the held-out test cases -> model_weights/MODEL/evaluation/.
#
# Environment (defaults in brackets):
#   MODEL [unet2d]        unet2d or unet3d
#   LABELS [/work/shared/data/kits19-labels]  folder of KiTS19 label maps
#   WORK [weights_work/]  generated CT and datasets (large; not committed)
#   N_TRAIN [40]          training cases: the first N present in the thesis's training ranges
#                         (0-119, 140-199); validation: the first 6 present in 120-139; test:
#                         the next 6 present there
#   RUN [model_weights/MODEL]  the run folder (an existing one is continued with --resume;
#                         a continuation may change training options, and config.json
#                         keeps each earlier session's in earlier_sessions)
#   RANKS [2]  TIME_LIMIT [2400]  EPOCHS [100]  WARMUP [1] epochs
#   BATCH [unet2d 16, unet3d 1] per rank   LR [unet2d 4e-4, unet3d 3e-4] per rank
#   MAX_STEPS [unet2d 100, unet3d 60]  steps per epoch: short epochs, so that a run of a
#                         CPU-hour still gets many validations, best checkpoints and
#                         learning-rate reductions (each epoch draws a fresh shuffle)
#   MODEL_OPTIONS [unet2d base_filters=16, unet3d base_filters=12]  a quarter of the thesis's
#                         widths (64, 48), ~1/16 of the compute: what one CPU-hour can train
#   KEEP_EMPTY [0.3]      fraction of the slices/blocks without kidney kept (whole-volume
#                         inference meets them; a model that never saw one marks kidney there)
#   LOSS [dice_ce]        weighted Dice + cross-entropy: with the weighted Dice alone, short
#                         runs learned kidney or tumor, rarely both
#   TUMOR_FACTOR [1]      tumor samples per epoch (above 1, the 2D run lost the kidney)
#   BN_MOMENTUM [0.9]     BatchNormalization statistics that follow a run of a few thousand steps
#   KEEP_EVERY [3]        keep every k-th epoch's weights (checkpoints/epochs/) for step 4
#   SELECT [unet3d 1, unet2d 0]  choose the best weights on whole validation volumes (the
#                         per-batch validation JC_w favours 3D models that mark no tumor;
#                         2D batches nearly always hold tumor)
#   EXTRA_TRAIN_ARGS      more train.train options
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 TF_CPP_MIN_LOG_LEVEL=2

MODEL="${MODEL:-unet2d}"
LABELS="${LABELS:-/work/shared/data/kits19-labels}"
WORK="${WORK:-$ROOT/weights_work}"
N_TRAIN="${N_TRAIN:-40}"
RANKS="${RANKS:-2}"
TIME_LIMIT="${TIME_LIMIT:-2400}"
EPOCHS="${EPOCHS:-100}"
RUN="${RUN:-$ROOT/model_weights/$MODEL}"
case "$MODEL" in
    unet2d) KIND=downsample DATA="$WORK/slices128" BATCH="${BATCH:-16}" LR="${LR:-4e-4}"
        MAX_STEPS="${MAX_STEPS:-100}" MODEL_OPTIONS="${MODEL_OPTIONS-base_filters=16}"
        SELECT="${SELECT:-0}" ;;
    unet3d) KIND=blocks DATA="$WORK/blocks32" BATCH="${BATCH:-1}" LR="${LR:-3e-4}"
        MAX_STEPS="${MAX_STEPS:-60}" MODEL_OPTIONS="${MODEL_OPTIONS-base_filters=12}"
        SELECT="${SELECT:-1}" ;;
    *) echo "error: MODEL must be unet2d or unet3d, not '$MODEL'" >&2; exit 2 ;;
esac
[[ -d "$LABELS" ]] || { echo "error: label maps folder $LABELS not found (set LABELS)" >&2; exit 2; }
MPIRUN=(mpirun -np "$RANKS" --oversubscribe --bind-to none)
say() { printf '\n=== %s\n' "$*"; }

# The split, from the case ids the folder holds (KiTS19 ids 0-209; some are kept elsewhere).
read -r TRAIN VAL TEST < <("$PY" - "$LABELS" "$N_TRAIN" <<'PYEOF'
import sys
from pathlib import Path
from preprocess.synthetic import find_label_files
ids = sorted(find_label_files(Path(sys.argv[1])))
n_train = int(sys.argv[2])
train = [c for c in ids if c <= 119 or 140 <= c <= 199][:n_train]
held_out = [c for c in ids if 120 <= c <= 139]
val, test = held_out[:6], held_out[6:12]
if len(train) < n_train or len(val) < 6 or len(test) < 6:
    sys.exit(f"error: {sys.argv[1]} holds too few cases for {n_train}/6/6")
print(*(",".join(map(str, part)) for part in (train, val, test)))
PYEOF
)
echo "cases: train $TRAIN; validation $VAL; test (held out) $TEST"

say "1/5 synthetic CT around the label maps -> $WORK/kits"
"${MPIRUN[@]}" "$PY" -m preprocess.synthetic --labels "$LABELS" --cases "$TRAIN,$VAL,$TEST" \
    --out "$WORK/kits" --seed 0

say "2/5 preprocessing ($KIND, 128x128, $RANKS shards) -> $DATA"
"${MPIRUN[@]}" "$PY" -m preprocess."$KIND" --kits "$WORK/kits" --out "$DATA" --shards "$RANKS" \
    --cases "$TRAIN,$VAL,$TEST" --train-cases "$TRAIN" --val-cases "$VAL" --test-cases "$TEST" \
    --keep-empty "${KEEP_EMPTY:-0.3}"
"$PY" -m preprocess.verify "$DATA"

say "3/5 training $MODEL on $RANKS ranks for at most ${TIME_LIMIT}s -> $RUN"
RESUME=()
[[ -f "$RUN/checkpoints/latest.json" ]] && RESUME=(--resume)
OPTIONS=()
[[ -n "$MODEL_OPTIONS" ]] && OPTIONS=(--model-option "$MODEL_OPTIONS")
export KITS_RUN_NOTE="trained on synthetic CT rendered by preprocess.synthetic around real KiTS19 \
label maps (cases $TRAIN), not on real CT; model options ${MODEL_OPTIONS:-none} (the thesis: \
base_filters 64 for unet2d, 48 for unet3d); slices/blocks without kidney kept: fraction \
${KEEP_EMPTY:-0.3}; validation cases $VAL, held-out test cases $TEST; \
made by scripts/train_weights.sh"
# shellcheck disable=SC2086  # EXTRA_TRAIN_ARGS is a list of options
"${MPIRUN[@]}" "$PY" -m train.train --model "$MODEL" --data "$DATA" --out "$RUN" \
    --epochs "$EPOCHS" --batch-size "$BATCH" --lr "$LR" --warmup-epochs "${WARMUP:-1}" \
    --max-steps "$MAX_STEPS" --threads 1 --checkpoint-every 1 --time-limit "$TIME_LIMIT" \
    --keep-every "${KEEP_EVERY:-3}" \
    --loss "${LOSS:-dice_ce}" --tumor-factor "${TUMOR_FACTOR:-1}" \
    --bn-momentum "${BN_MOMENTUM:-0.9}" "${OPTIONS[@]}" "${RESUME[@]}" ${EXTRA_TRAIN_ARGS:-}

if [[ "$SELECT" == 1 ]]; then
    say "4/5 best weights chosen on the whole validation volumes $VAL"
    "$PY" -m train.select_checkpoint --run "$RUN" --kits "$WORK/kits" --cases "$VAL" --postprocess
fi

say "5/5 evaluation on the held-out cases $TEST -> $RUN/evaluation"
"$PY" -m train.evaluate --run "$RUN" --kits "$WORK/kits" --cases "$TEST" --data "$DATA" \
    --out "$RUN/evaluation" --postprocess --no-progress
cat "$RUN/evaluation/results.md"
