// Forward and backward kernels of the fused token statistics (tensor cores: mma.sync m16n8k16).
//
// Layout. A CTA of 8 warps owns BM = 128 rows and walks vocabulary tiles of BN = 128 columns;
// the warps form a 4 (rows) x 2 (columns) grid, each computing a 32 x 64 piece of the logit tile
// (2 x 8 m16n8 accumulators per dot). Per vocabulary tile the logits z = h W^T (and
// zr = hr Wr^T) are accumulated in fp32 registers over D in BK = 32 slices that cp.async brings
// into a 3-stage shared-memory ring; ldmatrix feeds the tensor cores. With a shared weight, one
// W slice serves both dots (twice the mma work per shared-memory byte).
//
// Forward: each thread keeps the online statistics of tile_math.h for its 4 rows over its own
// columns; at the end they are merged across the quad (shuffles) and across the 2 column warps
// (shared memory), and one partial per (row, vocabulary split) is written; fgpo_merge_kernel
// folds the splits (log-sum-exp merge) into lse, lser, fkl, rkl.
//
// Backward: each CTA recomputes one 128 x 128 logit tile, turns it into G (and Gr) in registers,
// stores them in the input dtype in shared memory (the only logits that ever exist), and
// multiplies them out chunk by chunk over D: dh += G W / T (A = G, B = W chunk through
// ldmatrix.trans) and dW += G^T h / T (A = G^T and B = h chunk, both through ldmatrix.trans).
// The fp32 results are added to global memory with reductions (red.global.add.v2.f32 on sm_90).
#pragma once

#include <stdint.h>

#include <stdexcept>
#include <string>

#ifdef FGPO_EMULATE
#include "emulate.h"  // CPU stand-ins for the PTX below (tests/test_cuda_math.py)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "launch.h"
#include "tile_math.h"

namespace fgpo {

constexpr int BM = kBlockRows;   // rows per CTA
constexpr int BN = kBlockVocab;  // vocabulary columns per tile
constexpr int WARPS_M = 4;       // warp grid over the tile: rows x columns
constexpr int WARPS_N = 2;
constexpr int WARPS = WARPS_M * WARPS_N;
constexpr int THREADS = 32 * WARPS;
constexpr int WTM = BM / WARPS_M;  // warp tile: 32 rows x 64 columns
constexpr int WTN = BN / WARPS_N;
constexpr int MT = WTM / 16;  // m16 tiles per warp
constexpr int NT = WTN / 8;   // n8 tiles per warp
constexpr int BK = kBlockK;   // reduction slice over D
constexpr int LDS = BK + 8;   // padded smem row (80 B): ldmatrix rows hit distinct banks
constexpr int STAGES = kStages;
constexpr int DC = kChunkD;   // backward: D chunk multiplied out at a time
constexpr int LDG = BN + 8;   // padded rows of the G tile
constexpr int LDC = DC + 8;   // padded rows of the backward chunks
// Backward products (M = BM rows for dh, BN vocabulary rows for dW; N = DC): the same warp grid.
constexpr int BWM = BM / WARPS_M;  // 32
constexpr int BWN = DC / WARPS_N;  // 32
constexpr int BMT = BWM / 16;
constexpr int BNT = BWN / 8;

static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile: m16 x n16 steps");
static_assert(BN == BM, "the dW pass maps vocabulary rows onto the same warp grid as rows");
static_assert(BK % 16 == 0 && DC % (16 * WARPS_N) == 0, "k16 / n16 steps");

// Shared memory (dynamic): the main-loop ring, reused after it by the epilogues.
constexpr int kStageElems = (2 * BM + BN) * LDS;
constexpr int kMainBytes = STAGES * kStageElems * 2;
constexpr int kXchgBytes = WARPS_N * BM * kStatsKL * 4;  // forward cross-warp merge
constexpr int kBwdBytes = (2 * BM * LDG + BN * LDC + 2 * BM * LDC) * 2;
constexpr int kFwdSmem = kMainBytes > kXchgBytes ? kMainBytes : kXchgBytes;
constexpr int kBwdSmem = kMainBytes > kBwdBytes ? kMainBytes : kBwdBytes;
static_assert(kBwdSmem <= 160 * 1024, "fits sm_80 (164 KB) and sm_90 (227 KB) per CTA");
static_assert(kFwdSmem <= kMaxSmemBytes && kBwdSmem == kMaxSmemBytes, "update launch.h");

// L2 residency of the tiles a cp.async brings in (PTX createpolicy + .L2::cache_hint, sm_80+).
// The launch order (launch.h grouped_pos, fgpo_kernels/_launch.py) keeps a group's hidden-state
// blocks in L2 while its CTAs sweep the vocabulary: hidden states are loaded evict_last, weight
// slices evict_first, so a weight tile occupies L2 only while the CTAs of one wave that share it
// read the same slices, and the wave's working set fits half of the L2 (H100/H200).
enum class L2Hint : int { keep = 0, stream = 1 };  // evict_last (H), evict_first (W)

#ifndef FGPO_EMULATE
// ---- PTX wrappers -------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The 64-bit L2 cache policy of a hint (not volatile: the compiler may hoist and share it).
__device__ __forceinline__ uint64_t l2_policy(L2Hint hint) {
  uint64_t p;
  if (hint == L2Hint::keep) {
    asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(p));
  } else {
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(p));
  }
  return p;
}

// 16-byte async copy with an L2 residency hint; src_bytes = 0 zero-fills the destination
// without reading.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes,
                                           L2Hint hint) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(src_bytes), "l"(l2_policy(hint))
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float x, float y) {
    __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float x, float y) {
    __half2 v = __floats2half2_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// dst[0] += a, dst[1] += b (8-byte aligned): one vector reduction on sm_90, two before it.
__device__ __forceinline__ void red_add2(float* dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(a), "f"(b) : "memory");
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

// 1024-byte aligned: wgmma's swizzled operands (fwd_wgmma.cuh) take the pattern from absolute
// shared-memory address bits.
#define FGPO_DYNAMIC_SMEM(name, bytes) extern __shared__ __align__(1024) unsigned char name[]
#define FGPO_LAUNCH(kern, grid, block, smem, stream, ...) \
  kern<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif  // !FGPO_EMULATE

// ---- tile loads ---------------------------------------------------------------------------------

// rows [row0, row0 + ROWS) x columns [k0, k0 + COLS) of a row-major (nrows, K) matrix into smem
// with row pitch LD; out-of-range 16-byte chunks are zero-filled (K % 8 == 0, so a chunk is
// either wholly inside or wholly outside). HINT: hidden states keep, weights stream (above).
template <int ROWS, int COLS, int LD, L2Hint HINT, typename T>
__device__ __forceinline__ void load_tile(T* s, const T* g, long long nrows, long long K,
                                          long long row0, long long k0) {
  constexpr int CPR = COLS / 8;  // chunks per row
#pragma unroll
  for (int c = threadIdx.x; c < ROWS * CPR; c += THREADS) {
    int r = c / CPR, kc = (c % CPR) * 8;
    long long gr = row0 + r, gk = k0 + kc;
    bool ok = gr < nrows && gk < K;
    const T* src = ok ? g + gr * K + gk : g;
    cp_async16(s + r * LD + kc, src, ok ? 16 : 0, HINT);
  }
}

// ---- main loop: acc0 = A0[rows] B^T (and acc1 = A1[rows] B^T) over K ----------------------------

template <typename T, bool TWO>
__device__ __forceinline__ void mainloop(float (&acc0)[MT][NT][4], float (&acc1)[MT][NT][4],
                                         T* smem, const T* a0, const T* a1, const T* b,
                                         long long n, long long v, long long K, long long row0,
                                         long long v0) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc0[mt][j][e] = 0.f;
        if (TWO) acc1[mt][j][e] = 0.f;
      }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp % WARPS_M, wn = warp / WARPS_M;
  const int kt_n = static_cast<int>((K + BK - 1) / BK);

  auto load = [&](int stage, int kt) {
    T* st = smem + stage * kStageElems;
    load_tile<BM, BK, LDS, L2Hint::keep>(st, a0, n, K, row0, (long long)kt * BK);
    if (TWO)
      load_tile<BM, BK, LDS, L2Hint::keep>(st + BM * LDS, a1, n, K, row0, (long long)kt * BK);
    load_tile<BN, BK, LDS, L2Hint::stream>(st + 2 * BM * LDS, b, v, K, v0, (long long)kt * BK);
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < kt_n) load(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < kt_n; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // slice kt landed for everyone; slice kt-1's buffer is free
    {
      int nk = kt + STAGES - 1;
      if (nk < kt_n) load(nk % STAGES, nk);
      cp_async_commit();
    }
    const T* st = smem + (kt % STAGES) * kStageElems;
    const T* sa0 = st + (wm * WTM) * LDS;
    const T* sa1 = st + (BM + wm * WTM) * LDS;
    const T* sb = st + (2 * BM + wn * WTN) * LDS;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t fa0[MT][4], fa1[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int a_off = (mt * 16 + (lane % 16)) * LDS + kk * 16 + (lane / 16) * 8;
        ldsm_x4(fa0[mt], sa0 + a_off);
        if (TWO) ldsm_x4(fa1[mt], sa1 + a_off);
      }
#pragma unroll
      for (int jp = 0; jp < NT / 2; ++jp) {
        uint32_t fb[4];
        ldsm_x4(fb, sb + (jp * 16 + (lane % 8) + (lane / 16) * 8) * LDS + kk * 16 +
                        ((lane / 8) % 2) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma<T>::run(acc0[mt][2 * jp], fa0[mt], fb[0], fb[1]);
          Mma<T>::run(acc0[mt][2 * jp + 1], fa0[mt], fb[2], fb[3]);
          if (TWO) {
            Mma<T>::run(acc1[mt][2 * jp], fa1[mt], fb[0], fb[1]);
            Mma<T>::run(acc1[mt][2 * jp + 1], fa1[mt], fb[2], fb[3]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring may be reused by the caller
}

// Recompute the logit tile(s) for rows [row0, row0+BM) x vocabulary [v0, v0+BN).
template <typename T, bool KL>
__device__ __forceinline__ void logit_tiles(float (&z)[MT][NT][4], float (&zr)[MT][NT][4],
                                            T* smem, const T* h, const T* hr, const T* w,
                                            const T* wr, long long n, long long d, long long dr,
                                            long long v, long long row0, long long v0) {
  if (!KL) {
    mainloop<T, false>(z, zr, smem, h, nullptr, w, n, v, d, row0, v0);
  } else if (wr == nullptr) {  // shared weight: one W slice feeds both dots
    mainloop<T, true>(z, zr, smem, h, hr, w, n, v, d, row0, v0);
  } else {
    mainloop<T, false>(z, zr, smem, h, nullptr, w, n, v, d, row0, v0);
    mainloop<T, false>(zr, z, smem, hr, nullptr, wr, n, v, dr, row0, v0);
  }
}

// ---- forward ------------------------------------------------------------------------------------

// Merge the statistics of one row across the 4 threads of a quad (their column subsets).
template <bool KL>
__device__ __forceinline__ void quad_merge(KLState& s, LseState& l) {
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    if (KL) {
      KLState o;
      o.m = __shfl_xor_sync(0xffffffffu, s.m, off);
      o.s = __shfl_xor_sync(0xffffffffu, s.s, off);
      o.a = __shfl_xor_sync(0xffffffffu, s.a, off);
      o.mr = __shfl_xor_sync(0xffffffffu, s.mr, off);
      o.sr = __shfl_xor_sync(0xffffffffu, s.sr, off);
      o.b = __shfl_xor_sync(0xffffffffu, s.b, off);
      kl_merge(s, o);
    } else {
      LseState o;
      o.m = __shfl_xor_sync(0xffffffffu, l.m, off);
      o.s = __shfl_xor_sync(0xffffffffu, l.s, off);
      lse_merge(l, o);
    }
  }
}

// The statistics of one row at p[0], p[stride], ... (a split's partial, or the exchange buffer).
template <bool KL>
__device__ __forceinline__ void store_partial(float* p, long long stride, const KLState& s,
                                              const LseState& l) {
  if (KL) {
    p[0 * stride] = s.m;
    p[1 * stride] = s.s;
    p[2 * stride] = s.a;
    p[3 * stride] = s.mr;
    p[4 * stride] = s.sr;
    p[5 * stride] = s.b;
  } else {
    p[0 * stride] = l.m;
    p[1 * stride] = l.s;
  }
}

// 1-D grid of row blocks x vocabulary splits in grouped order (launch.h grouped_pos); each split
// walks tiles [t0, t1).
template <typename T, bool KL>
__global__ void __launch_bounds__(THREADS, 1)
    fgpo_fwd_kernel(const T* __restrict__ h, const T* __restrict__ hr, const T* __restrict__ w,
                    const T* __restrict__ wr, long long n, long long d, long long dr, long long v,
                    float inv_t, int tiles_per_split, int splits, int group,
                    float* __restrict__ partial) {
  FGPO_DYNAMIC_SMEM(smem_raw, kFwdSmem);
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp % WARPS_M, wn = warp / WARPS_M;
  const int g = lane / 4, c = lane % 4;
  const GridPos pos = grouped_pos(blockIdx.x, (n + BM - 1) / BM, splits, group);
  const long long row0 = pos.row * BM;
  const long long n_tiles = (v + BN - 1) / BN;
  const long long t0 = pos.col * tiles_per_split;
  const long long t1 = t0 + tiles_per_split < n_tiles ? t0 + tiles_per_split : n_tiles;

  KLState st[MT][2];  // rows wm*WTM + mt*16 + g + 8*half of the tile
  LseState ls[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      st[mt][half] = kl_init();
      ls[mt][half] = lse_init();
    }
  float z[MT][NT][4], zr[MT][NT][4];

  for (long long t = t0; t < t1; ++t) {
    const long long v0 = t * BN;
    logit_tiles<T, KL>(z, zr, smem, h, hr, w, wr, n, d, dr, v, row0, v0);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half)
        tile_update<NT, KL>(st[mt][half], ls[mt][half], z[mt], zr[mt], half, c, v0 + wn * WTN, v,
                            inv_t);
  }

  // Merge the quad's column subsets (shuffles), then the column warps (shared memory; the ring
  // is free: the last main loop ended with a barrier).
  float* xs = reinterpret_cast<float*>(smem_raw);  // [WARPS_N][kStatsKL][BM]
  constexpr int NS = KL ? kStatsKL : kStatsLP;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      quad_merge<KL>(st[mt][half], ls[mt][half]);
      if (c == 0) store_partial<KL>(xs + (wn * NS) * BM + wm * WTM + mt * 16 + g + 8 * half, BM,
                                    st[mt][half], ls[mt][half]);
    }
  __syncthreads();
  for (int r = threadIdx.x; r < BM; r += THREADS) {
    const long long row = row0 + r;
    if (!row_valid(row, n)) continue;
    KLState acc = kl_init();
    LseState lacc = lse_init();
    for (int q = 0; q < WARPS_N; ++q) {
      const float* x = xs + (q * NS) * BM + r;
      if (KL) {
        KLState o = {x[0], x[BM], x[2 * BM], x[3 * BM], x[4 * BM], x[5 * BM]};
        kl_merge(acc, o);
      } else {
        LseState o = {x[0], x[BM]};
        lse_merge(lacc, o);
      }
    }
    store_partial<KL>(partial + pos.col * NS * n + row, n, acc, lacc);
  }
}

// One thread per row: fold the vocabulary splits and finish the statistics.
template <bool KL>
__global__ void fgpo_merge_kernel(const float* __restrict__ partial, int splits, long long n,
                                  float* __restrict__ lse, float* __restrict__ lser,
                                  float* __restrict__ fkl, float* __restrict__ rkl) {
  const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= n) return;
  if (KL) {
    KLState st = kl_init();
    for (int s = 0; s < splits; ++s) {
      const float* p = partial + (long long)s * kStatsKL * n + row;
      KLState o = {p[0], p[n], p[2 * n], p[3 * n], p[4 * n], p[5 * n]};
      kl_merge(st, o);
    }
    KLStats o = kl_finish(st);
    lse[row] = o.lse;
    lser[row] = o.lser;
    fkl[row] = o.fkl;
    rkl[row] = o.rkl;
  } else {
    LseState st = lse_init();
    for (int s = 0; s < splits; ++s) {
      const float* p = partial + (long long)s * kStatsLP * n + row;
      LseState o = {p[0], p[n]};
      lse_merge(st, o);
    }
    lse[row] = lse_finish(st);
  }
}

}  // namespace fgpo

#include "fwd_wgmma.cuh"  // the sm_90a forward (wgmma)

namespace fgpo {

// ---- backward -----------------------------------------------------------------------------------

__device__ __forceinline__ float ld_or0(const float* p, long long i) { return p ? p[i] : 0.f; }

// acc (BMT x BNT m16n8 tiles) = A[m rows, k] B[k, n] over k in [0, K16 * 16): A from an smem tile
// (row-major [m][k], or [k][m] when A_TRANS), B from a row-major [k][n] smem tile.
template <typename T, bool A_TRANS, int K16>
__device__ __forceinline__ void smem_product(float (&acc)[BMT][BNT][4], const T* a, int lda,
                                             const T* b, int ldb, int m0, int n0) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int kk = 0; kk < K16; ++kk) {
    uint32_t fa[BMT][4];
#pragma unroll
    for (int mt = 0; mt < BMT; ++mt) {
      if (A_TRANS) {
        ldsm_x4_t(fa[mt], a + (kk * 16 + (lane % 8) + (lane / 16) * 8) * lda + m0 + mt * 16 +
                              ((lane / 8) % 2) * 8);
      } else {
        ldsm_x4(fa[mt], a + (m0 + mt * 16 + (lane % 16)) * lda + kk * 16 + (lane / 16) * 8);
      }
    }
#pragma unroll
    for (int jp = 0; jp < BNT / 2; ++jp) {
      uint32_t fb[4];
      ldsm_x4_t(fb, b + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * ldb + n0 + jp * 16 +
                        (lane / 16) * 8);
#pragma unroll
      for (int mt = 0; mt < BMT; ++mt) {
        Mma<T>::run(acc[mt][2 * jp], fa[mt], fb[0], fb[1]);
        Mma<T>::run(acc[mt][2 * jp + 1], fa[mt], fb[2], fb[3]);
      }
    }
  }
}

// out[(r0 + row) * K + d0 + col] += acc * scale for the warp's (row, col) fragment positions.
__device__ __forceinline__ void flush(float* out, const float (&acc)[BMT][BNT][4], long long r0,
                                      long long rows, long long K, long long d0, int m0, int n0,
                                      float scale) {
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
#pragma unroll
  for (int mt = 0; mt < BMT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const long long row = r0 + m0 + mt * 16 + g + 8 * half;
      if (row >= rows) continue;
#pragma unroll
      for (int j = 0; j < BNT; ++j) {
        const long long col = d0 + n0 + frag_col(j, c, 0);
        if (col < K) {
          red_add2(out + row * K + col, acc[mt][j][2 * half] * scale,
                   acc[mt][j][2 * half + 1] * scale);
        }
      }
    }
}

__device__ __forceinline__ void zero(float (&acc)[BMT][BNT][4]) {
#pragma unroll
  for (int mt = 0; mt < BMT; ++mt)
#pragma unroll
    for (int j = 0; j < BNT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mt][j][q] = 0.f;
}

// One side of the backward product for a weight Wk (V, K) and up to two (G tile, hidden, dh)
// entries that share it: dh_e += G_e Wk / T for each entry, dW += sum_e G_e^T H_e / T.
template <typename T, int NE>
__device__ __forceinline__ void bwd_side(T* smem, const T* const (&gs)[2], const T* wk,
                                         const T* const (&hk)[2], float* const (&dh)[2], float* dw,
                                         long long n, long long v, long long K, long long row0,
                                         long long v0, float inv_t) {
  bool any_dh = false;
#pragma unroll
  for (int e = 0; e < NE; ++e) any_dh |= dh[e] != nullptr;
  if (!any_dh && dw == nullptr) return;
  const int warp = threadIdx.x / 32;
  const int m0 = (warp % WARPS_M) * BWM, n0 = (warp / WARPS_M) * BWN;
  T* wc = smem + 2 * BM * LDG;  // (BN, DC) chunk of Wk
  T* hc = wc + BN * LDC;        // NE x (BM, DC) chunks of the hidden states
  float acc[BMT][BNT][4];

  if (dw == nullptr) {
    // No weight gradient (LoRA): only W chunks are needed, so they ping-pong between wc and the
    // (unused) hidden-state area; chunk i+1 streams in while chunk i is multiplied out.
    static_assert(BN * LDC <= BM * LDC, "second W buffer fits the hidden-state area");
    load_tile<BN, DC, LDC, L2Hint::stream>(wc, wk, v, K, v0, 0);
    cp_async_commit();
    int i = 0;
    for (long long d0 = 0; d0 < K; d0 += DC, ++i) {
      T* cur = (i & 1) ? hc : wc;  // a select, not an indexed array (which would hit the stack)
      T* nxt = (i & 1) ? wc : hc;
      if (d0 + DC < K) load_tile<BN, DC, LDC, L2Hint::stream>(nxt, wk, v, K, v0, d0 + DC);
      cp_async_commit();
      cp_async_wait<1>();  // chunk i has landed (chunk i+1 may still be in flight)
      __syncthreads();
#pragma unroll
      for (int e = 0; e < NE; ++e) {
        if (dh[e] == nullptr) continue;
        zero(acc);
        smem_product<T, false, BN / 16>(acc, gs[e], LDG, cur, LDC, m0, n0);
        flush(dh[e], acc, row0, n, K, d0, m0, n0, inv_t);
      }
      __syncthreads();  // cur is refilled at iteration i + 1
    }
    cp_async_wait<0>();
    return;
  }

  for (long long d0 = 0; d0 < K; d0 += DC) {
    load_tile<BN, DC, LDC, L2Hint::stream>(wc, wk, v, K, v0, d0);
#pragma unroll
    for (int e = 0; e < NE; ++e)
      load_tile<BM, DC, LDC, L2Hint::keep>(hc + e * BM * LDC, hk[e], n, K, row0, d0);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    // dh_e[rows, d0:d0+DC] += G_e[rows, :] Wc   (M = rows, N = DC, K = BN)
#pragma unroll
    for (int e = 0; e < NE; ++e) {
      if (dh[e] == nullptr) continue;
      zero(acc);
      smem_product<T, false, BN / 16>(acc, gs[e], LDG, wc, LDC, m0, n0);
      flush(dh[e], acc, row0, n, K, d0, m0, n0, inv_t);
    }
    // dW[vocab, d0:d0+DC] += sum_e G_e^T Hc_e   (M = vocabulary rows, N = DC, K = rows)
    zero(acc);
#pragma unroll
    for (int e = 0; e < NE; ++e)
      smem_product<T, true, BM / 16>(acc, gs[e], LDG, hc + e * BM * LDC, LDC, m0, n0);
    flush(dw, acc, v0, v, K, d0, m0, n0, inv_t);
    __syncthreads();  // the chunk buffers are refilled next iteration
  }
}

// 1-D grid of row blocks x vocabulary tiles in grouped order (launch.h grouped_pos): one BM x BN
// logit tile per CTA; the CTAs of a group reduce into the same dW rows while they are in L2.
template <typename T, bool KL>
__global__ void __launch_bounds__(THREADS, 1) fgpo_bwd_kernel(BwdArgs a) {
  FGPO_DYNAMIC_SMEM(smem_raw, kBwdSmem);
  T* smem = reinterpret_cast<T*>(smem_raw);
  const T* h = static_cast<const T*>(a.h);
  const T* hr = static_cast<const T*>(a.hr);
  const T* w = static_cast<const T*>(a.w);
  const T* wr = static_cast<const T*>(a.wr);
  const long long n = a.n, v = a.v;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp % WARPS_M, wn = warp / WARPS_M;
  const int g = lane / 4, c = lane % 4;
  const GridPos pos = grouped_pos(blockIdx.x, (n + BM - 1) / BM, (v + BN - 1) / BN, a.group);
  const long long v0 = pos.col * BN;
  const long long row0 = pos.row * BM;

  float z[MT][NT][4], zr[MT][NT][4];
  logit_tiles<T, KL>(z, zr, smem, h, hr, w, wr, n, a.d, a.dr, v, row0, v0);

  // G (and Gr) into shared memory, in the input dtype; masked rows/columns are exact zeros.
  T* gs = smem;
  T* grs = smem + BM * LDG;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int lrow = wm * WTM + mt * 16 + g + 8 * half;
      const long long row = row0 + lrow;
      const bool rv = row_valid(row, n);
      RowGrad rg = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (rv) {
        rg.lse = a.lse[row];
        rg.g_lp = ld_or0(a.g_lp, row);
        if (KL) {
          rg.lser = a.lser[row];
          rg.fkl = a.fkl[row];
          rg.rkl = a.rkl[row];
          rg.g_fkl = ld_or0(a.g_fkl, row);
          rg.g_rkl = ld_or0(a.g_rkl, row);
          rg.g_lpr = ld_or0(a.g_lpr, row);
        }
      }
      float gv[NT][2], grv[NT][2];
      tile_grads<NT, KL>(gv, grv, z[mt], zr[mt], half, c, v0 + wn * WTN, v, rv, rg, a.inv_t);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int off = lrow * LDG + wn * WTN + frag_col(j, c, 0);
        *reinterpret_cast<uint32_t*>(gs + off) = Mma<T>::pack(gv[j][0], gv[j][1]);
        if (KL) *reinterpret_cast<uint32_t*>(grs + off) = Mma<T>::pack(grv[j][0], grv[j][1]);
      }
    }
  __syncthreads();

  if (!KL) {
    const T* gl[2] = {gs, nullptr};
    const T* hl[2] = {h, nullptr};
    float* dl[2] = {a.dh, nullptr};
    bwd_side<T, 1>(smem, gl, w, hl, dl, a.dw, n, v, a.d, row0, v0, a.inv_t);
  } else if (wr == nullptr) {
    const T* gl[2] = {gs, grs};
    const T* hl[2] = {h, hr};
    float* dl[2] = {a.dh, a.dhr};
    bwd_side<T, 2>(smem, gl, w, hl, dl, a.dw, n, v, a.d, row0, v0, a.inv_t);
  } else {
    const T* gl[2] = {gs, nullptr};
    const T* hl[2] = {h, nullptr};
    float* dl[2] = {a.dh, nullptr};
    bwd_side<T, 1>(smem, gl, w, hl, dl, a.dw, n, v, a.d, row0, v0, a.inv_t);
    const T* gl2[2] = {grs, nullptr};
    const T* hl2[2] = {hr, nullptr};
    float* dl2[2] = {a.dhr, nullptr};
    bwd_side<T, 1>(smem, gl2, wr, hl2, dl2, a.dwr, n, v, a.dr, row0, v0, a.inv_t);
  }
}

// ---- host launchers -----------------------------------------------------------------------------

inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fgpo_kernels._C: ") + what +
                             " launch failed: " + cudaGetErrorString(err));
  }
}

// Kernels above 48 KB of dynamic shared memory must opt in (per kernel, per device).
template <typename K>
inline void allow_smem(K kernel, int bytes, const char* what) {
#ifndef FGPO_EMULATE
  cudaError_t err = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fgpo_kernels._C: ") + what + " needs " +
                             std::to_string(bytes) + " bytes of shared memory per block: " +
                             cudaGetErrorString(err));
  }
#else
  (void)kernel;
  (void)bytes;
  (void)what;
#endif
}

template <typename T>
void launch_fwd(const FwdArgs& a) {
  const long long n_tiles = (a.v + BN - 1) / BN;
  const long long row_blocks = (a.n + BM - 1) / BM;
  int splits = a.splits < 1 ? 1 : a.splits;
  if (splits > n_tiles) splits = static_cast<int>(n_tiles);
  const int tps = static_cast<int>((n_tiles + splits - 1) / splits);
  splits = static_cast<int>((n_tiles + tps - 1) / tps);  // no empty split
  if (row_blocks * splits > 0x7fffffffLL) {
    throw std::invalid_argument("fgpo_kernels._C: too many rows or splits for one launch");
  }
  dim3 grid(static_cast<unsigned>(row_blocks * splits));
  const T* h = static_cast<const T*>(a.h);
  const T* hr = static_cast<const T*>(a.hr);
  const T* w = static_cast<const T*>(a.w);
  const T* wr = static_cast<const T*>(a.wr);
  const bool kl = a.hr != nullptr;
  decltype(&fgpo_fwd_kernel<T, true>) fwd;  // both forwards take the same arguments
  int smem;
  if (a.wgmma) {
#if defined(FGPO_EMULATE) || defined(FGPO_WGMMA)
    fwd = !kl               ? fgpo_fwd_wgmma_kernel<T, false, false>
          : a.wr == nullptr ? fgpo_fwd_wgmma_kernel<T, true, true>
                            : fgpo_fwd_wgmma_kernel<T, true, false>;
    smem = kWgSmem;
#else
    throw std::invalid_argument(
        "fgpo_kernels._C: the wgmma forward needs a build with an sm_90a target "
        "(FGPO_CUDA_ARCHS, e.g. '80;90a')");
#endif
  } else {
    fwd = kl ? fgpo_fwd_kernel<T, true> : fgpo_fwd_kernel<T, false>;
    smem = kFwdSmem;
  }
  allow_smem(fwd, smem, a.wgmma ? "forward (wgmma)" : "forward");
  FGPO_LAUNCH(fwd, grid, THREADS, smem, a.stream, h, hr, w, wr, a.n, a.d, a.dr, a.v, a.inv_t, tps,
              splits, a.group, a.partial);
  check_launch("forward");
  const int mt = 128;
  const unsigned mb = static_cast<unsigned>((a.n + mt - 1) / mt);
  auto merge = kl ? fgpo_merge_kernel<true> : fgpo_merge_kernel<false>;
  FGPO_LAUNCH(merge, mb, mt, 0, a.stream, a.partial, splits, a.n, a.lse, a.lser, a.fkl, a.rkl);
  check_launch("merge");
}

template <typename T>
void launch_bwd(const BwdArgs& a) {
  const long long n_tiles = (a.v + BN - 1) / BN;
  const long long row_blocks = (a.n + BM - 1) / BM;
  if (n_tiles * row_blocks > 0x7fffffffLL) {
    throw std::invalid_argument("fgpo_kernels._C: backward grid too large");
  }
  dim3 grid(static_cast<unsigned>(n_tiles * row_blocks));
  auto bwd = a.hr != nullptr ? fgpo_bwd_kernel<T, true> : fgpo_bwd_kernel<T, false>;
  allow_smem(bwd, kBwdSmem, "backward");
  FGPO_LAUNCH(bwd, grid, THREADS, kBwdSmem, a.stream, a);
  check_launch("backward");
}

}  // namespace fgpo
