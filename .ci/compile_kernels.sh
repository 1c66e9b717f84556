#!/usr/bin/env bash
# Compile-only check of kernel instantiations (nvcc -c, no link, no GPU needed), with the nvcc
# flags setup.py uses, for sm80 and sm90 by default. CI runs it; run it locally after touching
# csrc/ to catch template errors without a full build.
#
#   .ci/compile_kernels.sh                        # the representative set below, sm80 + sm90
#   .ci/compile_kernels.sh --archs 90 csrc/flash_attn/instantiations/flash_fwd_hdim96_fp16_plain_sm80.cu
#   .ci/compile_kernels.sh --all --jobs 2         # every instantiation (slow on 2 cores)
#   .ci/compile_kernels.sh --ptxas-v              # also print registers / spills per kernel
#
# Options: --archs "80 90"  --timeout SECONDS (per file, default 1800)  --jobs N (default 1)
#          --all  --ptxas-v  --keep (keep the .o files under .ci_build/obj)
# Environment: NVCC (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc), NVCC_THREADS (default 2),
#              CUTLASS_HOME (else the nvidia-cutlass package, found without importing it), PYTHON.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
ARCHS="80 90"
TIMEOUT=1800
JOBS=1
PTXAS_V=0
KEEP=0
ALL=0
FILES=()
while [ $# -gt 0 ]; do
    case "$1" in
    --archs) ARCHS=${2//[;,]/ }; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --ptxas-v) PTXAS_V=1; shift ;;
    --keep) KEEP=1; shift ;;
    --all) ALL=1; shift ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "compile_kernels: unknown option $1" >&2; exit 2 ;;
    *) FILES+=("$1"); shift ;;
    esac
done

INST=$REPO/csrc/flash_attn/instantiations
if [ "$ALL" = 1 ]; then
    FILES=("$INST"/flash_*.cu "$REPO"/csrc/linear_attn/*.cu "$REPO"/csrc/linear_attn/instantiations/*.cu)
elif [ ${#FILES[@]} -eq 0 ]; then
    # one per concern: the main forward tile (hd128, bf16), the small tile with both score
    # modifiers (hd64, fp16), the largest tile with softcap (hd256, bf16), the forward with
    # dropout (hd128, bf16), the paged-KV forward (hd256 bf16 unsplit: the one-stage
    # pipeline; hd64 fp16 split: the one-warp decode tile, 32 rows per thread), the backward
    # with both score modifiers (hd128, bf16; sm90a: the wgmma pair), the backward with dropout
    # (hd64, bf16; sm90a: the wgmma dK/dV kernel with atomic dQ), and the backward's 64-row tile
    # with its 4-warp dQ kernel (hd256, fp16; sm90a: the split-d wgmma dK/dV kernel).
    FILES=("$INST/flash_fwd_hdim128_bf16_plain_sm80.cu"
           "$INST/flash_fwd_hdim64_fp16_alibi_softcap_sm80.cu"
           "$INST/flash_fwd_hdim256_bf16_softcap_sm80.cu"
           "$INST/flash_fwd_hdim128_bf16_dropout_sm80.cu"
           "$INST/flash_fwd_hdim256_bf16_paged_sm80.cu"
           "$INST/flash_fwd_hdim64_fp16_paged_splitkv_sm80.cu"
           "$INST/flash_bwd_hdim128_bf16_alibi_softcap_sm80.cu"
           "$INST/flash_bwd_hdim64_bf16_dropout_sm80.cu"
           "$INST/flash_bwd_hdim256_fp16_plain_sm80.cu")
    # linear attention (csrc/linear_attn, seconds per file): chunk states, chunk outputs
    # (R 128 bf16, R 256 fp16), the gate gradient, the token-by-token recurrence, masked
    # linear attention (its pass at R 128, bf16, and its mask gradient), and GLA's per-key
    # chunk states, output / dv (bf16) and dq / dk / dg (fp16), and the one-pass forward (bf16),
    # GLA's at K = V = 128 too (its 256-thread kernel, at the register limit) and its reverse pass (fp16),
    # and the simple-GLA backward's fused dv / dk / dq (sm90a wgmma, K = V = 128)
    FILES+=("$REPO/csrc/linear_attn/instantiations/chunk_state_bf16.cu"
            "$REPO/csrc/linear_attn/instantiations/chunk_fused_bf16.cu"
            "$REPO/csrc/linear_attn/instantiations/chunk_bwd_sm90_bf16_d128.cu"
            "$REPO/csrc/linear_attn/instantiations/chunk_output_bf16_r128.cu"
            "$REPO/csrc/linear_attn/instantiations/chunk_output_fp16_r256.cu"
            "$REPO/csrc/linear_attn/gate_grad.cu"
            "$REPO/csrc/linear_attn/instantiations/recurrent_bf16.cu"
            "$REPO/csrc/linear_attn/instantiations/masked_attn_bf16_r128.cu"
            "$REPO/csrc/linear_attn/instantiations/mask_grad_bf16.cu"
            "$REPO/csrc/linear_attn/instantiations/chunk_state_gla_bf16.cu"
            "$REPO/csrc/linear_attn/instantiations/gla_output_bf16.cu"
            "$REPO/csrc/linear_attn/instantiations/gla_grad_fp16.cu"
            "$REPO/csrc/linear_attn/instantiations/gla_fused_bf16_k128_bv128.cu"
            "$REPO/csrc/linear_attn/instantiations/gla_fused_reverse_fp16.cu")
fi
for f in "${FILES[@]}"; do
    if [ ! -f "$f" ]; then
        echo "compile_kernels: $f does not exist (run python csrc/flash_attn/generate_kernels.py)" >&2
        exit 2
    fi
done

NVCC=${NVCC:-$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")}
if ! "$NVCC" --version >/dev/null 2>&1; then
    echo "compile_kernels: nvcc not found (set NVCC or CUDA_HOME)" >&2
    exit 2
fi

if [ -n "${CUTLASS_HOME:-}" ]; then
    CUTLASS_INC=$CUTLASS_HOME/include
else
    # find_spec, not import: cutlass_library's __init__ pulls in heavy modules.
    CUTLASS_INC=$("$PY" -c '
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("cutlass_library")
if spec is None or not spec.submodule_search_locations:
    sys.exit("nvidia-cutlass is not installed (pip install nvidia-cutlass==4.2.0.0) and CUTLASS_HOME is unset")
print(pathlib.Path(list(spec.submodule_search_locations)[0]) / "source" / "include")
')
fi
if [ ! -f "$CUTLASS_INC/cute/tensor.hpp" ]; then
    echo "compile_kernels: no cute/tensor.hpp under $CUTLASS_INC" >&2
    exit 2
fi

# The nvcc flags of setup.py, read from its source (the list literal assigned to `nvcc_flags`),
# so this check cannot drift from the real build; gencode and the FLASH_ATTN_HAS_* defines are
# added below. Plus what torch's cpp_extension adds for every .cu: -fPIC and the
# no-half-operators defines that setup.py's -U flags undo.
SETUP_FLAGS=$("$PY" - "$REPO/setup.py" <<'PYEOF'
import ast, os, sys
tree = ast.parse(open(sys.argv[1]).read())
for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "nvcc_flags" for t in node.targets):
        lit = node.value
        while isinstance(lit, ast.BinOp):
            lit = lit.left
        if not isinstance(lit, ast.List):
            break
        for elt in lit.elts:
            if isinstance(elt, ast.Constant) and isinstance(elt.value, str):
                print(elt.value)
            elif isinstance(elt, ast.Name) and elt.id == "nvcc_threads":
                print(os.environ.get("NVCC_THREADS", "2"))
            else:
                sys.exit(f"setup.py: unsupported element in nvcc_flags: {ast.dump(elt)}")
        sys.exit(0)
sys.exit("setup.py: no `nvcc_flags = [...]` list found")
PYEOF
) || { echo "compile_kernels: could not read the nvcc flags from setup.py" >&2; exit 2; }
mapfile -t FLAGS <<<"$SETUP_FLAGS"
FLAGS=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       "${FLAGS[@]}" -Xcompiler -fPIC
       -I"$REPO/csrc/flash_attn" -I"$REPO/csrc/common" -I"$CUTLASS_INC")
for a in $ARCHS; do
    if [ "$a" = 90 ]; then  # as setup.py: sm90 code is sm_90a (wgmma), and the host may launch it
        a=90a
        FLAGS+=(-DFLASH_ATTN_HAS_SM90A)
    fi
    FLAGS+=(-gencode "arch=compute_$a,code=sm_$a")
done
[ "$PTXAS_V" = 1 ] && FLAGS+=(-Xptxas -v)

OBJ=$REPO/.ci_build/obj
mkdir -p "$OBJ"
echo "compile_kernels: $("$NVCC" --version | tail -n 1)"
echo "compile_kernels: ${#FILES[@]} file(s), archs [$ARCHS], timeout ${TIMEOUT}s each, $JOBS job(s), cutlass $CUTLASS_INC"
echo "compile_kernels: flags from setup.py: $(echo "$SETUP_FLAGS" | tr '\n' ' ')"

compile_one() {
    local src=$1 name obj t0 rc
    name=$(basename "$src" .cu)
    obj=$OBJ/$name.o
    t0=$(date +%s)
    if timeout "$TIMEOUT" "$NVCC" "${FLAGS[@]}" -c "$src" -o "$obj" >"$OBJ/$name.log" 2>&1; then
        rc=0
    else
        rc=$?
    fi
    local dt=$(( $(date +%s) - t0 ))
    if [ "$rc" -eq 0 ]; then
        echo "  ok      ${dt}s  $name.cu ($(du -k "$obj" | cut -f1) KiB)"
        [ "$PTXAS_V" = 1 ] && grep -E "registers|spill" "$OBJ/$name.log" | sed 's/^/          /'
    elif [ "$rc" -eq 124 ]; then
        echo "  TIMEOUT ${dt}s  $name.cu (over ${TIMEOUT}s)"
    else
        echo "  FAILED  ${dt}s  $name.cu (nvcc exit $rc):"
        grep -v "^$" "$OBJ/$name.log" | head -n 40 | sed 's/^/          /'
    fi
    return "$rc"
}

START=$(date +%s)
FAIL=0
if [ "$JOBS" -le 1 ]; then
    for f in "${FILES[@]}"; do
        compile_one "$f" || FAIL=$((FAIL + 1))
    done
else
    pids=()
    for f in "${FILES[@]}"; do
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done
        compile_one "$f" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || FAIL=$((FAIL + 1)); done
fi
[ "$KEEP" = 1 ] || rm -f "$OBJ"/*.o
echo "compile_kernels: $(( ${#FILES[@]} - FAIL )) of ${#FILES[@]} compiled in $(( $(date +%s) - START ))s"
[ "$FAIL" -eq 0 ]
