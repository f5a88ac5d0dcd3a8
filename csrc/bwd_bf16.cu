// bwd kernels for __nv_bfloat16 inputs (one translation unit per dtype and pass: parallel builds).
#include "kernels.cuh"

namespace fgpo {
void launch_bwd_bf16(const BwdArgs& a) { launch_bwd<__nv_bfloat16>(a); }
}  // namespace fgpo
