#!/usr/bin/env bash
# How model_weights/ is made, and how to continue it: `make weights MODEL=unet2d` (or unet3d).
#
#   1. synthetic KiTS19-format CT rendered around real KiTS19 label maps with domain
#      randomisation (preprocess.synthetic --randomize full: contrast phase, tissue HU, tumor
#      look, noise, blur, kernel, habitus drawn per case). The label maps of the real validation
#      patients (preprocess/real_ct_dev_split.json, "val") are never rendered for training: a few
#      of them are the synthetic validation and test cases;
#   2. preprocessing by the suite (HU window $HU_WINDOW, 128x128): the synthetic CT and, with
#      REAL_CT, the real development slices (the split's "train" ids -> train, "val" -> val);
#   3. train.train on $RANKS Horovod ranks (mpirun), the same path as the cluster jobs, for at
#      most $TIME_LIMIT seconds per call; a second call continues with --resume. With REAL_CT
#      (2D only): --data is the real set, so validation and the best checkpoint are measured on
#      the real validation third, and --mix-data draws MIX_FRACTION of every epoch from the
#      synthetic set; without it, the synthetic set alone;
#   4. (unet3d) train.select_checkpoint: the kept epochs, best and latest scored on whole
#      synthetic validation volumes, the highest installed as best.weights.h5;
#   5. train.evaluate on the held-out synthetic test cases -> RUN/evaluation/, and with REAL_CT
#      on the real validation slices -> RUN/evaluation_real/.
#
# Environment (defaults in brackets):
#   MODEL [unet2d]        unet2d or unet3d
#   LABELS [kits19/data]  KiTS19 label maps: the data/ folder of a clone of
#                         github.com/neheller/kits19 (case_XXXXX/segmentation.nii.gz), or flat
#                         case_XXXXX_segmentation.nii.gz files. Cases 200-209 (the thesis's test
#                         split) are never used
#   REAL_CT []            folder of real CT cases with masks to train and validate on, e.g. the
#                         real development slices (case_XXXXX_sNNN folders); empty: synthetic only
#   REAL_SPLIT [preprocess/real_ct_dev_split.json]  which real case ids train and which validate
#   WORK [weights_work]   generated CT and datasets (large; not committed)
#   RUN [model_weights/MODEL]  the run folder (an existing one is continued with --resume;
#                         a continuation may change training options, and config.json keeps
#                         each earlier session's in earlier_sessions)
#   RANKS [2]  TIME_LIMIT [4200]  EPOCHS [unet2d 2000, unet3d 100]  WARMUP [3] epochs
#   BATCH [unet2d 16, unet3d 1] per rank   LR [unet2d 4e-4, unet3d 3e-4] per rank
#   MODEL_OPTIONS [unet2d base_filters=32, unet3d base_filters=12]  half and a quarter of the
#                         thesis's widths (64, 48): what one or two CPU-hours can train
#   HU_WINDOW [-79 304]   nnU-Net's foreground window for KiTS19 (the thesis: -512 512)
#   TARGET_SPACING []     mm per pixel of the model's 128x128 slices
#                         (preprocess --target-spacing: resample, then centre crop or pad);
#                         empty: each whole slice squeezed to 128x128 (the thesis's)
#   MIX_FRACTION [0.5]    with REAL_CT: share of every epoch drawn from the synthetic set
#   TUMOR_FACTOR [unet2d with REAL_CT 3, else 1]  tumor samples counted this many times per epoch
#   INTENSITY [nnunet]    per-sample intensity augmentation (train.train --intensity-augment)
#   SIZE [256]  MAX_SLICES [40]  in-plane size and slices (centred on the kidneys) of the
#                         rendered CT: the models see 128x128 slices
#   KEEP_EMPTY [0.3]      fraction of the synthetic slices/blocks without kidney kept (the real
#                         slices keep all of theirs)
#   LOSS [dice_ce]  BN_MOMENTUM [0.9]  KEEP_EVERY [unet3d 3, unet2d 0]
#   SELECT [unet3d 1, unet2d 0]  choose the best weights on whole validation volumes
#   EXTRA_TRAIN_ARGS      more train.train options
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 TF_CPP_MIN_LOG_LEVEL=2

MODEL="${MODEL:-unet2d}"
LABELS="${LABELS:-kits19/data}"
REAL_CT="${REAL_CT:-}"
REAL_SPLIT="${REAL_SPLIT:-preprocess/real_ct_dev_split.json}"
WORK="${WORK:-weights_work}"  # relative paths: the run records no path of this machine
RANKS="${RANKS:-2}"
TIME_LIMIT="${TIME_LIMIT:-4200}"
RUN="${RUN:-model_weights/$MODEL}"
read -r HU_MIN HU_MAX <<<"${HU_WINDOW:--79 304}"
case "$MODEL" in
    unet2d) KIND=downsample SYNTH="$WORK/synth128" BATCH="${BATCH:-16}" LR="${LR:-4e-4}"
        EPOCHS="${EPOCHS:-2000}" MODEL_OPTIONS="${MODEL_OPTIONS-base_filters=32}"
        SELECT="${SELECT:-0}" KEEP_EVERY="${KEEP_EVERY:-0}" ;;
    unet3d) KIND=blocks SYNTH="$WORK/synth_blocks32" BATCH="${BATCH:-1}" LR="${LR:-3e-4}"
        EPOCHS="${EPOCHS:-100}" MODEL_OPTIONS="${MODEL_OPTIONS-base_filters=12}"
        SELECT="${SELECT:-1}" KEEP_EVERY="${KEEP_EVERY:-3}"
        [[ -z "$REAL_CT" ]] || { echo "error: REAL_CT holds 2D slices; unet3d trains on synthetic blocks only" >&2; exit 2; } ;;
    *) echo "error: MODEL must be unet2d or unet3d, not '$MODEL'" >&2; exit 2 ;;
esac
[[ -d "$LABELS" ]] || { echo "error: label maps folder $LABELS not found (set LABELS)" >&2; exit 2; }
[[ -z "$REAL_CT" || -d "$REAL_CT" ]] || { echo "error: REAL_CT folder $REAL_CT not found" >&2; exit 2; }
TARGET_SPACING="${TARGET_SPACING:-}"
# a dataset folder per slice geometry: synth128 (whole slices), synth128_sp25 (2.5 mm), ...
SPACING=() SUFFIX=""
if [[ -n "$TARGET_SPACING" ]]; then
    SPACING=(--target-spacing "$TARGET_SPACING") SUFFIX="_sp${TARGET_SPACING//./}"
fi
SYNTH="$SYNTH$SUFFIX"
MPIRUN=(mpirun -np "$RANKS" --oversubscribe --bind-to none)
say() { printf '\n=== %s\n' "$*"; }

# The splits (preprocess.splits.recipe_split, shared with compare_models.sh): synthetic
# training from every label map but the real validation patients' and the thesis's test cases;
# synthetic validation and test from real validation patients.
SPLITS="$("$PY" -m preprocess.splits --labels "$LABELS" --real-split "$REAL_SPLIT" \
    --real-ct "$REAL_CT")" || exit 2
read -r TRAIN VAL TEST REAL_TRAIN REAL_VAL <<<"$SPLITS"
[[ "$REAL_TRAIN" == - ]] && REAL_TRAIN=""
echo "synthetic cases: train $TRAIN; validation $VAL; test (held out) $TEST"

say "1/5 synthetic CT (domain-randomised) around the label maps -> $WORK/kits_synthetic"
"${MPIRUN[@]}" "$PY" -m preprocess.synthetic --labels "$LABELS" --cases "$TRAIN,$VAL,$TEST" \
    --out "$WORK/kits_synthetic" --size "${SIZE:-256}" --max-slices "${MAX_SLICES:-40}" \
    --randomize full --seed 0 --quiet

say "2/5 preprocessing ($KIND, 128x128${TARGET_SPACING:+ at $TARGET_SPACING mm}, HU $HU_MIN..$HU_MAX, $RANKS shards)"
"${MPIRUN[@]}" "$PY" -m preprocess."$KIND" --kits "$WORK/kits_synthetic" --out "$SYNTH" \
    --hu-window "$HU_MIN" "$HU_MAX" --shards "$RANKS" --keep-empty "${KEEP_EMPTY:-0.3}" \
    --train-cases "$TRAIN" --val-cases "$VAL" --test-cases "$TEST" "${SPACING[@]}" --quiet
DATA="$SYNTH" MIX=() DEFAULT_TUMOR_FACTOR=1
if [[ -n "$REAL_CT" ]]; then
    DATA="$WORK/real128$SUFFIX"
    "$PY" -m preprocess.downsample --kits "$REAL_CT" --out "$DATA" --hu-window "$HU_MIN" "$HU_MAX" \
        --shards "$RANKS" --keep-empty 1 --train-cases "$REAL_TRAIN" --val-cases "$REAL_VAL" \
        --test-cases "" "${SPACING[@]}" --quiet
    MIX=(--mix-data "$SYNTH" --mix-fraction "${MIX_FRACTION:-0.5}")
    DEFAULT_TUMOR_FACTOR=3
fi
"$PY" -m preprocess.verify "$DATA"

say "3/5 training $MODEL on $RANKS ranks for at most ${TIME_LIMIT}s -> $RUN"
RESUME=()
[[ -f "$RUN/checkpoints/latest.json" ]] && RESUME=(--resume)
OPTIONS=()
[[ -n "$MODEL_OPTIONS" ]] && OPTIONS=(--model-option "$MODEL_OPTIONS")
export KITS_RUN_NOTE="synthetic CT rendered with domain randomisation around real KiTS19 label \
maps (cases $TRAIN)${REAL_CT:+, mixed ${MIX_FRACTION:-0.5} into every epoch of the real \
development slices $REAL_TRAIN (validation and best checkpoint on the real slices $REAL_VAL)}; \
HU window $HU_MIN..$HU_MAX; ${TARGET_SPACING:+slices resampled to $TARGET_SPACING mm per pixel; }model options ${MODEL_OPTIONS:-none} (the thesis: base_filters 64 for \
unet2d, 48 for unet3d); synthetic validation cases $VAL, held-out test cases $TEST; made by \
scripts/train_weights.sh"
# shellcheck disable=SC2086  # EXTRA_TRAIN_ARGS is a list of options
"${MPIRUN[@]}" "$PY" -m train.train --model "$MODEL" --data "$DATA" "${MIX[@]}" --out "$RUN" \
    --epochs "$EPOCHS" --batch-size "$BATCH" --lr "$LR" --warmup-epochs "${WARMUP:-3}" \
    --threads 1 --checkpoint-every 1 --time-limit "$TIME_LIMIT" --keep-every "$KEEP_EVERY" \
    --plateau-patience 25 --plateau-factor 0.5 --min-lr 2e-5 --early-stop-patience 0 \
    --loss "${LOSS:-dice_ce}" --tumor-factor "${TUMOR_FACTOR:-$DEFAULT_TUMOR_FACTOR}" \
    --intensity-augment "${INTENSITY:-nnunet}" --bn-momentum "${BN_MOMENTUM:-0.9}" \
    "${OPTIONS[@]}" "${RESUME[@]}" ${EXTRA_TRAIN_ARGS:-}

if [[ "$SELECT" == 1 ]]; then
    say "4/5 best weights chosen on the whole validation volumes $VAL"
    "$PY" -m train.select_checkpoint --run "$RUN" --kits "$WORK/kits_synthetic" --cases "$VAL" \
        --postprocess
fi

say "5/5 evaluation on the held-out synthetic cases $TEST -> $RUN/evaluation"
"$PY" -m train.evaluate --run "$RUN" --kits "$WORK/kits_synthetic" --cases "$TEST" \
    --data "$SYNTH" --out "$RUN/evaluation" --postprocess --no-progress
cat "$RUN/evaluation/results.md"
if [[ -n "$REAL_CT" ]]; then
    "$PY" -m train.evaluate --run "$RUN" --kits "$REAL_CT" --cases "$REAL_VAL" --volumes-only \
        --out "$RUN/evaluation_real" --no-progress
    cat "$RUN/evaluation_real/results.md"
fi
