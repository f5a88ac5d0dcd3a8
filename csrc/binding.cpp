// pybind11 module fgpo_kernels._C: raw device pointers, sizes and a CUDA stream in, kernels out.
//
// Python (fgpo_kernels/cuda_kl.py) owns the tensors; it passes data_ptr() integers and
// torch.cuda.current_stream().cuda_stream. Every argument is checked here (ValueError naming it),
// every launch is checked for errors (RuntimeError with CUDA's message). Importing the module
// needs no GPU: cudart is linked statically and only touched when a function is called.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "launch.h"

namespace py = pybind11;

#ifndef FGPO_ARCHS
#define FGPO_ARCHS "unknown"
#endif

#define CHECK_ARG(cond, msg)                                   \
  do {                                                         \
    if (!(cond)) {                                             \
      std::ostringstream _os;                                  \
      _os << "fgpo_kernels._C: " << msg;                       \
      throw std::invalid_argument(_os.str());                  \
    }                                                          \
  } while (0)

#define CHECK_PTR(name, p, align)                                                        \
  CHECK_ARG((p) != 0, name " must be a device pointer, got null");                       \
  CHECK_ARG((p) % (align) == 0, name " must be " #align "-byte aligned, got address " << (p))

#define CHECK_OPT_PTR(name, p, align) \
  CHECK_ARG((p) % (align) == 0, name " must be " #align "-byte aligned, got address " << (p))

namespace {

using fgpo::BwdArgs;
using fgpo::FwdArgs;

template <typename P>
P* ptr(std::uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

void check_sizes(long long n, long long d, long long dr, long long v, bool kl, bool shared,
                 float inv_t, int dtype) {
  CHECK_ARG(dtype == fgpo::kBF16 || dtype == fgpo::kF16,
            "dtype must be 0 (bfloat16) or 1 (float16), got " << dtype);
  CHECK_ARG(n >= 1, "n (rows) must be >= 1, got " << n);
  CHECK_ARG(v >= 1, "v (vocabulary) must be >= 1, got " << v);
  CHECK_ARG(d >= 8 && d % 8 == 0, "d must be a positive multiple of 8, got " << d);
  if (kl) {
    CHECK_ARG(dr >= 8 && dr % 8 == 0, "dr must be a positive multiple of 8, got " << dr);
    CHECK_ARG(!shared || dr == d, "a shared weight needs dr == d, got d=" << d << " dr=" << dr);
  }
  CHECK_ARG(std::isfinite(inv_t) && inv_t > 0, "inv_t must be finite and > 0, got " << inv_t);
}

void fwd(std::uintptr_t h, std::uintptr_t hr, std::uintptr_t w, std::uintptr_t wr, long long n,
         long long d, long long dr, long long v, double inv_t, int dtype, int splits,
         std::uintptr_t partial, std::uintptr_t lse, std::uintptr_t lser, std::uintptr_t fkl,
         std::uintptr_t rkl, std::uintptr_t stream, int group, bool wgmma) {
  const bool kl = hr != 0;
  check_sizes(n, d, dr, v, kl, wr == 0, static_cast<float>(inv_t), dtype);
  CHECK_PTR("h", h, 16);
  CHECK_PTR("w", w, 16);
  CHECK_OPT_PTR("hr", hr, 16);
  CHECK_OPT_PTR("wr", wr, 16);
  CHECK_ARG(kl || wr == 0, "wr given without hr (log-prob-only mode takes no reference)");
  CHECK_ARG(splits >= 1, "splits must be >= 1, got " << splits);
  CHECK_PTR("partial", partial, 4);
  CHECK_PTR("lse", lse, 4);
  if (kl) {
    CHECK_PTR("lser", lser, 4);
    CHECK_PTR("fkl", fkl, 4);
    CHECK_PTR("rkl", rkl, 4);
  }
  FwdArgs a{};
  a.h = ptr<const void>(h);
  a.hr = ptr<const void>(hr);
  a.w = ptr<const void>(w);
  a.wr = ptr<const void>(wr);
  a.n = n;
  a.d = d;
  a.dr = kl ? dr : d;
  a.v = v;
  a.inv_t = static_cast<float>(inv_t);
  a.splits = splits;
  a.group = group;
  a.wgmma = wgmma ? 1 : 0;
  a.partial = ptr<float>(partial);
  a.lse = ptr<float>(lse);
  a.lser = ptr<float>(lser);
  a.fkl = ptr<float>(fkl);
  a.rkl = ptr<float>(rkl);
  a.stream = reinterpret_cast<cudaStream_t>(stream);
  py::gil_scoped_release nogil;
  if (dtype == fgpo::kBF16) {
    fgpo::launch_fwd_bf16(a);
  } else {
    fgpo::launch_fwd_f16(a);
  }
}

void bwd(std::uintptr_t h, std::uintptr_t hr, std::uintptr_t w, std::uintptr_t wr, long long n,
         long long d, long long dr, long long v, double inv_t, int dtype, std::uintptr_t lse,
         std::uintptr_t lser, std::uintptr_t fkl, std::uintptr_t rkl, std::uintptr_t g_fkl,
         std::uintptr_t g_rkl, std::uintptr_t g_lp, std::uintptr_t g_lpr, std::uintptr_t dh,
         std::uintptr_t dhr, std::uintptr_t dw, std::uintptr_t dwr, std::uintptr_t stream,
         int group) {
  const bool kl = hr != 0;
  check_sizes(n, d, dr, v, kl, wr == 0, static_cast<float>(inv_t), dtype);
  CHECK_PTR("h", h, 16);
  CHECK_PTR("w", w, 16);
  CHECK_OPT_PTR("hr", hr, 16);
  CHECK_OPT_PTR("wr", wr, 16);
  CHECK_ARG(kl || wr == 0, "wr given without hr (log-prob-only mode takes no reference)");
  CHECK_PTR("lse", lse, 4);
  if (kl) {
    CHECK_PTR("lser", lser, 4);
    CHECK_PTR("fkl", fkl, 4);
    CHECK_PTR("rkl", rkl, 4);
  } else {
    CHECK_ARG(g_fkl == 0 && g_rkl == 0 && g_lpr == 0 && dhr == 0 && dwr == 0,
              "log-prob-only backward takes no reference gradients");
  }
  for (auto p : {g_fkl, g_rkl, g_lp, g_lpr, dh, dhr, dw, dwr}) CHECK_OPT_PTR("gradient", p, 4);
  CHECK_ARG(wr != 0 || dwr == 0, "dwr given with a shared weight (dw receives both sides)");
  BwdArgs a{};
  a.h = ptr<const void>(h);
  a.hr = ptr<const void>(hr);
  a.w = ptr<const void>(w);
  a.wr = ptr<const void>(wr);
  a.n = n;
  a.d = d;
  a.dr = kl ? dr : d;
  a.v = v;
  a.inv_t = static_cast<float>(inv_t);
  a.lse = ptr<const float>(lse);
  a.lser = ptr<const float>(lser);
  a.fkl = ptr<const float>(fkl);
  a.rkl = ptr<const float>(rkl);
  a.g_fkl = ptr<const float>(g_fkl);
  a.g_rkl = ptr<const float>(g_rkl);
  a.g_lp = ptr<const float>(g_lp);
  a.g_lpr = ptr<const float>(g_lpr);
  a.dh = ptr<float>(dh);
  a.dhr = ptr<float>(dhr);
  a.dw = ptr<float>(dw);
  a.dwr = ptr<float>(dwr);
  a.group = group;
  a.stream = reinterpret_cast<cudaStream_t>(stream);
  py::gil_scoped_release nogil;
  if (dtype == fgpo::kBF16) {
    fgpo::launch_bwd_bf16(a);
  } else {
    fgpo::launch_bwd_f16(a);
  }
}

// (count, message): how many CUDA devices the runtime sees, and why none when it sees none.
py::tuple device_count() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state
    return py::make_tuple(0, std::string(cudaGetErrorString(err)));
  }
  return py::make_tuple(count, std::string(""));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA kernels of fgpo_kernels (token_kl / token_logprobs); see csrc/kernels.cuh";
  m.def("fwd", &fwd,
        "Forward statistics: fwd(h, hr, w, wr, n, d, dr, v, inv_t, dtype, splits, partial, lse, "
        "lser, fkl, rkl, stream, group=0, wgmma=False); pointers as integers, 0 = absent; "
        "group: row blocks numbered together (launch order; 0 = all); wgmma: the sm_90a kernel "
        "(needs WGMMA)",
        py::arg("h"), py::arg("hr"), py::arg("w"), py::arg("wr"), py::arg("n"), py::arg("d"),
        py::arg("dr"), py::arg("v"), py::arg("inv_t"), py::arg("dtype"), py::arg("splits"),
        py::arg("partial"), py::arg("lse"), py::arg("lser"), py::arg("fkl"), py::arg("rkl"),
        py::arg("stream"), py::arg("group") = 0, py::arg("wgmma") = false);
  m.def("bwd", &bwd,
        "Backward: bwd(h, hr, w, wr, n, d, dr, v, inv_t, dtype, lse, lser, fkl, rkl, g_fkl, "
        "g_rkl, g_lp, g_lpr, dh, dhr, dw, dwr, stream, group=0); outputs fp32, zero-filled by the "
        "caller",
        py::arg("h"), py::arg("hr"), py::arg("w"), py::arg("wr"), py::arg("n"), py::arg("d"),
        py::arg("dr"), py::arg("v"), py::arg("inv_t"), py::arg("dtype"), py::arg("lse"),
        py::arg("lser"), py::arg("fkl"), py::arg("rkl"), py::arg("g_fkl"), py::arg("g_rkl"),
        py::arg("g_lp"), py::arg("g_lpr"), py::arg("dh"), py::arg("dhr"), py::arg("dw"),
        py::arg("dwr"), py::arg("stream"), py::arg("group") = 0);
  m.def("device_count", &device_count, "(number of CUDA devices, error message or '')");
  m.attr("BLOCK_ROWS") = fgpo::kBlockRows;
  m.attr("BLOCK_VOCAB") = fgpo::kBlockVocab;
  m.attr("BLOCK_K") = fgpo::kBlockK;
  m.attr("SMEM_BYTES") = fgpo::kMaxSmemBytes;
  m.attr("ARCHS") = FGPO_ARCHS;
#if defined(FGPO_WGMMA) || defined(FGPO_EMULATE)
  m.attr("WGMMA") = true;  // the wgmma forward is built (an sm_90a target, or the CPU emulation)
#else
  m.attr("WGMMA") = false;
#endif
  m.attr("CUDART_VERSION") = CUDART_VERSION;
}
