#!/usr/bin/env bash
# Wheels of the peer libraries for a GPU machine that cannot reach PyPI, into .whl/ (ignored
# by git): betty-ml 0.2.1, higher 0.2.1, torchopt 0.7.3 and what they import (optree,
# graphviz), for CPython ${ZIGGURAT_WHEELS_PYTHON:-3.12} on x86-64 Linux, no dependencies (the
# machine's own torch and numpy are used). benchmarks/device_suite.sh installs them there.
#
#   bash benchmarks/device_wheels.sh            # then carry .whl to the device machine
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYV="${ZIGGURAT_WHEELS_PYTHON:-3.12}"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
mkdir -p .whl
# --ignore-requires-python: Betty 0.2.1 declares Python < 3.11 and runs on 3.12 (see README)
python3 -m pip download -q --no-deps --ignore-requires-python --only-binary=:all: \
    --python-version "$PYV" --implementation cp "${platforms[@]}" -d .whl \
    betty-ml==0.2.1 higher==0.2.1 torchopt==0.7.3 optree graphviz
ls -l .whl
