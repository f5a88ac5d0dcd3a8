// fwd kernels for __nv_bfloat16 inputs (one translation unit per dtype and pass: parallel builds).
#include "kernels.cuh"

namespace fgpo {
void launch_fwd_bf16(const FwdArgs& a) { launch_fwd<__nv_bfloat16>(a); }
}  // namespace fgpo
