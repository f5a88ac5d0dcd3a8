// Tile-level math of the fused token statistics, shared by the CUDA kernels and a CPU test build.
//
// Everything here is __host__ __device__ and free of CUDA intrinsics, so tests/test_cuda_math.py
// compiles it with g++ and checks it against a float64 reference.
//
// Per row (z = policy logits, zr = reference logits, both already divided by the temperature):
//   m  = max z,   s  = sum e^(z - m),    a = sum e^(z - m)   (z - zr)
//   mr = max zr,  sr = sum e^(zr - mr),  b = sum e^(zr - mr) (zr - z)
// kept online while the vocabulary streams by (rescaled whenever a maximum moves), merged across
// threads and vocabulary splits with the log-sum-exp merge, and finished as
//   lse = m + log s,  lser = mr + log sr,
//   rkl = KL(p || r) = a / s  - lse + lser,      fkl = KL(r || p) = b / sr - lser + lse.
// Backward, per logit (p = e^(z - lse), r = e^(zr - lser), d = log p - log r):
//   G  = g_fkl (p - r) + g_rkl p (d - rkl) - g_lp p
//   Gr = g_fkl r (-d - fkl) + g_rkl (r - p) - g_lpr r
// Columns past the vocabulary and rows past N contribute nothing (masked, never NaN).
#pragma once

#include <math.h>

#ifdef __CUDACC__
#define FGPO_HD __host__ __device__ __forceinline__
#else
#define FGPO_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define FGPO_UNROLL _Pragma("unroll")
#else
#define FGPO_UNROLL
#endif

namespace fgpo {

// Number of per-row partial statistics written by the forward kernels (and read by the merge).
constexpr int kStatsKL = 6;  // m, s, a, mr, sr, b
constexpr int kStatsLP = 2;  // m, s

FGPO_HD float neg_inf() { return -INFINITY; }

// e^(x - m) for an online-softmax rescale: 0 when m is -inf (an empty partial), never NaN from
// (-inf) - (-inf).
FGPO_HD float safe_scale(float m_old, float m_new) {
  return (m_old == -INFINITY) ? 0.0f : expf(m_old - m_new);
}

FGPO_HD float fmax_nan(float a, float b) {
  // fmaxf drops NaN; a NaN logit must poison the row instead (NaN in -> NaN out).
  return (a != a || b != b) ? NAN : (a > b ? a : b);
}

// Column j of a vocabulary tile starting at v0 is real iff v0 + j < V.
FGPO_HD bool col_valid(long long v, long long V) { return v < V; }
FGPO_HD bool row_valid(long long i, long long N) { return i < N; }

// ---- log-prob-only statistics -----------------------------------------------------------------

struct LseState {
  float m, s;
};

FGPO_HD LseState lse_init() { return {neg_inf(), 0.0f}; }

// Move the running maximum to m_new (>= m) before adding terms measured against it.
FGPO_HD void lse_rescale(LseState& st, float m_new) {
  float c = safe_scale(st.m, m_new);
  st.s *= c;
  st.m = m_new;
}

FGPO_HD void lse_add(LseState& st, float z) { st.s += expf(z - st.m); }

FGPO_HD void lse_merge(LseState& x, const LseState& y) {
  float m = fmax_nan(x.m, y.m);
  if (m == -INFINITY) return;  // both empty
  x.s = x.s * safe_scale(x.m, m) + y.s * safe_scale(y.m, m);
  x.m = m;
}

FGPO_HD float lse_finish(const LseState& st) { return st.m + logf(st.s); }

// ---- two-model statistics ---------------------------------------------------------------------

struct KLState {
  float m, s, a;     // policy: max, scaled sum, cross sum  sum e^(z-m)(z-zr)
  float mr, sr, b;   // reference: max, scaled sum, cross sum  sum e^(zr-mr)(zr-z)
};

FGPO_HD KLState kl_init() { return {neg_inf(), 0.0f, 0.0f, neg_inf(), 0.0f, 0.0f}; }

FGPO_HD void kl_rescale(KLState& st, float m_new, float mr_new) {
  float c = safe_scale(st.m, m_new);
  float cr = safe_scale(st.mr, mr_new);
  st.s *= c;
  st.a *= c;
  st.m = m_new;
  st.sr *= cr;
  st.b *= cr;
  st.mr = mr_new;
}

FGPO_HD void kl_add(KLState& st, float z, float zr) {
  float e = expf(z - st.m);
  float er = expf(zr - st.mr);
  float dz = z - zr;
  st.s += e;
  st.a += e * dz;
  st.sr += er;
  st.b -= er * dz;
}

FGPO_HD void kl_merge(KLState& x, const KLState& y) {
  float m = fmax_nan(x.m, y.m);
  float mr = fmax_nan(x.mr, y.mr);
  if (m != -INFINITY) {
    float cx = safe_scale(x.m, m), cy = safe_scale(y.m, m);
    x.s = x.s * cx + y.s * cy;
    x.a = x.a * cx + y.a * cy;
    x.m = m;
  }
  if (mr != -INFINITY) {
    float cx = safe_scale(x.mr, mr), cy = safe_scale(y.mr, mr);
    x.sr = x.sr * cx + y.sr * cy;
    x.b = x.b * cx + y.b * cy;
    x.mr = mr;
  }
}

struct KLStats {
  float lse, lser, fkl, rkl;
};

FGPO_HD KLStats kl_finish(const KLState& st) {
  KLStats o;
  float ls = logf(st.s), lsr = logf(st.sr);
  o.lse = st.m + ls;
  o.lser = st.mr + lsr;
  // Group the small differences first: (m - mr) and (log s - log sr) are each O(1) even when
  // lse itself is large, which keeps the fp32 cancellation error near the size of the KL terms.
  float dlse = (st.m - st.mr) + (ls - lsr);  // lse - lser
  o.rkl = st.a / st.s - dlse;
  o.fkl = st.b / st.sr + dlse;
  return o;
}

// ---- backward coefficients --------------------------------------------------------------------

// Per-row inputs of the backward epilogue (fp32).
struct RowGrad {
  float lse, lser, fkl, rkl;
  float g_fkl, g_rkl, g_lp, g_lpr;
};

struct GradPair {
  float g, gr;  // dLoss/dz, dLoss/dzr for one logit
};

// G and Gr for one (row, column); z and zr already divided by the temperature.
FGPO_HD GradPair kl_grad(float z, float zr, const RowGrad& rg) {
  float logp = z - rg.lse;
  float logr = zr - rg.lser;
  float p = expf(logp), r = expf(logr);
  float d = logp - logr;
  GradPair o;
  o.g = rg.g_fkl * (p - r) + rg.g_rkl * p * (d - rg.rkl) - rg.g_lp * p;
  o.gr = rg.g_fkl * r * (-d - rg.fkl) + rg.g_rkl * (r - p) - rg.g_lpr * r;
  return o;
}

// Log-prob-only mode: G = -g_lp p.
FGPO_HD float lp_grad(float z, float lse, float g_lp) { return -g_lp * expf(z - lse); }

// ---- fragment-level helpers (the mma.sync m16n8k16 accumulator layout) -------------------------
//
// A warp's fp32 accumulator for a 16 x (8 NT) tile is float acc[NT][4] per thread; element
// acc[j][2 * half + e] of quad lane c (= lane % 4) sits at row (lane / 4) + 8 * half and column
// frag_col(j, c, e). These two functions are the whole per-tile epilogue of the forward and the
// backward for one row of one thread; the kernels call them and the CPU tests drive them with
// emulated fragments (garbage past V, to prove the masking).

FGPO_HD int frag_col(int j, int c, int e) { return j * 8 + 2 * c + e; }

// Fold one tile (columns v0 + frag_col(.) < V) into a thread's running statistics.
template <int NT, bool KL>
FGPO_HD void tile_update(KLState& st, LseState& ls, const float (&z)[NT][4],
                         const float (&zr)[NT][4], int half, int c, long long v0, long long V,
                         float inv_t) {
  float tm = neg_inf(), tmr = neg_inf();
  FGPO_UNROLL
  for (int j = 0; j < NT; ++j)
    FGPO_UNROLL
    for (int e = 0; e < 2; ++e) {
      if (col_valid(v0 + frag_col(j, c, e), V)) {
        tm = fmax_nan(tm, z[j][2 * half + e] * inv_t);
        if (KL) tmr = fmax_nan(tmr, zr[j][2 * half + e] * inv_t);
      }
    }
  if (KL) {
    kl_rescale(st, fmax_nan(st.m, tm), fmax_nan(st.mr, tmr));
  } else {
    lse_rescale(ls, fmax_nan(ls.m, tm));
  }
  FGPO_UNROLL
  for (int j = 0; j < NT; ++j)
    FGPO_UNROLL
    for (int e = 0; e < 2; ++e) {
      if (col_valid(v0 + frag_col(j, c, e), V)) {
        if (KL) {
          kl_add(st, z[j][2 * half + e] * inv_t, zr[j][2 * half + e] * inv_t);
        } else {
          lse_add(ls, z[j][2 * half + e] * inv_t);
        }
      }
    }
}

// Logit gradients of one tile for one row of one thread: g[j][e] (and gr) for column
// v0 + frag_col(j, c, e); exact zeros for masked columns and rows (row_ok false).
template <int NT, bool KL>
FGPO_HD void tile_grads(float (&g)[NT][2], float (&gr)[NT][2], const float (&z)[NT][4],
                        const float (&zr)[NT][4], int half, int c, long long v0, long long V,
                        bool row_ok, const RowGrad& rg, float inv_t) {
  FGPO_UNROLL
  for (int j = 0; j < NT; ++j)
    FGPO_UNROLL
    for (int e = 0; e < 2; ++e) {
      g[j][e] = 0.f;
      gr[j][e] = 0.f;
      if (row_ok && col_valid(v0 + frag_col(j, c, e), V)) {
        const float zz = z[j][2 * half + e] * inv_t;
        if (KL) {
          GradPair gp = kl_grad(zz, zr[j][2 * half + e] * inv_t, rg);
          g[j][e] = gp.g;
          gr[j][e] = gp.gr;
        } else {
          g[j][e] = lp_grad(zz, rg.lse, rg.g_lp);
        }
      }
    }
}

}  // namespace fgpo
