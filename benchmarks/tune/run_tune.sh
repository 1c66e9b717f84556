#!/usr/bin/env bash
# Compile tune_fwd.cu for several (head dim, tile) variants in parallel and time each.
# Usage (on the GPU machine, repo root): benchmarks/tune/run_tune.sh "128:128:64:4 128:64:64:4 ..."
# Each variant is HDIM:BM:BN:WARPS[:STAGES]. Prints ptxas registers/spills, local-memory
# instructions in SASS, and the timings. CUTLASS include from the nvidia-cutlass wheel.
set -u
VARIANTS=${1:-"128:128:64:4"}
ARCH=${ARCH:-90}
CUT=${CUTLASS_INC:-$(python3 -c "import importlib.util as u; print(u.find_spec('cutlass_library').submodule_search_locations[0])")/source/include}
DIR=$(mktemp -d /tmp/tune.XXXX)
for v in $VARIANTS; do
  IFS=: read -r D M N W S <<<"$v"; S=${S:-1}
  ( nvcc -std=c++20 -O3 --use_fast_math --expt-relaxed-constexpr -gencode arch=compute_$ARCH,code=sm_$ARCH \
      -Xptxas -v -I csrc/flash_attn -I "$CUT" -DHDIM=$D -DBM=$M -DBN=$N -DWARPS=$W -DSTAGES=$S \
      benchmarks/tune/tune_fwd.cu -o "$DIR/$D-$M-$N-$W-$S.bin" >"$DIR/$v.log" 2>&1 ) &
done
wait
for v in $VARIANTS; do
  IFS=: read -r D M N W S <<<"$v"; S=${S:-1}
  bin="$DIR/$D-$M-$N-$W-$S.bin"
  echo "--- $v: $(grep -E 'registers|spill' "$DIR/$v.log" | tr -s ' ' | tr '\n' ' ')"
  if [ -x "$bin" ]; then
    echo "    SASS: $(cuobjdump -sass "$bin" | grep -cE 'LDL|STL') local-memory ops, $(cuobjdump -sass "$bin" | grep -c HMMA) HMMA"
    "$bin"
  else
    tail -5 "$DIR/$v.log"
  fi
done
