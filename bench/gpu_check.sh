#!/usr/bin/env bash
# GPU check for the TensorRT backend's CUDA layer (issue 4) and for TensorRT for RTX (issue 11).
# Run from anywhere: bash bench/gpu_check.sh
#
# TensorRT for RTX: installed from $WHEELS when it does not import (tensorrt_rtx_cu13_libs and _bindings
# 1.7.1.116). Its libs wheel (95 MB) may come in pieces (split -b 60M) named
# tensorrt_rtx_cu13_libs-*.whl.part-*; they are joined first. bench/gpu_check_rtx.py then builds and runs both
# bundled models on this GPU where it is one of TensorRT for RTX's targets, and says what it does where not.
#
# Needs a CUDA GPU with cuda-python (cuda.bindings) and CuPy. TensorRT is optional: steps that need it
# print NOT RUN without it. Python packages the daemon needs (pydantic, pyyaml, onnxruntime) are used
# from the environment; missing ones are installed, without network, into a temp folder from
# $WHEELS (a folder of wheels) if it is set. Output also goes to $OUT/gpu_check.txt when OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-}
DEPS=$(mktemp -d /tmp/edge-agent-gpu-deps.XXXXXX)
trap 'rm -rf "$DEPS"' EXIT

missing() {  # print the pip names of the wheel groups whose module does not import
    "$PY" - <<'PYEOF'
import importlib.util
groups = {
    "pydantic": "pydantic pydantic-core annotated-types typing-extensions typing-inspection",
    "yaml": "pyyaml",
    "onnxruntime": "onnxruntime flatbuffers protobuf packaging",
    "prometheus_client": "prometheus-client",
    "pytest": "pytest pluggy iniconfig pygments packaging pytest-timeout",
}
print(" ".join(v for k, v in groups.items() if importlib.util.find_spec(k) is None))
PYEOF
}

need=$(missing)
if [ -n "$need" ]; then
    if [ -n "$WHEELS" ] && [ -d "$WHEELS" ]; then
        echo "installing from $WHEELS into $DEPS: $need"
        # shellcheck disable=SC2086
        "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" --target "$DEPS" $need || exit 1
        export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "missing Python packages: $need (set WHEELS=<folder of wheels> to install them offline)"
    fi
fi

if ! "$PY" -c "import tensorrt_rtx_bindings" 2>/dev/null && [ -n "$WHEELS" ] && [ -d "$WHEELS" ]; then
    for first in "$WHEELS"/tensorrt_rtx_cu13_libs-*.whl.part-aa; do
        [ -e "$first" ] || continue
        whole="$DEPS/$(basename "${first%.part-aa}")"
        cat "${first%-aa}"-* > "$whole" && echo "joined $(basename "$whole") ($(stat -c %s "$whole") bytes)"
    done
    rtx=$(ls "$WHEELS"/tensorrt_rtx_cu13_*.whl "$DEPS"/tensorrt_rtx_cu13_*.whl 2>/dev/null)
    # shellcheck disable=SC2086
    [ -n "$rtx" ] && "$PY" -m pip install --quiet --no-index --no-deps --target "$DEPS" $rtx \
        && export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
out_file=""
[ -n "${OUT:-}" ] && out_file="$OUT/gpu_check.txt"
status=0
timeout 420 "$PY" bench/gpu_check.py ${out_file:+--out "$out_file"} || status=$?
rtx_out=""
[ -n "${OUT:-}" ] && rtx_out="$OUT/gpu_check_rtx.txt"
timeout 300 "$PY" bench/gpu_check_rtx.py ${rtx_out:+--out "$rtx_out"} || status=1

# The CUDA unit tests, on a real device this time (they skip on machines without one).
if "$PY" -c "import pytest" 2>/dev/null; then
    timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_mem.py tests/test_plan_cache.py 2>&1 | tee -a "${out_file:-/dev/null}" \
        || status=1
fi
exit $status
