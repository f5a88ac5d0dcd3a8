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
// bf16 and fp16 operands (round to nearest even, subnormals, inf and NaN as the hardware).
//
// Asynchrony, so that ordering bugs fail here instead of on a GPU:
//   - cp.async poisons its 16 destination bytes at issue (0xFF: NaN in bf16, fp16 and fp32) and
//     the data arrive only when the issuing thread's cp.async.wait_group retires the group;
//     commit_group closes a group, wait_group N retires all but the N newest committed groups,
//     exactly the PTX rule. A read between issue and the matching wait sees NaN.
//   - dynamic shared memory starts each CTA filled with 0xFF, so a read of bytes that nothing
//     wrote is NaN too (CTAs run one after another in one buffer otherwise).
//   - a thread that exits with a group no wait retired is an error (the launch throws). Stricter
//     than the hardware for an empty group, but every kernel here retires all its groups, and a
//     non-empty one left behind would write into the next CTA's shared memory.
// What it still cannot show: real timing, and a missing __syncthreads between one thread's
// wait and another thread's read is caught only when the OS happens to schedule it badly.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
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
struct __half {
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
  Block(int threads, int smem_bytes)
      : bar(threads),
        warps((threads + 31) / 32),
        smem_bytes(smem_bytes),
        unfenced(static_cast<size_t>(smem_bytes + 15) / 16) {
    for (auto& w : warps) w = std::make_unique<Warp>();
    if (smem_bytes > 0) {
      smem = static_cast<unsigned char*>(std::aligned_alloc(16, (smem_bytes + 15) / 16 * 16));
      std::memset(smem, 0xFF, smem_bytes);  // unwritten shared memory reads as NaN
    }
  }
  ~Block() { std::free(smem); }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  int smem_bytes;
  unsigned char* smem = nullptr;
  // Per 16 bytes of shared memory: written by a cp.async (generic proxy) that the writing
  // thread has not yet followed with fence.proxy.async, so wgmma (async proxy) may not see it.
  std::vector<std::atomic<unsigned char>> unfenced;
};
// The chunks this thread's cp.async waits delivered since its last fence.proxy.async.
inline thread_local std::vector<size_t> my_unfenced;

// One thread's cp.async state: copies issued since the last commit, and the committed groups
// (oldest first) that no wait_group has retired yet.
struct AsyncCopy {
  void* dst;
  unsigned char data[16];
};
struct AsyncState {
  std::vector<AsyncCopy> open;
  std::deque<std::vector<AsyncCopy>> groups;
};
inline thread_local AsyncState async_state;

// One thread's wgmma.mma_async state (fwd_wgmma.cuh): products issued since the last commit,
// the committed groups no wgmma.wait_group retired, and for each accumulator with products in
// flight the value the products build on (the registers themselves read NaN until the wait).
struct WgmmaOp {
  float* d;           // the thread's 64 accumulators
  uint64_t da, db;    // shared-memory descriptors
  bool f16;           // fp16 operands (else bf16)
  bool acc;           // scale-d: add to the accumulators (else overwrite them)
  uint16_t a[2][16];  // the operand bits read at issue: 2 rows of A, 32 columns of B, 16 of K
  uint16_t b[32][16];
};
struct WgmmaState {
  std::vector<WgmmaOp> open;
  std::deque<std::vector<WgmmaOp>> groups;
  std::vector<std::pair<float*, std::vector<float>>> shadow;  // accumulator -> value in flight
};
inline thread_local WgmmaState wgmma_state;

// L2 hints (kernels.cuh L2Hint) have no effect on data; the emulation counts the bytes each hint
// reads from up to kWatch watched source ranges (the test's h, hr, w, wr), so a test can check
// that every weight byte streams and every hidden-state byte is kept.
constexpr int kWatch = 4;
struct Watch {
  const unsigned char* lo = nullptr;
  const unsigned char* hi = nullptr;
  std::atomic<long long> bytes[2] = {0, 0};  // by hint: keep, stream
};
inline Watch watches[kWatch];
inline void watch_read(const void* src, int hint) {
  const auto* p = static_cast<const unsigned char*>(src);
  for (auto& w : watches)
    if (p >= w.lo && p < w.hi) w.bytes[hint] += 16;
}

// The first error any emulated thread reported during a launch (thrown when the launch ends).
inline std::mutex error_mutex;
inline std::string first_error;
inline void report(const std::string& what) {
  std::lock_guard<std::mutex> lock(error_mutex);
  if (first_error.empty()) first_error = what;
}

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
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t u;
  if (e == 0) {  // zero or subnormal: m * 2^-24
    float f = std::ldexp(static_cast<float>(m), -24);
    std::memcpy(&u, &f, 4);
    u |= sign;
  } else if (e == 31) {
    u = sign | 0x7f800000u | (m << 13);
  } else {
    u = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_half(float f) {  // round to nearest even, as __floats2half2_rn
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7e00u;  // NaN
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 (and inf) round to inf
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal half, in units of 2^-24
    float a;
    std::memcpy(&a, &ax, 4);
    return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f));  // ties to even
  }
  uint32_t r = ax - 0x38000000u;  // exponent bias 127 -> 15
  r = (r + 0x0fffu + ((r >> 13) & 1u)) >> 13;
  return sign | static_cast<uint16_t>(r);
}

// The 16-bit operand types: element bits <-> float.
template <typename T>
struct Bits;
template <>
struct Bits<__nv_bfloat16> {
  static float to(uint16_t b) { return bf16_to_float(b); }
  static uint16_t from(float f) { return float_to_bf16(f); }
};
template <>
struct Bits<__half> {
  static float to(uint16_t b) { return half_to_float(b); }
  static uint16_t from(float f) { return float_to_half(f); }
};
template <typename T>
inline float elem(uint32_t r, int k) {  // element k & 1 of a packed pair
  return Bits<T>::to(static_cast<uint16_t>((k & 1) ? (r >> 16) : (r & 0xffffu)));
}

// The kernel's dynamic shared memory (FGPO_DYNAMIC_SMEM): this CTA's, poisoned at its start.
inline unsigned char* dyn_smem(int bytes) {
  if (g_block == nullptr || bytes > g_block->smem_bytes) {
    std::string what = "CPU emulation: kernel declares " + std::to_string(bytes) +
                       " bytes of dynamic shared memory but was launched with " +
                       std::to_string(g_block ? g_block->smem_bytes : 0) + "\n";
    std::fputs(what.c_str(), stderr);
    std::abort();  // a launch that would fail on a GPU: nothing sensible can follow
  }
  return g_block->smem;
}

template <class F>
void launch(dim3 grid, dim3 block, int smem_bytes, F&& body) {
  {
    std::lock_guard<std::mutex> lock(error_mutex);
    first_error.clear();
  }
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk(static_cast<int>(block.x), smem_bytes);
        g_block = &blk;
        std::vector<std::thread> ts;
        ts.reserve(block.x);
        for (unsigned t = 0; t < block.x; ++t) {
          ts.emplace_back([&, t] {
            tid = dim3(t);
            bid = dim3(bx, by, bz);
            bdim = block;
            body();
            const AsyncState& st = async_state;
            if (!st.open.empty() || !st.groups.empty()) {
              report("thread " + std::to_string(t) + " of block (" + std::to_string(bx) + ", " +
                     std::to_string(by) + ") exited with cp.async copies no wait_group retired");
            }
            if (!wgmma_state.open.empty() || !wgmma_state.groups.empty()) {
              report("thread " + std::to_string(t) + " of block (" + std::to_string(bx) + ", " +
                     std::to_string(by) + ") exited with wgmma products no wait_group retired");
            }
          });
        }
        for (auto& th : ts) th.join();
        g_block = nullptr;
      }
  std::lock_guard<std::mutex> lock(error_mutex);
  if (!first_error.empty()) throw std::runtime_error("CPU emulation: " + first_error);
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

// The source is read at issue (the kernels' global inputs are read-only while they run); the
// destination holds NaN until the wait_group that retires this copy's group.
// Hint: kernels.cuh's L2Hint (keep = 0, stream = 1; declared after this header is included).
template <class Hint>
inline void cp_async16(void* dst, const void* src, int src_bytes, Hint hint) {
  emu::AsyncCopy c;
  c.dst = dst;
  if (src_bytes == 16) {
    std::memcpy(c.data, src, 16);
    emu::watch_read(src, static_cast<int>(hint));
  } else {
    std::memset(c.data, 0, 16);  // src_bytes = 0: zero-fill, delivered at the wait like data
  }
  std::memset(dst, 0xFF, 16);
  emu::async_state.open.push_back(c);
}
inline void cp_async_commit() {
  auto& st = emu::async_state;
  st.groups.push_back(std::move(st.open));
  st.open.clear();
}
template <int N>
inline void cp_async_wait() {
  auto& st = emu::async_state;
  while (st.groups.size() > static_cast<size_t>(N)) {
    for (const auto& c : st.groups.front()) {
      std::memcpy(c.dst, c.data, 16);
      const auto* d = static_cast<const unsigned char*>(c.dst);
      auto* blk = emu::g_block;
      if (d >= blk->smem && d < blk->smem + blk->smem_bytes) {
        const size_t i = static_cast<size_t>(d - blk->smem) / 16;
        blk->unfenced[i] = 1;
        emu::my_unfenced.push_back(i);
      }
    }
    st.groups.pop_front();
  }
}

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
          acc += emu::elem<T>(w.reg[la][qa], k) * emu::elem<T>(w.reg[lb][4 + qb], k);
        }
        d[2 * half + e] = acc;
      }
    w.bar.arrive_and_wait();
  }
  static uint32_t pack(float x, float y) {
    return static_cast<uint32_t>(emu::Bits<T>::from(x)) |
           (static_cast<uint32_t>(emu::Bits<T>::from(y)) << 16);
  }
};

// ---- wgmma (fwd_wgmma.cuh) ----
// Asynchrony as for cp.async: mma_async reads its operands from shared memory at issue and again
// when wgmma.wait_group retires its group; if they changed in between (a stage refilled while
// the tensor cores may still read it) the launch fails, and if they were not there yet (read
// before the cp.async wait) they are NaN. The accumulators read NaN from issue to the wait. At
// issue, bytes a cp.async delivered must have been followed by the writing thread's
// fence.proxy.async (wgmma reads through the async proxy, cp.async writes through the generic
// one), else the launch fails.
// Each thread computes its own 64 accumulators from the descriptors (the D fragment layout of
// wgmma .m64nNk16: warp w of the warpgroup, lane l: rows 16 (w % 4) + l / 4 + 8 half, columns
// 8 j + 2 (l % 4) + e, register [j][2 half + e]); K-major operands (no transpose) only.

inline uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - emu::g_block->smem);
}
inline void fence_proxy_async() {
  for (size_t i : emu::my_unfenced) emu::g_block->unfenced[i] = 0;
  emu::my_unfenced.clear();
}
inline void wgmma_fence() {}

namespace wg {
// Byte offset in shared memory of element (row, k) of a K-major operand (the PTX ISA's canonical
// layouts): no swizzle, 8 x 16-byte core matrices, K-adjacent ones the leading byte offset apart,
// 8-row groups the stride byte offset apart; a swizzle of W = 128 / 64 / 32 bytes (layout type
// 1 / 2 / 3): rows of W bytes, 8-row atoms the stride byte offset apart, and the 16-byte chunk
// bits [4, 4 + b) of the address XOR-ed with bits [7, 7 + b), b = log2(W / 16) (offsets from a
// base the kernels align to 1024 bytes).
inline long long offset(uint64_t desc, int row, int k) {
  const long long start = static_cast<long long>(desc & 0x3FFF) << 4;
  const long long lbo = static_cast<long long>((desc >> 16) & 0x3FFF) << 4;
  const long long sbo = static_cast<long long>((desc >> 32) & 0x3FFF) << 4;
  const int mode = static_cast<int>(desc >> 62);
  if (mode == 0) return start + (row / 8) * sbo + (k / 8) * lbo + (row % 8) * 16 + (k % 8) * 2;
  const int width = 256 >> mode, bits = 3 - (mode - 1);  // 128, 64, 32 bytes: 3, 2, 1 bits
  const long long addr = start + (row / 8) * sbo + (row % 8) * width + k * 2;
  return addr ^ (((addr >> 7) & ((1 << bits) - 1)) << 4);
}
inline uint16_t read(uint64_t desc, int row, int k, bool at_issue) {
  const long long off = offset(desc, row, k);
  if (off < 0 || off + 2 > emu::g_block->smem_bytes) {
    emu::report("wgmma operand outside the dynamic shared memory (offset " +
                std::to_string(off) + ")");
    return 0xFFFF;
  }
  if (at_issue && emu::g_block->unfenced[static_cast<size_t>(off) / 16]) {
    emu::report("wgmma reads shared memory a cp.async wrote with no fence.proxy.async after "
                "its wait (generic-proxy writes are not visible to the async proxy)");
  }
  uint16_t v;
  std::memcpy(&v, emu::g_block->smem + off, 2);
  return v;
}
// The operand bits this thread's accumulators need (its 2 rows of A, its 32 columns of B).
inline void snapshot(uint64_t da, uint64_t db, uint16_t (&a)[2][16], uint16_t (&b)[32][16],
                     bool at_issue) {
  const int w = static_cast<int>(emu::tid.x / 32) % 4, l = emu::lane();
  for (int k = 0; k < 16; ++k) {
    for (int half = 0; half < 2; ++half)
      a[half][k] = read(da, 16 * w + l / 4 + 8 * half, k, at_issue);
    for (int j = 0; j < 16; ++j)
      for (int e = 0; e < 2; ++e)
        b[2 * j + e][k] = read(db, 8 * j + 2 * (l % 4) + e, k, at_issue);
  }
}
inline std::vector<float>* shadow_of(float* d) {
  for (auto& [p, v] : emu::wgmma_state.shadow)
    if (p == d) return &v;
  return nullptr;
}
inline void retire(const emu::WgmmaOp& op) {
  uint16_t a[2][16], b[32][16];
  snapshot(op.da, op.db, a, b, false);
  const bool same = std::memcmp(a, op.a, sizeof a) == 0 && std::memcmp(b, op.b, sizeof b) == 0;
  if (!same) {
    emu::report("thread " + std::to_string(emu::tid.x) + ": wgmma operands changed in shared "
                "memory between mma_async and the wait_group that retired it");
  }
  auto to = [&](uint16_t x) { return op.f16 ? emu::half_to_float(x) : emu::bf16_to_float(x); };
  std::vector<float>& acc = *shadow_of(op.d);
  for (int j = 0; j < 16; ++j)
    for (int half = 0; half < 2; ++half)
      for (int e = 0; e < 2; ++e) {
        float x = op.acc ? acc[4 * j + 2 * half + e] : 0.f;
        for (int k = 0; k < 16; ++k) x += to(op.a[half][k]) * to(op.b[2 * j + e][k]);
        acc[4 * j + 2 * half + e] = same ? x : NAN;
      }
}
}  // namespace wg

template <typename T>
struct Wgmma {
  static void run(float (&d)[16][4], uint64_t da, uint64_t db, int acc) {
    auto& st = emu::wgmma_state;
    if (((da >> 49) & 7) || ((db >> 49) & 7)) {
      emu::report("wgmma: only descriptors with base offset 0 are emulated");
    }
    emu::WgmmaOp op;
    op.d = &d[0][0];
    op.da = da;
    op.db = db;
    op.f16 = std::is_same_v<T, __half>;
    op.acc = acc != 0;
    wg::snapshot(da, db, op.a, op.b, true);
    if (wg::shadow_of(op.d) == nullptr) {  // the value the products in flight build on
      st.shadow.emplace_back(op.d, std::vector<float>(op.d, op.d + 64));
      std::fill(op.d, op.d + 64, NAN);
    }
    st.open.push_back(op);
  }
};
inline void wgmma_commit() {
  auto& st = emu::wgmma_state;
  st.groups.push_back(std::move(st.open));
  st.open.clear();
}
template <int N>
inline void wgmma_wait() {
  auto& st = emu::wgmma_state;
  while (st.groups.size() > static_cast<size_t>(N)) {
    for (const auto& op : st.groups.front()) wg::retire(op);
    st.groups.pop_front();
  }
  // Accumulators with no product left in flight get their value back.
  auto in_flight = [&](float* d) {
    for (const auto& op : st.open)
      if (op.d == d) return true;
    for (const auto& g : st.groups)
      for (const auto& op : g)
        if (op.d == d) return true;
    return false;
  };
  for (size_t i = 0; i < st.shadow.size();) {
    auto& [d, v] = st.shadow[i];
    if (in_flight(d)) {
      ++i;
      continue;
    }
    std::copy(v.begin(), v.end(), d);
    st.shadow.erase(st.shadow.begin() + static_cast<long>(i));
  }
}

inline void red_add2(float* dst, float a, float b) {
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
}

}  // namespace fgpo

#define FGPO_DYNAMIC_SMEM(name, bytes) unsigned char* const name = ::emu::dyn_smem(bytes)
#define FGPO_LAUNCH(kern, grid, block, smem, stream, ...) \
  ::emu::launch(dim3(grid), dim3(block), (smem), [&] { kern(__VA_ARGS__); })
