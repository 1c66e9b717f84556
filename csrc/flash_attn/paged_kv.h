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

// This thread's rows of one (kBlockN, d) key tile, located in the paged caches: its row m
// (tile row row0 + m * kRowStep, the layout of Ktraits::GmemTiledCopyQKV) is slot[m] of
// physical page page[m]. Every index read from memory is clamped first, so no table entry
// or key count can move a copy outside block_table or the caches.
template <typename Ktraits>
struct PagedKV {
  using Element = typename Ktraits::Element;
  static constexpr int kBlockN = Ktraits::kBlockN;
  // kGmemThreadsPerRow threads share a row, so one thread's rows are kRowStep apart.
  static constexpr int kRowStep = Ktraits::kNThreads / Ktraits::kGmemThreadsPerRow;
  static constexpr int kRows = kBlockN / kRowStep;
  static_assert(kBlockN % kRowStep == 0);
  // Pages hold a multiple of 16 rows, so a step of at most 16 rows crosses at most one
  // page boundary (next_row's single `if`).
  static_assert(kRowStep <= 16, "next_row() assumes a thread's rows are at most 16 apart");

  const Flash_fwd_params &p;
  const int *table;                  // [max_blocks_per_seq] this sequence's row of block_table
  const Element *k_base, *v_base;    // page 0, slot 0 of this kv head, at this thread's first column
  int start;                         // logical position of key 0 (leftpad_k)
  int row0;                          // this thread's first row in the tile
  int page[kRows];
  int slot[kRows];

  // row0, col0: this thread's first (row, column) of a tile (from the copy's identity partition).
  __device__ PagedKV(const Flash_fwd_params &p_, int bidb, int bidh_kv, int row0_, int col0)
      : p(p_), table(p_.block_table + bidb * p_.block_table_batch_stride), row0(row0_) {
    k_base = reinterpret_cast<const Element *>(p.k_ptr) + bidh_kv * p.k_head_stride + col0;
    v_base = reinterpret_cast<const Element *>(p.v_ptr) + bidh_kv * p.v_head_stride + col0;
    start = p.leftpad_k == nullptr ? 0 : max(p.leftpad_k[bidb], 0);
  }

  // Finds page and slot of this thread's rows of key tile n_block (keys n_block * kBlockN + row)
  // for copy_k and copy_v. Rows past the sequence end still get a valid (clamped) location; the
  // copies skip them. (Locating and copying each row of K and V in one pass, without the
  // arrays, spilled more in the unsplit d = 64 kernel on sm90a: 112 / 140 bytes stored /
  // loaded against 108 / 80.)
  __device__ void locate(int n_block) {
    int block, s;
    first_row(n_block, block, s);
    CUTE_UNROLL
    for (int m = 0; m < kRows; ++m) {
      page[m] = page_of(block);
      slot[m] = s;
      next_row(block, s);
    }
  }

  // Copies the located rows below max_rows into dst (CPY, CPY_N, CPY_D); the other rows are
  // zero-filled, as are the columns at or past kv_d (a cache head dim below the kernel's).
  // row_layout: (CPY, CPY_D), where one row's chunks of this thread lie from its first one.
  template <typename TiledCopy, typename RowLayout, typename Dst, typename Coord>
  __device__ void copy_k(TiledCopy const &tiled_copy, RowLayout const &row_layout, Dst &&dst, Coord const &coord,
                         int max_rows) const {
    CUTE_UNROLL
    for (int m = 0; m < kRows; ++m) {
      copy_row(tiled_copy, k_row_ptr(page[m], slot[m]), row_layout, dst, coord, m, max_rows);
    }
  }
  template <typename TiledCopy, typename RowLayout, typename Dst, typename Coord>
  __device__ void copy_v(TiledCopy const &tiled_copy, RowLayout const &row_layout, Dst &&dst, Coord const &coord,
                         int max_rows) const {
    CUTE_UNROLL
    for (int m = 0; m < kRows; ++m) {
      copy_row(tiled_copy, v_row_ptr(page[m], slot[m]), row_layout, dst, coord, m, max_rows);
    }
  }

 private:
  // Logical page and slot of this thread's first row of tile n_block: one division per tile.
  __device__ void first_row(int n_block, int &block, int &s) const {
    const int pos = start + n_block * kBlockN + row0;
    block = pos / p.page_size;
    s = pos - block * p.page_size;
  }
  // The next row of this thread, kRowStep further.
  __device__ void next_row(int &block, int &s) const {
    s += kRowStep;
    if (s >= p.page_size) {
      s -= p.page_size;
      ++block;
    }
  }
  // The physical page of logical page `block`, both clamped: past the table its last entry,
  // an entry outside [0, num_pages) page 0.
  __device__ int page_of(int block) const {
    const int pg = __ldg(table + min(block, p.max_blocks_per_seq - 1));
    return unsigned(pg) < unsigned(p.num_pages) ? pg : 0;
  }
  __device__ const Element *k_row_ptr(int pg, int s) const {
    return k_base + pg * p.k_batch_stride + s * p.k_row_stride;
  }
  __device__ const Element *v_row_ptr(int pg, int s) const {
    return v_base + pg * p.v_batch_stride + s * p.v_row_stride;
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
