// Host-only check of csrc/flash_attn/paged_kv.h, compiled with g++ (no GPU, no nvcc):
// tests/test_paged_kv_cpu.py builds and runs it. Outside nvcc the __device__ helpers are
// plain functions; threadIdx and __ldg are stand-ins below.
//
//   paged_kv_host locate TILE HEAD_DIM PAGE_SIZE NUM_PAGES MAX_BLOCKS LEFTPAD
//       for every thread of the forward kernel's K/V copy (FwdKernelTraits<HEAD_DIM> with the
//       tile of tile_size.h: TILE "fwd" the prefill tile, "split" the split-KV one) and every
//       key tile of a sequence: after fetch(n) and advance(), each K and V row a thread
//       copies is read from the page and slot that block_table gives for that key (logical
//       position LEFTPAD + key; a table entry outside [0, NUM_PAGES) reads page 0; positions
//       past the table read its last entry) and lands in the smem row of that key through
//       the permuted view (PagedKV::smem_view), the threads cover every (row, 16-byte chunk)
//       of the tile once, and the row layout taken from the contiguous copy addresses the
//       columns the copy expects.
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
  // The smem tile as the kernel sees it, and its row-permuted view (PagedKV::smem_view).
  using SmemLayout = typename Traits::SmemLayoutKV;
  static std::vector<Element> smem(cosize(SmemLayout{}));
  Tensor sK = make_tensor(smem.data(), SmemLayout{});
  Tensor sKp = Paged::smem_view(sK);
  std::vector<int> covered(kBlockN * (kHeadDim / kChunk), 0);
  for (int tid = 0; tid < Traits::kNThreads; ++tid) {
    threadIdx = make_uint3(tid, 0, 0);
    auto thr = gmem_copy.get_thread_slice(tid);
    Tensor coord = thr.partition_S(make_identity_tensor(make_shape(Int<kBlockN>{}, Int<kHeadDim>{})));
    Tensor tKgK = thr.partition_S(gK);
    Tensor tKsKp = thr.partition_D(sKp);
    const auto row_layout = tKgK(_, 0, _).layout();
    const int row0 = get<0>(coord(0, 0, 0));
    Paged paged(p, bidb, bidh_kv, row0, get<1>(coord(0, 0, 0)));
    for (int m = 0; m < size<1>(coord); ++m) {
      const int row = row0 * Paged::kRows + m;  // the smem row this thread's row m fills
      for (int k = 0; k < size<2>(coord); ++k) {
        const int col = get<1>(coord(0, m, k));
        ++covered[row * (kHeadDim / kChunk) + col / kChunk];
        if (&tKsKp(0, m, k, 0) != &sK(row, col, 0)) {
          std::printf("thread %d row %d chunk %d: the permuted smem view is not smem row %d\n", tid, m, k, row);
          return 1;
        }
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
    for (int n = -1; n < n_tiles; ++n) {  // tile -1: a fetch before the first tile stays in range
      paged.fetch(n);
      paged.advance();
      for (int m = 0; m < Paged::kRows; ++m) {
        const int pos = std::max(leftpad + n * kBlockN + row0 * Paged::kRows + m, 0);
        if (n >= 0 && pos != leftpad + n * kBlockN + row0 * Paged::kRows + m) { return 1; }
        const int blk = std::min(pos / page_size, max_blocks - 1);
        const int entry = table[bidb * max_blocks + blk];
        const int want_page = entry >= 0 && entry < num_pages ? entry : 0;
        // past the table the last entry's page is read, at the position's own slot
        const Element *want = paged.k_base + want_page * p.k_batch_stride + (pos % page_size) * p.k_row_stride;
        const Element *want_v = paged.v_base + want_page * p.v_batch_stride + (pos % page_size) * p.v_row_stride;
        if (n >= 0 && (paged.k_row(m) != want || paged.v_row(m) != want_v)) {
          std::printf("thread %d tile %d row %d (position %d): K row at offset %ld, expected page %d slot %d\n", tid,
                      n, m, pos, long(paged.k_row(m) - paged.k_base), want_page, pos % page_size);
          return 1;
        }
        // every row, tile -1 included, stays inside the caches
        const int64_t off = paged.k_row(m) - paged.k_base;
        if (off < 0 || off >= int64_t(num_pages) * p.k_batch_stride) {
          std::printf("thread %d tile %d row %d: offset %ld outside the caches\n", tid, n, m, long(off));
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
