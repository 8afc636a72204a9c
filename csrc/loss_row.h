// The per-row math of every loss of apl-repro, written once for the CPU and CUDA kernels.
//
// Formulas and their sources: LOSSES.md (the single source of truth; this file implements
// it). A kernel reduces one row to a few sums (RowSums), turns them into the row's basic
// log-probabilities (RowBasics) and the loss values (active, passive and their normalisers),
// stored as the per-row `stats`. The backward turns a row's stats into a few coefficients
// (Coefs, RowGrad) of the common form of every gradient (LOSSES.md, "The fused operator"),
//
//   dL/dz_j = P p_j + D [j = y] + K + G q_j [j != y] + W w_j + R p_j [j in M],
//
// so one loop over the row (grad_not_target) serves every loss; see "backward" below for the
// cancellation-free way the coefficients are grouped.
//
// Everything here is inline and has internal linkage (static) on the host: the CPU kernels
// are compiled several times with different instruction sets (csrc/cpu/row_kernels_*.cpp)
// and must not share out-of-line copies of these functions.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define APL_HD static inline __host__ __device__
#define APL_HD_MEMBER inline __host__ __device__
#else
#define APL_HD static inline
#define APL_HD_MEMBER inline
#endif

namespace apl {
namespace row {

// Every kind of per-row loss term, once: its name and code (the operator's ABI). apl.losses.spec.Kind
// mirrors it and apl/losses/fused.py checks the two agree when it loads the extension.
// clang-format off
#define APL_LOSS_KINDS(X)                                                                        \
  X(NONE, 0) X(CE, 1) X(FL, 2) X(FL_DETACHED, 3) X(NCE_MA2020, 4) X(NFL_MA2020, 5) X(NCE_PAPER, 6) \
  X(NFL_PAPER, 7) X(MAE, 8) X(RCE, 9) X(GCE, 10) X(MAE_AUTHOR, 11) X(RCE_AUTHOR, 12) X(AGCE, 13)     \
  X(AUL, 14) X(AEL, 15) X(NNCE, 16) X(NNFL, 17) X(AMSE, 18) X(ECE, 19) X(EFL, 20) X(MAE2, 21)       \
  X(NGCE, 22) X(NMAE, 23) X(NRCE, 24)

enum Kind : int {
#define APL_KIND_VALUE(name, code) name = code,
#define APL_KIND_COUNT(name, code) +1
  APL_LOSS_KINDS(APL_KIND_VALUE)
  NUM_KINDS = 0 APL_LOSS_KINDS(APL_KIND_COUNT),
#undef APL_KIND_VALUE
#undef APL_KIND_COUNT
};
// clang-format on

// Columns of the per-row `stats` tensor the forward saves for the backward. Ignored rows
// are all zero. Kind-specific columns are zero when the kind is absent.
enum Stat : int {
  ST_ACTIVE = 0,           // active term's row value, before alpha and the batch scale
  ST_PASSIVE = 1,          // passive term's row value, before beta
  ST_MAX_NY = 2,           // m = max_{k != y} z_k
  ST_LOGSUM_NY = 3,        // log sum_{k != y} exp(z_k - m); logsumexp_{k != y} z = m + this
  ST_LOG_P = 4,            // log p_y
  ST_LOG_ONE_MINUS_P = 5,  // log(1 - p_y), exact even when p_y rounds to 1
  ST_P = 6,                // p_y
  ST_ONE_MINUS_P = 7,      // 1 - p_y (from the same exp as p_y, not by subtraction)
  ST_FOCAL_W = 8,          // (1 - p_y)^gamma = exp(gamma * log(1 - p_y)) (FL kinds only)
  ST_NORM = 9,             // NCE_MA2020: sum_k log p_k; NFL_MA2020: sum_k w_k log p_k
  ST_WSUM = 10,            // NFL_MA2020: sum_k w_k
  ST_RCE_MASS = 11,        // RCE: sum of the unclamped p_k (k != y, 1e-7 < p_k < 1): the set M
  ST_RCE_CMASS = 12,       // RCE: 1 - ST_RCE_MASS, summed directly (p_y + p_k outside M) for precision
  NUM_STATS = 13,
};

// -ln(1e-4): RCE's constant A (apl.losses.spec.RCE_A); 1e-7: the probability clamp (PROB_CLAMP).
constexpr double kRceA = 9.210340371976182736;
constexpr double kProbClamp = 1e-7;
constexpr double kLabelClamp = 1e-4;  // RCE's clamp of the target before the log (apl.losses.spec.LABEL_CLAMP)
constexpr double kLogProbClamp = -16.11809565095831978;  // log(1e-7)
constexpr double kLn2 = 0.693147180559945309;
// The author's RCE target: 1 - s on the label, s / (C - 1) elsewhere, clamped to [clip, 1 - clip]
// (apl.losses.spec.AUTHOR_SMOOTHING, AUTHOR_TARGET_CLIP).
constexpr double kAuthorSmoothing = 0.1;
constexpr double kAuthorTargetClip = 1e-7;

template <typename T>
struct LossParams {
  int active;
  int passive;
  T alpha, beta, gamma, q;
};

// ---------------------------------------------------------------- scalar maths
// Overloads instead of std:: so the same names work in CUDA device code.
APL_HD float apl_exp(float x) { return expf(x); }
APL_HD double apl_exp(double x) { return exp(x); }
APL_HD float apl_log(float x) { return logf(x); }
APL_HD double apl_log(double x) { return log(x); }
APL_HD float apl_expm1(float x) { return expm1f(x); }
APL_HD double apl_expm1(double x) { return expm1(x); }
APL_HD float apl_sqrt(float x) { return sqrtf(x); }
APL_HD double apl_sqrt(double x) { return sqrt(x); }

// max that returns NaN when either argument is NaN (std::max / fmax drop NaNs, which
// would turn a NaN logit into a finite loss).
template <typename T>
APL_HD T nanmax(T a, T b) {
  return (a != a) ? a : (a >= b ? a : b);
}

// The math below is written once against a "maths policy" M: M::V is the value type (a
// scalar, or a vector of rows or of classes), M::S the scalar type of the parameters. This is
// the scalar policy (CUDA, and the CPU's per-row bookkeeping); csrc/cpu/row_kernels_impl.h
// supplies the at::vec::Vectorized one. Every data-dependent choice is a select.
template <typename T>
struct ScalarMath {
  using V = T;
  using S = T;
  APL_HD V exp(V x) { return apl_exp(x); }
  APL_HD V log(V x) { return apl_log(x); }
  APL_HD V expm1(V x) { return apl_expm1(x); }
  // expm1 for x in [-ln 2, 0] (one_minus_p's branch); other lanes' results are discarded.
  APL_HD V expm1_small(V x) { return apl_expm1(x); }
  APL_HD V sqrt(V x) { return apl_sqrt(x); }
  // whether x > t (in any lane)
  APL_HD bool any_gt(V x, S t) { return x > t; }
  // x > t ? a : b, x < t ? a : b, x == t ? a : b
  APL_HD V select_gt(V x, S t, V a, V b) { return x > t ? a : b; }
  APL_HD V select_lt(V x, S t, V a, V b) { return x < t ? a : b; }
  APL_HD V select_eq(V x, S t, V a, V b) { return x == t ? a : b; }
  // lo < x < hi ? a : b  (torch.clamp passes a gradient only strictly inside its bounds)
  APL_HD V select_inside(V x, S lo, S hi, V a, V b) { return (x > lo && x < hi) ? a : b; }
  // torch.clamp: NaN stays NaN
  APL_HD V clamp(V x, S lo, S hi) { return x < lo ? V(lo) : (x > hi ? V(hi) : x); }
};

// 1 - p from p and log p: -expm1(log p) where p > 1/2 (exact when p rounds to 1), else 1 - p
// (exact to an ulp there). These are the two branches of log1mexp (LOSSES.md "Numerics"),
// before the log. Vector lanes above 1/2 are rare (at most one class per row), so expm1 is
// only evaluated when some lane needs it.
template <class M>
APL_HD typename M::V one_minus_p(typename M::V p, typename M::V log_py) {
  using V = typename M::V;
  using S = typename M::S;
  V r = V(S(1)) - p;
  if (M::any_gt(log_py, S(-kLn2))) r = M::select_gt(log_py, S(-kLn2), V(S(0)) - M::expm1_small(log_py), r);
  return r;
}

// (1 - p)^gamma from 1 - p, detached weights of NFL_MA2020: gamma = 0 gives 1 (also for
// p = 1), gamma = 0.5 (the default) a square root, otherwise exp(gamma log(1 - p)).
template <class M>
APL_HD typename M::V focal_weight_from_one_minus_p(typename M::V one_minus_py, typename M::S gamma) {
  using V = typename M::V;
  using S = typename M::S;
  if (gamma == S(0)) return V(S(1));
  if (gamma == S(0.5)) return M::sqrt(one_minus_py);
  if (gamma == S(1)) return one_minus_py;
  return M::exp(V(gamma) * M::log(one_minus_py));
}

// (1 - p_y)^gamma = exp(gamma log(1 - p_y)) (FL, FL_DETACHED, NFL_PAPER); gamma = 0 gives 1.
template <class M>
APL_HD typename M::V focal_weight_from_log_one_minus_p(typename M::V log_one_minus_py, typename M::S gamma) {
  using V = typename M::V;
  using S = typename M::S;
  return gamma == S(0) ? V(S(1)) : M::exp(V(gamma) * log_one_minus_py);
}

// MAE_AUTHOR and RCE_AUTHOR are offset + slope (1 - p_y) (apl.losses.spec.author_affine): MAE's
// gradient times the slope.
template <typename S>
APL_HD void author_affine(int kind, S c_classes, S& offset, S& slope) {
  if (kind == MAE_AUTHOR) {
    offset = S(0);
    slope = S(2) / c_classes;
    return;
  }
  const double lo = kAuthorTargetClip, hi = 1.0 - kAuthorTargetClip;
  const double t_y = fmin(fmax(1.0 - kAuthorSmoothing, lo), hi);
  const double t_o = fmin(fmax(kAuthorSmoothing / (static_cast<double>(c_classes) - 1.0), lo), hi);
  offset = S(-apl_log(t_y));
  slope = S(apl_log(t_y) - apl_log(t_o));
}
APL_HD bool is_author_affine(int kind) { return kind == MAE_AUTHOR || kind == RCE_AUTHOR; }

APL_HD bool is_normalised(int kind) { return kind == NCE_MA2020 || kind == NFL_MA2020; }
APL_HD bool is_batch_level(int kind) { return kind == NCE_PAPER || kind == NFL_PAPER; }
// The fused operator takes any kind as the active term; the passive term must not need
// columns of its own (normalisers) nor a batch statistic.
// The successors' kinds (AGCE ..) are named for the ABI but not computed by these kernels yet.
APL_HD bool valid_active(int kind) { return kind > NONE && kind <= RCE_AUTHOR; }
APL_HD bool valid_passive(int kind) {
  return kind >= NONE && kind <= RCE_AUTHOR && !is_normalised(kind) && !is_batch_level(kind);
}
template <typename T>
APL_HD bool uses(const LossParams<T>& p, int kind) {
  return p.active == kind || p.passive == kind;
}
// Which optional row passes a loss needs.
template <typename T>
APL_HD bool needs_zsum(const LossParams<T>& p) {
  return p.active == NCE_MA2020;
}
template <typename T>
APL_HD bool needs_rce_pass(const LossParams<T>& p) {
  return uses(p, RCE);
}
template <typename T>
APL_HD bool needs_nfl_pass(const LossParams<T>& p) {
  return p.active == NFL_MA2020;
}
template <typename T>
APL_HD bool uses_focal_weight(const LossParams<T>& p) {
  return uses(p, FL) || uses(p, FL_DETACHED) || uses(p, NFL_PAPER);
}

// ---------------------------------------------------------------- forward
// What the first two passes over a row produce (sums over k != y only).
template <typename V>
struct RowSums {
  V max_ny;   // max_{k != y} z_k
  V sum_ny;   // sum_{k != y} exp(z_k - max_ny)   (>= 1)
  V zsum_ny;  // sum_{k != y} (z_k - max_ny)      (NCE_MA2020 only)
};

// The row's log-probabilities, all relative to m = max_{k != y} z_k so that large logits
// lose no precision: log p_j = (z_j - m) - shift, q_j = exp((z_j - m) - lsum) (softmax over
// k != y), log p_y and log(1 - p_y) from d = logit of p_y, exactly (LOSSES.md "Numerics").
template <typename V>
struct RowBasics {
  V m;                 // max_{k != y} z_k
  V lsum;              // log sum_{k != y} exp(z_k - m)
  V shift;             // lse - m  (lse = logsumexp over all k)
  V log_py;            // log p_y
  V log_one_minus_py;  // log(1 - p_y)
  V p_y;               // p_y
  V one_minus_py;      // 1 - p_y
};

// From d = log(p_y / (1 - p_y)) with one exp and one log: e = exp(-|d|),
// -log p_y = softplus(-d) = max(-d, 0) + log1p(e), -log(1 - p_y) = max(d, 0) + log1p(e),
// and p_y, 1 - p_y = 1/(1+e), e/(1+e) in the order the sign of d says. NaN stays NaN.
template <class M>
APL_HD RowBasics<typename M::V> basics_from(typename M::V m, typename M::V lsum, typename M::V z_y) {
  using V = typename M::V;
  using S = typename M::S;
  RowBasics<V> basics;
  basics.m = m;
  basics.lsum = lsum;
  const V zero(S(0)), one(S(1));
  const V d = (z_y - m) - lsum;
  const V e = M::exp(M::select_gt(d, S(0), zero - d, d));
  // log1p(e) for e in [0, 1] as log(u) * e / (u - 1), u = 1 + e (exact to a few ulps; libm's
  // log1pf costs twice a logf)
  const V u = one + e;
  const V l = M::select_eq(u, S(1), e, M::log(u) * (e / (u - one)));
  const V sp_pos = M::select_gt(d, S(0), d, zero) + l;         // -log(1 - p_y)
  const V sp_neg = M::select_gt(d, S(0), zero, zero - d) + l;  // -log p_y
  basics.log_one_minus_py = zero - sp_pos;
  basics.log_py = zero - sp_neg;
  basics.shift = lsum + sp_pos;
  const V inv = one / u;
  basics.p_y = M::select_gt(d, S(0), inv, e * inv);
  basics.one_minus_py = M::select_gt(d, S(0), e * inv, inv);
  return basics;
}

template <class M>
APL_HD RowBasics<typename M::V> basics_from_sums(const RowSums<typename M::V>& s, typename M::V z_y) {
  return basics_from<M>(s.max_ny, M::log(s.sum_ny), z_y);
}

template <typename V>
APL_HD RowBasics<V> basics_from_stats(const V* st) {
  RowBasics<V> basics;
  basics.m = st[ST_MAX_NY];
  basics.lsum = st[ST_LOGSUM_NY];
  basics.log_py = st[ST_LOG_P];
  basics.log_one_minus_py = st[ST_LOG_ONE_MINUS_P];
  basics.p_y = st[ST_P];
  basics.one_minus_py = st[ST_ONE_MINUS_P];
  basics.shift = basics.lsum - basics.log_one_minus_py;  // bit-identical to the forward's lsum + softplus(d)
  return basics;
}

// Per-element contributions of the optional third pass (k != y). `B` is the type of the row
// quantities: a scalar broadcast over a vector of classes, or the vector of rows itself.
// Each comes in two forms: from the logit z, or from q = exp(z - m) / sum_{k != y} exp(z_k - m)
// where a kernel kept the second pass's exps (one exp per element less).
// RCE: p_k = q_k (1 - p_y); value sums clamp(p_k, 1e-7, 1), mass the unclamped p_k (k in M),
// outside the others.
template <class M, typename B>
APL_HD void rce_terms_q(typename M::V q, const RowBasics<B>& basics, typename M::V& value, typename M::V& mass,
                        typename M::V& outside) {
  using V = typename M::V;
  using S = typename M::S;
  const V pk = q * V(basics.one_minus_py);
  value = M::clamp(pk, S(kProbClamp), S(1));
  mass = M::select_inside(pk, S(kProbClamp), S(1), pk, V(S(0)));
  outside = M::select_inside(pk, S(kProbClamp), S(1), V(S(0)), pk);
}

template <class M, typename B>
APL_HD void rce_terms(typename M::V z, const RowBasics<B>& basics, typename M::V& value, typename M::V& mass,
                      typename M::V& outside) {
  using V = typename M::V;
  rce_terms_q<M>(M::exp((z - V(basics.m)) - V(basics.lsum)), basics, value, mass, outside);
}

// NFL_MA2020: w_k log p_k and w_k with w_k = (1 - p_k)^gamma detached.
template <class M, typename B>
APL_HD void nfl_terms_q(typename M::V z, typename M::V q, const RowBasics<B>& basics, typename M::S gamma,
                        typename M::V& wlogp, typename M::V& w) {
  using V = typename M::V;
  const V lp = (z - V(basics.m)) - V(basics.shift);
  w = focal_weight_from_one_minus_p<M>(one_minus_p<M>(q * V(basics.one_minus_py), lp), gamma);
  wlogp = w * lp;
}

template <class M, typename B>
APL_HD void nfl_terms(typename M::V z, const RowBasics<B>& basics, typename M::S gamma, typename M::V& wlogp,
                      typename M::V& w) {
  using V = typename M::V;
  const V lp = (z - V(basics.m)) - V(basics.shift);
  w = focal_weight_from_one_minus_p<M>(one_minus_p<M>(M::exp(lp), lp), gamma);
  wlogp = w * lp;
}

// NFL_MA2020's weight of the target itself, computed as every other class's.
template <class M>
APL_HD typename M::V nfl_weight_y(const RowBasics<typename M::V>& basics, typename M::S gamma) {
  return focal_weight_from_one_minus_p<M>(one_minus_p<M>(basics.p_y, basics.log_py), gamma);
}

// Third-pass results, summed over k != y.
template <typename V>
struct RowExtra {
  V rce_value;    // sum_{k != y} clamp(p_k, 1e-7, 1)
  V rce_mass;     // sum_{k != y, 1e-7 < p_k < 1} p_k
  V rce_outside;  // sum_{k != y, p_k <= 1e-7 or p_k >= 1} p_k
  V nfl_norm;     // sum_{k != y} w_k log p_k
  V nfl_wsum;     // sum_{k != y} w_k
};

// Value of one term for a row (before alpha/beta and the batch scale).
// `norm` is the row's normaliser for the normalised kinds (stats ST_NORM).
template <class M>
APL_HD typename M::V term_value(int kind, const RowBasics<typename M::V>& basics, const LossParams<typename M::S>& p,
                                typename M::V norm, typename M::V rce_value, typename M::S c_classes) {
  using V = typename M::V;
  using S = typename M::S;
  const V zero(S(0));
  switch (kind) {
    case CE:
    case NCE_PAPER:
      return zero - basics.log_py;
    case FL:
    case FL_DETACHED:
    case NFL_PAPER:
      return zero - focal_weight_from_log_one_minus_p<M>(basics.log_one_minus_py, p.gamma) * basics.log_py;
    case NCE_MA2020:
      return basics.log_py / norm;
    case NFL_MA2020:
      return nfl_weight_y<M>(basics, p.gamma) * basics.log_py / norm;
    case MAE:
      return basics.one_minus_py;
    case RCE:
      return V(S(kRceA)) * rce_value;
    case MAE_AUTHOR:
    case RCE_AUTHOR: {
      S offset, slope;
      author_affine(kind, c_classes, offset, slope);
      return V(offset) + V(slope) * basics.one_minus_py;
    }
    case GCE: {
      // (1 - clamp(p_y, 1e-7, 1)^q) / q taken on log p_y: -expm1(q max(log p_y, log 1e-7)) / q
      // (expm1 keeps precision near p_y = 1; NaN stays NaN)
      const V lp = M::select_lt(basics.log_py, S(kLogProbClamp), V(S(kLogProbClamp)), basics.log_py);
      return (zero - M::expm1(V(p.q) * lp)) / V(p.q);
    }
    default:
      return zero;
  }
}

// A valid row's stats (st[0 .. NUM_STATS)) from its sums. `c_classes` is C.
template <class M>
APL_HD void row_stats(typename M::V* st, const RowBasics<typename M::V>& basics, const RowSums<typename M::V>& s,
                      const RowExtra<typename M::V>& extra, const LossParams<typename M::S>& p,
                      typename M::S c_classes) {
  using V = typename M::V;
  using S = typename M::S;
  const V zero(S(0));
  V norm = zero, wsum = zero;
  if (p.active == NCE_MA2020) {
    // sum_k log p_k = sum_{k != y} (z_k - m) - (C - 1) * shift + log p_y
    norm = s.zsum_ny - V(c_classes - S(1)) * basics.shift + basics.log_py;
  } else if (p.active == NFL_MA2020) {
    const V wy = nfl_weight_y<M>(basics, p.gamma);
    norm = extra.nfl_norm + wy * basics.log_py;
    wsum = extra.nfl_wsum + wy;
  }
  st[ST_ACTIVE] = term_value<M>(p.active, basics, p, norm, extra.rce_value, c_classes);
  st[ST_PASSIVE] = p.passive == NONE ? zero : term_value<M>(p.passive, basics, p, norm, extra.rce_value, c_classes);
  st[ST_MAX_NY] = basics.m;
  st[ST_LOGSUM_NY] = basics.lsum;
  st[ST_LOG_P] = basics.log_py;
  st[ST_LOG_ONE_MINUS_P] = basics.log_one_minus_py;
  st[ST_P] = basics.p_y;
  st[ST_ONE_MINUS_P] = basics.one_minus_py;
  st[ST_FOCAL_W] = uses_focal_weight(p) ? focal_weight_from_log_one_minus_p<M>(basics.log_one_minus_py, p.gamma) : zero;
  st[ST_NORM] = norm;
  st[ST_WSUM] = wsum;
  st[ST_RCE_MASS] = extra.rce_mass;
  st[ST_RCE_CMASS] = uses(p, RCE) ? basics.p_y + extra.rce_outside : zero;
}

// ---------------------------------------------------------------- batch step
// After the row pass, one step over the N rows' stats makes the batch terms (the paper forms'
// statistic, the 'mean' denominator) and the reduced loss. Both devices run it with these
// functions: the CPU in a serial loop, CUDA in one block (LOSSES.md "The fused operator").

enum Reduction : int { RED_NONE = 0, RED_MEAN = 1, RED_SUM = 2 };
APL_HD bool valid_reduction(int64_t r) { return r >= RED_NONE && r <= RED_SUM; }

// Entries of the op's `batch` output, which the backward reads.
enum BatchTerm : int {
  BT_SCALE = 0,     // active term's batch scale: 1/H (NCE_PAPER), 1/B (NFL_PAPER), else 1
  BT_MEAN_W = 1,    // NFL_PAPER's B, the mean focal weight of the non-ignored rows
  BT_N_VALID = 2,   // number of non-ignored rows
  BT_DENOM = 3,     // 'mean' denominator: N_valid, or the sum of the valid rows' class weights
  BT_SUM_WACT = 4,  // sum over valid rows of class weight * active value (NFL_PAPER's gradient)
  NUM_BATCH = 5,
};

// Scale of the active term of the paper's forms (LOSSES.md "Defined edge cases"):
// NCE_PAPER: 1 / H, H = entropy of the batch's target histogram, H = 0 -> ln C.
template <typename T>
APL_HD T nce_paper_scale(T entropy, T c_classes) {
  return T(1) / (entropy > T(0) ? entropy : apl_log(c_classes));
}
// NFL_PAPER: 1 / B, B = mean focal weight; B = 0 -> the term and its gradient are 0.
template <typename T>
APL_HD T nfl_paper_scale(T mean_weight) {
  return mean_weight == T(0) ? T(0) : T(1) / mean_weight;
}
// NFL_PAPER's gradient through B: every row gets -c * d w_i / dz with
// c = alpha * sum_i g_i FL_i / (N_valid B^2)  (g_i: upstream gradient of row i).
template <typename T>
APL_HD T nfl_paper_batch_coef(T alpha, T sum_g_fl, T n_valid, T mean_weight) {
  return mean_weight == T(0) ? T(0) : alpha * sum_g_fl / (n_valid * mean_weight * mean_weight);
}

// Sums over the non-ignored rows (w: the row's class weight, 1 without weights).
template <typename T>
struct BatchSums {
  T n_valid;  // count
  T wsum;     // sum w
  T wact;     // sum w * active value
  T wpas;     // sum w * passive value
  T focal;    // sum of the focal weights (unweighted: B is a batch statistic, LOSSES.md)
};

template <typename T, typename S>
APL_HD void add_row(BatchSums<T>& s, const S* st, T w) {
  s.n_valid += T(1);
  s.wsum += w;
  s.wact += w * static_cast<T>(st[ST_ACTIVE]);
  s.wpas += w * static_cast<T>(st[ST_PASSIVE]);
  s.focal += static_cast<T>(st[ST_FOCAL_W]);
}

// One class's share of the label entropy H: -pi log pi with pi = count / N_valid.
template <typename T>
APL_HD T entropy_term(T count, T n_valid) {
  if (count <= T(0)) return T(0);
  const T pi = count / n_valid;
  return -pi * apl_log(pi);
}

// The batch terms (BatchTerm) from the sums; `entropy` is H (NCE_PAPER only).
template <typename T>
APL_HD void batch_terms(int active, bool weighted, const BatchSums<T>& s, T entropy, T c_classes, T* batch) {
  T scale = T(1), mean_w = T(0);
  if (active == NCE_PAPER) {
    scale = nce_paper_scale(entropy, c_classes);
  } else if (active == NFL_PAPER) {
    // no valid row: B = 0, so the term is 0 ('sum' 0, 'mean' 0/0 = NaN, as without weights)
    mean_w = s.n_valid > T(0) ? s.focal / s.n_valid : T(0);
    scale = nfl_paper_scale(mean_w);
  }
  batch[BT_SCALE] = scale;
  batch[BT_MEAN_W] = mean_w;
  batch[BT_N_VALID] = s.n_valid;
  batch[BT_DENOM] = weighted ? s.wsum : s.n_valid;  // 0 with no valid row: the mean is NaN, as F.cross_entropy
  batch[BT_SUM_WACT] = s.wact;
}

// A valid row's loss: alpha * scale * active + beta * passive, times the weight of its class y
// when there are per-class weights (`weight` not null).
template <typename T>
APL_HD T row_loss(const T* st, T alpha_scale, T beta, bool has_passive, const T* weight, int64_t y) {
  T v = alpha_scale * st[ST_ACTIVE];
  if (has_passive) v += beta * st[ST_PASSIVE];
  return weight != nullptr ? v * weight[y] : v;
}

// The 'mean' or 'sum' of the rows' losses from the sums and the batch terms.
template <typename T>
APL_HD T reduced_loss(int reduction, T alpha, T beta, bool has_passive, const BatchSums<T>& s, const T* batch) {
  T total = alpha * batch[BT_SCALE] * s.wact;
  if (has_passive) total += beta * s.wpas;
  return reduction == RED_MEAN ? total / batch[BT_DENOM] : total;
}

// The reduced loss's upstream gradient per unit class weight: g / denominator for 'mean'.
template <typename T>
APL_HD T reduced_grad(int reduction, T grad_loss, const T* batch) {
  return reduction == RED_MEAN ? grad_loss / batch[BT_DENOM] : grad_loss;
}

// NFL_PAPER's batch coefficient of a reduced loss: sum_i g_i FL_i = g * sum_i w_i FL_i.
template <typename T>
APL_HD T nfl_paper_reduced_coef(T alpha, T g_unit, const T* batch) {
  return nfl_paper_batch_coef(alpha, g_unit * batch[BT_SUM_WACT], batch[BT_N_VALID], batch[BT_MEAN_W]);
}

// Which steps a call runs (LaunchPlan: the same on every device). The row pass writes each
// row's loss itself when nothing batch-level is needed ('none' of a per-row loss).
APL_HD bool row_pass_writes_loss(int active, int reduction) { return reduction == RED_NONE && !is_batch_level(active); }
APL_HD bool needs_batch_step(int active, int reduction) { return !row_pass_writes_loss(active, reduction); }
// NFL_PAPER's 'none' gradient needs sum_i g_i FL_i over the rows first: one more step.
APL_HD bool needs_backward_batch_step(int active, int reduction) {
  return active == NFL_PAPER && reduction == RED_NONE;
}

// ---------------------------------------------------------------- backward
// The gradient of a row, dL/dz_j = P p_j + D [j = y] + K + G q_j [j != y] + W w_j + R p_j [j in M]
// (LOSSES.md), evaluated in a form without cancellations where a probability is near 0 or 1:
// - for j != y, p_j = q_j (1 - p_y), so P p_j + G q_j = Q q_j with Q = P (1 - p_y) + G, and
//   each term adds its Q from a formula that is exact in floating point (e.g. FL's
//   w (1 - p_y) - g w p_y log p_y rather than the difference of two large products);
// - the target's entry Y = dL/dz_y is accumulated per term from exact quantities (1 - p_y
//   from log(1 - p_y), never by subtraction);
// - RCE's P = -A mass and R = A are folded per side of the clamp: a class in M gets
//   A (1 - mass) p_j with 1 - mass summed directly (ST_RCE_CMASS), a class outside M gets
//   -A mass p_j.
// One exp per element (q_j), plus NFL_MA2020's w_j where that term is present.
template <typename V>
struct Coefs {
  V Q;     // of q_j, j != y
  V Qin;   // extra of q_j for j != y in M (RCE)
  V Qout;  // extra of q_j for j != y outside M (RCE)
  V K;     // constant, j != y
  V W;     // of w_j (NFL_MA2020's detached weights), j != y
  V Y;     // dL/dz_y
};

// Add `weight` times the gradient of one term.
template <class M>
APL_HD void add_term_coefs(Coefs<typename M::V>& c, int kind, typename M::V weight,
                           const RowBasics<typename M::V>& basics, const typename M::V* st,
                           const LossParams<typename M::S>& p, typename M::S c_classes) {
  using V = typename M::V;
  using S = typename M::S;
  const V p_y = basics.p_y, one_minus_py = basics.one_minus_py, one(S(1));
  switch (kind) {
    case CE:
    case NCE_PAPER:  // p_j - [j = y]
      c.Q = c.Q + weight * one_minus_py;
      c.Y = c.Y - weight * one_minus_py;
      break;
    case FL:
    case NFL_PAPER: {  // -w log p_y, w = (1-p_y)^g, d w = g w (q_j [j != y] - p_j)
      const V w = focal_weight_from_log_one_minus_p<M>(basics.log_one_minus_py, p.gamma);
      const V glp = V(p.gamma) * basics.log_py;
      c.Q = c.Q + weight * w * (one_minus_py - glp * p_y);
      c.Y = c.Y + weight * w * (glp * p_y - one_minus_py);
      break;
    }
    case FL_DETACHED: {
      const V w = focal_weight_from_log_one_minus_p<M>(basics.log_one_minus_py, p.gamma);
      c.Q = c.Q + weight * w * one_minus_py;
      c.Y = c.Y - weight * w * one_minus_py;
      break;
    }
    case NCE_MA2020: {  // log p_y / T, T = sum_k log p_k, dT/dz_j = 1 - C p_j
      const V t = st[ST_NORM];
      const V t2 = t * t;
      const V cc(c_classes);
      c.Q = c.Q + weight * (cc * basics.log_py - t) / t2 * one_minus_py;
      c.K = c.K - weight * basics.log_py / t2;
      c.Y = c.Y + weight * (t * one_minus_py + basics.log_py * (cc * p_y - one)) / t2;
      break;
    }
    case NFL_MA2020: {  // w_y log p_y / U, U = sum_k w_k log p_k, every w detached
      const V u = st[ST_NORM];
      const V wy = nfl_weight_y<M>(basics, p.gamma);
      const V num = wy * basics.log_py;
      const V u2 = u * u;
      c.Q = c.Q + weight * (num * st[ST_WSUM] / u2 - wy / u) * one_minus_py;
      c.W = c.W - weight * num / u2;
      c.Y = c.Y + weight * (wy * one_minus_py / u + num * (st[ST_WSUM] * p_y - wy) / u2);
      break;
    }
    case MAE:  // 1 - p_y
      c.Q = c.Q + weight * p_y * one_minus_py;
      c.Y = c.Y - weight * p_y * one_minus_py;
      break;
    case MAE_AUTHOR:
    case RCE_AUTHOR: {  // offset + slope (1 - p_y)
      S offset, slope;
      author_affine(kind, c_classes, offset, slope);
      c.Q = c.Q + weight * V(slope) * p_y * one_minus_py;
      c.Y = c.Y - weight * V(slope) * p_y * one_minus_py;
      break;
    }
    case RCE: {  // A sum_{k != y} clamp(p_k)
      const V a = weight * V(S(kRceA));
      c.Qin = c.Qin + a * st[ST_RCE_CMASS] * one_minus_py;
      c.Qout = c.Qout - a * st[ST_RCE_MASS] * one_minus_py;
      c.Y = c.Y - a * p_y * st[ST_RCE_MASS];
      break;
    }
    case GCE: {  // no gradient where the clamp acts (log p_y below log 1e-7)
      const V pq = M::select_gt(basics.log_py, S(kLogProbClamp), weight * M::exp(V(p.q) * basics.log_py), V(S(0)));
      c.Q = c.Q + pq * one_minus_py;
      c.Y = c.Y - pq * one_minus_py;
      break;
    }
    default:
      break;
  }
}

// Everything the per-element loop of a row needs.
template <typename V>
struct RowGrad {
  V m, lsum, shift;  // as RowBasics
  V one_minus_py;    // 1 - p_y
  V q_in;            // multiplier of q_j, j != y, j in M:  Q + Qin
  V q_out;           // multiplier of q_j, j != y, otherwise: Q + Qout
  V K, W;
  V grad_y;  // the target's own entry
};

// Coefficients of a valid row. `g_row` is the upstream gradient of the row's loss
// (already divided by N_valid for the mean), `scale` the active term's batch scale
// (1 unless NCE_PAPER/NFL_PAPER), `batch_coef` NFL_PAPER's term through B.
template <class M>
APL_HD RowGrad<typename M::V> row_grad(const typename M::V* st, const LossParams<typename M::S>& p,
                                       typename M::S c_classes, typename M::V g_row, typename M::S scale,
                                       typename M::S batch_coef) {
  using V = typename M::V;
  using S = typename M::S;
  const RowBasics<V> basics = basics_from_stats(st);
  const V zero(S(0));
  Coefs<V> c = {zero, zero, zero, zero, zero, zero};
  // Terms with a zero weight are skipped (also avoids 0 * inf from an unused term).
  if (p.alpha * scale != S(0)) add_term_coefs<M>(c, p.active, g_row * V(p.alpha * scale), basics, st, p, c_classes);
  if (p.passive != NONE && p.beta != S(0)) add_term_coefs<M>(c, p.passive, g_row * V(p.beta), basics, st, p, c_classes);
  if (p.active == NFL_PAPER && batch_coef != S(0)) {
    // -batch_coef * d w_i = -batch_coef g w (q_j [j != y] - p_j)
    const V cgw = V(batch_coef * p.gamma) * focal_weight_from_log_one_minus_p<M>(basics.log_one_minus_py, p.gamma);
    c.Q = c.Q - cgw * basics.p_y;  // P (1 - p_y) + G with P = c g w, G = -c g w
    c.Y = c.Y + cgw * basics.p_y;
  }
  RowGrad<V> r;
  r.m = basics.m;
  r.lsum = basics.lsum;
  r.shift = basics.shift;
  r.one_minus_py = basics.one_minus_py;
  r.q_in = c.Q + c.Qin;
  r.q_out = c.Q + c.Qout;
  r.K = c.K;
  r.W = c.W;
  r.grad_y = c.Y;
  return r;
}

// dL/dz_j for j != y. kMask: the loss has an RCE term; kW: it has NFL_MA2020's w_j term.
// `B` as for rce_terms.
template <bool kMask, bool kW, class M, typename B>
APL_HD typename M::V grad_not_target(const RowGrad<B>& g, typename M::S gamma, typename M::V z) {
  using V = typename M::V;
  using S = typename M::S;
  const V zm = z - V(g.m);
  const V q = M::exp(zm - V(g.lsum));  // p_j = q (1 - p_y)
  const V coef =
      kMask ? M::select_inside(q * V(g.one_minus_py), S(kProbClamp), S(1), V(g.q_in), V(g.q_out)) : V(g.q_out);
  V out = q * coef + V(g.K);
  if (kW) {
    const V lp = zm - V(g.shift);
    out = out + V(g.W) * focal_weight_from_one_minus_p<M>(one_minus_p<M>(q * V(g.one_minus_py), lp), gamma);
  }
  return out;
}

// ---------------------------------------------------------------- distribution targets
// Probability targets (floating, the logits' shape) and F.cross_entropy's label smoothing take
// a second row path (LOSSES.md "Soft targets"). The target of a row is a distribution
// t_k = (1 - e) b_k + e / C, with b the given probabilities or the one-hot of the class index
// and e the smoothing, and each term is a sum over every class:
//   CE   sum_k w_k t_k (-log p_k)                        dL/dz_j = p_j sum_k w_k t_k - w_j t_j
//   MAE  c sum_k |p_k - t_k|   (c = 1/2, MAE_AUTHOR 1/C)  dL/dz_j = c p_j (s_j - sum_k s_k p_k)
//   RCE  sum_k clamp(p_k, 1e-7, 1) a_k                    dL/dz_j = p_j (a_j [j in M] - sum_{k in M} a_k p_k)
// with w the class weights (1 without), s_k = sign(p_k - t_k), a_k = -log clamp(t_k, 1e-4, 1)
// and M the classes with 1e-7 < p_k < 1 (where the clamp passes a gradient). So a row's
// gradient is g (p_j (X + c_mae s_j + c_rce a_j [j in M]) - c_ce w_j t_j) with one constant X
// per row: one pass, one exp per element (two with RCE: its log).

// Columns of `stats` for distribution targets (the same tensor, fewer columns used).
enum DistStat : int {
  DS_LOSS = 0,      // the row's loss: the terms' weighted sum, class weights included (0: ignored)
  DS_DENOM = 1,     // its share of the 'mean' denominator: 1, or w_y for weighted class indices
  DS_VALID = 2,     // 1, or 0 for a class index equal to ignore_index
  DS_MAX = 3,       // m = max_k z_k
  DS_LOGSUM = 4,    // log sum_k exp(z_k - m)
  DS_CE_MASS = 5,   // sum_k w_k t_k
  DS_MAE_SIGN = 6,  // sum_k s_k p_k
  DS_RCE_MASS = 7,  // sum_{k in M} a_k p_k
  NUM_DIST_STATS = 8,
};
static_assert(int(NUM_DIST_STATS) <= int(NUM_STATS), "distribution stats share the stats tensor");

// The kinds defined for distribution targets, and where label smoothing applies.
APL_HD bool takes_distribution(int kind) {
  return kind == NONE || kind == CE || kind == MAE || kind == MAE_AUTHOR || kind == RCE;
}
APL_HD bool takes_smoothing(int active, int passive) { return active == CE && passive == NONE; }

// Each term's weight in the row's loss (alpha or beta, times MAE's scale c).
template <typename S>
struct DistCoefs {
  S ce, mae, rce;
  S keep, spread;  // t = keep b + spread: 1 - e and e / C
};

template <typename S>
APL_HD DistCoefs<S> dist_coefs(const LossParams<S>& p, S smoothing, S c_classes) {
  DistCoefs<S> c{S(0), S(0), S(0), S(1) - smoothing, smoothing / c_classes};
  for (int term = 0; term < 2; ++term) {
    const int kind = term == 0 ? p.active : p.passive;
    const S weight = term == 0 ? p.alpha : p.beta;
    if (kind == CE) c.ce += weight;
    if (kind == MAE) c.mae += weight * S(0.5);
    if (kind == MAE_AUTHOR) c.mae += weight / c_classes;
    if (kind == RCE) c.rce += weight;
  }
  return c;
}

// One element's (or one vector's) contributions to the row sums. `B` as for rce_terms.
template <typename V>
struct DistSums {
  V ce;         // w t (-log p)
  V ce_mass;    // w t
  V mae_abs;    // |p - t|
  V mae_sign;   // s p
  V rce_value;  // clamp(p, 1e-7, 1) a
  V rce_mass;   // a p [in M]
  APL_HD_MEMBER void add(const DistSums& o) {
    ce = ce + o.ce, ce_mass = ce_mass + o.ce_mass, mae_abs = mae_abs + o.mae_abs;
    mae_sign = mae_sign + o.mae_sign, rce_value = rce_value + o.rce_value, rce_mass = rce_mass + o.rce_mass;
  }
};

// -log clamp(t, 1e-4, 1): RCE's a_k
template <class M>
APL_HD typename M::V rce_label_weight(typename M::V t) {
  using V = typename M::V;
  using S = typename M::S;
  return V(S(0)) - M::log(M::clamp(t, S(kLabelClamp), S(1)));
}

// t_k from b_k (the probability, or 1 for the class index and 0 elsewhere)
template <class M>
APL_HD typename M::V dist_target(typename M::V b, const DistCoefs<typename M::S>& c) {
  using V = typename M::V;
  return b * V(c.keep) + V(c.spread);
}

// z: logits, t: target, w: class weights; m and lsum: the row's max and log sum exp(z - m).
template <class M, typename B>
APL_HD DistSums<typename M::V> dist_terms(typename M::V z, typename M::V t, typename M::V w, B m, B lsum,
                                          const DistCoefs<typename M::S>& c) {
  using V = typename M::V;
  using S = typename M::S;
  const V zero(S(0));
  DistSums<V> r{zero, zero, zero, zero, zero, zero};
  const V d = z - V(m);
  if (c.ce != S(0)) {
    r.ce_mass = w * t;
    r.ce = r.ce_mass * (V(lsum) - d);  // -log p = lsum - (z - m)
  }
  if (c.mae == S(0) && c.rce == S(0)) return r;  // CE alone needs no p
  const V p = M::exp(d - V(lsum));
  if (c.mae != S(0)) {
    const V diff = p - t;
    r.mae_abs = M::select_lt(diff, S(0), zero - diff, diff);
    r.mae_sign = M::select_gt(diff, S(0), p, M::select_lt(diff, S(0), zero - p, zero));
  }
  if (c.rce != S(0)) {
    const V a = rce_label_weight<M>(t);
    r.rce_value = M::clamp(p, S(kProbClamp), S(1)) * a;
    r.rce_mass = M::select_inside(p, S(kProbClamp), S(1), a * p, zero);
  }
  return r;
}

// Valid row i's share of the 'mean' denominator: w_y for weighted class indices, else 1
// (`target` null for probabilities: F.cross_entropy divides by N).
template <typename T>
APL_HD T dist_mean_share(const T* weight, const int64_t* target, int64_t i) {
  return target != nullptr && weight != nullptr ? weight[target[i]] : T(1);
}

// A valid row's stats (st[0 .. NUM_DIST_STATS)) from its sums; `denom` its 'mean' share.
template <typename V, typename S>
APL_HD void dist_row_stats(V* st, V m, V lsum, const DistSums<V>& s, const DistCoefs<S>& c, V denom) {
  st[DS_LOSS] = V(c.ce) * s.ce + V(c.mae) * s.mae_abs + V(c.rce) * s.rce_value;
  st[DS_DENOM] = denom;
  st[DS_VALID] = V(S(1));
  st[DS_MAX] = m;
  st[DS_LOGSUM] = lsum;
  st[DS_CE_MASS] = s.ce_mass;
  st[DS_MAE_SIGN] = s.mae_sign;
  st[DS_RCE_MASS] = s.rce_mass;
}

// What the backward's pass over a row needs: the row's m and lsum, X, and the coefficients
// times the row's upstream gradient g.
template <typename V>
struct DistGrad {
  V m, lsum, x, ce, mae, rce;
};

template <typename V, typename S>
APL_HD DistGrad<V> dist_row_grad(const V* st, const DistCoefs<S>& c, V g_row) {
  DistGrad<V> r;
  r.m = st[DS_MAX];
  r.lsum = st[DS_LOGSUM];
  r.ce = g_row * V(c.ce);
  r.mae = g_row * V(c.mae);
  r.rce = g_row * V(c.rce);
  r.x = r.ce * st[DS_CE_MASS] - r.mae * st[DS_MAE_SIGN] - r.rce * st[DS_RCE_MASS];
  return r;
}

// dL/dz_j of a valid row.
template <class M, typename B>
APL_HD typename M::V dist_grad(const DistGrad<B>& g, typename M::V z, typename M::V t, typename M::V w,
                               const DistCoefs<typename M::S>& c) {
  using V = typename M::V;
  using S = typename M::S;
  const V zero(S(0));
  const V p = M::exp((z - V(g.m)) - V(g.lsum));
  V coef = V(g.x);
  if (c.mae != S(0)) {
    const V diff = p - t;
    coef = coef + M::select_gt(diff, S(0), V(g.mae), M::select_lt(diff, S(0), zero - V(g.mae), zero));
  }
  if (c.rce != S(0)) coef = coef + M::select_inside(p, S(kProbClamp), S(1), V(g.rce) * rce_label_weight<M>(t), zero);
  V out = p * coef;
  if (c.ce != S(0)) out = out - V(g.ce) * w * t;
  return out;
}

// The batch terms of distribution targets: scale 1, the valid rows, the 'mean' denominator
// and the sum of the rows' losses; the reduced loss is that sum, or it over the denominator.
template <typename T>
APL_HD void dist_batch_terms(T n_valid, T denom, T total, T* batch) {
  batch[BT_SCALE] = T(1);
  batch[BT_MEAN_W] = T(0);
  batch[BT_N_VALID] = n_valid;
  batch[BT_DENOM] = denom;
  batch[BT_SUM_WACT] = total;
}

template <typename T>
APL_HD T dist_reduced_loss(int reduction, const T* batch) {
  return reduction == RED_MEAN ? batch[BT_SUM_WACT] / batch[BT_DENOM] : batch[BT_SUM_WACT];
}

}  // namespace row
}  // namespace apl
