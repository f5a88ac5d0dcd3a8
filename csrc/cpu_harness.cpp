// CPU harness for tile_math.h (built with g++ by tests/test_cuda_math.py; never part of _C).
//
// It replays, for one row, exactly what the kernels do with the accumulator fragments: vocabulary
// tiles of 8 * NT columns, each split into the 4 column subsets of a quad (frag_col), per-thread
// online statistics, the xor-butterfly merge across the quad, the merge across vocabulary splits
// (same split arithmetic as launch_fwd), and the finish; fragment slots that the row does not own
// or that lie past V hold NaN, so any masking mistake shows up as NaN.
#include <cmath>
#include <vector>

#include "tile_math.h"

#ifndef FGPO_NT
#define FGPO_NT 8
#endif

using namespace fgpo;

namespace {
constexpr int kTile = 8 * FGPO_NT;

void fill_frag(float (&f)[FGPO_NT][4], const float* src, long long V, long long v0, int half, int c) {
  for (int j = 0; j < FGPO_NT; ++j)
    for (int q = 0; q < 4; ++q) f[j][q] = NAN;
  if (src == nullptr) return;
  for (int j = 0; j < FGPO_NT; ++j)
    for (int e = 0; e < 2; ++e) {
      long long col = v0 + frag_col(j, c, e);
      f[j][2 * half + e] = col < V ? src[col] : NAN;
    }
}
}  // namespace

extern "C" {

// out = (lse, lser, fkl, rkl) for raw logits z, zr (before the temperature); zr unused if !kl.
int fgpo_row_stats(const float* z, const float* zr, long long V, int kl, int splits, int half,
                   float inv_t, float* out) {
  const long long n_tiles = (V + kTile - 1) / kTile;
  if (splits < 1) splits = 1;
  if (splits > n_tiles) splits = static_cast<int>(n_tiles);
  const long long tps = (n_tiles + splits - 1) / splits;
  splits = static_cast<int>((n_tiles + tps - 1) / tps);
  KLState tot = kl_init();
  LseState tot_l = lse_init();
  for (int s = 0; s < splits; ++s) {
    KLState st[4];
    LseState ls[4];
    for (int c = 0; c < 4; ++c) {
      st[c] = kl_init();
      ls[c] = lse_init();
    }
    const long long t1 = (s + 1) * tps < n_tiles ? (s + 1) * tps : n_tiles;
    for (long long t = s * tps; t < t1; ++t) {
      for (int c = 0; c < 4; ++c) {
        float fz[FGPO_NT][4], fzr[FGPO_NT][4];
        fill_frag(fz, z, V, t * kTile, half, c);
        fill_frag(fzr, kl ? zr : nullptr, V, t * kTile, half, c);
        if (kl) {
          tile_update<FGPO_NT, true>(st[c], ls[c], fz, fzr, half, c, t * kTile, V, inv_t);
        } else {
          tile_update<FGPO_NT, false>(st[c], ls[c], fz, fzr, half, c, t * kTile, V, inv_t);
        }
      }
    }
    for (int off = 1; off < 4; off <<= 1) {  // __shfl_xor_sync butterfly
      KLState st2[4];
      LseState ls2[4];
      for (int c = 0; c < 4; ++c) {
        st2[c] = st[c];
        kl_merge(st2[c], st[c ^ off]);
        ls2[c] = ls[c];
        lse_merge(ls2[c], ls[c ^ off]);
      }
      for (int c = 0; c < 4; ++c) {
        st[c] = st2[c];
        ls[c] = ls2[c];
      }
    }
    kl_merge(tot, st[0]);
    lse_merge(tot_l, ls[0]);
  }
  if (kl) {
    KLStats o = kl_finish(tot);
    out[0] = o.lse;
    out[1] = o.lser;
    out[2] = o.fkl;
    out[3] = o.rkl;
  } else {
    out[0] = lse_finish(tot_l);
  }
  return splits;
}

// G, Gr (length n_tiles * kTile, the padded tail must come back as exact zeros) for one row.
// rg = (lse, lser, fkl, rkl, g_fkl, g_rkl, g_lp, g_lpr).
void fgpo_row_grads(const float* z, const float* zr, long long V, int kl, int half, int row_ok,
                    const float* rg8, float inv_t, float* G, float* Gr) {
  const long long n_tiles = (V + kTile - 1) / kTile;
  RowGrad rg = {rg8[0], rg8[1], rg8[2], rg8[3], rg8[4], rg8[5], rg8[6], rg8[7]};
  for (long long t = 0; t < n_tiles; ++t) {
    for (int c = 0; c < 4; ++c) {
      float fz[FGPO_NT][4], fzr[FGPO_NT][4], g[FGPO_NT][2], gr[FGPO_NT][2];
      fill_frag(fz, z, V, t * kTile, half, c);
      fill_frag(fzr, kl ? zr : nullptr, V, t * kTile, half, c);
      if (kl) {
        tile_grads<FGPO_NT, true>(g, gr, fz, fzr, half, c, t * kTile, V, row_ok != 0, rg, inv_t);
      } else {
        tile_grads<FGPO_NT, false>(g, gr, fz, fzr, half, c, t * kTile, V, row_ok != 0, rg, inv_t);
      }
      for (int j = 0; j < FGPO_NT; ++j)
        for (int e = 0; e < 2; ++e) {
          G[t * kTile + frag_col(j, c, e)] = g[j][e];
          Gr[t * kTile + frag_col(j, c, e)] = gr[j][e];
        }
    }
  }
}

// Two partial states merged (the split merge of fgpo_merge_kernel): in = 2 x 6 floats.
void fgpo_merge_pair(const float* x, const float* y, float* out) {
  KLState a = {x[0], x[1], x[2], x[3], x[4], x[5]};
  KLState b = {y[0], y[1], y[2], y[3], y[4], y[5]};
  kl_merge(a, b);
  out[0] = a.m;
  out[1] = a.s;
  out[2] = a.a;
  out[3] = a.mr;
  out[4] = a.sr;
  out[5] = a.b;
}
}
