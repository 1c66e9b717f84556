// Host-only check of split_kv.h's split_share, compiled with g++ (no GPU, no nvcc):
// tests/test_kvcache_cpu.py builds and runs it. For every visible range [n_min, n_min + n)
// of up to MAX_BLOCKS key blocks and every share count 1..kMaxSplits, the shares must tile the
// range in order without gaps or overlaps, the first min(num_splits, max(1, n / kMinShareBlocks))
// of them non-empty and differing by at most one block, the rest empty, and no non-empty share
// below kMinShareBlocks blocks when the range has that many.
//
//   split_share_host MAX_BLOCKS     prints "ok", or the first violation and exits 1
#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include <vector_types.h>

uint3 threadIdx;  // stand-ins for the device built-ins the headers mention
template <typename T>
T __ldg(const T *p) { return *p; }
using std::max;  // the device min / max of block_info.h
using std::min;

#include "split_kv.h"

int main(int argc, char **argv) {
  const int max_blocks = argc > 1 ? std::atoi(argv[1]) : 300;
  for (int n = 0; n <= max_blocks; ++n) {
    for (int splits = 1; splits <= flash::kMaxSplits; ++splits) {
      const int n_min0 = 7, n_max0 = n_min0 + n;
      const int by_length = n / flash::kMinShareBlocks;
      const int used = by_length < splits ? (by_length > 1 ? by_length : 1) : splits;
      int next = n_min0, smallest = n + 1, largest = -1;
      for (int s = 0; s < splits; ++s) {
        int lo = n_min0, hi = n_max0;
        flash::split_share(lo, hi, s, splits);
        const int size = hi > lo ? hi - lo : 0;
        const bool ok = s < used ? (lo == next && hi >= lo && hi <= n_max0) : size == 0;
        if (!ok) {
          std::printf("n %d splits %d share %d: [%d, %d), expected %s at %d\n", n, splits, s, lo, hi,
                      s < used ? "a share starting" : "an empty share", next);
          return 1;
        }
        if (s < used) {
          next = hi;
          smallest = size < smallest ? size : smallest;
          largest = size > largest ? size : largest;
        }
      }
      const bool tiled = next == n_max0 && largest - smallest <= 1;
      const bool big_enough = n < flash::kMinShareBlocks || smallest >= flash::kMinShareBlocks;
      if (!tiled || !big_enough) {
        std::printf("n %d splits %d: shares end at %d (range end %d), sizes %d..%d\n", n, splits, next, n_max0,
                    smallest, largest);
        return 1;
      }
    }
  }
  std::printf("ok\n");
  return 0;
}
