// Forward and backward kernels of the fused token statistics (tensor cores: mma.sync m16n8k16).
//
// Layout. A CTA of 4 warps owns BM = 64 rows and walks vocabulary tiles of BN = 64 columns; warp
// w owns rows 16w..16w+15 of every tile (the FlashAttention-2 split), so each row's running
// statistics live in the 4 threads of one quad and need no shared memory. Per vocabulary tile the
// logits z = h W^T (and zr = hr Wr^T) are accumulated in fp32 registers over D in BK = 32 slices
// that cp.async brings into a 3-stage shared-memory ring; ldmatrix feeds the tensor cores.
//
// Forward: each thread keeps the online statistics of tile_math.h for its 2 rows over its own
// columns, merges them across the quad at the end, and writes one partial per (row, vocabulary
// split); fgpo_merge_kernel folds the splits (log-sum-exp merge) into lse, lser, fkl, rkl.
// With a shared weight, one W slice in shared memory serves both dots.
//
// Backward: each CTA recomputes one 64 x 64 logit tile, turns it into G (and Gr) in registers,
// stores them in the input dtype in shared memory (the only logits that ever exist), and
// multiplies them out chunk by chunk over D: dh += G W / T (A = G, B = W chunk through
// ldmatrix.trans) and dW += G^T h / T (A = G^T and B = h chunk, both through ldmatrix.trans).
// The fp32 results are added to global memory with atomics (red.global.add.f32).
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
constexpr int BK = 32;           // reduction slice over D
constexpr int LDS = BK + 8;      // padded smem row (80 B): ldmatrix rows hit distinct banks
constexpr int STAGES = 3;
constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;
constexpr int NT = BN / 8;  // n8 tiles per warp row strip
constexpr int DC = 64;      // backward: D chunk multiplied out at a time
constexpr int LDG = BN + 8;  // padded rows of the G tile (144 B)
constexpr int LDC = DC + 8;  // padded rows of the backward chunks (144 B)

static_assert(BM == 16 * WARPS, "one 16-row strip per warp");
static_assert(BN == BM, "the dW pass maps 16 vocabulary rows to each warp");
static_assert(BK % 16 == 0 && BN % 16 == 0 && DC % 16 == 0, "k16 / n16 steps");

// Shared memory: the main-loop ring, reused after it by the backward epilogue.
constexpr int kStageElems = (2 * BM + BN) * LDS;
constexpr int kMainBytes = STAGES * kStageElems * 2;
constexpr int kBwdBytes = (2 * BM * LDG + BN * LDC + 2 * BM * LDC) * 2;
constexpr int kSmemBytes = kMainBytes > kBwdBytes ? kMainBytes : kBwdBytes;
static_assert(kSmemBytes <= 48 * 1024, "static shared memory limit");

#ifndef FGPO_EMULATE
// ---- PTX wrappers -------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 zero-fills the destination without reading.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
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

#define FGPO_LAUNCH(kern, grid, block, stream, ...) kern<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif  // !FGPO_EMULATE

// ---- tile loads ---------------------------------------------------------------------------------

// rows [row0, row0 + ROWS) x columns [k0, k0 + COLS) of a row-major (nrows, K) matrix into smem
// with row pitch LD; out-of-range 16-byte chunks are zero-filled (K % 8 == 0, so a chunk is
// either wholly inside or wholly outside).
template <int ROWS, int COLS, int LD, typename T>
__device__ __forceinline__ void load_tile(T* s, const T* g, long long nrows, long long K,
                                          long long row0, long long k0) {
  constexpr int CPR = COLS / 8;  // chunks per row
  for (int c = threadIdx.x; c < ROWS * CPR; c += THREADS) {
    int r = c / CPR, kc = (c % CPR) * 8;
    long long gr = row0 + r, gk = k0 + kc;
    bool ok = gr < nrows && gk < K;
    const T* src = ok ? g + gr * K + gk : g;
    cp_async16(s + r * LD + kc, src, ok ? 16 : 0);
  }
}

// ---- main loop: acc0 = A0[rows] B^T (and acc1 = A1[rows] B^T) over K ----------------------------

template <typename T, bool TWO>
__device__ __forceinline__ void mainloop(float (&acc0)[NT][4], float (&acc1)[NT][4], T* smem,
                                         const T* a0, const T* a1, const T* b, long long n,
                                         long long v, long long K, long long row0, long long v0) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc0[j][e] = 0.f;
      if (TWO) acc1[j][e] = 0.f;
    }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kt_n = static_cast<int>((K + BK - 1) / BK);

  auto load = [&](int stage, int kt) {
    T* st = smem + stage * kStageElems;
    load_tile<BM, BK, LDS>(st, a0, n, K, row0, (long long)kt * BK);
    if (TWO) load_tile<BM, BK, LDS>(st + BM * LDS, a1, n, K, row0, (long long)kt * BK);
    load_tile<BN, BK, LDS>(st + 2 * BM * LDS, b, v, K, v0, (long long)kt * BK);
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
    const T* sa0 = st;
    const T* sa1 = st + BM * LDS;
    const T* sb = st + 2 * BM * LDS;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t fa0[4], fa1[4];
      const int a_off = (warp * 16 + (lane % 16)) * LDS + kk * 16 + (lane / 16) * 8;
      ldsm_x4(fa0, sa0 + a_off);
      if (TWO) ldsm_x4(fa1, sa1 + a_off);
#pragma unroll
      for (int jp = 0; jp < NT / 2; ++jp) {
        uint32_t fb[4];
        ldsm_x4(fb, sb + (jp * 16 + (lane % 8) + (lane / 16) * 8) * LDS + kk * 16 +
                        ((lane / 8) % 2) * 8);
        Mma<T>::run(acc0[2 * jp], fa0, fb[0], fb[1]);
        Mma<T>::run(acc0[2 * jp + 1], fa0, fb[2], fb[3]);
        if (TWO) {
          Mma<T>::run(acc1[2 * jp], fa1, fb[0], fb[1]);
          Mma<T>::run(acc1[2 * jp + 1], fa1, fb[2], fb[3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring may be reused by the caller
}

// Recompute the logit tile(s) for rows [row0, row0+BM) x vocabulary [v0, v0+BN).
template <typename T, bool KL>
__device__ __forceinline__ void logit_tiles(float (&z)[NT][4], float (&zr)[NT][4], T* smem,
                                            const T* h, const T* hr, const T* w, const T* wr,
                                            long long n, long long d, long long dr, long long v,
                                            long long row0, long long v0) {
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

// grid (row blocks, vocabulary splits); each split walks tiles [t0, t1).
template <typename T, bool KL>
__global__ void __launch_bounds__(THREADS) fgpo_fwd_kernel(const T* __restrict__ h,
                                                           const T* __restrict__ hr,
                                                           const T* __restrict__ w,
                                                           const T* __restrict__ wr, long long n,
                                                           long long d, long long dr, long long v,
                                                           float inv_t, int tiles_per_split,
                                                           float* __restrict__ partial) {
  __shared__ __align__(16) unsigned char smem_raw[kSmemBytes];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  const long long row0 = (long long)blockIdx.x * BM;
  const long long n_tiles = (v + BN - 1) / BN;
  const long long t0 = (long long)blockIdx.y * tiles_per_split;
  const long long t1 = t0 + tiles_per_split < n_tiles ? t0 + tiles_per_split : n_tiles;

  KLState st[2] = {kl_init(), kl_init()};  // rows g and g + 8 of this warp's strip
  LseState ls[2] = {lse_init(), lse_init()};
  float z[NT][4], zr[NT][4];

  for (long long t = t0; t < t1; ++t) {
    const long long v0 = t * BN;
    logit_tiles<T, KL>(z, zr, smem, h, hr, w, wr, n, d, dr, v, row0, v0);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      tile_update<NT, KL>(st[half], ls[half], z, zr, half, c, v0, v, inv_t);
    }
  }

  // Merge the quad's column subsets, then lane c == 0 writes the row's partial.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      if (KL) {
        KLState o;
        o.m = __shfl_xor_sync(0xffffffffu, st[half].m, off);
        o.s = __shfl_xor_sync(0xffffffffu, st[half].s, off);
        o.a = __shfl_xor_sync(0xffffffffu, st[half].a, off);
        o.mr = __shfl_xor_sync(0xffffffffu, st[half].mr, off);
        o.sr = __shfl_xor_sync(0xffffffffu, st[half].sr, off);
        o.b = __shfl_xor_sync(0xffffffffu, st[half].b, off);
        kl_merge(st[half], o);
      } else {
        LseState o;
        o.m = __shfl_xor_sync(0xffffffffu, ls[half].m, off);
        o.s = __shfl_xor_sync(0xffffffffu, ls[half].s, off);
        lse_merge(ls[half], o);
      }
    }
    const long long row = row0 + warp * 16 + g + 8 * half;
    if (c == 0 && row_valid(row, n)) {
      constexpr int NS = KL ? kStatsKL : kStatsLP;
      float* p = partial + (long long)blockIdx.y * NS * n + row;
      if (KL) {
        p[0 * n] = st[half].m;
        p[1 * n] = st[half].s;
        p[2 * n] = st[half].a;
        p[3 * n] = st[half].mr;
        p[4 * n] = st[half].sr;
        p[5 * n] = st[half].b;
      } else {
        p[0 * n] = ls[half].m;
        p[1 * n] = ls[half].s;
      }
    }
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

// ---- backward -----------------------------------------------------------------------------------

__device__ __forceinline__ float ld_or0(const float* p, long long i) { return p ? p[i] : 0.f; }

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
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  T* wc = smem + 2 * BM * LDG;  // (BN, DC) chunk of Wk
  T* hc = wc + BN * LDC;        // NE x (BM, DC) chunks of the hidden states

  for (long long d0 = 0; d0 < K; d0 += DC) {
    load_tile<BN, DC, LDC>(wc, wk, v, K, v0, d0);
    if (dw != nullptr) {
#pragma unroll
      for (int e = 0; e < NE; ++e) load_tile<BM, DC, LDC>(hc + e * BM * LDC, hk[e], n, K, row0, d0);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    // dh_e[rows, d0:d0+DC] += G_e[rows, :] Wc   (M = rows, N = DC, K = BN)
#pragma unroll
    for (int e = 0; e < NE; ++e) {
      if (dh[e] == nullptr) continue;
      float acc[DC / 8][4];
#pragma unroll
      for (int j = 0; j < DC / 8; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[j][q] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t fa[4];
        ldsm_x4(fa, gs[e] + (warp * 16 + (lane % 16)) * LDG + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int jp = 0; jp < DC / 16; ++jp) {
          uint32_t fb[4];
          ldsm_x4_t(fb, wc + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * LDC + jp * 16 +
                            (lane / 16) * 8);
          Mma<T>::run(acc[2 * jp], fa, fb[0], fb[1]);
          Mma<T>::run(acc[2 * jp + 1], fa, fb[2], fb[3]);
        }
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const long long row = row0 + warp * 16 + g + 8 * half;
        if (!row_valid(row, n)) continue;
#pragma unroll
        for (int j = 0; j < DC / 8; ++j)
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const long long col = d0 + j * 8 + 2 * c + q;
            if (col < K) atomicAdd(dh[e] + row * K + col, acc[j][2 * half + q] * inv_t);
          }
      }
    }

    // dW[vocab, d0:d0+DC] += sum_e G_e^T Hc_e   (M = vocabulary rows, N = DC, K = rows)
    if (dw != nullptr) {
      float acc[DC / 8][4];
#pragma unroll
      for (int j = 0; j < DC / 8; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[j][q] = 0.f;
#pragma unroll
      for (int e = 0; e < NE; ++e) {
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
          uint32_t fa[4];
          ldsm_x4_t(fa, gs[e] + (kk * 16 + (lane % 8) + (lane / 16) * 8) * LDG + warp * 16 +
                            ((lane / 8) % 2) * 8);
#pragma unroll
          for (int jp = 0; jp < DC / 16; ++jp) {
            uint32_t fb[4];
            ldsm_x4_t(fb, hc + e * BM * LDC + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * LDC +
                              jp * 16 + (lane / 16) * 8);
            Mma<T>::run(acc[2 * jp], fa, fb[0], fb[1]);
            Mma<T>::run(acc[2 * jp + 1], fa, fb[2], fb[3]);
          }
        }
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const long long vr = v0 + warp * 16 + g + 8 * half;
        if (!col_valid(vr, v)) continue;
#pragma unroll
        for (int j = 0; j < DC / 8; ++j)
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const long long col = d0 + j * 8 + 2 * c + q;
            if (col < K) atomicAdd(dw + vr * K + col, acc[j][2 * half + q] * inv_t);
          }
      }
    }
    __syncthreads();  // the chunk buffers are refilled next iteration
  }
}

// grid (vocabulary tiles, row blocks): one 64 x 64 logit tile per CTA.
template <typename T, bool KL>
__global__ void __launch_bounds__(THREADS) fgpo_bwd_kernel(BwdArgs a) {
  __shared__ __align__(16) unsigned char smem_raw[kSmemBytes];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const T* h = static_cast<const T*>(a.h);
  const T* hr = static_cast<const T*>(a.hr);
  const T* w = static_cast<const T*>(a.w);
  const T* wr = static_cast<const T*>(a.wr);
  const long long n = a.n, v = a.v;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  const long long v0 = (long long)blockIdx.x * BN;
  const long long row0 = (long long)blockIdx.y * BM;

  float z[NT][4], zr[NT][4];
  logit_tiles<T, KL>(z, zr, smem, h, hr, w, wr, n, a.d, a.dr, v, row0, v0);

  // G (and Gr) into shared memory, in the input dtype; masked rows/columns are exact zeros.
  T* gs = smem;
  T* grs = smem + BM * LDG;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int lrow = warp * 16 + g + 8 * half;
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
    tile_grads<NT, KL>(gv, grv, z, zr, half, c, v0, v, rv, rg, a.inv_t);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int off = lrow * LDG + frag_col(j, c, 0);
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

template <typename T>
void launch_fwd(const FwdArgs& a) {
  const long long n_tiles = (a.v + BN - 1) / BN;
  const long long row_blocks = (a.n + BM - 1) / BM;
  int splits = a.splits < 1 ? 1 : a.splits;
  if (splits > n_tiles) splits = static_cast<int>(n_tiles);
  const int tps = static_cast<int>((n_tiles + splits - 1) / splits);
  splits = static_cast<int>((n_tiles + tps - 1) / tps);  // no empty split
  if (row_blocks > 0x7fffffffLL || splits > 65535) {
    throw std::invalid_argument("fgpo_kernels._C: too many rows or splits for one launch");
  }
  dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits));
  const T* h = static_cast<const T*>(a.h);
  const T* hr = static_cast<const T*>(a.hr);
  const T* w = static_cast<const T*>(a.w);
  const T* wr = static_cast<const T*>(a.wr);
  const bool kl = a.hr != nullptr;
  auto fwd = kl ? fgpo_fwd_kernel<T, true> : fgpo_fwd_kernel<T, false>;
  FGPO_LAUNCH(fwd, grid, THREADS, a.stream, h, hr, w, wr, a.n, a.d, a.dr, a.v, a.inv_t, tps,
              a.partial);
  check_launch("forward");
  const int mt = 128;
  const unsigned mb = static_cast<unsigned>((a.n + mt - 1) / mt);
  auto merge = kl ? fgpo_merge_kernel<true> : fgpo_merge_kernel<false>;
  FGPO_LAUNCH(merge, mb, mt, a.stream, a.partial, splits, a.n, a.lse, a.lser, a.fkl, a.rkl);
  check_launch("merge");
}

template <typename T>
void launch_bwd(const BwdArgs& a) {
  const long long n_tiles = (a.v + BN - 1) / BN;
  const long long row_blocks = (a.n + BM - 1) / BM;
  if (n_tiles > 0x7fffffffLL || row_blocks > 65535) {
    throw std::invalid_argument("fgpo_kernels._C: backward grid too large (rows > 4M?)");
  }
  dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(row_blocks));
  auto bwd = a.hr != nullptr ? fgpo_bwd_kernel<T, true> : fgpo_bwd_kernel<T, false>;
  FGPO_LAUNCH(bwd, grid, THREADS, a.stream, a);
  check_launch("backward");
}

}  // namespace fgpo
