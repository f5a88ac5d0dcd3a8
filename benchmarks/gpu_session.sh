#!/usr/bin/env bash
# One call on a GPU machine (no network needed): install, record the machine, run the tests,
# the GPU benchmark suite (docs/design.md §4 shapes), the measured matmul rate, the CUDA helper's
# check, and print a short table last. Everything lands in
#   benchmarks/results/<device-name>-<UTC date-time>/
# Each step is logged to its own file there; a failing or timed-out step is reported and the
# next one still runs. The whole script fits in 10 minutes (step budgets below, overridable):
#   FGPO_T_INSTALL (default 150 s), FGPO_T_TESTS (140), FGPO_T_BENCH (210), FGPO_T_CHECK (50).
# Peers: Liger-Kernel and Cut Cross-Entropy are installed from benchmarks/wheels/*.whl when that
# folder exists (fill it where there is network: pip download --no-deps liger-kernel
# cut-cross-entropy -d benchmarks/wheels); otherwise their rows are "skipped: not installed".
#
#   bash benchmarks/gpu_session.sh            # from the repository root or anywhere
#   FGPO_DRY_RUN=1 bash benchmarks/gpu_session.sh   # CPU rehearsal: no install, tiny shapes
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-python}
T_INSTALL=${FGPO_T_INSTALL:-150}
T_TESTS=${FGPO_T_TESTS:-140}
T_BENCH=${FGPO_T_BENCH:-210}
T_CHECK=${FGPO_T_CHECK:-50}
START=$(date +%s)
DRY=${FGPO_DRY_RUN:-0}
DEVICE=cuda
PRESET=gpu
if [ "$DRY" = 1 ]; then DEVICE=cpu; PRESET=tiny; fi

GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
SLUG=$(printf '%s' "${GPU_NAME:-unknown-gpu}" | tr -c 'A-Za-z0-9._-' '-' | sed 's/--*/-/g; s/-$//')
OUT=benchmarks/results/${SLUG}-$(date -u +%Y%m%d-%H%M)
mkdir -p "$OUT"
SUMMARY="$OUT/steps.txt"
: > "$SUMMARY"

# step NAME TIMEOUT CMD...: run CMD with a time limit, log to $OUT/NAME.log, never abort.
step() {
    local name=$1 limit=$2
    shift 2
    local t0 rc
    t0=$(date +%s)
    echo "== [$name] $* (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    local what=ok
    [ "$rc" -ne 0 ] && what="FAILED rc=$rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="TIMED OUT after ${limit}s"
    echo "== [$name] $what (${took}s); last lines of $OUT/$name.log:"
    tail -n 6 "$OUT/$name.log" | sed 's/^/   /'
    printf '%-10s %-24s %5ss\n' "$name" "$what" "$took" >> "$SUMMARY"
    return 0
}

# ---- the machine and the commit
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git describe --always --dirty --abbrev=10 2>/dev/null || echo unknown)"
    git log -1 --format='%H %s' 2>/dev/null
    nvidia-smi 2>&1
    nvcc --version 2>&1 | tail -n 2
    $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
    $PY -c "import triton; print('triton', triton.__version__)" 2>&1
} > "$OUT/machine.txt" 2>&1
head -n 3 "$OUT/machine.txt"
echo "GPU: ${GPU_NAME:-none found}"

# ---- install (builds fgpo_kernels._C for this GPU's architecture only, to save time)
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ')
export FGPO_CUDA_ARCHS=${FGPO_CUDA_ARCHS:-${CAP:-90}}
if [ "$DRY" = 1 ]; then
    echo "== [install] skipped (dry run)"
else
    step install "$T_INSTALL" $PY -m pip install --no-deps --no-build-isolation -e .
fi
if ls benchmarks/wheels/*.whl > /dev/null 2>&1; then
    step peers 60 $PY -m pip install --no-deps --no-index --find-links benchmarks/wheels \
        liger-kernel cut-cross-entropy
fi
step status 60 $PY -c "import json, fgpo_kernels as fk; print(json.dumps(fk.backend_status(), indent=1))"

# ---- tests (GPU tests included)
if [ "$DRY" = 1 ]; then
    step tests "$T_TESTS" $PY -m pytest tests/test_benchmarks_smoke.py -q -ra -p no:cacheprovider
else
    step tests "$T_TESTS" $PY -m pytest tests -q -ra -p no:cacheprovider
fi

# ---- benchmarks: matmul rate probe + the gpu preset (rows written as each group ends)
step bench "$T_BENCH" $PY -m benchmarks.run --device "$DEVICE" --preset "$PRESET" --modes forward full \
    --repeats 5 --out "$OUT"

# ---- the CUDA helper's correctness/timing check, if present
if [ -f benchmarks/gpu_cuda_check.py ] && [ "$DRY" != 1 ]; then
    step cuda_check "$T_CHECK" $PY benchmarks/gpu_cuda_check.py --out "$OUT/cuda_check"
fi

# ---- charts (needs matplotlib; optional)
step plot 30 $PY -m benchmarks.plot "$OUT"

# ---- short table last
echo
echo "== steps"
cat "$SUMMARY"
echo
echo "== matmul rate and results ($OUT/results.csv)"
grep -h "matmul rate" "$OUT/bench.log" 2>/dev/null
if [ -f "$OUT/results.csv" ]; then
    $PY -m benchmarks.report "$OUT" --mode full --no-skipped 2>&1 | tee "$OUT/table.md"
fi
grep -E "passed|failed|error" "$OUT/tests.log" 2>/dev/null | tail -n 1
echo "total $(( $(date +%s) - START ))s; everything is under $OUT"
