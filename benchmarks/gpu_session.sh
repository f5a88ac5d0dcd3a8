#!/usr/bin/env bash
# One GPU session in ONE call of at most 10 minutes, on a fresh machine with no network: install,
# self-test, GPU tests, every impl and available peer at the design §4 shape and the few-rows
# case, every backward path, the traffic model's predictions against the measurements, then a
# short table last. The lease is 15 minutes of GPU time in all, the machine's start (a few
# minutes) included, so the phases below are budgeted to FGPO_BUDGET_S = 540 s together (the
# call's limit is 600 s) and each runs under `timeout`, clipped to what is left of the budget.
#
#   phase       limit (s)  what
#   machine        15      nvidia-smi, nvcc, python/torch/triton versions, commit
#   install       120      pip install --no-deps --no-build-isolation -e . (_C for this GPU only:
#                          sm_90a on an H100/H200, for the wgmma forward; FGPO_PLAN=1 shows it;
#                          53 s with nvcc on the 2-core Xeon)
#   peers          10      Liger-Kernel and Cut Cross-Entropy from benchmarks/wheels (make
#                          gpu-wheels; skipped without them)
#   status         55      backend_status(): the first-use self-tests of _C and of the Triton
#                          kernels (compiled here for this GPU, kept in triton's disk cache;
#                          20 variants, each 0.55 s median / 1.3 s max to compile for sm_90
#                          with triton 3.6.0, cold cache, on the 2-core Xeon: the compile_s of
#                          tests/test_triton_aot.py's worker)
#   gpu_tests      55      tests/test_cuda_gpu.py, tests/test_kl_numerics.py on the GPU, and
#                          test_triton_kl's TMA tile test (sm_90's kept-logit / G stores)
#   bench         120      benchmarks.run --preset session: token_kl and token_logprobs at
#                          N = 8192, 256, 1024 (D = 3584, V = 152064, bf16), every impl + peer
#   backward       50      benchmarks.gpu_backward: triton gblock/atomic/held, cuda's own
#                          kernel (FGPO_CUDA_BWD=cuda), torch
#   tiles          40      benchmarks.gpu_tiles: shipped fwd / G tiles vs 2 programs per SM, and
#                          the flattened loops vs the forward's nested one / one G tile a program
#   cuda_check     45      benchmarks/gpu_cuda_check.py --quick (bf16 and fp16 vs float64; both
#                          CUDA forwards, FGPO_CUDA_FWD=mma and =wgmma where it can run, each
#                          timed next to its PREDICTED time)
#   model          10      benchmarks.gpu_model (issue 15 item 4) against bench + backward, the
#                          CUDA rows for the forward path cuda_check found to be the default
#   kernel_tests   10      tests/test_triton_kl.py, test_token_kl.py, test_forward_grads.py
#                          (as far as they get)
#   plot           10      benchmarks.plot
# Sum 540. Override a limit with FGPO_T_<PHASE> (upper case), the total with FGPO_BUDGET_S.
#
# Results: benchmarks/results/<gpu>-<UTC date-time>/ (FGPO_RESULTS_DIR overrides): one log per
# phase, steps.txt (status and seconds of each), results.csv (bench), backward/backward.csv,
# cuda_check/, model/, written as each phase ends, so a phase that dies or times out leaves the
# earlier ones. With $OUT set (the device tool's folder; or
# FGPO_EXPORT_DIR), steps.txt and session.tar.gz (the whole folder) are refreshed there after
# every phase: what a killed call leaves under $OUT still comes back.
#
#   FGPO_COMMIT=<sha> bash benchmarks/gpu_session.sh   # on the GPU machine (device tool:
#                                                   # timeout_s=600), from anywhere
#   FGPO_DRY_RUN=1 bash benchmarks/gpu_session.sh   # CPU rehearsal: the same phases, no
#                                                   # install, tiny shapes, seconds per phase
#   FGPO_PLAN=1 bash benchmarks/gpu_session.sh      # print the phase budgets and exit
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-python3}  # the GPU image's python3 is the one with torch
DRY=${FGPO_DRY_RUN:-0}
BUDGET=${FGPO_BUDGET_S:-540}
PHASES="machine:15 install:120 peers:10 status:55 gpu_tests:55 bench:120 backward:50 tiles:40 \
cuda_check:45 model:10 kernel_tests:10 plot:10"

limit_of() {  # the budget of phase $1 (FGPO_T_<PHASE> overrides)
    local p var
    for p in $PHASES; do
        if [ "${p%%:*}" = "$1" ]; then
            var="FGPO_T_$(printf '%s' "$1" | tr '[:lower:]' '[:upper:]')"
            echo "${!var:-${p##*:}}"
            return
        fi
    done
    echo 0
}

cuda_archs() {  # what to build _C for: this GPU only; Hopper as sm_90a, whose code holds the
    # wgmma forward (csrc/fwd_wgmma.cuh; a plain "90" build has only the mma.sync one)
    local cap
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ')
    cap=${cap:-90}
    [ "$cap" = 90 ] && cap=90a
    echo "${FGPO_CUDA_ARCHS:-$cap}"
}

if [ "${FGPO_PLAN:-0}" = 1 ]; then
    total=0
    for p in $PHASES; do
        l=$(limit_of "${p%%:*}")
        total=$((total + l))
        printf '%-13s %4s\n' "${p%%:*}" "$l"
    done
    printf '%-13s %4s\n%-13s %4s\n' total "$total" budget "$BUDGET"
    printf '%-13s %4s\n' cuda_archs "$(cuda_archs)"
    exit 0
fi

START=$(date +%s)
DEADLINE=$((START + BUDGET))
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1  # Triton on CPU tensors
    GPU_NAME="dry-run-cpu"
else
    GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
fi
SLUG=$(printf '%s' "${GPU_NAME:-unknown-gpu}" | tr -c 'A-Za-z0-9._-' '-' | sed 's/--*/-/g; s/-$//')
RES=${FGPO_RESULTS_DIR:-benchmarks/results/${SLUG}-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$RES"
STEPS="$RES/steps.txt"
: > "$STEPS"
EXPORT=${FGPO_EXPORT_DIR:-${OUT:-}}
export PYTHONUNBUFFERED=1

export_results() {  # copy what exists so far to $EXPORT (no-op without one)
    [ -n "$EXPORT" ] && [ -d "$EXPORT" ] || return 0
    cp "$STEPS" "$EXPORT/steps.txt" 2>/dev/null
    tar -czf "$EXPORT/session.tar.gz.part" -C "$(dirname "$RES")" "$(basename "$RES")" \
        2>/dev/null && mv "$EXPORT/session.tar.gz.part" "$EXPORT/session.tar.gz"
    return 0
}

# phase NAME CMD...: run CMD under its limit (clipped to the time left), log to $RES/NAME.log,
# record "NAME status seconds" in steps.txt; never abort the session.
phase() {
    local name=$1 limit t0 rc took what left
    shift
    limit=$(limit_of "$name")
    if [ "$limit" -le 0 ]; then  # not in PHASES (or FGPO_T_<PHASE>=0): `timeout 0` is no limit
        skip "$name" "no budget in PHASES"
        return 0
    fi
    left=$((DEADLINE - $(date +%s)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$left" -lt 5 ]; then
        echo "== [$name] SKIPPED: ${left}s left of the ${BUDGET}s budget"
        printf '%-13s %-28s %5ss\n' "$name" "SKIPPED (no time left)" 0 >> "$STEPS"
        return 0
    fi
    echo "== [$name] $* (limit ${limit}s)"
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" > "$RES/$name.log" 2>&1
    rc=$?
    took=$(($(date +%s) - t0))
    what=ok
    [ "$rc" -ne 0 ] && what="FAILED rc=$rc"
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && what="TIMED OUT after ${limit}s"
    echo "== [$name] $what (${took}s); last lines of $RES/$name.log:"
    tail -n 6 "$RES/$name.log" | sed 's/^/   /'
    printf '%-13s %-28s %5ss\n' "$name" "$what" "$took" >> "$STEPS"
    export_results
    return 0
}

skip() {  # skip NAME REASON
    echo "== [$1] skipped: $2"
    printf '%-13s %-28s %5ss\n' "$1" "skipped: $2" 0 >> "$STEPS"
}

machine_info() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    # The device machine gets a copy of the working tree without .git: pass FGPO_COMMIT=<sha>.
    echo "commit: ${FGPO_COMMIT:-$(git describe --always --dirty --abbrev=10 2>/dev/null || echo unknown)}"
    echo "dry run: $DRY; budget ${BUDGET}s"
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    nvcc --version 2>&1 | tail -n 2
    $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    $PY -c "import triton; print('triton', triton.__version__)"
}

# ---- machine and install
export -f machine_info
export DRY BUDGET PY FGPO_COMMIT=${FGPO_COMMIT:-}
phase machine bash -c machine_info
if [ "$DRY" = 1 ]; then
    skip install "dry run (the installed package is used)"
else
    FGPO_BUILD_CUDA=1 FGPO_CUDA_ARCHS=$(cuda_archs) MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        phase install $PY -m pip install --no-deps --no-build-isolation --no-index -e .
fi
if [ "$DRY" = 1 ]; then
    skip peers "dry run (the installed peers are used)"
elif ls benchmarks/wheels/*.whl > /dev/null 2>&1; then
    phase peers $PY -m pip install --no-deps --no-index --find-links benchmarks/wheels \
        liger-kernel cut-cross-entropy
else
    skip peers "no wheels in benchmarks/wheels (make gpu-wheels)"
fi
# One impl per line as each answers (a phase cut off by its limit keeps what finished): cuda's
# self-test first (built ahead), then triton's, which compiles its kernels for this GPU.
phase status $PY -c "
import json, time
from fgpo_kernels import _registry
for name in ('torch', 'cuda', 'triton'):
    t0 = time.time()
    st = _registry.status(name)
    print(name, f'{time.time() - t0:.1f}s', json.dumps(st), flush=True)
"
# The Triton self-test ran (and is in status.log); later phases time and test the Triton kernels
# even where it failed (a session is rare: what a failing kernel measures is worth having, next
# to the failure), and each process skips recompiling and rerunning it.
export FGPO_TRITON_SELFTEST=0

# ---- GPU tests (on a CPU they skip or run in the interpreter: seconds)
# (+ the TMA tile stores / loads of the Triton kernels on sm_90: run on a GPU first here)
phase gpu_tests $PY -m pytest tests/test_cuda_gpu.py tests/test_kl_numerics.py -q -ra \
    "tests/test_triton_kl.py::test_kept_logits_and_g_tiles_tma_and_pointer_paths" \
    -p no:cacheprovider

# ---- every impl and peer at the design §4 shape and the few-rows case (rows as groups end)
if [ "$DRY" = 1 ]; then
    phase bench $PY -m benchmarks.run --device cpu --preset tiny --ops token_kl \
        --impls torch --modes full --repeats 2 --no-matmul-rate --out "$RES"
else
    phase bench $PY -m benchmarks.run --device cuda --preset session --repeats 5 \
        --max-seconds 10 --case-timeout 140 --out "$RES"
fi

# ---- every backward path, side by side
DRYFLAG=""
[ "$DRY" = 1 ] && DRYFLAG="--dry-run"
phase backward $PY -m benchmarks.gpu_backward --out "$RES/backward" $DRYFLAG

# ---- the shipped Triton tiles vs the epilogue-overlapping ones (2 programs per SM)
if [ -f benchmarks/gpu_tiles.py ]; then
    phase tiles $PY -m benchmarks.gpu_tiles --out "$RES/tiles" $DRYFLAG
else
    skip tiles "benchmarks/gpu_tiles.py is not in this tree yet"
fi

# ---- the CUDA impl against float64 at larger shapes, bf16 and fp16, both forward paths timed
# next to their PREDICTED times (without a GPU: only the paths' rows, skipped with the reason)
phase cuda_check $PY benchmarks/gpu_cuda_check.py --quick --out "$RES/cuda_check"

# ---- the traffic and time model (issue 15 item 4, benchmarks/gpu_model.py) vs the measurements
if [ -f benchmarks/gpu_model.py ]; then
    MODEL_ARGS=()
    HELP=$(timeout 10 $PY -m benchmarks.gpu_model --help 2>&1)
    if printf '%s' "$HELP" | grep -q -- "--measured"; then MODEL_ARGS+=(--measured "$RES"); fi
    if printf '%s' "$HELP" | grep -q -- "--out"; then MODEL_ARGS+=(--out "$RES/model"); fi
    # the CUDA forward the bench ran (its default here, found by cuda_check); else both paths
    CUDA_FWD=$(cat "$RES/cuda_check/cuda_fwd_path.txt" 2>/dev/null)
    case "$CUDA_FWD" in mma | wgmma) MODEL_ARGS+=(--cuda-path "$CUDA_FWD") ;; esac
    phase model $PY -m benchmarks.gpu_model "${MODEL_ARGS[@]}"
else
    skip model "benchmarks/gpu_model.py is not in this tree yet"
fi

# ---- the kernel test files on the GPU; collection only in the dry run (minutes on a CPU)
KFLAG=()
[ "$DRY" = 1 ] && KFLAG=(--collect-only)
phase kernel_tests $PY -m pytest tests/test_triton_kl.py tests/test_token_kl.py \
    tests/test_forward_grads.py -q -ra \
    -p no:cacheprovider "${KFLAG[@]}"

phase plot $PY -m benchmarks.plot "$RES"

# ---- short table last
echo
echo "== phases ($STEPS)"
cat "$STEPS"
echo
grep -h "matmul rate" "$RES/bench.log" 2>/dev/null
if [ -f "$RES/results.csv" ]; then
    $PY -m benchmarks.report "$RES" --mode full --no-skipped 2>&1 | tee "$RES/table.md"
fi
[ -f "$RES/backward/backward.csv" ] && cut -d, -f1-8,12 "$RES/backward/backward.csv"
grep -hE "passed|failed|error" "$RES/gpu_tests.log" "$RES/kernel_tests.log" 2>/dev/null | tail -n 2
echo "total $(($(date +%s) - START))s of ${BUDGET}s; everything is under $RES"
export_results
