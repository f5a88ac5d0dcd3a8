// The unmodified kernels of kernels.cuh (bf16 and fp16), run on the CPU through emulate.h.
// Built with g++ by tests/test_cuda_math.py; never part of _C.
#define FGPO_EMULATE 1
#include <stdexcept>
#include <string>

#include "kernels.cuh"

// The launch interface of launch.h, so binding.cpp can be linked against the emulation too.
namespace fgpo {
void launch_fwd_bf16(const FwdArgs& a) { launch_fwd<__nv_bfloat16>(a); }
void launch_bwd_bf16(const BwdArgs& a) { launch_bwd<__nv_bfloat16>(a); }
void launch_fwd_f16(const FwdArgs& a) { launch_fwd<__half>(a); }
void launch_bwd_f16(const BwdArgs& a) { launch_bwd<__half>(a); }
}  // namespace fgpo

namespace {
std::string g_error;  // what the last failed fgpo_emu_* call threw
int g_wgmma = 0;      // the forward fgpo_emu_fwd runs: 1 = fwd_wgmma.cuh, 0 = mma.sync

template <class F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
    return 1;
  }
}
}  // namespace

extern "C" {

// Why the last fgpo_emu_fwd / fgpo_emu_bwd returned 1 (an emulation error, a bad argument).
const char* fgpo_emu_error() { return g_error.c_str(); }

// Same semantics as _C.fwd (pointers to host memory; 0/null = absent; dtype 0 bf16, 1 fp16).
// Returns 0, or 1 with the reason in fgpo_emu_error().
int fgpo_emu_fwd(const void* h, const void* hr, const void* w, const void* wr, long long n,
                 long long d, long long dr, long long v, float inv_t, int dtype, int splits,
                 float* partial, float* lse, float* lser, float* fkl, float* rkl) {
  fgpo::FwdArgs a{};
  a.h = h;
  a.hr = hr;
  a.w = w;
  a.wr = wr;
  a.n = n;
  a.d = d;
  a.dr = hr ? dr : d;
  a.v = v;
  a.inv_t = inv_t;
  a.splits = splits;
  a.partial = partial;
  a.lse = lse;
  a.lser = lser;
  a.fkl = fkl;
  a.rkl = rkl;
  a.wgmma = g_wgmma;
  a.stream = nullptr;
  return guarded([&] { dtype == 0 ? fgpo::launch_fwd_bf16(a) : fgpo::launch_fwd_f16(a); });
}

// Which forward kernel the next fgpo_emu_fwd calls run (1 = wgmma, 0 = mma.sync).
void fgpo_emu_fwd_path(int wgmma) { g_wgmma = wgmma; }

// Same semantics as _C.bwd; outputs must be zero-filled by the caller. Returns as fgpo_emu_fwd.
int fgpo_emu_bwd(const void* h, const void* hr, const void* w, const void* wr, long long n,
                 long long d, long long dr, long long v, float inv_t, int dtype, const float* lse,
                 const float* lser, const float* fkl, const float* rkl, const float* g_fkl,
                 const float* g_rkl, const float* g_lp, const float* g_lpr, float* dh, float* dhr,
                 float* dw, float* dwr) {
  fgpo::BwdArgs a{};
  a.h = h;
  a.hr = hr;
  a.w = w;
  a.wr = wr;
  a.n = n;
  a.d = d;
  a.dr = hr ? dr : d;
  a.v = v;
  a.inv_t = inv_t;
  a.lse = lse;
  a.lser = lser;
  a.fkl = fkl;
  a.rkl = rkl;
  a.g_fkl = g_fkl;
  a.g_rkl = g_rkl;
  a.g_lp = g_lp;
  a.g_lpr = g_lpr;
  a.dh = dh;
  a.dhr = dhr;
  a.dw = dw;
  a.dwr = dwr;
  a.stream = nullptr;
  return guarded([&] { dtype == 0 ? fgpo::launch_bwd_bf16(a) : fgpo::launch_bwd_f16(a); });
}

// Watch source range `slot` (0..3; bytes = 0 clears it) and reset its counters; after a launch,
// fgpo_emu_watched(slot, hint) is the bytes cp.async read from it with hint 0 (keep: evict_last)
// or 1 (stream: evict_first).
int fgpo_emu_watch(int slot, const void* base, long long bytes) {
  if (slot < 0 || slot >= emu::kWatch) return 1;
  auto& w = emu::watches[slot];
  w.lo = static_cast<const unsigned char*>(base);
  w.hi = bytes > 0 ? w.lo + bytes : w.lo;
  w.bytes[0] = 0;
  w.bytes[1] = 0;
  return 0;
}
long long fgpo_emu_watched(int slot, int hint) {
  if (slot < 0 || slot >= emu::kWatch || hint < 0 || hint > 1) return -1;
  return emu::watches[slot].bytes[hint];
}

// The emulation's fp16 rounding, for its check against torch: out[i] = bits of half(x[i]), and
// back[i] = float of the half with bits in[i].
void fgpo_emu_to_half(const float* x, uint16_t* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = emu::float_to_half(x[i]);
}
void fgpo_emu_from_half(const uint16_t* in, float* back, long long n) {
  for (long long i = 0; i < n; ++i) back[i] = emu::half_to_float(in[i]);
}
}
