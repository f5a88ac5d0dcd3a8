// fwd kernels for __half inputs (one translation unit per dtype and pass: parallel builds).
#include "kernels.cuh"

namespace fgpo {
void launch_fwd_f16(const FwdArgs& a) { launch_fwd<__half>(a); }
}  // namespace fgpo
