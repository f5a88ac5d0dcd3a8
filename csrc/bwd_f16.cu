// bwd kernels for __half inputs (one translation unit per dtype and pass: parallel builds).
#include "kernels.cuh"

namespace fgpo {
void launch_bwd_f16(const BwdArgs& a) { launch_bwd<__half>(a); }
}  // namespace fgpo
