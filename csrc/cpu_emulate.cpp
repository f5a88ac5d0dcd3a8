// The unmodified kernels of kernels.cuh (bf16), run on the CPU through emulate.h.
// Built with g++ by tests/test_cuda_math.py; never part of _C.
#define FGPO_EMULATE 1
#include <stdexcept>

#include "kernels.cuh"

// The launch interface of launch.h, so binding.cpp can be linked against the emulation too.
namespace fgpo {
void launch_fwd_bf16(const FwdArgs& a) { launch_fwd<__nv_bfloat16>(a); }
void launch_bwd_bf16(const BwdArgs& a) { launch_bwd<__nv_bfloat16>(a); }
void launch_fwd_f16(const FwdArgs&) { throw std::runtime_error("fp16 is not emulated"); }
void launch_bwd_f16(const BwdArgs&) { throw std::runtime_error("fp16 is not emulated"); }
}  // namespace fgpo

extern "C" {

// Same semantics as _C.fwd (pointers to host memory; 0/null = absent).
void fgpo_emu_fwd(const void* h, const void* hr, const void* w, const void* wr, long long n,
                  long long d, long long dr, long long v, float inv_t, int splits, float* partial,
                  float* lse, float* lser, float* fkl, float* rkl) {
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
  a.stream = nullptr;
  fgpo::launch_fwd<__nv_bfloat16>(a);
}

// Same semantics as _C.bwd; outputs must be zero-filled by the caller.
void fgpo_emu_bwd(const void* h, const void* hr, const void* w, const void* wr, long long n,
                  long long d, long long dr, long long v, float inv_t, const float* lse,
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
  fgpo::launch_bwd<__nv_bfloat16>(a);
}
}
