// Paged KV, the forward kernel's side: K and V tiles are copied from the pages that
// block_table names, row by row, inside the kernel's own gmem -> smem copy (no gather
// buffer). Each thread locates its rows of a tile once and copies them for K and for V.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>

#include "block_info.h"
#include "flash.h"

namespace flash {

using namespace cute;

// A paged sequence's SeqInfo. The query side is the batched or varlen one; the keys have no
// packed rows (k_start is meaningless), and their count is seqused_k[bidb] when given (decode;
// batched calls always give it), else cu_seqlens_k[bidb + 1] - cu_seqlens_k[bidb] (varlen
// prefill), clamped to the sequence's pages: [0, max_blocks_per_seq * page_size - leftpad].
__forceinline__ __device__ SeqInfo paged_seq_info(const Flash_fwd_params &p, int bidb) {
  SeqInfo seq(p, bidb);
  const int n = p.seqused_k != nullptr ? p.seqused_k[bidb] : p.cu_seqlens_k[bidb + 1] - p.cu_seqlens_k[bidb];
  const int start = p.leftpad_k == nullptr ? 0 : max(p.leftpad_k[bidb], 0);
  seq.seqlen_k = max(0, min(n, p.max_blocks_per_seq * p.page_size - start));
  seq.k_start = 0;
  return seq;
}

// Where the rows of a (kBlockN, d) key tile lie in the paged caches, for the thread's part
// of the tile copy: its row m is tile row row0 + m * kRowStep (the layout of
// Ktraits::GmemTiledCopyQKV), and sits at slot `slot` of physical page `page`.
//
// The table lookups are spread over the warp and issued one tile ahead. Each warp copies
// kWarpRows distinct rows of a tile; lane l fetches the page of warp rows l, l + 32, ...
// (kHeld of them) with fetch(n), and copy_k / copy_v take each row's (page, slot) from its
// lane with a shuffle. fetch(n - 1) is issued right after tile n's copies, so the lookup's
// latency hides behind tile n's compute instead of stalling the next copy (a decode CTA is
// one warp streaming its keys; a dependent table load before every tile's copies cost it
// 40% of its bandwidth). Every index read from memory is clamped first, so no table entry
// or key count can move a copy outside block_table or the caches.
//
// Call order: fetch(n); advance(); copy_k / copy_v of tile n (any number of times, until
// the next advance); fetch(n') for the next tile to copy; advance(); ...
template <typename Ktraits>
struct PagedKV {
  using Element = typename Ktraits::Element;
  static constexpr int kBlockN = Ktraits::kBlockN;
  static constexpr int kThreadsPerRow = Ktraits::kGmemThreadsPerRow;
  // kThreadsPerRow threads share a row, so one thread's rows are kRowStep apart.
  static constexpr int kRowStep = Ktraits::kNThreads / kThreadsPerRow;
  static constexpr int kRows = kBlockN / kRowStep;  // rows per thread per tile
  static_assert(kBlockN % kRowStep == 0);
  static_assert(32 % kThreadsPerRow == 0, "a row's threads must lie in one warp");
  // A warp's threads start kGroup consecutive rows (lane / kThreadsPerRow), so per tile a
  // warp copies kGroup * kRows rows: warp row i = m * kGroup + g is tile row
  // warp * kGroup + g + m * kRowStep.
  static constexpr int kGroup = 32 / kThreadsPerRow;
  static constexpr int kWarpRows = kGroup * kRows;
  static constexpr int kHeld = (kWarpRows + 31) / 32;  // rows whose page each lane fetches

  const Flash_fwd_params &p;
  const int *table;                  // [max_blocks_per_seq] this sequence's row of block_table
  const Element *k_base, *v_base;    // page 0, slot 0 of this kv head, at this thread's first column
  int start;                         // logical position of key 0 (leftpad_k)
  int lane, warp;
  int fetched_page[kHeld], fetched_slot[kHeld];  // fetch()'s rows, for the next advance()
  int page[kHeld], slot[kHeld];                  // the rows of the tile being copied

  // row0, col0: this thread's first (row, column) of a tile (from the copy's identity
  // partition); row0 is lane / kThreadsPerRow + warp * kGroup (the copy's thread layout).
  __device__ PagedKV(const Flash_fwd_params &p_, int bidb, int bidh_kv, int row0, int col0)
      : p(p_), table(p_.block_table + bidb * p_.block_table_batch_stride) {
    (void)row0;
    lane = threadIdx.x % 32;
    warp = threadIdx.x / 32;
    k_base = reinterpret_cast<const Element *>(p.k_ptr) + bidh_kv * p.k_head_stride + col0;
    v_base = reinterpret_cast<const Element *>(p.v_ptr) + bidh_kv * p.v_head_stride + col0;
    start = p.leftpad_k == nullptr ? 0 : max(p.leftpad_k[bidb], 0);
  }

  // Tile row of warp row i of warp w (i < kWarpRows).
  __host__ __device__ static constexpr int tile_row(int w, int i) {
    return w * kGroup + i % kGroup + (i / kGroup) * kRowStep;
  }
  // The lane holding row m of this lane's thread, and which of its held rows it is.
  __host__ __device__ static constexpr int holder_lane(int m, int lane_) {
    return (m * kGroup) % 32 + lane_ / kThreadsPerRow;
  }
  __host__ __device__ static constexpr int holder_index(int m) { return (m * kGroup) / 32; }

  // Issues the table loads of this lane's rows of key tile n_block (keys n_block * kBlockN +
  // row); their results are waited for only at advance(). Positions before the sequence (a
  // tile past the first) or past the table read clamped entries; the copies skip such rows.
  __device__ void fetch(int n_block) {
    CUTE_UNROLL
    for (int j = 0; j < kHeld; ++j) {
      const int i = min(lane + 32 * j, kWarpRows - 1);
      const int pos = max(start + n_block * kBlockN + tile_row(warp, i), 0);
      const int block = pos / p.page_size;
      fetched_slot[j] = pos - block * p.page_size;
      fetched_page[j] = page_of(block);
    }
  }
  // Makes the fetched tile the one copy_k / copy_v read.
  __device__ void advance() {
    CUTE_UNROLL
    for (int j = 0; j < kHeld; ++j) {
      page[j] = fetched_page[j];
      slot[j] = fetched_slot[j];
    }
  }

  // Copies this thread's rows of the advanced tile below max_rows into dst (CPY, CPY_N,
  // CPY_D); the other rows are zero-filled, as are the columns at or past kv_d (a cache
  // head dim below the kernel's). row_layout: (CPY, CPY_D), where one row's chunks of this
  // thread lie from its first one. Every lane of the warp must call (shuffles).
  template <typename TiledCopy, typename RowLayout, typename Dst, typename Coord>
  __device__ void copy_k(TiledCopy const &tiled_copy, RowLayout const &row_layout, Dst &&dst, Coord const &coord,
                         int max_rows) const {
    CUTE_UNROLL
    for (int m = 0; m < kRows; ++m) {
      int pg, s;
      row_location(m, pg, s);
      copy_row(tiled_copy, k_base + pg * p.k_batch_stride + s * p.k_row_stride, row_layout, dst, coord, m, max_rows);
    }
  }
  template <typename TiledCopy, typename RowLayout, typename Dst, typename Coord>
  __device__ void copy_v(TiledCopy const &tiled_copy, RowLayout const &row_layout, Dst &&dst, Coord const &coord,
                         int max_rows) const {
    CUTE_UNROLL
    for (int m = 0; m < kRows; ++m) {
      int pg, s;
      row_location(m, pg, s);
      copy_row(tiled_copy, v_base + pg * p.v_batch_stride + s * p.v_row_stride, row_layout, dst, coord, m, max_rows);
    }
  }

#ifdef __CUDA_ARCH__
  // (page, slot) of this thread's row m of the advanced tile, from the lane that fetched it.
  __device__ void row_location(int m, int &pg, int &s) const {
    const int src = holder_lane(m, lane);
    pg = __shfl_sync(0xffffffffu, page[holder_index(m)], src);
    s = __shfl_sync(0xffffffffu, slot[holder_index(m)], src);
  }
#else
  // Host builds (tests/cpp/paged_kv_host.cpp) provide the warp exchange.
  void row_location(int m, int &pg, int &s) const;
#endif

 private:
  // The physical page of logical page `block`, both clamped: past the table its last entry,
  // an entry outside [0, num_pages) page 0.
  __device__ int page_of(int block) const {
    const int pg = __ldg(table + min(block, p.max_blocks_per_seq - 1));
    return unsigned(pg) < unsigned(p.num_pages) ? pg : 0;
  }

  // Row m of dst (CPY, CPY_N, CPY_D) from the cache row at src, or zeros past max_rows; chunks
  // at or past kv_d are zeros too.
  template <typename TiledCopy, typename RowLayout, typename Dst, typename Coord>
  __device__ void copy_row(TiledCopy const &tiled_copy, const Element *src_row, RowLayout const &row_layout,
                           Dst &dst, Coord const &coord, int m, int max_rows) const {
    if (get<0>(coord(0, m, 0)) < max_rows) {
      Tensor src = make_tensor(make_gmem_ptr(src_row), row_layout);  // (CPY, CPY_D)
      CUTE_UNROLL
      for (int k = 0; k < size<2>(dst); ++k) {
        if (get<1>(coord(0, m, k)) < p.kv_d) {
          cute::copy(tiled_copy, src(_, k), dst(_, m, k));
        } else {
          clear(dst(_, m, k));
        }
      }
    } else {
      clear(dst(_, m, _));
    }
  }
};

// What the contiguous kernels hold instead: nothing.
struct NoPagedKV {
  __device__ NoPagedKV(const Flash_fwd_params &, int, int, int, int) {}
};

template <typename Ktraits, bool Is_paged>
using PagedKVOrNone = std::conditional_t<Is_paged, PagedKV<Ktraits>, NoPagedKV>;

}  // namespace flash
