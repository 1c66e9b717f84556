// Host-only check of csrc/flash_attn/paged_kv.h, compiled with g++ (no GPU, no nvcc):
// tests/test_paged_kv_cpu.py builds and runs it. Outside nvcc the __device__ helpers are
// plain functions; threadIdx, __ldg and the warp shuffle of PagedKV::row_location are
// stand-ins below.
//
//   paged_kv_host locate TILE HEAD_DIM PAGE_SIZE NUM_PAGES MAX_BLOCKS LEFTPAD
//       for every thread of the forward kernel's K/V copy (FwdKernelTraits<HEAD_DIM> with the
//       tile of tile_size.h: TILE "fwd" the prefill tile, "split" the split-KV one) and every
//       key tile of a sequence: after all threads fetch(n) and advance(), each row a thread
//       copies comes from the lane that fetched it with the page and slot that block_table
//       gives for that key (logical position LEFTPAD + key; a table entry outside
//       [0, NUM_PAGES) reads page 0; positions past the table read its last entry), the
//       threads cover every (row, 16-byte chunk) of the tile once, and the row layout taken
//       from the contiguous copy addresses the columns the copy expects.
//   paged_kv_host seqinfo SEQUSED CU_LEN PAGE_SIZE MAX_BLOCKS LEFTPAD
//       prints paged_seq_info's key count (SEQUSED "none": no seqused_k, the cu_seqlens_k length).
// Prints "ok" (or the count), else the first mismatch, and exits 1 on a mismatch.
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include <vector_types.h>

uint3 threadIdx;  // set per simulated thread
template <typename T>
T __ldg(const T *p) { return *p; }

#include "kernel_traits.h"
#include "paged_kv.h"

using namespace cute;

// The simulated CTA: every thread's PagedKV, indexed by thread; row_location reads the
// holder lane's registers as __shfl_sync would.
static std::vector<const void *> g_threads;

template <typename Ktraits>
void flash::PagedKV<Ktraits>::row_location(int m, int &pg, int &s) const {
  const auto *holder = static_cast<const PagedKV *>(g_threads[warp * 32 + holder_lane(m, lane)]);
  pg = holder->page[holder_index(m)];
  s = holder->slot[holder_index(m)];
}

template <int kHeadDim, bool Split>
static int locate(int page_size, int num_pages, int max_blocks, int leftpad) {
  constexpr flash::FwdTile kTile = Split ? flash::fwd_split_tile(kHeadDim) : flash::fwd_tile(kHeadDim);
  using Traits = flash::FwdKernelTraits<kHeadDim, cutlass::half_t, kTile>;
  using Element = typename Traits::Element;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kChunk = Traits::kGmemElemsPerLoad;
  const int b = 2, bidb = 1, h_k = 3, bidh_kv = 2;
  // Table entries: a permutation-like walk over [-2, num_pages + 2), so some are out of range.
  std::vector<int> table(b * max_blocks);
  for (int i = 0; i < b * max_blocks; ++i) { table[i] = (i * 7 + 3) % (num_pages + 4) - 2; }
  std::vector<int> pad(b, leftpad);

  flash::Flash_fwd_params p{};
  const int64_t row_stride = int64_t(h_k) * kHeadDim, page_stride = page_size * row_stride;
  static std::vector<Element> pool(1);  // never read: only addresses are compared
  p.k_ptr = pool.data();
  p.v_ptr = pool.data();
  p.k_row_stride = p.v_row_stride = row_stride;
  p.k_batch_stride = p.v_batch_stride = page_stride;
  p.k_head_stride = p.v_head_stride = kHeadDim;
  p.block_table = table.data();
  p.block_table_batch_stride = max_blocks;
  p.max_blocks_per_seq = max_blocks;
  p.page_size = page_size;
  p.num_pages = num_pages;
  p.kv_d = kHeadDim;
  p.leftpad_k = pad.data();

  const int capacity = max_blocks * page_size;
  const int n_tiles = (capacity + kBlockN - 1) / kBlockN + 1;  // one tile past the end too
  const Element *head = reinterpret_cast<const Element *>(p.k_ptr) + bidh_kv * p.k_head_stride;
  // The contiguous copy's view of one tile: its (CPY, CPY_D) row layout is what the kernel reuses.
  Tensor gK = make_tensor(make_gmem_ptr(head), make_shape(Int<kBlockN>{}, Int<kHeadDim>{}),
                          make_stride(row_stride, _1{}));
  typename Traits::GmemTiledCopyQKV gmem_copy;
  using Paged = flash::PagedKV<Traits>;
  std::vector<int> covered(kBlockN * (kHeadDim / kChunk), 0);
  std::vector<Paged> threads;
  threads.reserve(Traits::kNThreads);
  g_threads.assign(Traits::kNThreads, nullptr);
  for (int tid = 0; tid < Traits::kNThreads; ++tid) {
    threadIdx = make_uint3(tid, 0, 0);
    auto thr = gmem_copy.get_thread_slice(tid);
    Tensor coord = thr.partition_S(make_identity_tensor(make_shape(Int<kBlockN>{}, Int<kHeadDim>{})));
    Tensor tKgK = thr.partition_S(gK);
    const auto row_layout = tKgK(_, 0, _).layout();
    threads.emplace_back(p, bidb, bidh_kv, get<0>(coord(0, 0, 0)), get<1>(coord(0, 0, 0)));
    g_threads[tid] = &threads.back();
    const Paged &paged = threads.back();
    // the copy's thread layout, which tile_row / holder_lane assume
    if (get<0>(coord(0, 0, 0)) != paged.warp * Paged::kGroup + paged.lane / Paged::kThreadsPerRow) {
      std::printf("thread %d: first row %d is not warp * kGroup + lane / kThreadsPerRow\n", tid,
                  int(get<0>(coord(0, 0, 0))));
      return 1;
    }
    for (int m = 0; m < size<1>(coord); ++m) {
      for (int k = 0; k < size<2>(coord); ++k) {
        ++covered[get<0>(coord(0, m, k)) * (kHeadDim / kChunk) + get<1>(coord(0, m, k)) / kChunk];
        for (int i = 0; i < size<0>(coord); ++i) {  // row_layout from paged.k_base reaches column col
          const int64_t offset = (paged.k_base - head) + row_layout(i, k);
          if (offset != get<1>(coord(i, m, k))) {
            std::printf("thread %d row %d chunk %d element %d: column offset %ld, expected %d\n", tid, m, k, i,
                        long(offset), get<1>(coord(i, m, k)));
            return 1;
          }
        }
      }
    }
  }
  for (int n = -1; n < n_tiles; ++n) {  // tile -1: a fetch one past the first tile stays in range
    for (auto &t : threads) {
      threadIdx = make_uint3(t.warp * 32 + t.lane, 0, 0);
      t.fetch(n);
      t.advance();
    }
    for (int tid = 0; tid < Traits::kNThreads; ++tid) {
      auto thr = gmem_copy.get_thread_slice(tid);
      Tensor coord = thr.partition_S(make_identity_tensor(make_shape(Int<kBlockN>{}, Int<kHeadDim>{})));
      for (int m = 0; m < size<1>(coord); ++m) {
        const int pos = std::max(leftpad + n * kBlockN + int(get<0>(coord(0, m, 0))), 0);
        const int blk = std::min(pos / page_size, max_blocks - 1);
        const int entry = table[bidb * max_blocks + blk];
        const int want_page = entry >= 0 && entry < num_pages ? entry : 0;
        int page, slot;
        threads[tid].row_location(m, page, slot);
        if (page != want_page || slot != pos % page_size) {
          std::printf("thread %d tile %d row %d (position %d): page %d slot %d, expected page %d slot %d\n", tid, n,
                      m, pos, page, slot, want_page, pos % page_size);
          return 1;
        }
      }
    }
  }
  for (int c : covered) {
    if (c != 1) {
      std::printf("a (row, chunk) of the tile is copied %d times\n", c);
      return 1;
    }
  }
  std::printf("ok\n");
  return 0;
}

static int seqinfo(const char *seqused, int cu_len, int page_size, int max_blocks, int leftpad) {
  const bool has_seqused = std::string(seqused) != "none";
  std::vector<int> cu_q = {0, 1}, cu_k = {5, 5 + cu_len}, used = {std::atoi(seqused)}, pad = {leftpad};
  flash::Flash_fwd_params p{};
  p.cu_seqlens_q = cu_q.data();
  p.cu_seqlens_k = cu_k.data();
  p.seqused_k = has_seqused ? used.data() : nullptr;
  p.total_q = 1;
  p.total_k = 0;  // as flash_api.cpp sets it for paged calls
  p.page_size = page_size;
  p.max_blocks_per_seq = max_blocks;
  p.leftpad_k = pad.data();
  const flash::SeqInfo seq = flash::paged_seq_info(p, 0);
  std::printf("%d\n", seq.seqlen_k);
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 8 && std::string(argv[1]) == "locate") {
    const bool split = std::string(argv[2]) == "split";
    const int d = std::atoi(argv[3]), page = std::atoi(argv[4]), pages = std::atoi(argv[5]);
    const int max_blocks = std::atoi(argv[6]), leftpad = std::atoi(argv[7]);
    if (d == 64) { return split ? locate<64, true>(page, pages, max_blocks, leftpad)
                                : locate<64, false>(page, pages, max_blocks, leftpad); }
    if (d == 128) { return split ? locate<128, true>(page, pages, max_blocks, leftpad)
                                 : locate<128, false>(page, pages, max_blocks, leftpad); }
    if (d == 256) { return split ? locate<256, true>(page, pages, max_blocks, leftpad)
                                 : locate<256, false>(page, pages, max_blocks, leftpad); }
  }
  if (argc == 7 && std::string(argv[1]) == "seqinfo") {
    return seqinfo(argv[2], std::atoi(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]), std::atoi(argv[6]));
  }
  std::printf("usage: paged_kv_host locate fwd|split HEAD_DIM PAGE_SIZE NUM_PAGES MAX_BLOCKS LEFTPAD\n"
              "       paged_kv_host seqinfo SEQUSED CU_LEN PAGE_SIZE MAX_BLOCKS LEFTPAD\n");
  return 2;
}
