#!/usr/bin/env bash
# `make demo`: the main job end to end on the built-in synthetic data, on this machine's cores.
#   1. synthetic KiTS19-format CT (analytic anatomy, built in: no download)
#   2. preprocessing to a sharded 2D slice set (2 MPI ranks)
#   3. Unet2D training with Horovod on 2 ranks, until validation JC_w clearly beats the
#      all-background baseline (or the time budget ends)
#   4. evaluation (JC_w on the test split, KiTS19 Dice per case) and prediction with overlays
#   5. the shipped model_weights/ (Unet2D and Unet3D): evaluation and prediction on synthetic CT
#      around committed real label maps they never trained on, and on ten committed REAL CT
#      slices (tests/data/real_ct_slices, KiTS23, never trained on): real CT is the yardstick
# Everything lands in one report folder, named on the last line. Override any variable below
# from the environment, e.g. `DEMO_EPOCHS=30 make demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 TF_CPP_MIN_LOG_LEVEL=2

OUT="${DEMO_OUT:-$ROOT/demo_output}"
RANKS="${DEMO_RANKS:-2}"
N_CASES="${DEMO_CASES:-32}"          # analytic synthetic cases (ids 0..N-1)
SLICES="${DEMO_SLICES:-48}"          # slices per case
SIZE="${DEMO_SIZE:-256}"             # in-plane size of the synthetic CT
IMAGE_SIZE="${DEMO_IMAGE_SIZE:-64}"  # model input side (thesis: 128; the demo's CPU budget: 64)
BASE_FILTERS="${DEMO_BASE_FILTERS:-16}"  # thesis Unet2D: 64; the demo's CPU budget: 16
EPOCHS="${DEMO_EPOCHS:-40}"
BATCH="${DEMO_BATCH:-8}"
TIME_LIMIT="${DEMO_TIME_LIMIT:-600}" # seconds of training at most
TARGET="${DEMO_TARGET:-0.35}"        # stop once validation JC_w reaches this
MPIRUN=(mpirun -np "$RANKS" --oversubscribe --bind-to none)

say() { printf '\n=== %s\n' "$*"; }
mkdir -p "$OUT"
REPORT="$OUT/report"

say "1/5 synthetic KiTS19-format data: $N_CASES cases x $SLICES slices, ${SIZE}x${SIZE} -> $OUT/kits"
"${MPIRUN[@]}" "$PY" -m preprocess.synthetic --out "$OUT/kits" --n-cases "$N_CASES" \
    --slices "$SLICES" --size "$SIZE" --seed 0 --quiet

say "2/5 preprocessing to ${IMAGE_SIZE}x${IMAGE_SIZE} slices, $RANKS shards per split -> $OUT/slices"
"${MPIRUN[@]}" "$PY" -m preprocess.downsample --kits "$OUT/kits" --out "$OUT/slices" \
    --image-size "$IMAGE_SIZE" --shards "$RANKS"
"$PY" -m preprocess.verify "$OUT/slices"

say "3/5 training Unet2D (base_filters=$BASE_FILTERS, thesis: 64) on $RANKS Horovod ranks"
echo "    used: image ${IMAGE_SIZE}x${IMAGE_SIZE}, batch $BATCH per rank, up to $EPOCHS epochs or ${TIME_LIMIT}s, stop at val JC_w >= $TARGET"
RESUME=()
[[ -f "$OUT/run/checkpoints/latest.json" ]] && RESUME=(--resume)
"${MPIRUN[@]}" "$PY" -m train.train --model unet2d --data "$OUT/slices" --out "$OUT/run" \
    --model-option "base_filters=$BASE_FILTERS" --batch-size "$BATCH" --epochs "$EPOCHS" \
    --lr 5e-4 --warmup-epochs 1 --early-stop-patience 0 --checkpoint-every 1 --threads 1 \
    --stop-at "$TARGET" --time-limit "$TIME_LIMIT" "${RESUME[@]}"

say "4/5 evaluation and prediction -> $REPORT"
"$PY" -m train.evaluate --run "$OUT/run" --kits "$OUT/kits" --out "$REPORT" --postprocess --no-progress
"$PY" - "$OUT/run" "$REPORT" <<'PYEOF'
import json, sys
from pathlib import Path
run, report = Path(sys.argv[1]), Path(sys.argv[2])
best = json.loads((run / "checkpoints" / "best.json").read_text())
cfg = json.loads((run / "config.json").read_text())
# dataset.dir is relative to the run folder (an absolute one joins to itself)
man = json.loads((run / cfg["dataset"]["dir"] / "manifest.json").read_text())
counts = man["splits"]["val"]["class_voxel_counts"]
w = cfg["class_weights"]
# all-background prediction: JC_bg = background share, JC_kidney = JC_tumor = 0
baseline = w[0] * counts[0] / sum(counts) / sum(w)
print(f"validation JC_w: best {best['value']:.4f} (epoch {best['epoch']}) vs all-background "
      f"baseline {baseline:.4f}")
if best["value"] < max(10 * baseline, baseline + 0.05):
    sys.exit("error: the demo model did not rise clearly above the all-background baseline")
(report / "baseline.json").write_text(json.dumps({"best_val_jc_w": best["value"],
                                                  "all_background_val_jc_w": baseline}))
PYEOF
TEST_CASE="$("$PY" -c "import json;print(json.load(open('$OUT/slices/manifest.json'))['splits']['test']['cases'][0])")"
CASE_DIR="$OUT/kits/$(printf 'case_%05d' "$TEST_CASE")"
"$PY" -m train.predict --run "$OUT/run" --input "$CASE_DIR" --output "$REPORT/predictions" \
    --overlay-slices auto --postprocess --no-progress

say "5/5 shipped model_weights/ (Unet2D, Unet3D) on held-out label maps and real CT -> $REPORT/shipped_*"
# Synthetic CT around the committed KiTS19 label maps that the shipped weights never trained on
# (neither as CT rendered around them nor as real slices of those patients).
SHIPPED=()
for model in unet2d unet3d; do
    [[ -f "$ROOT/model_weights/$model/config.json" ]] && SHIPPED+=("$model")
done
if ((${#SHIPPED[@]} == 0)); then
    echo "    no model_weights/*/config.json: skipped"
else
    LABEL_MAPS="$ROOT/tests/data/kits19_labels_small"
    REAL_SLICES="$ROOT/tests/data/real_ct_slices"
    REAL_IDS="$("$PY" -c "import sys; from preprocess.kits import list_cases
print(','.join(map(str, list_cases(sys.argv[1]))))" "$REAL_SLICES")"
    HELD_OUT="$("$PY" - "$LABEL_MAPS" "${SHIPPED[@]/#/$ROOT/model_weights/}" <<'PYEOF'
import json, sys
from pathlib import Path
from preprocess.synthetic import find_label_files
seen = set()
for run in sys.argv[2:]:
    config = json.loads((Path(run) / "config.json").read_text())
    for dataset in ("dataset", "mix_dataset"):
        seen |= set(config.get(dataset, {}).get("splits", {}).get("train", []))
held_out = [c for c in sorted(find_label_files(sys.argv[1])) if c not in seen]
if not held_out:
    sys.exit(f"error: every label map in {sys.argv[1]} was used to train the shipped weights")
print(",".join(map(str, held_out)))
PYEOF
)"
    echo "    cases $HELD_OUT from $LABEL_MAPS (not in the shipped weights' training)"
    "$PY" -m preprocess.synthetic --labels "$LABEL_MAPS" --cases "$HELD_OUT" \
        --out "$OUT/kits_labels" --seed 1 --quiet
    FIRST="$(printf 'case_%05d' "${HELD_OUT%%,*}")"
    for model in "${SHIPPED[@]}"; do
        "$PY" -m train.evaluate --run "$ROOT/model_weights/$model" --kits "$OUT/kits_labels" \
            --cases "$HELD_OUT" --volumes-only --postprocess --no-progress \
            --out "$REPORT/shipped_$model"
        "$PY" -m train.predict --run "$ROOT/model_weights/$model" --input "$OUT/kits_labels/$FIRST" \
            --output "$REPORT/shipped_$model/predictions" --overlay-slices auto --postprocess \
            --no-progress
        "$PY" -m train.evaluate --run "$ROOT/model_weights/$model" --kits "$REAL_SLICES" \
            --cases "$REAL_IDS" --volumes-only --no-progress --out "$REPORT/shipped_${model}_real_ct"
    done
fi

say "report"
cat "$REPORT/results.md"
for model in "${SHIPPED[@]}"; do
    echo
    echo "Shipped $model on held-out synthetic cases:"
    cat "$REPORT/shipped_$model/results.md"
    echo
    echo "Shipped $model on ten real CT slices (tests/data/real_ct_slices, KiTS23):"
    cat "$REPORT/shipped_${model}_real_ct/results.md"
done
echo
echo "Demo report folder: $REPORT"
