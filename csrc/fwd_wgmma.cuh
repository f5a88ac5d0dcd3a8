// The forward on Hopper (sm_90a): wgmma.mma_async m64n128k16 instead of mma.sync (included by
// kernels.cuh after the mma.sync forward; same grid, launch order, splits, partials and merge).
//
// A CTA of 2 warpgroups (the same 256 threads) owns BM = 128 rows and walks vocabulary tiles of
// BN = 128 columns; warpgroup wg multiplies rows [64 wg, 64 wg + 64) by all 128 columns with one
// m64n128k16 per 16 of D, both operands read from shared memory by the tensor cores (no
// ldmatrix, no register fragments of A or B), fp32 accumulators in registers: 64 per thread and
// model. The accumulator layout is the m16n8 one of mma.sync repeated over 16 column blocks
// (PTX ISA, wgmma .m64nNk16 D fragments): thread (warp, lane) of a warpgroup holds rows
// 16 (warp % 4) + lane / 4 + {0, 8} and columns 8 j + 2 (lane % 4) + {0, 1}, so tile_math.h's
// tile_update<16> folds them, and each warp's quad holds whole rows (no cross-warp merge).
//
// Shared memory: a ring of kStagesWgmma slices of 32 of D, [A0 | A1 | B] each, K-major with the
// 64-byte swizzle of wgmma: a row of a slice is 64 bytes, 8 rows form a 512-byte atom (the
// descriptor's stride byte offset), and inside an atom the 16-byte chunk c of row r sits at
// chunk c ^ ((r / 2) % 4) (shared-memory address bits [4, 5] ^= bits [7, 8]); the leading byte
// offset is unused (a k16 step never leaves the 64-byte row). Chosen over the no-swizzle layout,
// whose two byte offsets the PTX ISA and Triton's hardware-tested encoder assign the opposite
// way round for K-major operands; for swizzled K-major operands the sources agree. cp.async
// writes one 16-byte chunk per copy (a warp: 8 whole rows, all 32 banks), with the L2 hints of
// the mma.sync forward. Stages sit at multiples of 512 bytes from a 1024-byte aligned base.
//
// Pipeline, across vocabulary tiles (the ring never drains between tiles): slice q is multiplied
// while slices q+1, q+2 load; wgmma.wait_group 1 leaves slice q's products in flight while the
// next slice is waited for, so the tensor cores queue one slice ahead. A stage is refilled two
// slices after the products that read it were issued, by which time every thread has retired
// them (wait_group 1 at the end of the next slice, then the barrier before the refill). With a
// shared weight (SHARED) each B slice feeds both models; separate weights run all of D for the
// policy, then all of Dr for the reference, per tile, in two loops: no branch between the
// products of a slice (ptxas closes a wgmma group at each branch). The epilogue (exponentials)
// waits for all products of the tile (wait_group 0): one pair of accumulators fits the
// registers, not two.
#pragma once

namespace fgpo {

constexpr int WG_STAGES = kStagesWgmma;
constexpr int WG_AHEAD = WG_STAGES - 2;        // slices loaded ahead of the one multiplied
constexpr int WG_ROWS = BM / 2;                // rows per warpgroup
constexpr int kRowBytes = BK * 2;              // one row of a slice: one 64-byte swizzle span
constexpr int kAtomBytes = 8 * kRowBytes;      // 8 rows: the descriptor's stride byte offset
constexpr uint64_t kSwizzle64 = 2;             // descriptor layout type: 64-byte swizzle
constexpr int kWgStageElems = (2 * BM + BN) * BK;
constexpr int kWgSmem = WG_STAGES * kWgStageElems * 2;
static_assert(BM == 2 * 64 && BN == 128 && THREADS == 256, "2 warpgroups of m64n128");
static_assert(kRowBytes == 64 && WG_AHEAD >= 1, "64-byte rows (16-bit, BK 32); a slice ahead");
static_assert(kWgSmem <= kMaxSmemBytes, "fits the shared memory the launcher opts in to");

// Shared-memory matrix descriptor (PTX ISA "matrix descriptor"): start address >> 4, leading
// byte offset (unused with a swizzle along K: 1, as CUTLASS sets it), stride byte offset >> 4,
// base offset 0 (stages are 512-byte aligned), layout type 64-byte swizzle.
__device__ __forceinline__ uint64_t wg_desc(const void* p) {
  return static_cast<uint64_t>((smem_u32(p) & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
         (static_cast<uint64_t>(kAtomBytes >> 4) << 32) | (kSwizzle64 << 62);
}

#ifndef FGPO_EMULATE
// Generic-proxy writes (cp.async) become visible to the async proxy that wgmma reads through.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
#define FGPO_ACC4(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define FGPO_WGMMA_M64N128K16(AB)                                                              \
  asm volatile(                                                                                \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                             \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." AB "." AB " "                             \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "  \
      "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "   \
      "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"  \
      : FGPO_ACC4(0), FGPO_ACC4(1), FGPO_ACC4(2), FGPO_ACC4(3), FGPO_ACC4(4), FGPO_ACC4(5),    \
        FGPO_ACC4(6), FGPO_ACC4(7), FGPO_ACC4(8), FGPO_ACC4(9), FGPO_ACC4(10), FGPO_ACC4(11),  \
        FGPO_ACC4(12), FGPO_ACC4(13), FGPO_ACC4(14), FGPO_ACC4(15)                             \
      : "l"(da), "l"(db), "r"(acc))

// d (64 rows x 128 columns of fp32, the warpgroup's) = A B^T (+ d when acc, scale-d) over 16 of
// K: A (64 x 16) and B (128 x 16) K-major in shared memory (no transpose).
template <typename T>
struct Wgmma;
template <>
struct Wgmma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[16][4], uint64_t da, uint64_t db,
                                             int acc) {
    FGPO_WGMMA_M64N128K16("bf16");
  }
};
template <>
struct Wgmma<__half> {
  static __device__ __forceinline__ void run(float (&d)[16][4], uint64_t da, uint64_t db,
                                             int acc) {
    FGPO_WGMMA_M64N128K16("f16");
  }
};
#undef FGPO_WGMMA_M64N128K16
#undef FGPO_ACC4
#endif  // !FGPO_EMULATE

// rows [row0, row0 + ROWS) x columns [k0, k0 + BK) of a row-major (nrows, K) matrix into the
// swizzled layout above; 4 consecutive threads fill one row (64 contiguous bytes read from global
// memory). Out-of-range chunks are zero-filled.
template <int ROWS, L2Hint HINT, typename T>
__device__ __forceinline__ void load_swizzled(T* s, const T* g, long long nrows, long long K,
                                              long long row0, long long k0) {
  constexpr int CPR = BK / 8;  // 16-byte chunks per row
  static_assert(ROWS * CPR % THREADS == 0 && CPR == 4, "whole copies per thread; 64-byte rows");
#pragma unroll
  for (int i = 0; i < ROWS * CPR / THREADS; ++i) {
    const int q = threadIdx.x + i * THREADS;
    const int r = q / CPR, kc = q % CPR;
    long long gr = row0 + r, gk = k0 + kc * 8;
    bool ok = gr < nrows && gk < K;
    const T* src = ok ? g + gr * K + gk : g;
    cp_async16(s + r * BK + ((kc ^ ((r >> 1) & 3)) * 8), src, ok ? 16 : 0, HINT);
  }
}

// KL: both models (else log-probabilities only); SHARED: the reference uses the policy's W.
template <typename T, bool KL, bool SHARED>
__global__ void __launch_bounds__(THREADS, 1)
    fgpo_fwd_wgmma_kernel(const T* __restrict__ h, const T* __restrict__ hr,
                          const T* __restrict__ w, const T* __restrict__ wr, long long n,
                          long long d, long long dr, long long v, float inv_t,
                          int tiles_per_split, int splits, int group,
                          float* __restrict__ partial) {
#if defined(FGPO_EMULATE) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(KL || !SHARED, "log-prob mode has no reference");
  FGPO_DYNAMIC_SMEM(smem_raw, kWgSmem);
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wg = warp / 4, g = lane / 4, c = lane % 4;
  const GridPos pos = grouped_pos(blockIdx.x, (n + BM - 1) / BM, splits, group);
  const long long row0 = pos.row * BM;
  const long long n_tiles = (v + BN - 1) / BN;
  const long long t0 = pos.col * tiles_per_split;
  const long long t1 = t0 + tiles_per_split < n_tiles ? t0 + tiles_per_split : n_tiles;
  const int kd = static_cast<int>((d + BK - 1) / BK);
  const int kdr = KL && !SHARED ? static_cast<int>((dr + BK - 1) / BK) : 0;
  const int per_tile = kd + kdr;  // slices per vocabulary tile
  const long long total = (t1 - t0) * per_tile;

  // Slice q of this CTA: tile t0 + q / per_tile, slice s = q % per_tile of the policy (s < kd)
  // or of the reference (separate weights), into stage q % WG_STAGES.
  auto load = [&](long long q) {
    T* st = smem + (q % WG_STAGES) * kWgStageElems;
    const long long v0 = (t0 + q / per_tile) * BN;
    const int s = static_cast<int>(q % per_tile);
    const bool ref = s >= kd;
    const long long k0 = static_cast<long long>(ref ? s - kd : s) * BK;
    const long long K = ref ? dr : d;
    load_swizzled<BM, L2Hint::keep>(st, ref ? hr : h, n, K, row0, k0);
    if (SHARED) load_swizzled<BM, L2Hint::keep>(st + BM * BK, hr, n, d, row0, k0);
    load_swizzled<BN, L2Hint::stream>(st + 2 * BM * BK, ref ? wr : w, v, K, v0, k0);
  };

  KLState st[2];  // rows wg*64 + (warp%4)*16 + g + 8*half of the tile
  LseState ls[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    st[half] = kl_init();
    ls[half] = lse_init();
  }
  float z[16][4], zr[16][4];  // written first by a product with scale-d = 0 (no zeroing:
                              // register writes outside wgmma make ptxas serialize it)

#pragma unroll
  for (int s = 0; s < WG_AHEAD; ++s) {
    if (s < total) load(s);
    cp_async_commit();
  }
  long long q = 0;  // slices multiplied so far (the ring runs on across tiles)
  // Multiply slice q (its s-th of the model's loop) with `products(a0, b, acc)`.
  auto slice = [&](int s, auto products) {
    cp_async_wait<WG_AHEAD - 1>();  // this thread's copies of slice q landed
    fence_proxy_async();
    __syncthreads();  // everyone's landed; everyone retired the products of slice q - 2
    if (q + WG_AHEAD < total) load(q + WG_AHEAD);  // into the stage slice q - 2 used
    cp_async_commit();
    const T* sl = smem + (q % WG_STAGES) * kWgStageElems;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {  // a k16 step: 32 bytes further along each row
      products(sl + wg * WG_ROWS * BK + kk * 16, wg_desc(sl + 2 * BM * BK + kk * 16),
               kk > 0 || s > 0);  // a model's first product of a tile overwrites
    }
    wgmma_commit();
    wgmma_wait<1>();  // slice q's products stay in flight; slice q - 1's retire
    ++q;
  };
  for (long long t = t0; t < t1; ++t) {
    if (SHARED) {
      for (int s = 0; s < kd; ++s)
        slice(s, [&](const T* a, uint64_t db, int acc) {
          Wgmma<T>::run(z, wg_desc(a), db, acc);
          Wgmma<T>::run(zr, wg_desc(a + BM * BK), db, acc);
        });
    } else {
      for (int s = 0; s < kd; ++s)
        slice(s, [&](const T* a, uint64_t db, int acc) { Wgmma<T>::run(z, wg_desc(a), db, acc); });
      for (int s = 0; s < kdr; ++s)
        slice(s, [&](const T* a, uint64_t db, int acc) { Wgmma<T>::run(zr, wg_desc(a), db, acc); });
    }
    wgmma_wait<0>();  // the tile's logits are complete
    const long long v0 = t * BN;
#pragma unroll
    for (int half = 0; half < 2; ++half) tile_update<16, KL>(st[half], ls[half], z, zr, half, c,
                                                             v0, v, inv_t);
  }
  cp_async_wait<0>();  // the trailing empty groups

  constexpr int NS = KL ? kStatsKL : kStatsLP;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    quad_merge<KL>(st[half], ls[half]);
    const long long row = row0 + wg * WG_ROWS + (warp % 4) * 16 + g + 8 * half;
    if (c == 0 && row_valid(row, n)) store_partial<KL>(partial + pos.col * NS * n + row, n,
                                                       st[half], ls[half]);
  }
#endif
}

}  // namespace fgpo
