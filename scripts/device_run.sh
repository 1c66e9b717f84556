#!/usr/bin/env bash
# The one command for a GPU machine: build, test, benchmark, and collect the results in $OUT.
#
#   scripts/device_run.sh [STAGE ...]        (default: build test bench hf memcheck demo)
#
# Stages, run in the order given:
#   build      install the carried wheels (.whl/*.whl, e.g. nvidia-cutlass) into /tmp/site, then
#              `pip install --no-build-isolation --no-deps --no-index -v .` (log: $OUT/build.log)
#   test       GPU tests: pytest -m cuda over tests/, HF test excluded (junit: $OUT/tests.xml)
#   quicktest  the same with FLASH_ATTN_TEST_QUICK=1 (a few hundred cases)
#   hf         tests/test_hf_transformers_gpu.py (junit: $OUT/hf.xml)
#   bench      benchmarks/benchmark_attn.py (forward, backward, forward+backward, peak memory), one
#              JSON + one PNG named with the modes and the commit, into $OUT (~1-1.5 min on an H100)
#   quickbench the same with --quick
#   memcheck   compute-sanitizer --tool memcheck on scripts/memcheck.py
#   bwdmemcheck the same with --backward (forward + both backward paths)
#   racecheck  compute-sanitizer --tool racecheck on scripts/memcheck.py --quick
#   linmemcheck / linracecheck  the same two on the linear-attention kernels (memcheck.py --linear)
#   linbench   benchmarks/benchmark_linear.py (ours vs fla-core from .whl/, fwd and fwd+bwd), JSON into
#              $OUT; LINBENCH_ARGS adds arguments (e.g. "--ops chunk_gla --shapes 8x2048,1x65536").
#              fla-core's Triton kernels autotune on a fresh machine for minutes; Triton (>= 3.4)
#              keeps the timings on disk with TRITON_CACHE_AUTOTUNING=1, so this stage restores
#              them from .triton_autotune.tar (ignored; carry it) and writes the updated set back
#              to $OUT/triton_autotune.tar: copy that to the repo root for the next machine.
#   linseg     the segmented linear-attention passes: their GPU tests (-k "fused or segment", junit
#              $OUT/linseg.xml), then benchmark_linear.py --mode fwd,fwdbwd --no-fla --no-softmax with
#              FLASH_ATTN_LINEAR_SEGMENTED_STATES=0 and =1 (JSON into $OUT/segstates_off, _on)
#   glafused   chunk_gla's GPU tests (-k gla, junit $OUT/glafused.xml), then benchmark_linear.py --ops
#              chunk_gla --mode fwd --no-fla --no-softmax with FLASH_ATTN_LINEAR_GLA_FUSED_FWD=0 and =1
#              (JSON into $OUT/glafused_off, _on)
#   savestates the simple-GLA family keeping its chunk states for the backward: GPU tests (-k "kept_states
#              or chunk_fused_fwd_kernel or gla", junit $OUT/savestates.xml), then benchmark_linear.py --ops
#              chunk_simple_gla,chunk_retention --mode fwdbwd --no-fla with FLASH_ATTN_LINEAR_SAVE_STATES=auto
#              and =1 (JSON into $OUT/savestates_auto, _1)
#   linsm90    chunk_fused_fwd's wgmma kernel (chunk_fused_sm90.cuh): the simple-GLA GPU tests (-k "fused or
#              segment or simple_gla or retention or kept_states", junit $OUT/linsm90.xml), then
#              benchmark_linear.py --ops chunk_simple_gla,chunk_retention --mode fwd,fwdbwd --no-fla --no-softmax
#              $LINSM90_ARGS (e.g. "--grid fla-gla") with FLASH_ATTN_LINEAR_SM90=0 and =1 (JSON into
#              $OUT/linsm90_0, _1)
#   linbwd     the simple-GLA backward's fused dv / dk / dq (chunk_bwd_sm90.cuh): GPU tests (-k "bwd_fused or
#              fused_backward_switch or chunk_simple_gla_backward or kept_states", junit $OUT/linbwd.xml), then
#              benchmark_linear.py --ops chunk_simple_gla,chunk_retention --mode fwdbwd --no-fla --no-softmax
#              $LINBWD_ARGS with FLASH_ATTN_LINEAR_FUSED_BWD_SM90=0, one and split (JSON into $OUT/linbwd_<mode>)
#   linprofile benchmarks/tune/profile_linear.py $PROFILE_ARGS ($OUT/profile_linear_<commit>.txt)
#   linsweep   benchmarks/tune/sweep_segments.py: the one-pass forwards' segment plan, settings x shapes
#              ($OUT/sweep_segments_<commit>.json, .txt)
#   recurrent  the token-by-token recurrence (recurrent.cuh): GPU tests (-k recurrent, junit $OUT/recurrent.xml),
#              then benchmarks/tune/tune_recurrent.cu ($OUT/tune_recurrent_<commit>.txt)
#   glabwd     chunk_gla's one-kernel backward reverse pass: GPU tests (-k gla, junit $OUT/glabwd.xml), then
#              benchmark_linear.py --ops chunk_gla --mode fwdbwd --no-fla with FLASH_ATTN_LINEAR_GLA_FUSED_BWD=0
#              and =1 (JSON into $OUT/glabwd_0, _1)
#   bwdsm90    the wgmma dK/dV kernel: backward / dropout / compile GPU tests (junit $OUT/bwdsm90.xml), then
#              benchmark_attn.py --mode bwd --headdims 64,128,256 --deterministic (both paths timed) with
#              FLASH_ATTN_BWD_SM90=0 and =1 (JSON into $OUT/bwdsm90_0, _1); the =0 half needs a build
#              with FLASH_ATTN_SM90_MMA_SYNC_BWD=1 (else both halves run the wgmma kernels)
#   tunedq     benchmarks/tune/run_tune.sh on the hd64 backward with the dQ warp grid 2 x 4 and 4 x 2
#              ($OUT/tune_dq_grid.txt; needs no build)
#   demo       python -m flash_attn
#
# Environment passed through: FLASH_ATTN_CUDA_ARCHS (default 90 here), MAX_JOBS (16), NVCC_THREADS,
# the trim flags FLASH_ATTN_HEADDIMS / FLASH_ATTN_DTYPES / FLASH_ATTN_DISABLE_ALIBI /
# FLASH_ATTN_DISABLE_SOFTCAP, FLASH_ATTN_GIT_COMMIT (names the benchmark files; the machine
# has no .git), PYTEST_WORKERS (pytest-xdist workers for `test`, default 4; 0 = off),
# PYTEST_ARGS (extra pytest arguments, e.g. "-k d128"), PYTEST_MAXFAIL (default 300: a broken
# build stops early instead of filling the log).
#
# Where Python runs from: every Python step runs with the working directory in a fresh empty
# folder ($RUN_DIR), never the repo root. From the repo root, `import flash_attn` would pick
# the source tree instead of the installed package; the two only agree when pip built in
# place (then setup.py wrote flash_attn/_build_config.json into the tree, and the extension
# is the top-level module flash_attn_2_cuda in site-packages). Running elsewhere makes the
# installed package win whatever pip did, and the build stage prints which flash_attn and
# which extension were imported. The GPU tests run with FLASH_ATTN_REQUIRE_CUDA=1, so a
# broken install fails them instead of skipping them all.
#
# Output: $OUT/run.log (everything), build.log, tests.xml, hf.xml, attn_*.json/png: at
# most 6 files, under the 8 that come back. Every stage runs even when an earlier one
# failed (a stage that needs the build is skipped when the build failed); the exit code is
# the number of failed stages (0 = all passed). A summary table is printed last.

set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/.ci_build/device_out}  # $OUT is set on the device machine
mkdir -p "$OUT"
LOG=$OUT/run.log
RUN_DIR=$(mktemp -d /tmp/flash_attn_run.XXXXXX)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export FLASH_ATTN_CUDA_ARCHS=${FLASH_ATTN_CUDA_ARCHS:-90}
export MAX_JOBS=${MAX_JOBS:-16}
COMMIT=${FLASH_ATTN_GIT_COMMIT:-$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
export FLASH_ATTN_GIT_COMMIT=$COMMIT

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build test bench hf memcheck demo)

declare -a SUMMARY=()
FAILED=0
BUILD_STATE=unknown   # unknown | ok | failed

log() { echo "$*" | tee -a "$LOG"; }

# Runs "$@" with output appended to run.log; records status and time under a stage name.
run_stage() {
    local name=$1; shift
    local t0=$SECONDS rc
    log ""
    log "=== [$name] $(date -u +%H:%M:%S) $*"
    ( cd "$RUN_DIR" && "$@" ) 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local dt=$((SECONDS - t0))
    if [ "$rc" -eq 5 ] && [ "${ALLOW_EMPTY:-0}" = 1 ]; then
        # pytest collected nothing (e.g. the module skipped itself): not a failure of ours
        SUMMARY+=("$(printf '%-11s %-6s %5ss  %s' "$name" skip "$dt" "nothing ran (pytest exit 5)")")
    elif [ "$rc" -eq 0 ]; then
        SUMMARY+=("$(printf '%-11s %-6s %5ss  %s' "$name" ok "$dt" "${STAGE_NOTE:-}")")
    else
        SUMMARY+=("$(printf '%-11s %-6s %5ss  exit %s %s' "$name" FAIL "$dt" "$rc" "${STAGE_NOTE:-}")")
        FAILED=$((FAILED + 1))
    fi
    STAGE_NOTE=""
    return "$rc"
}

skip_stage() {
    SUMMARY+=("$(printf '%-11s %-6s %5s   %s' "$1" skip - "$2")")
    log "=== [$1] skipped: $2"
}

# Counts from a junit xml file: "N passed, N failed, N errors, N skipped".
junit_counts() {
    "$PY" - "$1" <<'EOF' 2>/dev/null || echo "no junit report"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
t = sum(int(s.get("tests", 0)) for s in suites)
f = sum(int(s.get("failures", 0)) for s in suites)
e = sum(int(s.get("errors", 0)) for s in suites)
s = sum(int(s.get("skipped", 0)) for s in suites)
print(f"{t - f - e - s} passed, {f} failed, {e} errors, {s} skipped")
EOF
}

install_wheels() {
    shopt -s nullglob
    local wheels=("$REPO"/.whl/*.whl)
    shopt -u nullglob
    # a wheel already installed (its NAME-VERSION.dist-info is there) is left alone: reinstalling
    # would give the CUTLASS headers new mtimes, and ninja would then recompile every kernel
    local todo=() w base
    for w in "${wheels[@]}"; do
        base=$(basename "$w")
        [ -d "/tmp/site/$(echo "$base" | cut -d- -f1-2).dist-info" ] || todo+=("$w")
    done
    if [ ${#todo[@]} -gt 0 ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "${todo[@]}" || return 1
    fi
    if [ ${#wheels[@]} -gt 0 ]; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
}

do_build() {
    local t0=$SECONDS rc
    echo "building: archs=$FLASH_ATTN_CUDA_ARCHS MAX_JOBS=$MAX_JOBS NVCC_THREADS=${NVCC_THREADS:-default}" \
         "HEADDIMS=${FLASH_ATTN_HEADDIMS:-all} DTYPES=${FLASH_ATTN_DTYPES:-all}" \
         "DISABLE_ALIBI=${FLASH_ATTN_DISABLE_ALIBI:-} DISABLE_SOFTCAP=${FLASH_ATTN_DISABLE_SOFTCAP:-}"
    nvcc --version | tail -n 2
    # --no-index: this machine has no network, pip must not try; --no-deps: torch, einops,
    # packaging are already there; --no-build-isolation: build against the installed torch.
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v "$REPO" >"$OUT/build.log" 2>&1
    rc=$?
    echo "build wall time: $((SECONDS - t0)) s (pip exit $rc; log in build.log)"
    # ninja's per-file start/end times (ms): the slowest compile units set the build's tail
    local nlog
    while IFS= read -r nlog; do
        echo "slowest compile units (s) of $nlog:"
        awk -F'\t' 'NR > 1 { n = split($4, a, "/"); printf "%7.1f  %s\n", ($2 - $1) / 1000, a[n] }' "$nlog" \
            | sort -rn | head -n 8
        # the sum over units against the span: with MAX_JOBS jobs the build cannot take less
        # than sum / MAX_JOBS, nor less than the slowest unit
        awk -F'\t' 'NR > 1 { s += ($2 - $1) / 1000; n++; if ($2 > e) e = $2; if (b == "" || $1 < b) b = $1 }
            END { if (n) printf "  %d units, %.0f s of compile time in all, %.0f s from first start to last end\n",
                  n, s, (e - b) / 1000 }' "$nlog"
    done < <(find "$REPO/build" -name .ninja_log 2>/dev/null)
    grep -E "flash_attn: (building|skipping)" "$OUT/build.log" | head -n 3
    if [ "$rc" -ne 0 ]; then
        echo "--- last 60 lines of build.log:"
        tail -n 60 "$OUT/build.log"
        return "$rc"
    fi
    "$PY" - <<'EOF'
import flash_attn, flash_attn.build_info as bi
print("imported flash_attn", flash_attn.__version__, "from", flash_attn.__file__)
cfg = bi.build_config()
print("build config:", {k: cfg.get(k) for k in ("cuda", "skip_reason", "archs", "head_dims", "dtypes", "variants")})
ext = bi.cuda_extension()
print("extension:", getattr(ext, "__file__", ext))
assert ext is not None, "the CUDA extension is not available after the build"
EOF
}

need_build() {  # stages that run our kernels need a successful build (this run or an earlier one)
    if [ "$BUILD_STATE" = failed ]; then
        skip_stage "$1" "the build failed"
        return 1
    fi
    return 0
}

log "flash_attn device run: stages ${STAGES[*]}; commit $COMMIT; $(date -u +%Y-%m-%dT%H:%M:%SZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" 2>&1 | tee -a "$LOG"

if ! install_wheels >>"$LOG" 2>&1; then
    log "installing the carried wheels failed"
    SUMMARY+=("$(printf '%-11s %-6s %5s   %s' wheels FAIL - "pip install .whl/*.whl")")
    FAILED=$((FAILED + 1))
fi

XDIST=()
if [ "${PYTEST_WORKERS:-4}" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n "${PYTEST_WORKERS:-4}")
fi
read -r -a EXTRA_PYTEST <<<"${PYTEST_ARGS:-}"

for stage in "${STAGES[@]}"; do
    case "$stage" in
    build)
        if run_stage build do_build; then BUILD_STATE=ok; else BUILD_STATE=failed; fi
        ;;
    test | quicktest)
        need_build "$stage" || continue
        quick=0; [ "$stage" = quicktest ] && quick=1
        rm -f "$OUT/tests.xml"
        if ! reason=$(cd "$RUN_DIR" && "$PY" -c "from flash_attn._bench import ours_unavailable_reason as r; print(r() or '')" 2>&1) \
                || [ -n "$reason" ]; then
            log "=== [$stage] cannot run: ${reason:-flash_attn is not importable}"
            SUMMARY+=("$(printf '%-11s %-6s %5s   %s' "$stage" FAIL - "kernels unavailable: ${reason:0:80}")")
            FAILED=$((FAILED + 1))
            continue
        fi
        FLASH_ATTN_TEST_QUICK=$quick FLASH_ATTN_REQUIRE_CUDA=1 run_stage "$stage" \
            "$PY" -m pytest "$REPO/tests" -m cuda -p no:cacheprovider -q -rfEs --tb=short \
            --maxfail="${PYTEST_MAXFAIL:-300}" \
            --ignore="$REPO/tests/test_hf_transformers_gpu.py" --junitxml="$OUT/tests.xml" \
            "${XDIST[@]}" "${EXTRA_PYTEST[@]}"
        SUMMARY[-1]="${SUMMARY[-1]} $(junit_counts "$OUT/tests.xml")"
        ;;
    hf)
        need_build hf || continue
        rm -f "$OUT/hf.xml"
        ALLOW_EMPTY=1 FLASH_ATTN_REQUIRE_CUDA=1 run_stage hf "$PY" -m pytest "$REPO/tests/test_hf_transformers_gpu.py" \
            -p no:cacheprovider -q -rfEs --tb=short --junitxml="$OUT/hf.xml"
        SUMMARY[-1]="${SUMMARY[-1]} $(junit_counts "$OUT/hf.xml")"
        ;;
    bench | quickbench)
        need_build "$stage" || continue
        args=(--out-dir "$OUT"); [ "$stage" = quickbench ] && args+=(--quick)
        run_stage "$stage" "$PY" "$REPO/benchmarks/benchmark_attn.py" "${args[@]}"
        ;;
    memcheck)
        need_build memcheck || continue
        run_stage memcheck compute-sanitizer --tool memcheck --error-exitcode 1 --leak-check no \
            "$PY" "$REPO/scripts/memcheck.py"
        ;;
    bwdmemcheck)
        need_build bwdmemcheck || continue
        run_stage bwdmemcheck compute-sanitizer --tool memcheck --error-exitcode 1 --leak-check no \
            "$PY" "$REPO/scripts/memcheck.py" --backward
        ;;
    racecheck)
        need_build racecheck || continue
        run_stage racecheck compute-sanitizer --tool racecheck --error-exitcode 1 \
            "$PY" "$REPO/scripts/memcheck.py" --quick
        ;;
    linmemcheck)
        need_build linmemcheck || continue
        run_stage linmemcheck compute-sanitizer --tool memcheck --error-exitcode 1 --leak-check no \
            "$PY" "$REPO/scripts/memcheck.py" --linear
        ;;
    linracecheck)
        need_build linracecheck || continue
        run_stage linracecheck compute-sanitizer --tool racecheck --error-exitcode 1 \
            "$PY" "$REPO/scripts/memcheck.py" --linear --quick
        ;;
    linbench)
        need_build linbench || continue
        read -r -a LINBENCH <<<"${LINBENCH_ARGS:-}"
        export TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
        mkdir -p "$TRITON_CACHE_DIR"
        [ -f "$REPO/.triton_autotune.tar" ] && tar -xf "$REPO/.triton_autotune.tar" -C "$TRITON_CACHE_DIR"
        run_stage linbench "$PY" "$REPO/benchmarks/benchmark_linear.py" --out-dir "$OUT" "${LINBENCH[@]}"
        # only the autotune timings (small JSON files), not the compiled kernels
        ( cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 |
            tar --null -cf "$OUT/triton_autotune.tar" -T - ) || true
        ;;
    linseg)
        need_build linseg || continue
        rm -f "$OUT/linseg.xml"
        FLASH_ATTN_REQUIRE_CUDA=1 run_stage linseg "$PY" -m pytest "$REPO/tests/test_linear_attn_gpu.py" -m cuda \
            -k "fused or segment" -p no:cacheprovider -q -rfEs --tb=short --junitxml="$OUT/linseg.xml" "${XDIST[@]}"
        SUMMARY[-1]="${SUMMARY[-1]} $(junit_counts "$OUT/linseg.xml")"
        for on in 0 1; do
            name=$([ "$on" = 1 ] && echo on || echo off)
            mkdir -p "$OUT/segstates_$name"
            FLASH_ATTN_LINEAR_SEGMENTED_STATES=$on run_stage "linseg-ab-$name" "$PY" \
                "$REPO/benchmarks/benchmark_linear.py" --mode fwd,fwdbwd --no-fla --no-softmax \
                --out-dir "$OUT/segstates_$name"
        done
        ;;
    linsm90)
        need_build linsm90 || continue
        rm -f "$OUT/linsm90.xml"
        FLASH_ATTN_REQUIRE_CUDA=1 run_stage linsm90 "$PY" -m pytest "$REPO/tests/test_linear_attn_gpu.py" -m cuda \
            -k "fused or segment or simple_gla or retention or kept_states" -p no:cacheprovider -q -rfEs \
            --tb=short --junitxml="$OUT/linsm90.xml" "${XDIST[@]}"
        SUMMARY[-1]="${SUMMARY[-1]} $(junit_counts "$OUT/linsm90.xml")"
        for on in 0 1; do
            mkdir -p "$OUT/linsm90_$on"
            # shellcheck disable=SC2086  # LINSM90_ARGS is a list of arguments
            FLASH_ATTN_LINEAR_SM90=$on run_stage "linsm90-ab-$on" "$PY" "$REPO/benchmarks/benchmark_linear.py" \
                --ops chunk_simple_gla,chunk_retention --mode fwd,fwdbwd --no-fla --no-softmax ${LINSM90_ARGS:-} \
                --out-dir "$OUT/linsm90_$on"
        done
        ;;
    linbwd)
        # the simple-GLA backward's fused dv / dk / dq (chunk_bwd_sm90.cuh): its GPU tests, then forward +
        # backward with FLASH_ATTN_LINEAR_FUSED_BWD_SM90=0 (three chunk_output passes), one and split
        need_build linbwd || continue
        rm -f "$OUT/linbwd.xml"
        FLASH_ATTN_REQUIRE_CUDA=1 run_stage linbwd "$PY" -m pytest "$REPO/tests/test_linear_attn_gpu.py" -m cuda \
            -k "bwd_fused or fused_backward_switch or chunk_simple_gla_backward or kept_states" -p no:cacheprovider \
            -q -rfEs --tb=short --junitxml="$OUT/linbwd.xml" "${XDIST[@]}"
        SUMMARY[-1]="${SUMMARY[-1]} $(junit_counts "$OUT/linbwd.xml")"
        for mode in 0 one split; do
            mkdir -p "$OUT/linbwd_$mode"
            # shellcheck disable=SC2086  # LINBWD_ARGS is a list of arguments
            FLASH_ATTN_LINEAR_FUSED_BWD_SM90=$mode run_stage "linbwd-ab-$mode" "$PY" \
                "$REPO/benchmarks/benchmark_linear.py" --ops chunk_simple_gla,chunk_retention --mode fwdbwd --no-fla \
                --no-softmax ${LINBWD_ARGS:-} --out-dir "$OUT/linbwd_$mode"
            rm -f "$OUT/linbwd_$mode"/*.png
        done
        ;;
    glafused)
        need_build glafused || continue
        rm -f "$OUT/glafused.xml"
        FLASH_ATTN_REQUIRE_CUDA=1 run_stage glafused "$PY" -m pytest "$REPO/tests/test_linear_attn_gpu.py" -m cuda \
            -k gla -p no:cacheprovider -q -rfEs --tb=short --junitxml="$OUT/glafused.xml" "${XDIST[@]}"
        SUMMARY[-1]="${SUMMARY[-1]} $(junit_counts "$OUT/glafused.xml")"
        for on in 0 1; do
            name=$([ "$on" = 1 ] && echo on || echo off)
            mkdir -p "$OUT/glafused_$name"
            FLASH_ATTN_LINEAR_GLA_FUSED_FWD=$on run_stage "glafused-ab-$name" "$PY" \
                "$REPO/benchmarks/benchmark_linear.py" --ops chunk_gla --mode fwd --no-fla --no-softmax \
                --out-dir "$OUT/glafused_$name"
        done
        ;;
    savestates)
        # the simple-GLA family keeping its chunk states (FLASH_ATTN_LINEAR_SAVE_STATES=1): GPU tests,
        # then forward + backward with the states recomputed (auto) and kept (1)
        need_build savestates || continue
        rm -f "$OUT/savestates.xml"
        FLASH_ATTN_REQUIRE_CUDA=1 run_stage savestates "$PY" -m pytest "$REPO/tests/test_linear_attn_gpu.py" -m cuda \
            -k "kept_states or chunk_fused_fwd_kernel or gla" -p no:cacheprovider -q -rfEs --tb=short \
            --junitxml="$OUT/savestates.xml" "${XDIST[@]}"
        SUMMARY[-1]="${SUMMARY[-1]} $(junit_counts "$OUT/savestates.xml")"
        for on in auto 1; do
            mkdir -p "$OUT/savestates_$on"
            FLASH_ATTN_LINEAR_SAVE_STATES=$on run_stage "savestates-ab-$on" "$PY" \
                "$REPO/benchmarks/benchmark_linear.py" --ops chunk_simple_gla,chunk_retention --mode fwdbwd --no-fla \
                --no-softmax --out-dir "$OUT/savestates_$on"
        done
        ;;
    linprofile)
        # where the chunked linear ops spend their time: every kernel per call (profile_linear.py;
        # PROFILE_ARGS, e.g. "--ops chunk_gla --shapes 4x4096 --mode fwdbwd"), fla-core's autotune
        # timings restored as in linbench
        need_build linprofile || continue
        export TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
        mkdir -p "$TRITON_CACHE_DIR"
        [ -f "$REPO/.triton_autotune.tar" ] && tar -xf "$REPO/.triton_autotune.tar" -C "$TRITON_CACHE_DIR"
        run_stage linprofile bash -c "cd '$RUN_DIR' && '$PY' '$REPO/benchmarks/tune/profile_linear.py' ${PROFILE_ARGS:-} \
            | tee '$OUT/profile_linear_$COMMIT.txt'"
        ;;
    glabwd)
        # chunk_gla's backward reverse pass in one kernel: GLA GPU tests (-k gla), then forward +
        # backward with FLASH_ATTN_LINEAR_GLA_FUSED_BWD=0 (chunk_state + gla_output) and =1
        need_build glabwd || continue
        rm -f "$OUT/glabwd.xml"
        FLASH_ATTN_REQUIRE_CUDA=1 run_stage glabwd "$PY" -m pytest "$REPO/tests/test_linear_attn_gpu.py" -m cuda \
            -k gla -p no:cacheprovider -q -rfEs --tb=short --junitxml="$OUT/glabwd.xml" "${XDIST[@]}"
        SUMMARY[-1]="${SUMMARY[-1]} $(junit_counts "$OUT/glabwd.xml")"
        for on in 0 1; do
            mkdir -p "$OUT/glabwd_$on"
            FLASH_ATTN_LINEAR_GLA_FUSED_BWD=$on run_stage "glabwd-ab-$on" "$PY" \
                "$REPO/benchmarks/benchmark_linear.py" --ops chunk_gla --mode fwdbwd --no-fla --no-softmax \
                --out-dir "$OUT/glabwd_$on"
        done
        ;;
    bwdsm90)
        # the wgmma backward kernels (sm90a): the backward / dropout / compile GPU tests (junit
        # $OUT/bwdsm90.xml), then benchmark_attn.py --mode bwd at head dims 64, 128 and 256, default and
        # deterministic, with FLASH_ATTN_BWD_SM90=0 (mma.sync; needs a FLASH_ATTN_SM90_MMA_SYNC_BWD=1
        # build) and =1 (JSON into bwdsm90_<on>)
        need_build bwdsm90 || continue
        rm -f "$OUT/bwdsm90.xml"
        FLASH_ATTN_REQUIRE_CUDA=1 run_stage bwdsm90 "$PY" -m pytest "$REPO/tests/test_flash_attn_bwd_gpu.py" \
            "$REPO/tests/test_dropout_gpu.py" "$REPO/tests/test_compile_gpu.py" -m cuda \
            -p no:cacheprovider -q -rfEs --tb=short --maxfail="${PYTEST_MAXFAIL:-300}" \
            --junitxml="$OUT/bwdsm90.xml" "${XDIST[@]}"
        SUMMARY[-1]="${SUMMARY[-1]} $(junit_counts "$OUT/bwdsm90.xml")"
        for on in 0 1; do
            mkdir -p "$OUT/bwdsm90_$on"
            FLASH_ATTN_BWD_SM90=$on run_stage "bwdsm90-ab-$on" "$PY" "$REPO/benchmarks/benchmark_attn.py" \
                --mode bwd --headdims 64,128,256 --deterministic --no-memory --no-plot --out-dir "$OUT/bwdsm90_$on"
        done
        ;;
    recurrent)
        # the token-by-token recurrence (recurrent.cuh): its GPU tests (-k recurrent: the kernel against
        # the float64 model on both row layouts, the fused_recurrent_* ops), then tune_recurrent.cu
        # (decoding steps and short / long sequences, GB/s of the state against a copy; needs the
        # CUTLASS headers of the build stage's /tmp/site, no extension)
        need_build recurrent || continue
        rm -f "$OUT/recurrent.xml"
        FLASH_ATTN_REQUIRE_CUDA=1 run_stage recurrent "$PY" -m pytest "$REPO/tests/test_linear_attn_gpu.py" -m cuda \
            -k recurrent -p no:cacheprovider -q -rfEs --tb=short --junitxml="$OUT/recurrent.xml" "${XDIST[@]}"
        SUMMARY[-1]="${SUMMARY[-1]} $(junit_counts "$OUT/recurrent.xml")"
        run_stage recurrent-tune bash -c "cd '$REPO' && nvcc -O3 -std=c++20 --use_fast_math \
            --expt-relaxed-constexpr -arch=sm_90a -Icsrc/linear_attn -Icsrc/common \
            -I/tmp/site/cutlass_library/source/include benchmarks/tune/tune_recurrent.cu -o /tmp/tune_recurrent \
            && /tmp/tune_recurrent | tee '$OUT/tune_recurrent_$COMMIT.txt'"
        ;;
    linsweep)
        # the one-pass forwards' segment plan: benchmarks/tune/sweep_segments.py (settings x shapes)
        need_build linsweep || continue
        run_stage linsweep bash -c "cd '$RUN_DIR' && '$PY' '$REPO/benchmarks/tune/sweep_segments.py' \
            --out '$OUT/sweep_segments_$COMMIT.json' | tee '$OUT/sweep_segments_$COMMIT.txt'"
        ;;
    tunedq)
        # the backward's dQ warp grid at d = 64: the library's (2 x 4) against 4 x 2
        run_stage tunedq bash -c "cd '$REPO' && benchmarks/tune/run_tune.sh 'bwd:64:128:128:8:2 bwd:64:128:128:8:2:4' \
            | tee '$OUT/tune_dq_grid.txt'"
        ;;
    demo)
        need_build demo || continue
        run_stage demo "$PY" -m flash_attn
        ;;
    *)
        log "unknown stage '$stage' (stages: build test quicktest hf bench quickbench memcheck bwdmemcheck racecheck" \
            "linmemcheck linracecheck linbench linseg glafused savestates recurrent linsweep tunedq demo)"
        SUMMARY+=("$(printf '%-11s %-6s %5s   %s' "$stage" FAIL - "unknown stage")")
        FAILED=$((FAILED + 1))
        ;;
    esac
done

rm -rf "$RUN_DIR"
{
    echo ""
    echo "=== summary (commit $COMMIT, archs $FLASH_ATTN_CUDA_ARCHS)"
    printf '%-11s %-6s %6s  %s\n' stage status time notes
    for line in "${SUMMARY[@]}"; do echo "$line"; done
    echo "files in \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
    [ "$FAILED" -eq 0 ] && echo "all stages passed" || echo "$FAILED stage(s) failed"
} | tee -a "$LOG"
exit "$FAILED"
