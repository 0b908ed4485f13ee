#!/usr/bin/env bash
# The test and benchmark suite on a GPU, in one call: part 5 of the performance issue.
#
#   bash benchmarks/device_suite.sh [SECTION...]
#
# Sections, in this order: env tests meta overhead accuracy memory mixed (the default), and
# full (only when named: 3 to 4 more minutes).
# Each section's output goes to its own file NAME.log under $OUT (the device tool's folder;
# else $ZIGGURAT_SUITE_OUT, else ./device-results), and summary.txt holds one line per
# section (exit status, seconds) and the env section's output: at most 8 files, what the
# device tool brings back. Each section has its own time limit, so one that hangs costs only
# its own limit; the default sections' limits add up to 8.3 minutes and can be set with
# ZIGGURAT_SUITE_<SECTION>_S (seconds), e.g. ZIGGURAT_SUITE_META_S=300.
#
# Peer libraries (Betty, higher, TorchOpt) are installed from .whl/ when it is there: run
# `bash benchmarks/device_wheels.sh` on a machine with PyPI first (wheels for the device's
# Python 3.12, under 1 MB), then on the device tool:
#   run(command="bash benchmarks/device_suite.sh", carry=[".whl"], timeout_s=560)
# It uses the machine's own python3 and torch (ziggurat from this checkout, not installed).
#
#   env       the GPU, python, torch and CUDA versions
#   tests     pytest --device cuda tests/test_device.py (whole programs on the GPU against
#             closed forms and against the same program on the CPU), tests/test_host_syncs.py
#             (host reads of device values per step, exact on a GPU) and the fp16 test
#   meta      benchmarks/meta_iteration.py --device cuda --in-process, 8M 32M 2M, every
#             method and library
#   overhead  benchmarks/overhead.py --device cuda (framework overhead, unroll 100)
#   accuracy  benchmarks/accuracy.py --device cuda
#   memory    benchmarks/unrolled_memory.py --device cuda (allocated memory)
#   mixed     benchmarks/mixed_product.py --device cuda --hidden 4096
#   full      the whole test suite on the CPU of that machine, with its torch (a check of the
#             torch version there; skipped tests are the CUDA ones run above)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT="$PWD"
PY="${ZIGGURAT_SUITE_PYTHON:-python3}"
DEST="${OUT:-${ZIGGURAT_SUITE_OUT:-$ROOT/device-results}}"
mkdir -p "$DEST"
: >"$DEST/summary.txt"
ALL=(env tests meta overhead accuracy memory mixed full)
SECTIONS=("$@")
[[ ${#SECTIONS[@]} -eq 0 ]] && SECTIONS=(env tests meta overhead accuracy memory mixed)
for s in "${SECTIONS[@]}"; do
    [[ " ${ALL[*]} " == *" $s "* ]] || { echo "device_suite: unknown section '$s' (sections: ${ALL[*]})" >&2; exit 2; }
done
DEVICE="${ZIGGURAT_SUITE_DEVICE:-cuda}"  # cpu: a dry run of the script itself (tests do this)
QUICK=()
[[ "${ZIGGURAT_SUITE_QUICK:-0}" == 1 ]] && QUICK=(--quick)
IN_PROCESS=()  # on a GPU every meta-iteration configuration runs in one process
[[ "$DEVICE" == cuda* ]] && IN_PROCESS=(--in-process)

export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/ziggurat-peers .whl/*.whl >>"$DEST/summary.txt" 2>&1 \
        && export PYTHONPATH="$PYTHONPATH:/tmp/ziggurat-peers"
fi

FAILED=()
limit() {  # default seconds for a section, overridable by ZIGGURAT_SUITE_<NAME>_S
    local var="ZIGGURAT_SUITE_${1^^}_S"
    echo "${!var:-$2}"
}

section() {  # section NAME DEFAULT_SECONDS COMMAND...
    local name="$1" seconds
    seconds="$(limit "$1" "$2")"
    shift 2
    [[ " ${SECTIONS[*]} " == *" $name "* ]] || return 0
    local start=$SECONDS rc log="$DEST/$name.log"
    [[ $name == env ]] && log="$DEST/env.tmp"
    echo "== $name (limit ${seconds} s): $*"
    timeout --kill-after=10 "$seconds" "$@" >"$log" 2>&1
    rc=$?
    local took=$((SECONDS - start))
    [[ $rc -eq 0 ]] || FAILED+=("$name")
    [[ $rc -eq 124 || $rc -eq 137 ]] && printf '\n(stopped at the limit of %s s)\n' "$seconds" >>"$log"
    printf '%-9s rc=%-3d %4d s\n' "$name" "$rc" "$took" | tee -a "$DEST/summary.txt"
    tail -n 25 "$log"
    if [[ $name == env ]]; then cat "$log" >>"$DEST/summary.txt"; rm -f "$log"; fi
}

section env 30 bash -c "nvidia-smi -L 2>&1; $PY -c 'import sys, torch; print(sys.version); \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); \
print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")'"
section tests 120 "$PY" -m pytest -v -p no:cacheprovider --device "$DEVICE" tests/test_device.py \
    tests/test_host_syncs.py tests/test_systems.py::test_fp16_loss_scaling_on_cuda -rs --durations=5
section meta 180 "$PY" benchmarks/meta_iteration.py --device "$DEVICE" \
    "${IN_PROCESS[@]}" --sizes 8M 32M 2M --repeats 9 "${QUICK[@]}"
section overhead 60 "$PY" benchmarks/overhead.py --device "$DEVICE" --repeats 9 "${QUICK[@]}"
section accuracy 30 "$PY" benchmarks/accuracy.py --device "$DEVICE" "${QUICK[@]}"
section memory 45 "$PY" benchmarks/unrolled_memory.py --device "$DEVICE" --iterations 400 "${QUICK[@]}"
section mixed 30 "$PY" benchmarks/mixed_product.py --device "$DEVICE" --hidden 4096 "${QUICK[@]}"
section full 300 "$PY" -m pytest -q -p no:cacheprovider
echo "results in $DEST"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "device_suite: sections that failed: ${FAILED[*]}" | tee -a "$DEST/summary.txt" >&2
    exit 1
fi
