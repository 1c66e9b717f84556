#!/usr/bin/env bash
# Compile tune_fwd.cu / tune_bwd.cu for several (head dim, tile) variants in parallel and time each.
# Usage (on the GPU machine, repo root):
#   benchmarks/tune/run_tune.sh "128:128:64:4:2 bwd:128:64:32:4 ..."
# Forward variants are HDIM:BM:BN:WARPS[:STAGES]; backward variants bwd:HDIM:ROWS:COLS:WARPS[:STAGES[:DQM]]
# (the default path, atomic dQ; DQM = warps along the queries of the dQ product, default the
# library's) or bwddet:... (the deterministic kernel pair); decoding
# (split-KV forward + combine at the ANCHORS decode shapes) dec:HDIM:BM:BN:WARPS[:STAGES[:PAGE]]
# (PAGE > 0: the paged-KV kernels on caches in pages of PAGE rows).
# Prints ptxas registers/spills, local-memory instructions in SASS, and the timings.
# CUTLASS include from the nvidia-cutlass wheel.
# TUNE_DIR=dir keeps the binaries there (default: a fresh temporary folder); a binary already
# in it is not rebuilt. TUNE_COMPILE_ONLY=1 stops after compiling, so the compiles can overlap
# another build and the timings run later on an idle GPU (same TUNE_DIR, same variants).
set -u
VARIANTS=${1:-"128:128:64:4:2"}
ARCH=${ARCH:-90}
CUT=${CUTLASS_INC:-$(python3 -c "import importlib.util as u; print(u.find_spec('cutlass_library').submodule_search_locations[0])")/source/include}
DIR=${TUNE_DIR:-$(mktemp -d /tmp/tune.XXXX)}
mkdir -p "$DIR"

# The nvcc defines and source for one variant spec.
variant_args() {
  if [[ $1 == bwd* ]]; then
    IFS=: read -r kind D R C W S Q <<<"$1"
    local atomic=1 dqm=""
    [ "$kind" = bwddet ] && atomic=0
    [ -n "${Q:-}" ] && dqm="-DFLASH_ATTN_TUNE_DQ_WARPS_M=$Q"
    echo "-DHDIM=$D -DROWS=$R -DCOLS=$C -DWARPS=$W -DSTAGES=${S:-1} -DATOMIC=$atomic $dqm benchmarks/tune/tune_bwd.cu"
  elif [[ $1 == dec:* ]]; then
    IFS=: read -r _ D M N W S P <<<"$1"
    echo "-DHDIM=$D -DBM=$M -DBN=$N -DWARPS=$W -DSTAGES=${S:-1} -DPAGE=${P:-0} benchmarks/tune/tune_decode.cu"
  else
    IFS=: read -r D M N W S <<<"$1"
    echo "-DHDIM=$D -DBM=$M -DBN=$N -DWARPS=$W -DSTAGES=${S:-1} benchmarks/tune/tune_fwd.cu"
  fi
}

for v in $VARIANTS; do
  name=${v//:/-}
  [ -x "$DIR/$name.bin" ] && continue
  # shellcheck disable=SC2046
  ( nvcc -std=c++20 -O3 --use_fast_math --expt-relaxed-constexpr -gencode arch=compute_$ARCH,code=sm_$ARCH \
      -Xptxas -v -I csrc/flash_attn -I csrc/common -I "$CUT" $(variant_args "$v") -o "$DIR/$name.bin" >"$DIR/$name.log" 2>&1 ) &
done
wait
[ "${TUNE_COMPILE_ONLY:-0}" = 1 ] && exit 0
for v in $VARIANTS; do
  name=${v//:/-}
  bin="$DIR/$name.bin"
  echo "--- $v: $(grep -E 'registers|spill' "$DIR/$name.log" | tr -s ' ' | tr '\n' ' ')"
  if [ -x "$bin" ]; then
    echo "    SASS: $(cuobjdump -sass "$bin" | grep -cE 'LDL|STL') local-memory ops, $(cuobjdump -sass "$bin" | grep -c HMMA) HMMA"
    "$bin"
  else
    tail -5 "$DIR/$name.log"
  fi
done
