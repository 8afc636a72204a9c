// The per-row math of every loss of apl-repro, written once for the CPU and CUDA kernels.
//
// Formulas and their sources: LOSSES.md (the single source of truth; this file implements
// it). A kernel reduces one row to a few sums (RowSums, and a third pass's per-term sums,
// RowExtra), turns them into the row's basic log-probabilities (RowBasics) and the loss
// values, stored as the per-row `stats`. The backward turns a row's stats into a few
// coefficients (Coefs, RowGrad) of the common form of every gradient (LOSSES.md, "The fused
// operator"), so one loop over the row (grad_not_target) serves every loss; see "backward"
// below for the cancellation-free way the coefficients are grouped. The batch step (the
// paper forms' statistic, the per-class weights, the reduction) is written here too, as
// block partials and their combination, so that both devices split and combine a batch alike.
//
// Everything here is inline and has internal linkage (static) on the host: the CPU kernels
// are compiled several times with different instruction sets (csrc/cpu/row_kernels_*.cpp)
// and must not share out-of-line copies of these functions.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

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
  ST_TERM_SUMS = 9,        // two row sums per term (active, then passive): term_col(t, j), see TermSums
  NUM_STATS = 13,
};
APL_HD int term_col(int term, int j) { return ST_TERM_SUMS + 2 * term + j; }

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
// epsilon-softmax's clamp of the transformed probability (apl.losses.spec.EPS_SOFTMAX_CLAMP).
constexpr double kEpsSoftmaxClamp = 1e-8;

// ---------------------------------------------------------------- scalar maths
// Overloads instead of std:: so the same names work in CUDA device code.
APL_HD float apl_exp(float x) { return expf(x); }
APL_HD double apl_exp(double x) { return exp(x); }
APL_HD float apl_log(float x) { return logf(x); }
APL_HD double apl_log(double x) { return log(x); }
APL_HD float apl_log1p(float x) { return log1pf(x); }
APL_HD double apl_log1p(double x) { return log1p(x); }
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
  APL_HD V log1p(V x) { return apl_log1p(x); }
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

// ---------------------------------------------------------------- parameters
// Constants of one term's kind that depend only on the call (its parameters and C), computed
// once on the host (make_params) rather than in every row:
//   affine kinds (MAE_AUTHOR, RCE_AUTHOR, MAE2, NMAE): c0 + c1 (1 - p_y)
//   RCE, NRCE: c0 sum_{k != y} clamp(p_k)          AGCE: c0 = (a + 1)^q    AUL: c0 = (a - 1)^q
//   NNCE: c0 = A = -ln m0                          NNFL: c0 = A = -(1 - m0)^g ln m0
//   ECE, EFL: c0 = log1p(m), c1 = ln 1e-8          AMSE: c0 = 1 / C
template <typename T>
struct KindConsts {
  T c0, c1;
};

template <typename T>
struct LossParams {
  int active;
  int passive;
  T alpha, beta, gamma, q, a, m, min_prob;
  T log_min_prob;       // ln m0 (NNCE, NNFL)
  KindConsts<T> kc[2];  // the active term's, the passive term's
};

APL_HD bool is_affine(int kind) { return kind == MAE_AUTHOR || kind == RCE_AUTHOR || kind == MAE2 || kind == NMAE; }
APL_HD bool is_rce(int kind) { return kind == RCE || kind == NRCE; }
APL_HD bool is_eps_softmax(int kind) { return kind == ECE || kind == EFL; }
APL_HD bool is_batch_level(int kind) { return kind == NCE_PAPER || kind == NFL_PAPER; }
// Kinds with the exponent q, each kind's range (apl.losses.spec.LossSpec checks the same).
APL_HD bool q_at_most_one(int kind) { return kind == GCE || kind == NGCE; }

// A kind's constants (KindConsts) in double, from the call's scalar arguments (ops.h LossArgs) and C
// (host code).
template <class Args>
static inline KindConsts<double> kind_consts(int kind, const Args& args, int64_t num_classes) {
  const double c = static_cast<double>(num_classes), a = args.a, q = args.q, min_prob = args.min_prob;
  switch (kind) {
    case MAE_AUTHOR:
      return {0.0, 2.0 / c};
    case RCE_AUTHOR: {  // -p_y log t_y - (1 - p_y) log t_o
      const double lo = kAuthorTargetClip, hi = 1.0 - kAuthorTargetClip;
      const double t_y = std::fmin(std::fmax(1.0 - kAuthorSmoothing, lo), hi);
      const double t_o = std::fmin(std::fmax(kAuthorSmoothing / (c - 1.0), lo), hi);
      return {-std::log(t_y), std::log(t_y) - std::log(t_o)};
    }
    case MAE2:
      return {0.0, 2.0};
    case NMAE:
      return {0.0, 1.0 / (2.0 * (c - 1.0))};
    case RCE:
      return {kRceA, 0.0};
    case NRCE:  // the cited work's code: 1 / 4 * (C - 1), an operator-precedence slip kept as it ran
      return {kRceA * (c - 1.0) / 4.0, 0.0};
    case AGCE:
      return {std::pow(a + 1.0, q), 0.0};
    case AUL:
      return {std::pow(a - 1.0, q), 0.0};
    case NNCE:
      return {-std::log(min_prob), 0.0};
    case NNFL:
      return {-std::pow(1.0 - min_prob, args.gamma) * std::log(min_prob), 0.0};
    case ECE:
    case EFL:
      return {std::log1p(args.m), std::log(kEpsSoftmaxClamp)};
    case AMSE:
      return {1.0 / c, 0.0};
    default:
      return {0.0, 0.0};
  }
}

// The kernels' parameters from the operator's scalar arguments (ops.h LossArgs: active .. min_prob)
// for C classes; the kinds' constants in double first, then in T.
template <typename T, class Args>
static inline LossParams<T> make_params(const Args& args, int64_t num_classes) {
  LossParams<T> p;
  p.active = static_cast<int>(args.active);
  p.passive = static_cast<int>(args.passive);
  p.alpha = static_cast<T>(args.alpha);
  p.beta = static_cast<T>(args.beta);
  p.gamma = static_cast<T>(args.gamma);
  p.q = static_cast<T>(args.q);
  p.a = static_cast<T>(args.a);
  p.m = static_cast<T>(args.m);
  p.min_prob = static_cast<T>(args.min_prob);
  p.log_min_prob = static_cast<T>(std::log(args.min_prob));
  for (int t = 0; t < 2; ++t) {
    const KindConsts<double> k = kind_consts(t == 0 ? p.active : p.passive, args, num_classes);
    p.kc[t] = KindConsts<T>{static_cast<T>(k.c0), static_cast<T>(k.c1)};
  }
  return p;
}

// ---------------------------------------------------------------- kinds: what each needs
// The fused operator takes any kind as the active term; the passive term may be any kind but a
// batch-level one (the paper forms' statistic scales the active term only).
APL_HD bool valid_active(int kind) { return kind > NONE && kind < NUM_KINDS; }
APL_HD bool valid_passive(int kind) { return kind >= NONE && kind < NUM_KINDS && !is_batch_level(kind); }
template <typename T>
APL_HD bool uses(const LossParams<T>& p, int kind) {
  return p.active == kind || p.passive == kind;
}
template <typename T>
APL_HD int kind_of(const LossParams<T>& p, int term) {
  return term == 0 ? p.active : p.passive;
}
// Which optional row passes a loss needs: sum_{k != y} (z_k - m) in the second pass (NCE_MA2020),
// and a third pass for the kinds with sums over the classes (pass3_term).
APL_HD bool kind_needs_pass3(int kind) {
  return is_rce(kind) || kind == NFL_MA2020 || kind == NGCE || kind == NNCE || kind == NNFL || kind == AMSE;
}
// How many of its three sums a kind's third pass fills (s0 .. s{n-1}).
APL_HD constexpr int pass3_sums(int kind) { return kind == RCE || kind == NRCE ? 3 : (kind == AMSE ? 1 : 2); }
template <typename T>
APL_HD bool needs_zsum(const LossParams<T>& p) {
  return uses(p, NCE_MA2020);
}
template <typename T>
APL_HD bool needs_pass3(const LossParams<T>& p) {
  return kind_needs_pass3(p.active) || kind_needs_pass3(p.passive);
}
// epsilon-softmax needs to know whether y is the row's argmax (the first on ties).
template <typename T>
APL_HD bool needs_argmax(const LossParams<T>& p) {
  return is_eps_softmax(p.active) || is_eps_softmax(p.passive);
}
template <typename T>
APL_HD bool uses_focal_weight(const LossParams<T>& p) {
  return uses(p, FL) || uses(p, FL_DETACHED) || uses(p, NFL_PAPER);
}

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

// (1 - p)^gamma from 1 - p, detached weights (NFL_MA2020, NNFL): gamma = 0 gives 1 (also for
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

// (1 - p_y)^gamma = exp(gamma log(1 - p_y)) (FL, FL_DETACHED, NFL_PAPER, EFL); gamma = 0 gives 1.
template <class M>
APL_HD typename M::V focal_weight_from_log_one_minus_p(typename M::V log_one_minus_py, typename M::S gamma) {
  using V = typename M::V;
  using S = typename M::S;
  return gamma == S(0) ? V(S(1)) : M::exp(V(gamma) * log_one_minus_py);
}

// ---------------------------------------------------------------- forward
// What the first two passes over a row produce (sums over k != y only).
template <typename V>
struct RowSums {
  V max_ny;   // max_{k != y} z_k
  V sum_ny;   // sum_{k != y} exp(z_k - max_ny)   (>= 1)
  V zsum_ny;  // sum_{k != y} (z_k - max_ny)      (NCE_MA2020 only)
  V top;      // 1 where y is the row's argmax (the first on ties), else 0 (epsilon-softmax only)
};

// Whether y is the argmax, the first index on ties as torch.argmax: z_y above every other logit,
// or equal to the largest with no equal logit before y (`tie_before`, 1 or 0, found by the kernel
// only where z_y == m: rare).
template <class M>
APL_HD typename M::V argmax_flag(typename M::V z_y, typename M::V m, typename M::V tie_before) {
  using V = typename M::V;
  using S = typename M::S;
  const V zero(S(0)), one(S(1));
  return M::select_gt(z_y - m, S(0), one, M::select_eq(z_y - m, S(0), one - tie_before, zero));
}

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

// ------------------------------------------- the third pass: sums over k != y, per term
// Per term (active, passive) up to three sums, summed over the classes k != y; the target's own
// share is added in row_stats. Each element comes with z (its logit) and q = exp(z - m) /
// sum_{k != y} exp(z_k - m) (a kernel keeps the second pass's exps, or computes it), so p_k =
// q (1 - p_y) and log p_k = (z - m) - shift. The sums, by kind:
//   RCE, NRCE   s0 sum clamp(p_k, 1e-7, 1), s1 the unclamped p_k (1e-7 < p_k < 1: the set M), s2 the others
//   NFL_MA2020  s0 sum w_k log p_k, s1 sum w_k, w_k = (1 - p_k)^g detached
//   NGCE        s0 sum (1 - u_k), u_k = clamp(p_k, 1e-7, 1)^q;  s1 sum of u_k over M
//   NNCE        s0 sum v_k, v_k = A + log clamp(p_k, m0, 1);  s1 the number of k with m0 < p_k < 1
//   NNFL        s0 sum (A - FL_k), FL_k = -w_k l_k, l_k = max(log p_k, ln m0), w_k = (1 - e^l_k)^g detached;
//               s1 sum of w_k over log p_k > ln m0
//   AMSE        s0 sum p_k^2
template <typename V>
struct TermSums {
  V s0, s1, s2;
};

template <typename V>
struct RowExtra {
  TermSums<V> t[2];  // active, passive
};

template <typename V>
APL_HD TermSums<V> zero_sums(V zero) {
  return TermSums<V>{zero, zero, zero};
}

// kFromLogit: the caller passes no q (a one-row pass that kept no exps); each kind then takes its
// probabilities from z with one exp, as it would from q.
template <class M, bool kFromLogit = false, typename B>
APL_HD void pass3_term(int kind, const KindConsts<typename M::S>& kc, const LossParams<typename M::S>& p,
                       typename M::V z, typename M::V q, const RowBasics<B>& basics, TermSums<typename M::V>& out) {
  using V = typename M::V;
  using S = typename M::S;
  const V zero(S(0)), one(S(1));
  if constexpr (kFromLogit) {
    if (kind == RCE || kind == NRCE || kind == AMSE) q = M::exp((z - V(basics.m)) - V(basics.lsum));
  }
  switch (kind) {
    case RCE:
    case NRCE: {
      const V pk = q * V(basics.one_minus_py);
      out.s0 = out.s0 + M::clamp(pk, S(kProbClamp), S(1));
      out.s1 = out.s1 + M::select_inside(pk, S(kProbClamp), S(1), pk, zero);
      out.s2 = out.s2 + M::select_inside(pk, S(kProbClamp), S(1), zero, pk);
      break;
    }
    case NFL_MA2020: {
      const V lp = (z - V(basics.m)) - V(basics.shift);
      const V pk = kFromLogit ? M::exp(lp) : q * V(basics.one_minus_py);
      const V w = focal_weight_from_one_minus_p<M>(one_minus_p<M>(pk, lp), p.gamma);
      out.s0 = out.s0 + w * lp;
      out.s1 = out.s1 + w;
      break;
    }
    case NGCE: {
      const V lp = (z - V(basics.m)) - V(basics.shift);
      const V qlp = V(p.q) * M::clamp(lp, S(kLogProbClamp), S(0));
      out.s0 = out.s0 + (zero - M::expm1(qlp));
      out.s1 = out.s1 + M::select_inside(lp, S(kLogProbClamp), S(0), M::exp(qlp), zero);
      break;
    }
    case NNCE: {
      const V lp = (z - V(basics.m)) - V(basics.shift);
      out.s0 = out.s0 + (M::clamp(lp, p.log_min_prob, S(0)) - V(p.log_min_prob));
      out.s1 = out.s1 + M::select_inside(lp, p.log_min_prob, S(0), one, zero);
      break;
    }
    case NNFL: {
      const V lp = (z - V(basics.m)) - V(basics.shift);
      const V l = M::select_lt(lp, p.log_min_prob, V(p.log_min_prob), lp);
      const V pk =
          M::select_lt(lp, p.log_min_prob, V(p.min_prob), kFromLogit ? M::exp(lp) : q * V(basics.one_minus_py));
      const V w = focal_weight_from_one_minus_p<M>(one_minus_p<M>(pk, l), p.gamma);
      // A - FL_k is exactly 0 on the clamp (A is FL there): no rounding residue from A + w ln m0
      out.s0 = out.s0 + M::select_gt(lp, p.log_min_prob, V(kc.c0) + w * l, zero);
      out.s1 = out.s1 + M::select_gt(lp, p.log_min_prob, w, zero);
      break;
    }
    case AMSE: {
      const V pk = q * V(basics.one_minus_py);
      out.s0 = out.s0 + pk * pk;
      break;
    }
    default:
      break;
  }
}

// Calls fn with the kind as a compile-time constant for the commonest third passes (RCE, NFL_MA2020),
// so their per-element code is the kind's alone, else with the int (host; the CPU's one-row passes).
template <class Fn>
static inline void with_pass3_kind(int kind, Fn&& fn) {
  switch (kind) {
    case RCE:
      return fn(std::integral_constant<int, RCE>{});
    case NFL_MA2020:
      return fn(std::integral_constant<int, NFL_MA2020>{});
    default:
      return fn(kind);
  }
}

// Both terms' third-pass sums for one element (or one vector) of a row.
template <class M, typename B>
APL_HD void pass3(const LossParams<typename M::S>& p, typename M::V z, typename M::V q, const RowBasics<B>& basics,
                  RowExtra<typename M::V>& extra) {
  if (kind_needs_pass3(p.active)) pass3_term<M>(p.active, p.kc[0], p, z, q, basics, extra.t[0]);
  if (kind_needs_pass3(p.passive)) pass3_term<M>(p.passive, p.kc[1], p, z, q, basics, extra.t[1]);
}

// NFL_MA2020's weight of the target itself, computed as every other class's.
template <class M>
APL_HD typename M::V nfl_weight_y(const RowBasics<typename M::V>& basics, typename M::S gamma) {
  return focal_weight_from_one_minus_p<M>(one_minus_p<M>(basics.p_y, basics.log_py), gamma);
}

// NNFL's target quantities: w_y = (1 - p_y)^g (detached) and N = A - FL_y, FL_y = -w_y l_y with
// l_y = max(log p_y, ln m0) (N is exactly 0 on the clamp, where FL_y = A).
template <class M>
APL_HD void nnfl_target(const RowBasics<typename M::V>& basics, const LossParams<typename M::S>& p,
                        const KindConsts<typename M::S>& kc, typename M::V& w_y, typename M::V& n) {
  using V = typename M::V;
  using S = typename M::S;
  const S lm0 = p.log_min_prob;
  const V one_minus = M::select_gt(basics.log_py, lm0, basics.one_minus_py, V(S(1) - p.min_prob));
  w_y = focal_weight_from_one_minus_p<M>(one_minus, p.gamma);
  n = M::select_gt(basics.log_py, lm0, V(kc.c0) + w_y * basics.log_py, V(S(0)));
}

// epsilon-softmax's log q^_y = max(log q_y, ln 1e-8): q_y = (p_y + m)/(1 + m) for the argmax,
// p_y/(1 + m) otherwise (for the argmax as -log1p((1 - p_y)/(p_y + m)), exact as p_y -> 1).
template <class M>
APL_HD typename M::V eps_log_q(const RowBasics<typename M::V>& basics, typename M::V top,
                               const LossParams<typename M::S>& p, const KindConsts<typename M::S>& kc) {
  using V = typename M::V;
  using S = typename M::S;
  const V log_top = V(S(0)) - M::log1p(basics.one_minus_py / (basics.p_y + V(p.m)));
  const V log_other = basics.log_py - V(kc.c0);
  const V lq = M::select_gt(top, S(0.5), log_top, log_other);
  return M::select_lt(lq, kc.c1, V(kc.c1), lq);
}

// 1 - q^_y of epsilon-softmax (EFL's detached weight is its gamma-th power).
template <class M>
APL_HD typename M::V eps_one_minus_q(const RowBasics<typename M::V>& basics, typename M::V top, typename M::V log_q,
                                     const LossParams<typename M::S>& p) {
  using V = typename M::V;
  using S = typename M::S;
  return M::select_gt(top, S(0.5), basics.one_minus_py / V(S(1) + p.m), V(S(0)) - M::expm1(log_q));
}

// A term that depends on p_y alone: its value and g = p_y dL/dp_y, the whole gradient being
// dL/dz_j = g ([j = y] - p_j) (MAE, GCE, the affine kinds, AGCE, AUL, AEL, ECE, EFL).
template <typename V>
struct PyTerm {
  V value, g;
};

template <class M>
APL_HD PyTerm<typename M::V> py_term(int kind, const RowBasics<typename M::V>& basics, typename M::V top,
                                     const LossParams<typename M::S>& p, const KindConsts<typename M::S>& kc) {
  using V = typename M::V;
  using S = typename M::S;
  const V zero(S(0)), one(S(1));
  const V p_y = basics.p_y, omp = basics.one_minus_py;
  switch (kind) {
    case MAE:
      return {omp, zero - p_y};
    case GCE: {
      // (1 - clamp(p_y, 1e-7, 1)^q) / q taken on log p_y: -expm1(q max(log p_y, log 1e-7)) / q
      // (expm1 keeps precision near p_y = 1; NaN stays NaN); no gradient where the clamp acts
      const V lp = M::select_lt(basics.log_py, S(kLogProbClamp), V(S(kLogProbClamp)), basics.log_py);
      const V pq = M::exp(V(p.q) * basics.log_py);
      return {(zero - M::expm1(V(p.q) * lp)) / V(p.q), M::select_gt(basics.log_py, S(kLogProbClamp), zero - pq, zero)};
    }
    case AGCE: {  // ((a+1)^q - (a+p_y)^q)/q = (a+1)^q (1 - (1 - (1-p_y)/(a+1))^q)/q
      const V r = M::log1p((zero - omp) / V(p.a + S(1)));
      const V ap = V(p.a) + p_y;
      return {V(kc.c0) * (zero - M::expm1(V(p.q) * r)) / V(p.q), zero - p_y * M::exp(V(p.q - S(1)) * M::log(ap))};
    }
    case AUL: {  // ((a-p_y)^q - (a-1)^q)/q = (a-1)^q ((1 + (1-p_y)/(a-1))^q - 1)/q
      const V r = M::log1p(omp / V(p.a - S(1)));
      const V am = V(p.a - S(1)) + omp;
      return {V(kc.c0) * M::expm1(V(p.q) * r) / V(p.q), zero - p_y * M::exp(V(p.q - S(1)) * M::log(am))};
    }
    case AEL: {
      const V e = M::exp((zero - p_y) / V(p.a));
      return {e, zero - p_y * e / V(p.a)};
    }
    case ECE:
    case EFL: {
      const V lq = eps_log_q<M>(basics, top, p, kc);
      // dL/dp_y = -1/(p_y + m [top]) where the clamp does not act, so g = -p_y/(p_y + m) or -1
      const V g_top = zero - p_y / (p_y + V(p.m));
      V g = M::select_gt(lq, kc.c1, M::select_gt(top, S(0.5), g_top, zero - one), zero);
      V value = zero - lq;
      if (kind == EFL) {
        const V w = focal_weight_from_one_minus_p<M>(eps_one_minus_q<M>(basics, top, lq, p), p.gamma);
        value = value * w;
        g = g * w;
      }
      return {value, g};
    }
    default: {  // the affine kinds: c0 + c1 (1 - p_y)
      return {V(kc.c0) + V(kc.c1) * omp, zero - V(kc.c1) * p_y};
    }
  }
}

APL_HD bool is_py_kind(int kind) {
  return kind == MAE || kind == GCE || is_affine(kind) || kind == AGCE || kind == AUL || kind == AEL ||
         is_eps_softmax(kind);
}

// Value of one term for a row (before alpha/beta and the batch scale), and the two sums it keeps
// in `stats` (term_col) for the backward. `s` holds the third pass's sums over k != y.
template <class M>
APL_HD typename M::V term_value(int term, const RowBasics<typename M::V>& basics, const RowSums<typename M::V>& sums,
                                const TermSums<typename M::V>& s, const LossParams<typename M::S>& p,
                                typename M::S c_classes, typename M::V& col0, typename M::V& col1) {
  using V = typename M::V;
  using S = typename M::S;
  const int kind = kind_of(p, term);
  const KindConsts<S>& kc = p.kc[term];
  const V zero(S(0));
  col0 = zero;
  col1 = zero;
  switch (kind) {
    case CE:
    case NCE_PAPER:
      return zero - basics.log_py;
    case FL:
    case FL_DETACHED:
    case NFL_PAPER:
      return zero - focal_weight_from_log_one_minus_p<M>(basics.log_one_minus_py, p.gamma) * basics.log_py;
    case NCE_MA2020: {
      // sum_k log p_k = sum_{k != y} (z_k - m) - (C - 1) * shift + log p_y
      col0 = sums.zsum_ny - V(c_classes - S(1)) * basics.shift + basics.log_py;
      return basics.log_py / col0;
    }
    case NFL_MA2020: {
      const V wy = nfl_weight_y<M>(basics, p.gamma);
      col0 = s.s0 + wy * basics.log_py;
      col1 = s.s1 + wy;
      return wy * basics.log_py / col0;
    }
    case RCE:
    case NRCE:
      col0 = s.s1;               // the mass of M
      col1 = basics.p_y + s.s2;  // 1 - that mass, summed directly
      return V(kc.c0) * s.s0;
    case NGCE: {  // N / (N + sum_{k != y} (1 - u_k)), N = 1 - u_y
      const V n = zero - M::expm1(V(p.q) * M::clamp(basics.log_py, S(kLogProbClamp), S(0)));
      col0 = s.s0;
      col1 = s.s1;
      return n / (n + s.s0);
    }
    case NNCE: {  // 1 - v_y / S = S_{k != y} / S
      const V v_y = M::clamp(basics.log_py, p.log_min_prob, S(0)) - V(p.log_min_prob);
      col0 = s.s0;
      col1 = s.s1;
      return s.s0 / (s.s0 + v_y);
    }
    case NNFL: {  // 1 - N/D = R/D, N = A - FL_y, R = sum_{k != y} (A - FL_k), D = R + N
      V w_y, n;
      nnfl_target<M>(basics, p, kc, w_y, n);
      col0 = s.s0;
      col1 = s.s1;
      return s.s0 / (s.s0 + n);
    }
    case AMSE: {  // ((a - p_y)^2 + sum_{k != y} p_k^2) / C
      const V a_minus = V(p.a - S(1)) + basics.one_minus_py;
      col0 = s.s0;
      return V(kc.c0) * (a_minus * a_minus + s.s0);
    }
    default:
      if (is_eps_softmax(kind)) col0 = sums.top;
      if (is_py_kind(kind)) return py_term<M>(kind, basics, sums.top, p, kc).value;
      return zero;
  }
}

// A valid row's stats (st[0 .. NUM_STATS)) from its sums. `c_classes` is C.
template <class M>
APL_HD void row_stats(typename M::V* st, const RowBasics<typename M::V>& basics, const RowSums<typename M::V>& sums,
                      const RowExtra<typename M::V>& extra, const LossParams<typename M::S>& p,
                      typename M::S c_classes) {
  using V = typename M::V;
  using S = typename M::S;
  const V zero(S(0));
  V c0 = zero, c1 = zero;
  st[ST_ACTIVE] = term_value<M>(0, basics, sums, extra.t[0], p, c_classes, c0, c1);
  st[term_col(0, 0)] = c0;
  st[term_col(0, 1)] = c1;
  c0 = zero, c1 = zero;
  st[ST_PASSIVE] = p.passive == NONE ? zero : term_value<M>(1, basics, sums, extra.t[1], p, c_classes, c0, c1);
  st[term_col(1, 0)] = c0;
  st[term_col(1, 1)] = c1;
  st[ST_MAX_NY] = basics.m;
  st[ST_LOGSUM_NY] = basics.lsum;
  st[ST_LOG_P] = basics.log_py;
  st[ST_LOG_ONE_MINUS_P] = basics.log_one_minus_py;
  st[ST_P] = basics.p_y;
  st[ST_ONE_MINUS_P] = basics.one_minus_py;
  st[ST_FOCAL_W] = uses_focal_weight(p) ? focal_weight_from_log_one_minus_p<M>(basics.log_one_minus_py, p.gamma) : zero;
}

// ---------------------------------------------------------------- batch step
// After the row pass, one step over the N rows' stats makes the batch terms (the paper forms'
// statistic, the 'mean' denominator) and the reduced loss. Both devices split the rows into the
// same blocks of kBatchRows (batch_blocks), sum each block into a BatchSums partial in double,
// and combine the partials in block order (add_sums): CUDA one block of threads per row block,
// the last block to finish combining; the CPU a task per block.

enum Reduction : int { RED_NONE = 0, RED_MEAN = 1, RED_SUM = 2 };
APL_HD bool valid_reduction(int64_t r) { return r >= RED_NONE && r <= RED_SUM; }

// Rows per block of the batch step, and the blocks of N rows (one, empty, for N = 0).
constexpr int64_t kBatchRows = 4096;
APL_HD int64_t batch_blocks(int64_t n) { return n == 0 ? 1 : (n + kBatchRows - 1) / kBatchRows; }

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

// Sums over the non-ignored rows (w: the row's class weight, 1 without weights); the partial
// of a block and the whole batch alike, always in double.
struct BatchSums {
  double n_valid;  // count
  double wsum;     // sum w
  double wact;     // sum w * active value
  double wpas;     // sum w * passive value
  double focal;    // sum of the focal weights (unweighted: B is a batch statistic, LOSSES.md)
};

APL_HD BatchSums zero_batch_sums() { return BatchSums{0.0, 0.0, 0.0, 0.0, 0.0}; }

template <typename S>
APL_HD void add_row(BatchSums& s, const S* st, double w) {
  s.n_valid += 1.0;
  s.wsum += w;
  s.wact += w * static_cast<double>(st[ST_ACTIVE]);
  s.wpas += w * static_cast<double>(st[ST_PASSIVE]);
  s.focal += static_cast<double>(st[ST_FOCAL_W]);
}

// One partial into another (a block's into the running total, in block order).
APL_HD void add_sums(BatchSums& into, const BatchSums& part) {
  into.n_valid += part.n_valid;
  into.wsum += part.wsum;
  into.wact += part.wact;
  into.wpas += part.wpas;
  into.focal += part.focal;
}

// One class's share of the label entropy H: -pi log pi with pi = count / N_valid.
template <typename T>
APL_HD T entropy_term(T count, T n_valid) {
  if (count <= T(0)) return T(0);
  const T pi = count / n_valid;
  return -pi * apl_log(pi);
}

// The batch terms (BatchTerm) from the sums; `entropy` is H (NCE_PAPER only).
APL_HD void batch_terms(int active, bool weighted, const BatchSums& s, double entropy, double c_classes,
                        double* batch) {
  double scale = 1.0, mean_w = 0.0;
  if (active == NCE_PAPER) {
    scale = nce_paper_scale(entropy, c_classes);
  } else if (active == NFL_PAPER) {
    // no valid row: B = 0, so the term is 0 ('sum' 0, 'mean' 0/0 = NaN, as without weights)
    mean_w = s.n_valid > 0.0 ? s.focal / s.n_valid : 0.0;
    scale = nfl_paper_scale(mean_w);
  }
  batch[BT_SCALE] = scale;
  batch[BT_MEAN_W] = mean_w;
  batch[BT_N_VALID] = s.n_valid;
  batch[BT_DENOM] = weighted ? s.wsum : s.n_valid;  // 0 with no valid row: the mean is NaN, as F.cross_entropy
  batch[BT_SUM_WACT] = s.wact;
}

// The batch terms of a per-row loss whose rows wrote their own losses ('none'): scale 1, the rest 0.
template <typename T>
APL_HD void per_row_batch_terms(T* batch) {
  for (int j = 0; j < NUM_BATCH; ++j) batch[j] = j == BT_SCALE ? T(1) : T(0);
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
APL_HD double reduced_loss(int reduction, double alpha, double beta, bool has_passive, const BatchSums& s,
                           const double* batch) {
  double total = alpha * batch[BT_SCALE] * s.wact;
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
// The gradient of a row, for j != y,
//   dL/dz_j = Q q_j + [j in M](Qin q_j) + [j not in M](Qout q_j) + Q2 q_j^2 + K + [m0 < p_j < 1] Kin
//             + W w_j + [log p_j > ln m0] Win w_j + [1e-7 < p_j < 1] U p_j^q
// (LOSSES.md), with q_j = p_j / (1 - p_y) and w_j = (1 - p_j)^g, evaluated in a form without
// cancellations where a probability is near 0 or 1:
// - a term's P p_j, as P (1 - p_y) q_j, is folded into Q with every other multiple of q_j, each
//   term adding its share from a formula that is exact in floating point (e.g. FL's
//   w (1 - p_y) - g w p_y log p_y rather than the difference of two large products);
// - the target's entry Y = dL/dz_y is accumulated per term from exact quantities (1 - p_y
//   from log(1 - p_y), never by subtraction; the normalised kinds' denominators minus their
//   numerators as sums over k != y);
// - RCE's P = -A mass and R = A are folded per side of the clamp: a class in M gets
//   A (1 - mass) p_j with 1 - mass summed directly, a class outside M gets -A mass p_j.
// One exp per element (q_j), plus w_j or p_j^q where a term needs them.
template <typename V>
struct Coefs {
  V Q;     // of q_j, j != y
  V Qin;   // extra of q_j for j != y in M (RCE, NRCE)
  V Qout;  // extra of q_j for j != y outside M
  V Q2;    // of q_j^2 (AMSE)
  V K;     // constant, j != y (NCE_MA2020)
  V Kin;   // constant where m0 < p_j < 1 (NNCE)
  V W;     // of w_j (NFL_MA2020's detached weights)
  V Win;   // of w_j where log p_j > ln m0 (NNFL)
  V U;     // of p_j^q where 1e-7 < p_j < 1 (NGCE)
  V Y;     // dL/dz_y
};

// What the per-element loop computes beyond q_j: a bit per optional part of the gradient form.
enum GradFeature : unsigned {
  GF_RCE_MASK = 1u,  // Qin / Qout
  GF_W = 2u,         // W w_j
  GF_Q2 = 4u,        // Q2 q_j^2
  GF_K_IN = 8u,      // Kin
  GF_W_IN = 16u,     // Win w_j
  GF_U = 32u,        // U p_j^q
  GF_ALL = 63u,
};

template <typename T>
APL_HD unsigned grad_features(const LossParams<T>& p) {
  unsigned f = 0;
  for (int term = 0; term < 2; ++term) {
    const int kind = kind_of(p, term);
    if (is_rce(kind)) f |= GF_RCE_MASK;
    if (kind == NFL_MA2020) f |= GF_W;
    if (kind == AMSE) f |= GF_Q2;
    if (kind == NNCE) f |= GF_K_IN;
    if (kind == NNFL) f |= GF_W_IN;
    if (kind == NGCE) f |= GF_U;
  }
  return f;
}

// Calls fn(std::integral_constant<unsigned, F>) with F = the features themselves for the common
// sets (none, RCE, NFL_MA2020, both), else GF_ALL, whose loop tests each part per row (host).
template <class Fn>
static inline void with_grad_features(unsigned features, Fn&& fn) {
  switch (features) {
    case 0u:
      return fn(std::integral_constant<unsigned, 0u>{});
    case GF_RCE_MASK:
      return fn(std::integral_constant<unsigned, GF_RCE_MASK>{});
    case GF_W:
      return fn(std::integral_constant<unsigned, GF_W>{});
    case GF_RCE_MASK | GF_W:
      return fn(std::integral_constant<unsigned, GF_RCE_MASK | GF_W>{});
    default:
      return fn(std::integral_constant<unsigned, GF_ALL>{});
  }
}

// Add `weight` times the gradient of term `term`; `st` the row's stats.
template <class M>
APL_HD void add_term_coefs(Coefs<typename M::V>& c, int term, typename M::V weight,
                           const RowBasics<typename M::V>& basics, const typename M::V* st,
                           const LossParams<typename M::S>& p, typename M::S c_classes) {
  using V = typename M::V;
  using S = typename M::S;
  const int kind = kind_of(p, term);
  const KindConsts<S>& kc = p.kc[term];
  const V col0 = st[term_col(term, 0)], col1 = st[term_col(term, 1)];
  const V p_y = basics.p_y, one_minus_py = basics.one_minus_py, zero(S(0)), one(S(1));
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
      const V t = col0;
      const V t2 = t * t;
      const V cc(c_classes);
      c.Q = c.Q + weight * (cc * basics.log_py - t) / t2 * one_minus_py;
      c.K = c.K - weight * basics.log_py / t2;
      c.Y = c.Y + weight * (t * one_minus_py + basics.log_py * (cc * p_y - one)) / t2;
      break;
    }
    case NFL_MA2020: {  // w_y log p_y / U, U = sum_k w_k log p_k, every w detached
      const V u = col0, wsum = col1;
      const V wy = nfl_weight_y<M>(basics, p.gamma);
      const V num = wy * basics.log_py;
      const V u2 = u * u;
      c.Q = c.Q + weight * (num * wsum / u2 - wy / u) * one_minus_py;
      c.W = c.W - weight * num / u2;
      c.Y = c.Y + weight * (wy * one_minus_py / u + num * (wsum * p_y - wy) / u2);
      break;
    }
    case RCE:
    case NRCE: {  // c0 sum_{k != y} clamp(p_k); col0 the mass of M, col1 1 - that mass
      const V a = weight * V(kc.c0);
      c.Qin = c.Qin + a * col1 * one_minus_py;
      c.Qout = c.Qout - a * col0 * one_minus_py;
      c.Y = c.Y - a * p_y * col0;
      break;
    }
    case NNCE: {  // 1 - v_y/S; col0 = S_{k != y}, col1 = #{k != y: m0 < p_k < 1}
      const V v_y = M::clamp(basics.log_py, p.log_min_prob, S(0)) - V(p.log_min_prob);
      const V s = col0 + v_y;
      const V s2 = s * s;
      const V y_in = M::select_inside(basics.log_py, p.log_min_prob, S(0), one, zero);
      const V x = (v_y * col1 - y_in * col0) / s2;  // sum over the clamp's set of dL/dv_k
      c.Kin = c.Kin + weight * v_y / s2;
      c.Q = c.Q - weight * x * one_minus_py;
      c.Y = c.Y - weight * (y_in * col0 / s2 + p_y * x);
      break;
    }
    case NNFL: {  // 1 - N/D; col0 = R = D - N, col1 = sum of w_k over k != y with log p_k > ln m0
      V w_y, n;
      nnfl_target<M>(basics, p, kc, w_y, n);
      const V d = col0 + n;
      const V d2 = d * d;
      const V y_in = M::select_gt(basics.log_py, p.log_min_prob, one, zero);
      const V x = (n * col1 - y_in * w_y * col0) / d2;
      c.Win = c.Win + weight * n / d2;
      c.Q = c.Q - weight * x * one_minus_py;
      c.Y = c.Y - weight * (y_in * w_y * col0 / d2 + p_y * x);
      break;
    }
    case NGCE: {  // N/D, N = 1 - u_y, D = N + col0; col1 = sum of u_k over k != y in M
      const V lpc = M::clamp(basics.log_py, S(kLogProbClamp), S(0));
      const V n = V(S(0)) - M::expm1(V(p.q) * lpc);
      const V u_y = M::exp(V(p.q) * lpc);
      const V d = col0 + n;
      const V d2 = d * d;
      const V y_in = M::select_inside(basics.log_py, S(kLogProbClamp), S(0), one, zero);
      const V x = V(p.q) * (n * col1 - y_in * u_y * col0) / d2;
      c.U = c.U + weight * n * V(p.q) / d2;
      c.Q = c.Q - weight * x * one_minus_py;
      c.Y = c.Y - weight * (y_in * V(p.q) * u_y * col0 / d2 + p_y * x);
      break;
    }
    case AMSE: {  // ((a - p_y)^2 + sum_{k != y} p_k^2) / C; col0 = sum_{k != y} p_k^2
      const V a_minus = V(p.a - S(1)) + one_minus_py;
      const V two_c = V(S(2) * kc.c0);
      const V x = two_c * (col0 - p_y * a_minus);
      c.Q2 = c.Q2 + weight * two_c * one_minus_py * one_minus_py;
      c.Q = c.Q - weight * x * one_minus_py;
      c.Y = c.Y - weight * two_c * p_y * (a_minus * one_minus_py + col0);
      break;
    }
    default:
      if (is_py_kind(kind)) {  // g ([j = y] - p_j)
        const V g = py_term<M>(kind, basics, col0, p, kc).g;
        c.Q = c.Q - weight * g * one_minus_py;
        c.Y = c.Y + weight * g * one_minus_py;
      }
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
  V q2, K, k_in, W, w_in, U;
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
  Coefs<V> c = {zero, zero, zero, zero, zero, zero, zero, zero, zero, zero};
  // Terms with a zero weight are skipped (also avoids 0 * inf from an unused term).
  if (p.alpha * scale != S(0)) add_term_coefs<M>(c, 0, g_row * V(p.alpha * scale), basics, st, p, c_classes);
  if (p.passive != NONE && p.beta != S(0)) add_term_coefs<M>(c, 1, g_row * V(p.beta), basics, st, p, c_classes);
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
  r.q2 = c.Q2;
  r.K = c.K;
  r.k_in = c.Kin;
  r.W = c.W;
  r.w_in = c.Win;
  r.U = c.U;
  r.grad_y = c.Y;
  return r;
}

// dL/dz_j for j != y, with the parts of the gradient form in F (GradFeature bits; with GF_ALL,
// `present` says which parts the loss has). `B` is the type of the row quantities: a scalar
// broadcast over a vector of classes, or the vector of rows itself.
template <unsigned F, class M, typename B>
APL_HD typename M::V grad_not_target(const RowGrad<B>& g, const LossParams<typename M::S>& p, unsigned present,
                                     typename M::V z) {
  using V = typename M::V;
  using S = typename M::S;
  // a part is in F, and (only for GF_ALL, tested per row) in the loss
  const auto has = [present](unsigned part) { return (F & part) && (F != GF_ALL || (present & part)); };
  const V zero(S(0));
  const V zm = z - V(g.m);
  const V q = M::exp(zm - V(g.lsum));  // p_j = q (1 - p_y)
  const V coef = has(GF_RCE_MASK) ? M::select_inside(q * V(g.one_minus_py), S(kProbClamp), S(1), V(g.q_in), V(g.q_out))
                                  : V(g.q_out);
  V out = q * coef + V(g.K);
  if (has(GF_Q2)) out = out + V(g.q2) * q * q;
  if (F & (GF_W | GF_W_IN | GF_K_IN | GF_U)) {
    const V lp = zm - V(g.shift);
    const S log_m0 = p.log_min_prob;
    if (has(GF_K_IN)) out = out + M::select_inside(lp, log_m0, S(0), V(g.k_in), zero);
    if (has(GF_W | GF_W_IN)) {
      const V w = focal_weight_from_one_minus_p<M>(one_minus_p<M>(q * V(g.one_minus_py), lp), p.gamma);
      if (has(GF_W)) out = out + V(g.W) * w;
      if (has(GF_W_IN)) out = out + M::select_gt(lp, log_m0, V(g.w_in) * w, zero);
    }
    if (has(GF_U)) out = out + M::select_inside(lp, S(kLogProbClamp), S(0), V(g.U) * M::exp(V(p.q) * lp), zero);
  }
  return out;
}

// ---------------------------------------------------------------- soft targets
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

// Columns of `stats` for soft targets (the same tensor, fewer columns used).
enum SoftStat : int {
  SS_LOSS = 0,      // the row's loss: the terms' weighted sum, class weights included (0: ignored)
  SS_DENOM = 1,     // its share of the 'mean' denominator: 1, or w_y for weighted class indices
  SS_VALID = 2,     // 1, or 0 for a class index equal to ignore_index
  SS_MAX = 3,       // m = max_k z_k
  SS_LOGSUM = 4,    // log sum_k exp(z_k - m)
  SS_CE_MASS = 5,   // sum_k w_k t_k
  SS_MAE_SIGN = 6,  // sum_k s_k p_k
  SS_RCE_MASS = 7,  // sum_{k in M} a_k p_k
  NUM_SOFT_STATS = 8,
};
static_assert(int(NUM_SOFT_STATS) <= int(NUM_STATS), "soft-target stats share the stats tensor");

// The kinds defined for soft targets, and where label smoothing applies.
APL_HD bool takes_soft(int kind) {
  return kind == NONE || kind == CE || kind == MAE || kind == MAE_AUTHOR || kind == RCE;
}
APL_HD bool takes_smoothing(int active, int passive) { return active == CE && passive == NONE; }

// Each term's weight in the row's loss (alpha or beta, times MAE's scale c).
template <typename S>
struct SoftCoefs {
  S ce, mae, rce;
  S keep, spread;  // t = keep b + spread: 1 - e and e / C
};

template <typename S>
APL_HD SoftCoefs<S> soft_coefs(const LossParams<S>& p, S smoothing, S c_classes) {
  SoftCoefs<S> c{S(0), S(0), S(0), S(1) - smoothing, smoothing / c_classes};
  for (int term = 0; term < 2; ++term) {
    const int kind = kind_of(p, term);
    const S weight = term == 0 ? p.alpha : p.beta;
    if (kind == CE) c.ce += weight;
    if (kind == MAE) c.mae += weight * S(0.5);
    if (kind == MAE_AUTHOR) c.mae += weight / c_classes;
    if (kind == RCE) c.rce += weight;
  }
  return c;
}

// One element's (or one vector's) contributions to the row sums. `B` as for grad_not_target.
template <typename V>
struct SoftSums {
  V ce;         // w t (-log p)
  V ce_mass;    // w t
  V mae_abs;    // |p - t|
  V mae_sign;   // s p
  V rce_value;  // clamp(p, 1e-7, 1) a
  V rce_mass;   // a p [in M]
  APL_HD_MEMBER void add(const SoftSums& o) {
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
APL_HD typename M::V soft_target(typename M::V b, const SoftCoefs<typename M::S>& c) {
  using V = typename M::V;
  return b * V(c.keep) + V(c.spread);
}

// z: logits, t: target, w: class weights; m and lsum: the row's max and log sum exp(z - m).
template <class M, typename B>
APL_HD SoftSums<typename M::V> soft_terms(typename M::V z, typename M::V t, typename M::V w, B m, B lsum,
                                          const SoftCoefs<typename M::S>& c) {
  using V = typename M::V;
  using S = typename M::S;
  const V zero(S(0));
  SoftSums<V> r{zero, zero, zero, zero, zero, zero};
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
APL_HD T soft_mean_share(const T* weight, const int64_t* target, int64_t i) {
  return target != nullptr && weight != nullptr ? weight[target[i]] : T(1);
}

// A valid row's stats (st[0 .. NUM_SOFT_STATS)) from its sums; `denom` its 'mean' share.
template <typename V, typename S>
APL_HD void soft_row_stats(V* st, V m, V lsum, const SoftSums<V>& s, const SoftCoefs<S>& c, V denom) {
  st[SS_LOSS] = V(c.ce) * s.ce + V(c.mae) * s.mae_abs + V(c.rce) * s.rce_value;
  st[SS_DENOM] = denom;
  st[SS_VALID] = V(S(1));
  st[SS_MAX] = m;
  st[SS_LOGSUM] = lsum;
  st[SS_CE_MASS] = s.ce_mass;
  st[SS_MAE_SIGN] = s.mae_sign;
  st[SS_RCE_MASS] = s.rce_mass;
}

// What the backward's pass over a row needs: the row's m and lsum, X, and the coefficients
// times the row's upstream gradient g.
template <typename V>
struct SoftGrad {
  V m, lsum, x, ce, mae, rce;
};

template <typename V, typename S>
APL_HD SoftGrad<V> soft_row_grad(const V* st, const SoftCoefs<S>& c, V g_row) {
  SoftGrad<V> r;
  r.m = st[SS_MAX];
  r.lsum = st[SS_LOGSUM];
  r.ce = g_row * V(c.ce);
  r.mae = g_row * V(c.mae);
  r.rce = g_row * V(c.rce);
  r.x = r.ce * st[SS_CE_MASS] - r.mae * st[SS_MAE_SIGN] - r.rce * st[SS_RCE_MASS];
  return r;
}

// dL/dz_j of a valid row.
template <class M, typename B>
APL_HD typename M::V soft_grad(const SoftGrad<B>& g, typename M::V z, typename M::V t, typename M::V w,
                               const SoftCoefs<typename M::S>& c) {
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

// A soft-target row's share of the batch sums: n_valid, the 'mean' denominator (in wsum) and the
// loss (in wact); the reduced loss is that sum, or it over the denominator.
template <typename S>
APL_HD void soft_add_row(BatchSums& s, const S* st) {
  s.n_valid += static_cast<double>(st[SS_VALID] != S(0));
  s.wsum += static_cast<double>(st[SS_DENOM]);
  s.wact += static_cast<double>(st[SS_LOSS]);
}

APL_HD void soft_batch_terms(const BatchSums& s, double* batch) {
  batch[BT_SCALE] = 1.0;
  batch[BT_MEAN_W] = 0.0;
  batch[BT_N_VALID] = s.n_valid;
  batch[BT_DENOM] = s.wsum;
  batch[BT_SUM_WACT] = s.wact;
}

APL_HD double soft_reduced_loss(int reduction, const double* batch) {
  return reduction == RED_MEAN ? batch[BT_SUM_WACT] / batch[BT_DENOM] : batch[BT_SUM_WACT];
}

}  // namespace row
}  // namespace apl
