// Host-side launch interface between the pybind11 binding and the kernel translation units.
#pragma once

#ifdef FGPO_EMULATE
#include "emulate.h"
#else
#include <cuda_runtime.h>
#endif

namespace fgpo {

enum DType : int { kBF16 = 0, kF16 = 1 };

// Forward: per row lse (always) and, in KL mode, lser, fkl, rkl (fp32, length N).
struct FwdArgs {
  const void* h;   // (N, D)   bf16/fp16, row-major, 16-byte aligned, D % 8 == 0
  const void* hr;  // (N, Dr)  or null in log-prob-only mode
  const void* w;   // (V, D)
  const void* wr;  // (V, Dr)  or null: the reference shares w (then Dr == D)
  long long n, d, dr, v;
  float inv_t;      // 1 / temperature
  int splits;       // vocabulary splits (>= 1): CTAs along the vocabulary per row block
  int group = 0;    // row blocks numbered together (launch order below); 0 = all of them
  int wgmma = 0;    // 1: the sm_90a kernel (fwd_wgmma.cuh; needs FGPO_WGMMA), 0: mma.sync
  float* partial;   // workspace: splits * (6 or 2) * n floats
  float* lse;
  float* lser;      // null in log-prob-only mode (also fkl, rkl)
  float* fkl;
  float* rkl;
  cudaStream_t stream;
};

// Backward: dense logit gradients recomputed tile by tile and multiplied out; outputs are fp32,
// zero-initialised by the caller, accumulated with atomics. Null output = not needed.
struct BwdArgs {
  const void* h;
  const void* hr;
  const void* w;
  const void* wr;
  long long n, d, dr, v;
  float inv_t;
  const float* lse;
  const float* lser;   // null in log-prob-only mode (also fkl, rkl, g_fkl, g_rkl, g_lpr)
  const float* fkl;
  const float* rkl;
  const float* g_fkl;  // any of the g_* may be null (= zero)
  const float* g_rkl;
  const float* g_lp;
  const float* g_lpr;
  float* dh;   // (N, D)
  float* dhr;  // (N, Dr)
  float* dw;   // (V, D): with a shared weight it receives both sides
  float* dwr;  // (V, Dr): separate reference weight only
  int group = 0;  // row blocks numbered together (launch order below); 0 = all of them
  cudaStream_t stream;
};

// Launch order (fgpo_kernels/_launch.py chooses ``group``): a 1-D grid of row_blocks x cols
// CTAs (cols = vocabulary splits in the forward, vocabulary tiles in the backward) numbered in
// groups of ``group`` row blocks, row block fastest inside a group, so the CTAs resident at
// once share few hidden-state blocks and weight tiles, and both are reused from L2.
struct GridPos {
  long long row;  // row block
  long long col;  // split or vocabulary tile
};
__host__ __device__ inline GridPos grouped_pos(long long pid, long long row_blocks, long long cols,
                                                 long long group) {
  if (group < 1 || group > row_blocks) group = row_blocks;
  const long long per_group = group * cols;
  const long long first = (pid / per_group) * group;
  const long long size = row_blocks - first < group ? row_blocks - first : group;
  const long long local = pid % per_group;
  return GridPos{first + local % size, local / size};
}

void launch_fwd_bf16(const FwdArgs& a);
void launch_fwd_f16(const FwdArgs& a);
void launch_bwd_bf16(const BwdArgs& a);
void launch_bwd_f16(const BwdArgs& a);

// Tile sizes shared with the host (Python chooses the number of vocabulary splits from them).
constexpr int kBlockRows = 128;
constexpr int kBlockVocab = 128;
constexpr int kBlockK = 32;  // the cp.async ring's slice over D
constexpr int kStages = 3;   // slices in flight in the ring
constexpr int kStagesWgmma = 4;  // sm_90a wgmma forward: ring of 4 slices, 2 loads ahead
constexpr int kChunkD = 64;  // backward: D chunk of W (and H) multiplied out at a time
// Dynamic shared memory of the largest kernel (the backward), checked in kernels.cuh; the GPU
// must allow this much per block (sm_80: 163 KB, sm_90: 227 KB; sm_86/89: 99 KB is too little).
constexpr int kMaxSmemBytes = 124928;

}  // namespace fgpo
