// CPU emulation of the few CUDA features kernels.cuh uses, so the unmodified kernel bodies run
// on the host in tests (tests/test_cuda_math.py builds csrc/cpu_emulate.cpp with g++).
//
// Each CTA runs as real OS threads (one per CUDA thread) with std::barrier for __syncthreads; the
// warp-collective instructions (ldmatrix, mma.sync, shfl) exchange operands through a per-warp
// buffer between two warp barriers and compute exactly the fragment layouts of the PTX ISA:
//   mma.m16n8k16 A (row-major 16x16): reg q of lane l holds rows l/4 + 8*(q&1), k = 2*(l%4) +
//     8*(q>>1) + {0,1};  B (k x n, "col"): reg q holds k = 2*(l%4) + 8*q + {0,1}, n = l/4;
//     C/D: d[2*half + e] is row l/4 + 8*half, column 2*(l%4) + e.
//   ldmatrix.x4: lanes 8i..8i+7 give the row addresses of matrix i (-> reg i); lane l receives
//     row l/4, columns 2*(l%4)+{0,1} (with .trans: rows 2*(l%4)+{0,1}, column l/4).
// cp.async copies at issue (no asynchrony); CTAs run one after another. Only bf16 is modelled.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "CPU emulation, no CUDA runtime"; }
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 0;
  return 1;
}
#ifndef CUDART_VERSION
#define CUDART_VERSION 0
#endif

struct __nv_bfloat16 {
  uint16_t bits;
};

namespace emu {

struct Warp {
  std::barrier<> bar{32};
  const void* ptr[32];
  uint32_t reg[32][8];
  float val[32];
};

struct Block {
  explicit Block(int threads) : bar(threads), warps((threads + 31) / 32) {
    for (auto& w : warps) w = std::make_unique<Warp>();
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local dim3 tid, bid, bdim;
inline Block* g_block = nullptr;

inline Warp& warp() { return *g_block->warps[tid.x / 32]; }
inline int lane() { return static_cast<int>(tid.x % 32); }

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float lo(uint32_t r) { return bf16_to_float(static_cast<uint16_t>(r & 0xffffu)); }
inline float hi(uint32_t r) { return bf16_to_float(static_cast<uint16_t>(r >> 16)); }
inline float half_of(uint32_t r, int k) { return (k & 1) ? hi(r) : lo(r); }

template <class F>
void launch(dim3 grid, dim3 block, F&& body) {
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk(static_cast<int>(block.x));
        g_block = &blk;
        std::vector<std::thread> ts;
        ts.reserve(block.x);
        for (unsigned t = 0; t < block.x; ++t) {
          ts.emplace_back([&, t] {
            tid = dim3(t);
            bid = dim3(bx, by, bz);
            bdim = block;
            body();
          });
        }
        for (auto& th : ts) th.join();
        g_block = nullptr;
      }
}

}  // namespace emu

#define threadIdx (::emu::tid)
#define blockIdx (::emu::bid)
#define blockDim (::emu::bdim)

inline void __syncthreads() { emu::g_block->bar.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int off) {
  auto& w = emu::warp();
  const int l = emu::lane();
  w.val[l] = v;
  w.bar.arrive_and_wait();
  float r = w.val[l ^ off];
  w.bar.arrive_and_wait();
  return r;
}

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

namespace fgpo {

inline void cp_async16(void* dst, const void* src, int src_bytes) {
  if (src_bytes == 16) {
    std::memcpy(dst, src, 16);
  } else {
    std::memset(dst, 0, 16);
  }
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

inline void ldsm_impl(uint32_t (&r)[4], const void* p, bool trans) {
  auto& w = emu::warp();
  const int l = emu::lane();
  w.ptr[l] = p;
  w.bar.arrive_and_wait();
  for (int i = 0; i < 4; ++i) {
    uint16_t e[2];
    for (int k = 0; k < 2; ++k) {
      const uint16_t* row;
      int col;
      if (!trans) {
        row = static_cast<const uint16_t*>(w.ptr[8 * i + l / 4]);
        col = 2 * (l % 4) + k;
      } else {
        row = static_cast<const uint16_t*>(w.ptr[8 * i + 2 * (l % 4) + k]);
        col = l / 4;
      }
      e[k] = row[col];
    }
    r[i] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
  w.bar.arrive_and_wait();
}
inline void ldsm_x4(uint32_t (&r)[4], const void* p) { ldsm_impl(r, p, false); }
inline void ldsm_x4_t(uint32_t (&r)[4], const void* p) { ldsm_impl(r, p, true); }

template <typename T>
struct Mma {
  static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    auto& w = emu::warp();
    const int l = emu::lane();
    for (int q = 0; q < 4; ++q) w.reg[l][q] = a[q];
    w.reg[l][4] = b0;
    w.reg[l][5] = b1;
    w.bar.arrive_and_wait();
    const int g = l / 4, c = l % 4;
    for (int half = 0; half < 2; ++half)
      for (int e = 0; e < 2; ++e) {
        const int row = g + 8 * half, col = 2 * c + e;
        float acc = d[2 * half + e];
        for (int k = 0; k < 16; ++k) {
          const int la = (row % 8) * 4 + (k % 8) / 2;
          const int qa = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
          const int lb = col * 4 + (k % 8) / 2;
          const int qb = k >= 8 ? 1 : 0;
          acc += emu::half_of(w.reg[la][qa], k) * emu::half_of(w.reg[lb][4 + qb], k);
        }
        d[2 * half + e] = acc;
      }
    w.bar.arrive_and_wait();
  }
  static uint32_t pack(float x, float y) {
    return static_cast<uint32_t>(emu::float_to_bf16(x)) |
           (static_cast<uint32_t>(emu::float_to_bf16(y)) << 16);
  }
};

inline void red_add2(float* dst, float a, float b) {
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
}

}  // namespace fgpo

#define FGPO_DYNAMIC_SMEM(name, bytes) static __attribute__((aligned(16))) unsigned char name[bytes]
#define FGPO_LAUNCH(kern, grid, block, smem, stream, ...) \
  ::emu::launch(dim3(grid), dim3(block), [&] { kern(__VA_ARGS__); })
