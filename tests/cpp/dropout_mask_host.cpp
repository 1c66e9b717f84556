// Host-only check of csrc/flash_attn/dropout.h, compiled with g++ (no GPU, no nvcc):
// tests/test_dropout_cpu.py builds and runs it. Outside nvcc the __device__ helpers are
// plain functions; threadIdx and the warp shuffle are stand-ins below.
//
//   dropout_mask_host kat                       Philox4x32-10 known-answer vectors
//   dropout_mask_host bytes SEED OFFSET B H SQ SK
//       prints the random byte of every (b, h, i, j) through DropoutMask::bytes/byte
//   dropout_mask_host layout SEED OFFSET THRESHOLD
//       applies DropoutMask::apply to the forward's accumulator of every thread of a
//       128 x 128 tile (4 warps) and checks each element against DropoutMask::keep;
//       likewise the coordinates write_s_dmask stores to
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <vector_types.h>

uint3 threadIdx;  // set per simulated thread
uint3 blockIdx;
inline float __shfl_xor_sync(unsigned, float x, int) { return x; }

#include "dropout.h"
#include "kernel_traits.h"
#include "utils.h"

using namespace cute;

static int kat() {
  struct Case { uint4 ctr; uint2 key; uint4 want; };
  const Case cases[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{~0u, ~0u, ~0u, ~0u}, {~0u, ~0u}, {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Case &c : cases) {
    const uint4 r = flash::Philox::generate(c.ctr, c.key);
    if (r.x != c.want.x || r.y != c.want.y || r.z != c.want.z || r.w != c.want.w) {
      std::printf("KAT mismatch\n");
      return 1;
    }
  }
  std::printf("ok\n");
  return 0;
}

static int bytes(uint64_t seed, uint64_t offset, int b, int h, int sq, int sk) {
  for (int bi = 0; bi < b; ++bi) {
    for (int hi = 0; hi < h; ++hi) {
      const flash::DropoutMask mask(seed, offset, bi, hi, h, 0);
      for (int i = 0; i < sq; ++i) {
        for (int j = 0; j < sk; ++j) {
          const uint4 r = mask.bytes(i, j / 64, (j % 8) / 2);
          std::printf("%u%c", flash::DropoutMask::byte(r, ((j % 64) / 8) * 2 + j % 2), j + 1 == sk ? '\n' : ' ');
        }
      }
    }
  }
  return 0;
}

static int layout(uint64_t seed, uint64_t offset, uint32_t threshold) {
  using Traits = flash::FwdKernelTraits<64, cutlass::half_t, flash::FwdTile{128, 128, 4, 1}>;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  const flash::DropoutMask mask(seed, offset, 1, 3, 4, threshold);
  const int m0 = 256, n0 = 128;  // a tile away from the origin
  typename Traits::TiledMma tiled_mma;
  int bad = 0, kept = 0, total = 0;
  std::vector<int> written(kBlockM * kBlockN, 0);
  for (int tid = 0; tid < Traits::kNThreads; ++tid) {
    threadIdx = make_uint3(tid, 0, 0);
    auto thr_mma = tiled_mma.get_thread_slice(tid);
    Tensor acc = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor coord = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
    fill(acc, 1.f);
    Tensor s = make_tensor(acc.data(), flash::acc_layout_rowcol(acc.layout()));
    Tensor c = make_tensor(coord.data(), flash::acc_layout_rowcol(coord.layout()));
    mask.apply<Traits::kNWarps, /*kEncodeSign=*/true>(s, m0, n0);
    for (int r = 0; r < size<0>(s); ++r) {
      for (int k = 0; k < size<1>(s); ++k) {
        const int row = get<0>(c(r, k)), col = get<1>(c(r, k));
        const bool want = mask.keep(m0 + row, n0 + col);
        bad += (s(r, k) > 0.f) != want;
        kept += want;
        ++total;
      }
    }
    // write_s_dmask's coordinates: store each element's flat tile index + 1 and compare.
    for (int r = 0; r < size<0>(s); ++r) {
      for (int k = 0; k < size<1>(s); ++k) { s(r, k) = float(get<0>(c(r, k)) * kBlockN + get<1>(c(r, k)) + 1); }
    }
    flash::Flash_fwd_params p{};
    std::vector<float> out(size_t(kBlockM) * kBlockN, 0.f);
    p.s_dmask_ptr = out.data();
    p.s_dmask_row_stride = kBlockN;
    p.s_dmask_rows = kBlockM;
    p.s_dmask_cols = kBlockN;
    flash::write_s_dmask<Traits::kNWarps, float>(p, s, 0, 0, 0, 0, kBlockM, kBlockN);
    for (int e = 0; e < kBlockM * kBlockN; ++e) {
      if (out[e] != 0.f) {
        bad += out[e] != float(e + 1);
        ++written[e];
      }
    }
  }
  for (int w : written) { bad += w != 1; }
  std::printf("%s bad=%d kept=%d total=%d\n", bad == 0 ? "ok" : "FAIL", bad, kept, total);
  return bad != 0;
}

int main(int argc, char **argv) {
  if (argc >= 2 && std::string(argv[1]) == "kat") { return kat(); }
  if (argc == 8 && std::string(argv[1]) == "bytes") {
    return bytes(std::strtoull(argv[2], nullptr, 0), std::strtoull(argv[3], nullptr, 0), std::atoi(argv[4]),
                 std::atoi(argv[5]), std::atoi(argv[6]), std::atoi(argv[7]));
  }
  if (argc == 5 && std::string(argv[1]) == "layout") {
    return layout(std::strtoull(argv[2], nullptr, 0), std::strtoull(argv[3], nullptr, 0),
                  uint32_t(std::atoi(argv[4])));
  }
  std::fprintf(stderr, "usage: see the top of dropout_mask_host.cpp\n");
  return 2;
}
