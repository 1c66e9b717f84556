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

// Where the rows of a (kBlockN, d) key tile lie in the paged caches, for one thread's part
// of the tile copy.
//
// The paged kernels copy K and V with the contiguous kernels' TiledCopy, but into a view
// of the smem tiles whose rows are permuted (smem_view): the thread that copies rows row0,
// row0 + kRowStep, ... of a tile then fills rows row0 * kRows + m, m < kRows, consecutive
// keys. A run of kRows consecutive keys lies on at most kSegments pages (pages hold a
// multiple of 16 rows), so a thread looks up kSegments table entries per tile and its row
// m is at segment base + m * row stride, the segment picked by comparing m with the page
// boundaries: a few integer instructions per row, as in the contiguous copy. (Looking a
// page up per row, by table loads or warp shuffles, made a decode CTA, one warp with no
// other warp to hide its latency, run 1.7x slower than the contiguous kernel.)
//
// The lookups of tile n are issued one tile ahead (fetch), so their latency hides behind
// a tile's compute. Every index read from memory is clamped first, so no table entry or
// key count can move a copy outside block_table or the caches.
//
// Call order: fetch(n); advance(); copy_k / copy_v of tile n (any number of times, until
// the next advance); fetch(n') for the next tile to copy; advance(); ...
template <typename Ktraits>
struct PagedKV {
  using Element = typename Ktraits::Element;
  static constexpr int kBlockN = Ktraits::kBlockN;
  static constexpr int kHeadDim = Ktraits::kHeadDim;
  static constexpr int kStages = Ktraits::kStages;
  // kGmemThreadsPerRow threads share a row, so the TiledCopy's rows of one thread are
  // kRowStep apart; after the permutation they are kRows consecutive keys.
  static constexpr int kRowStep = Ktraits::kNThreads / Ktraits::kGmemThreadsPerRow;
  static constexpr int kRows = kBlockN / kRowStep;
  static_assert(kBlockN % kRowStep == 0);
  // Pages a run of kRows keys can touch: the first page, then ceil((kRows - 1) / 16) more.
  static constexpr int kSegments = 1 + (kRows + 14) / 16;

  // (kBlockN, d, stages) smem coordinates -> the permuted view: copy row r = a + kRowStep * b
  // (a = the copying thread's row0, b = m) is smem row a * kRows + b.
  static constexpr auto row_permutation() {
    return make_layout(make_shape(make_shape(Int<kRowStep>{}, Int<kRows>{}), Int<kHeadDim>{}, Int<kStages>{}),
                       make_stride(make_stride(Int<kRows>{}, _1{}), Int<kBlockN>{}, Int<kBlockN * kHeadDim>{}));
  }
  template <typename SmemTensor>
  __host__ __device__ static auto smem_view(SmemTensor const &s) {
    return make_tensor(s.data(), composition(s.layout(), row_permutation()));
  }

  const Flash_fwd_params &p;
  const int *table;                  // [max_blocks_per_seq] this sequence's row of block_table
  const Element *k_base, *v_base;    // page 0, slot 0 of this kv head, at this thread's first column
  int start;                         // logical position of key 0 (leftpad_k)
  int first;                         // this thread's first smem row of a tile: row0 * kRows
  int fetched_page[kSegments], fetched_slot;  // fetch()'s pages and first slot, for advance()
  // The advanced tile: row m lies at seg_k[j] + m * row stride (and seg_v[j]), j the number
  // of bounds[1..] at or below m.
  const Element *seg_k[kSegments], *seg_v[kSegments];
  int bounds[kSegments];

  // row0, col0: this thread's first (row, column) of a tile in the TiledCopy's partition.
  __device__ PagedKV(const Flash_fwd_params &p_, int bidb, int bidh_kv, int row0, int col0)
      : p(p_), table(p_.block_table + bidb * p_.block_table_batch_stride), first(row0 * kRows) {
    k_base = reinterpret_cast<const Element *>(p.k_ptr) + bidh_kv * p.k_head_stride + col0;
    v_base = reinterpret_cast<const Element *>(p.v_ptr) + bidh_kv * p.v_head_stride + col0;
    start = p.leftpad_k == nullptr ? 0 : max(p.leftpad_k[bidb], 0);
  }

  // Issues the table loads for this thread's rows of key tile n_block (keys n_block * kBlockN
  // + row); they are waited for only at advance(). A tile before the sequence (prefetched
  // past the first) or past the table reads clamped entries; the copies skip such rows.
  __device__ void fetch(int n_block) {
    const int pos = max(start + n_block * kBlockN + first, 0);
    const int block = pos / p.page_size;
    fetched_slot = pos - block * p.page_size;
    CUTE_UNROLL
    for (int j = 0; j < kSegments; ++j) { fetched_page[j] = page_of(block + j); }
  }
  // Makes the fetched tile the one copy_k / copy_v read.
  __device__ void advance() {
    // Segment 0 starts at row m = 0 (slot fetched_slot); segment j >= 1 at row bounds[j]
    // (slot 0), so its base is moved back by bounds[j] rows.
    const int rows_in_first = p.page_size - fetched_slot;
    CUTE_UNROLL
    for (int j = 0; j < kSegments; ++j) {
      const int m0 = j == 0 ? 0 : rows_in_first + (j - 1) * p.page_size;
      const int64_t slot0 = j == 0 ? fetched_slot : -int64_t(m0);
      bounds[j] = m0;
      seg_k[j] = k_base + fetched_page[j] * p.k_batch_stride + slot0 * p.k_row_stride;
      seg_v[j] = v_base + fetched_page[j] * p.v_batch_stride + slot0 * p.v_row_stride;
    }
  }
  // This thread's K (V) row m of the advanced tile (m < kRows: smem row first + m).
  __device__ const Element *k_row(int m) const { return pick(seg_k, m) + m * p.k_row_stride; }
  __device__ const Element *v_row(int m) const { return pick(seg_v, m) + m * p.v_row_stride; }

  // Copies this thread's rows of the advanced tile below max_rows into dst (CPY, CPY_N,
  // CPY_D), a partition of smem_view(); the other rows are zero-filled, as are the columns
  // at or past kv_d (a cache head dim below the kernel's). row_layout: (CPY, CPY_D), where
  // one row's chunks of this thread lie from its first one; coord: the TiledCopy's identity
  // partition (its columns).
  template <typename TiledCopy, typename RowLayout, typename Dst, typename Coord>
  __device__ void copy_k(TiledCopy const &tiled_copy, RowLayout const &row_layout, Dst &&dst, Coord const &coord,
                         int max_rows) const {
    CUTE_UNROLL
    for (int m = 0; m < kRows; ++m) { copy_row(tiled_copy, k_row(m), row_layout, dst, coord, m, max_rows); }
  }
  template <typename TiledCopy, typename RowLayout, typename Dst, typename Coord>
  __device__ void copy_v(TiledCopy const &tiled_copy, RowLayout const &row_layout, Dst &&dst, Coord const &coord,
                         int max_rows) const {
    CUTE_UNROLL
    for (int m = 0; m < kRows; ++m) { copy_row(tiled_copy, v_row(m), row_layout, dst, coord, m, max_rows); }
  }

 private:
  __device__ const Element *pick(const Element *const (&seg)[kSegments], int m) const {
    const Element *ptr = seg[0];
    CUTE_UNROLL
    for (int j = 1; j < kSegments; ++j) { ptr = m >= bounds[j] ? seg[j] : ptr; }
    return ptr;
  }
  // The physical page of logical page `block`, both clamped: past the table its last entry,
  // an entry outside [0, num_pages) page 0.
  __device__ int page_of(int block) const {
    const int pg = __ldg(table + min(block, p.max_blocks_per_seq - 1));
    return unsigned(pg) < unsigned(p.num_pages) ? pg : 0;
  }

  // Row m of dst (CPY, CPY_N, CPY_D) from the cache row at src, or zeros when its smem row
  // (first + m) is at or past max_rows; chunks at or past kv_d are zeros too.
  template <typename TiledCopy, typename RowLayout, typename Dst, typename Coord>
  __device__ void copy_row(TiledCopy const &tiled_copy, const Element *src_row, RowLayout const &row_layout,
                           Dst &dst, Coord const &coord, int m, int max_rows) const {
    if (first + m < max_rows) {
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
