// sm90_tiles.h's written-out layouts checked against CuTe's on the host (g++): tile_offset (the
// swizzled offset of (r, c) in the tiles the wgmma kernels read) and for_acc_pairs (the (row,
// column) of each pair of a warpgroup's accumulator), for every tile and accumulator shape the
// linear-attention kernels use.
// Prints "ok" and exits 0, or prints the first mismatches and exits 1.
#include <cstdio>

#include "sm90_tiles.h"

namespace la = linear_attn;
using namespace cute;
using TC = cutlass::bfloat16_t;

static int bad = 0;

template <int R, int C>
void check_tile() {
  using L = typename la::sm90::StagedTile<TC, R, C, 2>::Layout;
  alignas(1024) static TC buf[R * C * 2];
  Tensor t = make_tensor(make_smem_ptr(buf), L{});
  for (int s = 0; s < 2; ++s) {
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) {
        const int cute_off = static_cast<int>(&t(r, c, s) - buf);
        const int ours = s * R * C + la::sm90::tile_offset<R, C>(r, c);
        if (cute_off != ours && bad++ < 8) std::printf("tile %dx%d (%d, %d, %d): CuTe %d, ours %d\n", R, C, r, c, s, cute_off, ours);
      }
    }
  }
}

// the state accumulator of chunk_fused_sm90.cuh (M 64-row tiles of an N-column wgmma) for every thread
template <int M, int N>
void check_acc() {
  using Mma = decltype(make_tiled_mma(
      GMMA::ss_op_selector<TC, TC, float, Shape<_64, Int<N>, _64>, GMMA::Major::MN, GMMA::Major::MN>()));
  Mma mma;
  for (int t = 0; t < 128; ++t) {
    Tensor coord = mma.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<64 * M>, Int<N>>{}));
    static_assert(decltype(size(coord))::value == 64 * M * N / 128, "elements per thread");
    int seen = 0;
    la::sm90::for_acc_pairs<M, N>(t, [&](int i, int r, int c) {
      for (int e = 0; e < 2; ++e) {
        const int cr = get<0>(coord(i + e)), cc = get<1>(coord(i + e));
        if ((cr != r || cc != c + e) && bad++ < 8) {
          std::printf("acc %dx%d thread %d element %d: CuTe (%d, %d), ours (%d, %d)\n", 64 * M, N, t, i + e, cr, cc, r,
                      c + e);
        }
      }
      seen += 2;
    });
    if (seen != 64 * M * N / 128 && bad++ < 8) std::printf("acc %dx%d thread %d: %d elements\n", 64 * M, N, t, seen);
  }
}

int main() {
  check_tile<64, 32>();
  check_tile<64, 64>();
  check_tile<64, 128>();
  check_tile<64, 256>();
  check_tile<128, 64>();
  check_tile<128, 128>();
  check_tile<256, 32>();
  check_tile<256, 64>();
  check_acc<1, 32>();
  check_acc<1, 64>();
  check_acc<1, 128>();
  check_acc<2, 64>();
  check_acc<4, 32>();
  check_acc<4, 64>();
  if (bad) {
    std::printf("%d mismatches\n", bad);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
