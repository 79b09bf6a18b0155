#!/usr/bin/env bash
# How the receive path scales from 2 to 16 cores (issue 9), on a machine with 16 cores and nothing installed but
# Python 3.12 with numpy, OpenCV, ONNX Runtime, PyYAML and prometheus-client: bench/scale_kit.sh made the rest
# (.scale.tar.xz, carried beside this checkout).
#
#     bash bench/scale_check.sh
#
# OUT=<folder> keeps the output and the tables there; SCALE_CPUS ("0-1 0-3 0-7 0-15"), SCALE_REPS (1) and
# SCALE_SECONDS (560, the two runs' budget) change the run.
#
# Before the run it says whether the machine honours CPU affinity (the bench pins each receiver to 2, 4, 8 and 16
# CPUs with sched_setaffinity; where that is not honoured, every row runs on every core and the table says
# nothing about scaling) and whether a private network namespace can be made (else loopback is shared).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/edge-agent-scale.XXXXXX)}
REPS=${SCALE_REPS:-1}
read -r -a CPUS <<<"${SCALE_CPUS:-0-1 0-3 0-7 0-15}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/scale_check.txt") 2>&1

if [ ! -d .scale ]; then
    [ -f .scale.tar.xz ] || { echo "no .scale or .scale.tar.xz here: run bench/scale_kit.sh where apt works"; exit 1; }
    tar -xJf .scale.tar.xz || exit 1
fi
SITE=$(mktemp -d /tmp/edge-agent-scale-site.XXXXXX)
"$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" .scale/wheels/*.whl || exit 1
mkdir -p "$SITE/data_store/data" && cp .scale/data/*.dcm "$SITE/data_store/data/"  # where bench/ingest_data looks
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$PWD/.scale/bin:$PATH"

echo "machine: $(nproc) CPUs, $("$PY" --version 2>&1), kernel $(uname -r); $(date -u '+%Y-%m-%d %H:%M UTC')"
for name in storescu storescp Orthanc nats-server; do
    printf '%s: %s\n' "$name" "$(command -v "$name")"
done
"$PY" -c "import edge_agent.cli, bench.ingest" || { echo "the daemon or the bench does not import"; exit 1; }

# Affinity: 8 busy processes pinned to CPUs 0-1 for 2 s should use about 4 CPU-seconds, not 16.
"$PY" - <<'EOF'
import os, resource, time
from multiprocessing import Process

def burn() -> None:
    os.sched_setaffinity(0, {0, 1})
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        pass

ps = [Process(target=burn) for _ in range(8)]
for p in ps:
    p.start()
for p in ps:
    p.join()
used = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = used.ru_utime + used.ru_stime
print(f"affinity: 8 busy processes pinned to CPUs 0-1 for 2 s used {cpu:.1f} CPU-seconds "
      f"({'honoured' if cpu < 6 else 'NOT honoured: the pinned rows below run on every core'})")
EOF

NETNS=()
if unshare -n -- sh -c 'ip link set lo up' 2>/dev/null; then
    NETNS=(--netns)
    echo "network: a private namespace with only loopback"
else
    echo "network: no private namespace here (unshare or ip missing or refused); the host's loopback"
fi

# Two runs, so that a call cut short still brings the first back: the first CPU set against the last, then every
# set in one run (the last again among them) if time is left; each run's ratios are against its first set. The
# budget is the whole script's: SCALE_SECONDS (560 by default) from the first run's start.
run() {  # run NAME SECONDS CPUS...
    local name=$1 seconds=$2
    shift 2
    # --quiet-share 0: the machine is the bench's alone, and a sandboxed kernel's /proc/stat may never read as
    # quiet (each measurement would wait its 30 s for others' CPU to settle).
    timeout "$seconds" "$PY" bench/ingest.py "${NETNS[@]}" --nice -10 --workloads ct4 --reps "$REPS" --latency 0 \
        --quiet-share "${SCALE_QUIET_SHARE:-0}" \
        --only storescp orthanc edge-ct edge-ct-procs --receiver-processes 4 --receiver-cpus "$@" \
        --markdown "$OUT/$name.md" --json "$OUT/$name.json"
    local status=$?
    echo "bench/ingest.py --receiver-cpus $*: exit status $status after $((SECONDS - started)) s in all"
    return $status
}
budget=${SCALE_SECONDS:-560}
started=$SECONDS
run scale-ends "$((budget * 6 / 10))" "${CPUS[0]}" "${CPUS[-1]}"
status=$?
left=$((budget - (SECONDS - started)))
if [ ${#CPUS[@]} -gt 2 ] && [ "$left" -gt $((budget / 3)) ]; then
    run scale-all "$left" "${CPUS[@]}" || status=1
else
    echo "the run over every CPU set was left out: ${left} s left of ${budget}"
fi
echo "tables in $OUT"
exit $status
