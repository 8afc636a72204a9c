// The CPU row kernels, vectorised with ATen's at::vec::Vectorized. Compiled once per
// instruction set: the including file defines APL_ISA_NS (and, for AVX2/AVX-512, a GCC target
// pragma plus ATen's CPU_CAPABILITY macros) before including this header.
//
// Forward of a row: pass 1 max_{k != y} z_k, pass 2 sum_{k != y} exp(z_k - m) (and
// sum_{k != y} (z_k - m) for NCE_MA2020), pass 3 only for RCE / NFL_MA2020; then
// row::row_stats. Two layouts: lanes = classes of one row (C > kRowsMaxC), lanes = rows of a
// block (few classes). Backward of a row: one pass writing grad_not_target for every element,
// then the target's own entry. All row math is in ../loss_row.h.
#pragma once

#ifndef APL_ISA_NS
#error "define APL_ISA_NS before including row_kernels_impl.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "row_kernels.h"

namespace apl {
namespace cpu {
namespace APL_ISA_NS {

using at::vec::Vectorized;

// The vector instance of the maths policy of loss_row.h.
template <typename T>
struct VecMath {
  using V = Vectorized<T>;
  using S = T;
  // exp_u20: ATen's fast exp (the one its softmax kernels use). It maps NaN to a finite
  // value, so NaN lanes are put back: a NaN logit makes its row's max (or z_y) NaN, and the
  // row quantities must carry that to the loss and the gradient, never a finite number.
  static inline V exp(V x) { return V::blendv(x.exp_u20(), x, x != x); }
  static inline V log(V x) { return x.log(); }
  static inline V log1p(V x) { return x.log1p(); }
  static inline V expm1(V x) { return x.expm1(); }
  // expm1 on [-ln 2, 0] only: its Taylor series to the degree whose remainder is under 0.1 ulp
  // there (|x|^n / (n+1)! relative), one FMA per degree, far cheaper than Sleef's full-range
  // expm1 (benchmarks/RESULTS.md, "Kernel design"); other lanes are discarded by the caller.
  static inline V expm1_small(V x) {
    constexpr int n = std::is_same_v<T, float> ? 10 : 17;
    V acc(inv_factorial(n));
    for (int k = n - 1; k >= 1; --k) acc = at::vec::fmadd(acc, x, V(inv_factorial(k)));
    return acc * x;
  }
  static constexpr T inv_factorial(int k) {
    double f = 1;
    for (int i = 2; i <= k; ++i) f *= i;
    return static_cast<T>(1.0 / f);
  }
  static inline V sqrt(V x) { return x.sqrt(); }
  static inline bool any_gt(V x, T t) {  // zero_mask: bit i set when lane i is 0 (false)
    return (x > V(t)).zero_mask() != (1 << V::size()) - 1;
  }
  static inline V select_gt(V x, T t, V a, V b) { return V::blendv(b, a, x > V(t)); }
  static inline V select_lt(V x, T t, V a, V b) { return V::blendv(b, a, x < V(t)); }
  static inline V select_eq(V x, T t, V a, V b) { return V::blendv(b, a, x == V(t)); }
  static inline V select_inside(V x, T lo, T hi, V a, V b) { return V::blendv(b, a, (x > V(lo)) & (x < V(hi))); }
  static inline V clamp(V x, T lo, T hi) { return V::blendv(V::blendv(x, V(hi), x > V(hi)), V(lo), x < V(lo)); }
};

template <typename T>
inline T hsum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](const Vectorized<T>& a, const Vectorized<T>& b) { return a + b; }, v);
}

template <typename T>
inline T hmax(const Vectorized<T>& v) {  // NaN-propagating
  return at::vec::vec_reduce_all<T>(
      [](const Vectorized<T>& a, const Vectorized<T>& b) { return at::vec::maximum(a, b); }, v);
}

// NA vector accumulators (kept in registers once inlined).
template <int NA, typename T>
struct Acc {
  Vectorized<T> v[NA];
  static inline Acc zero() {
    Acc a;
    for (int j = 0; j < NA; ++j) a.v[j] = Vectorized<T>(T(0));
    return a;
  }
  inline void add(const Acc& o) {
    for (int j = 0; j < NA; ++j) v[j] = v[j] + o.v[j];
  }
};

// One row without its target y, as the passes see it: full vectors over [0, C), where the
// one vector holding y and the partial last vector are masked (a lane mask from the lane
// index, no branches on y beyond "is this the vector holding y"). A row of at most one
// vector (CIFAR-10's C = 10) is a single masked vector.
template <typename T>
struct RowView {
  using Vec = Vectorized<T>;
  static constexpr int64_t W = Vec::size();
  const T* z;
  int64_t C, y;
  int64_t y_vec;  // start of the vector holding y
  int64_t full;   // end of the full vectors
  Vec lane;       // 0, 1, ..., W-1

  RowView(const T* z_, int64_t C_, int64_t y_)
      : z(z_), C(C_), y(y_), y_vec(y_ / W * W), full(C_ / W * W), lane(Vec::arange(T(0), T(1))) {}

  // all-ones lanes for the classes of the vector at k that exist and are not y
  inline Vec keep(int64_t k) const {
    const int64_t valid = std::min<int64_t>(C - k, W);
    const int64_t yl = (y >= k && y < k + W) ? y - k : -1;
    return (lane < Vec(static_cast<T>(valid))) & (lane != Vec(static_cast<T>(yl)));
  }

  // max_{k != y} z_k, NaN-propagating. at::vec::maximum is a dependent compare/max/or chain,
  // so four accumulators are in flight (two left the pass latency-bound).
  T max() const {
    constexpr int kChains = 4;
    const Vec neg_inf(-std::numeric_limits<T>::infinity());
    Vec a[kChains];
    for (auto& v : a) v = neg_inf;
    int64_t k = 0;
    for (; k + kChains * W <= full; k += kChains * W) {
      for (int j = 0; j < kChains; ++j) {
        Vec v = Vec::loadu(z + k + j * W);
        if (k + j * W == y_vec) v = Vec::blendv(neg_inf, v, keep(k + j * W));
        a[j] = at::vec::maximum(a[j], v);
      }
    }
    for (; k < C; k += W) {  // fewer than kChains full vectors, then the partial one
      Vec v = k + W <= C ? Vec::loadu(z + k) : Vec::loadu(z + k, C - k);
      if (k == y_vec || k + W > C) v = Vec::blendv(neg_inf, v, keep(k));
      a[0] = at::vec::maximum(a[0], v);
    }
    for (int j = 1; j < kChains; ++j) a[0] = at::vec::maximum(a[0], a[j]);
    return hmax(a[0]);
  }

  // sum_{k != y} f(z_k), f returning Acc<NA, T>. Summed in chunks of at most 32 vectors into
  // fresh accumulators, so the rounding error grows with the chunk length plus the number of
  // chunks rather than with C (float32 sums over C = 32000+ classes stay within a few ulps).
  // Masked lanes are cleared after f (also any inf/NaN f made of padding lanes).
  template <int NA, class F>
  Acc<NA, T> sum(const F& f) const {
    constexpr int64_t kChunk = 32 * W;
    auto masked = [&](Acc<NA, T> r, int64_t k) {
      const Vec m = keep(k);
      for (int j = 0; j < NA; ++j) r.v[j] = r.v[j] & m;
      return r;
    };
    Acc<NA, T> total = Acc<NA, T>::zero();
    int64_t k = 0;
    while (k < full) {
      const int64_t stop = std::min<int64_t>(full, k + kChunk);
      Acc<NA, T> a0 = Acc<NA, T>::zero(), a1 = Acc<NA, T>::zero();
      for (; k + 2 * W <= stop; k += 2 * W) {
        Acc<NA, T> r0 = f(Vec::loadu(z + k)), r1 = f(Vec::loadu(z + k + W));
        if (k == y_vec) r0 = masked(r0, k);
        if (k + W == y_vec) r1 = masked(r1, k + W);
        a0.add(r0);
        a1.add(r1);
      }
      if (k < stop) {
        Acc<NA, T> r = f(Vec::loadu(z + k));
        if (k == y_vec) r = masked(r, k);
        a0.add(r);
        k += W;
      }
      total.add(a0);
      total.add(a1);
    }
    if (k < C) total.add(masked(f(Vec::loadu(z + k, C - k)), k));
    return total;
  }
};

// ------------------------------------------------------------ one row at a time
// Vector lanes are classes of one row for the passes over the row. The row's own quantities
// (the logs, exps and divisions of loss_row.h) are computed for a block of W rows at once,
// one row per lane, between the passes. The backward's per-row work is light and stays scalar
// (lanes were no faster). The forward above the rows-in-lanes limit, the backward always.

// Row quantities of a block of W rows, lane r = row r: written row by row, read as a vector.
template <typename T>
struct Lanes {
  using Vec = Vectorized<T>;
  alignas(64) T v[Vec::size()];
  inline Vec load() const { return Vec::loadu(v); }
  inline void store(const Vec& x) { x.store(v); }
};

// stats of the valid rows of a block from their lanes (ignored and missing rows: zeros),
// transposed by ATen's transpose_mxn (register tiles on AVX-512 float).
template <typename T>
inline void store_lane_stats(const Vectorized<T>* st, const bool* valid, int64_t rows, T* out) {
  constexpr int64_t W = Vectorized<T>::size();
  alignas(64) T columns[row::NUM_STATS * W];
  for (int j = 0; j < row::NUM_STATS; ++j) st[j].store(columns + j * W);
  at::vec::transpose_mxn<T>(columns, W, out, row::NUM_STATS, row::NUM_STATS, static_cast<int>(rows));
  for (int64_t r = 0; r < rows; ++r)
    if (!valid[r])
      for (int j = 0; j < row::NUM_STATS; ++j) out[r * row::NUM_STATS + j] = T(0);
}

// Whether some class k < y has z_k == z_y (epsilon-softmax's tie rule: the first maximum is the argmax).
template <typename T>
inline bool tie_before(const T* z, int64_t y) {
  for (int64_t k = 0; k < y; ++k)
    if (z[k] == z[y]) return true;
  return false;
}

// The accumulators a one-row third pass keeps: the kind's own sums when it is fixed at compile time
// (loss_row.h with_pass3_kind), all three otherwise.
template <class K>
constexpr int pass3_accumulators() {
  if constexpr (std::is_same_v<K, int>) {
    return 3;
  } else {
    return row::pass3_sums(K::value);
  }
}

template <int NS, typename V>
inline Acc<NS, typename V::value_type> first_sums(const row::TermSums<V>& e) {
  Acc<NS, typename V::value_type> a;
  const V all[3] = {e.s0, e.s1, e.s2};
  for (int j = 0; j < NS; ++j) a.v[j] = all[j];
  return a;
}

template <typename T>
void forward_rows_serial(const ForwardBlock<T>& a) {
  using Vec = Vectorized<T>;
  using M = VecMath<T>;
  constexpr int64_t W = Vec::size();
  const row::LossParams<T>& p = a.params;
  const int64_t C = a.C;
  const bool want_zsum = row::needs_zsum(p), want_top = row::needs_argmax(p);
  const Vec zero(T(0));
  for (int64_t i0 = 0; i0 < a.rows; i0 += W) {
    const int64_t rows = std::min<int64_t>(W, a.rows - i0);
    bool valid[W];
    // Ignored and missing lanes get a neutral row (m = 0, sum = 1) and are discarded.
    Lanes<T> m, s, zsum, zy, tie;
    for (int64_t r = 0; r < W; ++r) {
      const int64_t y = r < rows ? a.target[i0 + r] : a.ignore_index;
      valid[r] = r < rows && y != a.ignore_index;
      m.v[r] = T(0), s.v[r] = T(1), zsum.v[r] = T(0), zy.v[r] = T(0), tie.v[r] = T(0);
      if (!valid[r]) continue;
      const T* z = a.logits + (i0 + r) * C;
      const RowView<T> row(z, C, y);
      // pass 1: m = max_{k != y} z_k, NaN-propagating
      const T mr = row.max();
      // pass 2: sum_{k != y} exp(z_k - m)  (and sum (z_k - m) for NCE_MA2020)
      const Vec vm(mr);
      if (want_zsum) {
        const auto acc = row.template sum<2>([&](Vec v) {
          const Vec d = v - vm;
          return Acc<2, T>{{M::exp(d), d}};
        });
        s.v[r] = hsum(acc.v[0]);
        zsum.v[r] = hsum(acc.v[1]);
      } else {
        s.v[r] = hsum(row.template sum<1>([&](Vec v) { return Acc<1, T>{{M::exp(v - vm)}}; }).v[0]);
      }
      m.v[r] = mr;
      zy.v[r] = z[y];
      if (want_top && z[y] == mr && tie_before(z, y)) tie.v[r] = T(1);
    }
    const Vec top = want_top ? row::argmax_flag<M>(zy.load(), m.load(), tie.load()) : zero;
    const row::RowSums<Vec> sums{m.load(), s.load(), zsum.load(), top};
    const row::RowBasics<Vec> basics = row::basics_from_sums<M>(sums, zy.load());
    row::RowExtra<Vec> extra{{row::zero_sums(zero), row::zero_sums(zero)}};
    if (row::needs_pass3(p)) {
      // pass 3 needs each row's basics as scalars
      Lanes<T> lane_m, lane_lsum, lane_shift, lane_one_minus_py, extra_sums[6];
      lane_m.store(basics.m), lane_lsum.store(basics.lsum), lane_shift.store(basics.shift),
          lane_one_minus_py.store(basics.one_minus_py);
      for (auto& lane : extra_sums) lane.store(zero);
      for (int64_t r = 0; r < rows; ++r) {
        if (!valid[r]) continue;
        const RowView<T> row(a.logits + (i0 + r) * C, C, a.target[i0 + r]);
        row::RowBasics<T> row_basics{};
        row_basics.m = lane_m.v[r], row_basics.lsum = lane_lsum.v[r], row_basics.shift = lane_shift.v[r],
        row_basics.one_minus_py = lane_one_minus_py.v[r];
        for (int t = 0; t < 2; ++t) {  // one pass per term that needs one, its kind fixed where common
          const int kind = row::kind_of(p, t);
          if (!row::kind_needs_pass3(kind)) continue;
          row::with_pass3_kind(kind, [&](auto k) {
            constexpr int NS = pass3_accumulators<decltype(k)>();
            const auto acc = row.template sum<NS>([&](Vec v) {
              row::TermSums<Vec> e = row::zero_sums(zero);
              row::pass3_term<M, true>(static_cast<int>(k), p.kc[t], p, v, zero, row_basics, e);
              return first_sums<NS>(e);
            });
            for (int j = 0; j < NS; ++j) extra_sums[3 * t + j].v[r] = hsum(acc.v[j]);
          });
        }
      }
      for (int t = 0; t < 2; ++t)
        extra.t[t] =
            row::TermSums<Vec>{extra_sums[3 * t].load(), extra_sums[3 * t + 1].load(), extra_sums[3 * t + 2].load()};
    }
    Vec st[row::NUM_STATS];
    row::row_stats<M>(st, basics, sums, extra, p, static_cast<T>(C));
    store_lane_stats(st, valid, rows, a.stats + i0 * row::NUM_STATS);
  }
}

template <unsigned F, typename T>
inline void write_row_grad(const T* z, int64_t C, const row::RowGrad<T>& g, const row::LossParams<T>& p,
                           unsigned present, T* out) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t k = 0;
  for (; k + W <= C; k += W) row::grad_not_target<F, VecMath<T>>(g, p, present, Vec::loadu(z + k)).store(out + k);
  if (k < C) row::grad_not_target<F, VecMath<T>>(g, p, present, Vec::loadu(z + k, C - k)).store(out + k, C - k);
}

// Lane setup of the block of `rows` rows at i0: its gradient coefficients, the targets of its
// lanes (-1 where ignored or missing) and the mask of those lanes.
template <typename T>
inline void lane_grads(const BackwardBlock<T>& a, int64_t i0, int64_t rows, row::RowGrad<Vectorized<T>>& g,
                       Vectorized<T>& yv, Vectorized<T>& invalid) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Lanes<T> stats[row::NUM_STATS], g_row, y;
  for (int64_t r = 0; r < W; ++r) {
    const bool valid = r < rows && a.target[i0 + r] != a.ignore_index;
    for (int j = 0; j < row::NUM_STATS; ++j) stats[j].v[r] = valid ? a.stats[(i0 + r) * row::NUM_STATS + j] : T(0);
    g_row.v[r] = valid ? a.grad_rows[(i0 + r) * a.grad_stride] : T(0);
    y.v[r] = valid ? static_cast<T>(a.target[i0 + r]) : T(-1);
  }
  Vec st[row::NUM_STATS];
  for (int j = 0; j < row::NUM_STATS; ++j) st[j] = stats[j].load();
  g = row::row_grad<VecMath<T>>(st, a.params, static_cast<T>(a.C), g_row.load(), a.scale, a.batch_coef);
  yv = y.load();
  invalid = yv == Vec(T(-1));
}

// A block's RowGrad<Vec> as the scalar RowGrad of each of its lanes.
template <typename T>
struct LaneGrads {
  Lanes<T> m, lsum, shift, one_minus_py, q_in, q_out, q2, K, k_in, W, w_in, U, grad_y;
  explicit LaneGrads(const row::RowGrad<Vectorized<T>>& g) {
    m.store(g.m), lsum.store(g.lsum), shift.store(g.shift), one_minus_py.store(g.one_minus_py);
    q_in.store(g.q_in), q_out.store(g.q_out), q2.store(g.q2), K.store(g.K), k_in.store(g.k_in);
    W.store(g.W), w_in.store(g.w_in), U.store(g.U), grad_y.store(g.grad_y);
  }
  row::RowGrad<T> row(int64_t r) const {
    return row::RowGrad<T>{m.v[r], lsum.v[r], shift.v[r], one_minus_py.v[r], q_in.v[r], q_out.v[r], q2.v[r],
                           K.v[r], k_in.v[r], W.v[r],     w_in.v[r],         U.v[r],    grad_y.v[r]};
  }
};

// The backward of (N, C) rows: each block of W rows' coefficients computed in the lanes (row_grad is
// the per-row bookkeeping, as costly as a short row's element loop when scalar), then one masked pass
// per row, classes in the lanes, whatever C (transposing a block in and out cost more than it saved).
template <typename T>
void backward_rows_serial(const BackwardBlock<T>& a) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const row::LossParams<T>& p = a.params;
  const int64_t C = a.C;
  const unsigned present = row::grad_features(p);
  row::with_grad_features(present, [&](auto features) {
    constexpr unsigned F = decltype(features)::value;
    for (int64_t i0 = 0; i0 < a.rows; i0 += W) {
      const int64_t rows = std::min<int64_t>(W, a.rows - i0);
      row::RowGrad<Vec> block_grad;
      Vec yv, invalid;
      lane_grads(a, i0, rows, block_grad, yv, invalid);
      const LaneGrads<T> lanes(block_grad);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        const T* z = a.logits + i * C;
        T* out = a.grad + i * C;
        const int64_t y = a.target[i];
        if (y == a.ignore_index) {
          int64_t k = 0;
          for (; k + W <= C; k += W) Vec(T(0)).store(out + k);
          for (; k < C; ++k) out[k] = T(0);
          continue;
        }
        const row::RowGrad<T> g = lanes.row(r);
        write_row_grad<F>(z, C, g, p, present, out);
        out[y] = g.grad_y;
      }
    }
  });
}

// ------------------------------------------------------------ rows in lanes (forward, few classes)
// For few classes (CIFAR-10's 10) the one-row-at-a-time forward's per-row work (two reductions
// across lanes, a chain of dependent steps per row) would dominate, so the vector lanes hold W
// rows instead: a block of W rows is transposed into a class-major buffer and every row
// quantity, the scalar math included, is computed for the W rows at once with the same
// loss_row.h functions.
// Ignored and missing rows are computed on zeros and discarded. Up to C = kRowsMaxC this is
// faster than the one-row-at-a-time forward for every kind. In F.cross_entropy's (N, C, D)
// layout a class of W consecutive positions is already a vector: no transpose at all.

// A block of up to W rows, class-major: buf[k * W + r] = z[row r, class k].
template <typename T>
struct RowBlock {
  using Vec = Vectorized<T>;
  static constexpr int64_t W = Vec::size();
  int64_t rows;
  bool valid[W];
  Vec yv;  // target of each lane (-1 for ignored / missing rows)
  Vec zy;  // target logit of each lane
  alignas(64) T buf[kRowsMaxC * W];

  // The block's rows of a ForwardBlock / BackwardBlock `a` starting at its row i0.
  template <class Block>
  RowBlock(const Block& a, int64_t i0) : rows(std::min<int64_t>(W, a.rows - i0)) {
    const int64_t C = a.C;
    if (a.D == 1) {
      // ATen's transpose_mxn works in 16 x 16 register tiles for float on AVX-512 (a scalar loop
      // for other types and instruction sets, as this was before).
      at::vec::transpose_mxn<T>(a.logits + i0 * C, C, buf, W, static_cast<int>(rows), static_cast<int>(C));
    } else {
      const int64_t first = a.row0 + i0, n = first / a.D, d = first % a.D;
      if (d + rows <= a.D) {  // one sample: each class is `rows` consecutive positions
        for (int64_t k = 0; k < C; ++k) Vec::loadu(a.logits + (n * C + k) * a.D + d, rows).store(buf + k * W);
      } else {
        for (int64_t r = 0; r < rows; ++r) {
          const T* z = a.logits + ((first + r) / a.D) * C * a.D + (first + r) % a.D;
          for (int64_t k = 0; k < C; ++k) buf[k * W + r] = z[k * a.D];
        }
      }
    }
    const int64_t* target = a.target + i0;
    alignas(64) T y_arr[W], zy_arr[W];
    for (int64_t r = 0; r < W; ++r) {
      valid[r] = r < rows && target[r] != a.ignore_index;
      if (valid[r]) {
        y_arr[r] = static_cast<T>(target[r]);
        zy_arr[r] = buf[target[r] * W + r];
      } else {
        for (int64_t k = 0; k < C; ++k) buf[k * W + r] = T(0);
        y_arr[r] = T(-1);
        zy_arr[r] = T(0);
      }
    }
    yv = Vec::loadu(y_arr);
    zy = Vec::loadu(zy_arr);
  }
  inline Vec col(int64_t k) const { return Vec::loadu(buf + k * W); }
  inline Vec is_target(int64_t k) const { return yv == Vec(static_cast<T>(k)); }
};

template <typename T>
void forward_rows_in_lanes(const ForwardBlock<T>& a) {
  using Vec = Vectorized<T>;
  using M = VecMath<T>;
  constexpr int64_t W = Vec::size();
  const row::LossParams<T>& p = a.params;
  const int64_t C = a.C;
  const Vec zero(T(0));
  alignas(64) T exps[kRowsMaxC * W];  // exp(z_k - m) of the block, class-major like RowBlock::buf
  for (int64_t i0 = 0; i0 < a.rows; i0 += W) {
    const RowBlock<T> blk(a, i0);
    // pass 1: max over k != y, NaN-propagating. Two accumulators (even and odd k) in passes 1
    // and 2: a single one makes the pass a chain of dependent max/add steps.
    const Vec neg_inf(-std::numeric_limits<T>::infinity());
    Vec m0 = neg_inf, m1 = neg_inf;
    int64_t k = 0;
    for (; k + 1 < C; k += 2) {
      m0 = at::vec::maximum(m0, Vec::blendv(blk.col(k), neg_inf, blk.is_target(k)));
      m1 = at::vec::maximum(m1, Vec::blendv(blk.col(k + 1), neg_inf, blk.is_target(k + 1)));
    }
    if (k < C) m0 = at::vec::maximum(m0, Vec::blendv(blk.col(k), neg_inf, blk.is_target(k)));
    const Vec m = at::vec::maximum(m0, m1);
    // pass 2: sum_{k != y} exp(z_k - m)  (and sum (z_k - m) for NCE_MA2020); the exps are kept
    // for pass 3, which then needs no exp of its own
    Vec s[2] = {zero, zero}, zsum[2] = {zero, zero};
    const bool want_zsum = row::needs_zsum(p), pass3 = row::needs_pass3(p);
    for (k = 0; k < C; ++k) {
      const Vec out = blk.is_target(k);
      const Vec d = blk.col(k) - m;
      const Vec e = M::exp(d);
      if (pass3) e.store(exps + k * W);
      s[k & 1] = s[k & 1] + Vec::blendv(e, zero, out);
      if (want_zsum) zsum[k & 1] = zsum[k & 1] + Vec::blendv(d, zero, out);
    }
    Vec top = zero;
    if (row::needs_argmax(p)) {  // y is the argmax unless a logit before it equals it (rare: checked then)
      Vec tie = zero;
      if ((blk.zy == m).zero_mask() != (1 << W) - 1)
        for (k = 0; k < C; ++k) tie = tie | ((blk.col(k) == blk.zy) & (Vec(static_cast<T>(k)) < blk.yv) & Vec(T(1)));
      top = row::argmax_flag<M>(blk.zy, m, tie);
    }
    const row::RowSums<Vec> sums{m, s[0] + s[1], zsum[0] + zsum[1], top};
    const row::RowBasics<Vec> basics = row::basics_from_sums<M>(sums, blk.zy);
    row::RowExtra<Vec> extra{{row::zero_sums(zero), row::zero_sums(zero)}};
    if (pass3) {
      const Vec inv_s = Vec(T(1)) / sums.sum_ny;  // q_k = exp(z_k - m) / sum
      for (int t = 0; t < 2; ++t) {               // one pass per term that needs one, its kind fixed where common
        const int kind = row::kind_of(p, t);
        if (!row::kind_needs_pass3(kind)) continue;
        row::with_pass3_kind(kind, [&](auto kk) {
          constexpr int NS = pass3_accumulators<decltype(kk)>();
          Vec total[NS];
          for (auto& v : total) v = zero;
          for (int64_t c = 0; c < C; ++c) {
            row::TermSums<Vec> e = row::zero_sums(zero);
            row::pass3_term<M>(static_cast<int>(kk), p.kc[t], p, blk.col(c), Vec::loadu(exps + c * W) * inv_s, basics,
                               e);
            const Acc<NS, T> add = first_sums<NS>(e);
            const Vec out = blk.is_target(c);
            for (int j = 0; j < NS; ++j) total[j] = total[j] + Vec::blendv(add.v[j], zero, out);
          }
          Vec* dest[3] = {&extra.t[t].s0, &extra.t[t].s1, &extra.t[t].s2};
          for (int j = 0; j < NS; ++j) *dest[j] = total[j];
        });
      }
    }
    Vec st[row::NUM_STATS];
    row::row_stats<M>(st, basics, sums, extra, p, static_cast<T>(C));
    store_lane_stats(st, blk.valid, blk.rows, a.stats + i0 * row::NUM_STATS);
  }
}

template <typename T>
void forward_block(const ForwardBlock<T>& a) {
  if (a.C <= kRowsMaxC)
    forward_rows_in_lanes(a);
  else
    forward_rows_serial(a);
}

// The backward of the (N, C, D) layout: W positions in the lanes, as the forward reads them,
// each class one vector of every lane's gradient (grad_not_target, or the target's own entry).
// One block of up to W rows anywhere in the layout (it may straddle two samples).
template <unsigned F, typename T>
void backward_positions_block(const BackwardBlock<T>& a, int64_t i0, unsigned present) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t C = a.C, D = a.D;
  const RowBlock<T> blk(a, i0);
  row::RowGrad<Vec> g;
  Vec yv, invalid;
  lane_grads(a, i0, blk.rows, g, yv, invalid);
  const int64_t first = a.row0 + i0, n = first / D, d = first % D;
  const bool one_sample = d + blk.rows <= D;
  for (int64_t k = 0; k < C; ++k) {
    Vec v = row::grad_not_target<F, VecMath<T>>(g, a.params, present, blk.col(k));
    v = Vec::blendv(Vec::blendv(v, g.grad_y, yv == Vec(static_cast<T>(k))), Vec(T(0)), invalid);
    if (one_sample) {
      v.store(a.grad + (n * C + k) * D + d, blk.rows);
    } else {
      alignas(64) T out[W];
      v.store(out);
      for (int64_t r = 0; r < blk.rows; ++r) a.grad[((first + r) / D) * C * D + k * D + (first + r) % D] = out[r];
    }
  }
}

// kGroup full blocks of one sample at a time, so each class is visited once per kGroup * W
// consecutive positions (whole cache lines in and out, instead of a half line per stream).
template <unsigned F, typename T>
void backward_positions_in_lanes(const BackwardBlock<T>& a, unsigned present) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t kGroup = 4;
  const int64_t C = a.C, D = a.D;
  int64_t i0 = 0;
  while (i0 < a.rows) {
    const int64_t first = a.row0 + i0, n = first / D, d = first % D;
    if (i0 + kGroup * W > a.rows || d + kGroup * W > D) {
      backward_positions_block<F>(a, i0, present);
      i0 += W;
      continue;
    }
    row::RowGrad<Vec> g[kGroup];
    Vec yv[kGroup], invalid[kGroup];
    for (int64_t b = 0; b < kGroup; ++b) lane_grads(a, i0 + b * W, W, g[b], yv[b], invalid[b]);
    const T* z = a.logits + n * C * D + d;
    T* out = a.grad + n * C * D + d;
    for (int64_t k = 0; k < C; ++k) {
      const Vec kv(static_cast<T>(k));
      for (int64_t b = 0; b < kGroup; ++b) {
        Vec v = row::grad_not_target<F, VecMath<T>>(g[b], a.params, present, Vec::loadu(z + k * D + b * W));
        v = Vec::blendv(Vec::blendv(v, g[b].grad_y, yv[b] == kv), Vec(T(0)), invalid[b]);
        v.store(out + k * D + b * W);
      }
    }
    i0 += kGroup * W;
  }
}

// (N, C) rows: backward_rows_serial; the (N, C, D) layout: positions in the lanes.
template <typename T>
void backward_block(const BackwardBlock<T>& a) {
  if (a.D == 1) return backward_rows_serial(a);
  const unsigned present = row::grad_features(a.params);
  row::with_grad_features(present,
                          [&](auto features) { backward_positions_in_lanes<decltype(features)::value>(a, present); });
}

// ------------------------------------------------------------ soft targets
// One row at a time, classes in the lanes: pass 1 the max, pass 2 sum_k exp(z_k - m), pass 3
// loss_row.h's soft_terms with the target built per vector (the probabilities, or the one-hot
// of the class index, smoothed); the backward is one pass of soft_grad.

// sum over a row's C classes of f(k, n), the vector at k with n valid lanes (n < W only for
// the last, whose other lanes are cleared), in chunks as RowView::sum.
template <int NA, typename T, class F>
inline Acc<NA, T> class_sum(int64_t C, const F& f) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size(), kChunk = 32 * W;
  const int64_t full = C / W * W;
  Acc<NA, T> total = Acc<NA, T>::zero();
  int64_t k = 0;
  while (k < full) {
    const int64_t stop = std::min<int64_t>(full, k + kChunk);
    Acc<NA, T> a0 = Acc<NA, T>::zero();
    for (; k < stop; k += W) a0.add(f(k, W));
    total.add(a0);
  }
  if (k < C) {
    Acc<NA, T> r = f(k, C - k);
    const Vec keep = Vec::arange(T(0), T(1)) < Vec(static_cast<T>(C - k));
    for (int j = 0; j < NA; ++j) r.v[j] = r.v[j] & keep;
    total.add(r);
  }
  return total;
}

// The vectors of one row: logits, target distribution and class weights at k (n lanes).
template <typename T>
struct SoftRowVectors {
  using Vec = Vectorized<T>;
  static constexpr int64_t W = Vec::size();
  const SoftRows<T>& a;
  const T* z;
  const T* probs;  // this row's, or nullptr
  int64_t y;       // the class index (probabilities: -1)

  static inline Vec load(const T* p, int64_t n) { return n == W ? Vec::loadu(p) : Vec::loadu(p, n); }
  inline Vec logits(int64_t k, int64_t n) const { return load(z + k, n); }
  inline Vec target(int64_t k, int64_t n) const {
    Vec b;
    if (probs != nullptr) {
      b = load(probs + k, n);
    } else {  // the one-hot: lane y - k of the vector holding y (lane indices are exact in any T)
      const T lane_of_y = static_cast<T>(y >= k && y < k + W ? y - k : -1);
      b = Vec::blendv(Vec(T(0)), Vec(T(1)), Vec::arange(T(0), T(1)) == Vec(lane_of_y));
    }
    return row::soft_target<VecMath<T>>(b, a.coefs);
  }
  inline Vec weight(int64_t k, int64_t n) const { return a.weight != nullptr ? load(a.weight + k, n) : Vec(T(1)); }
};

template <typename T>
inline bool soft_row_ignored(const SoftRows<T>& a, int64_t i) {
  return a.probs == nullptr && a.target[i] == a.ignore_index;
}

template <typename T>
void soft_forward_rows(const SoftRows<T>& a, T* stats) {
  using Vec = Vectorized<T>;
  using M = VecMath<T>;
  const int64_t C = a.C;
  for (int64_t i = 0; i < a.rows; ++i) {
    T* st = stats + i * row::NUM_STATS;
    std::fill(st, st + row::NUM_STATS, T(0));
    if (soft_row_ignored(a, i)) continue;
    const SoftRowVectors<T> row_vectors{a, a.logits + i * C, a.probs != nullptr ? a.probs + i * C : nullptr,
                                        a.probs != nullptr ? int64_t(-1) : a.target[i]};
    const RowView<T> view(row_vectors.z, C, -1);  // no class left out
    const T m = view.max();
    const Vec vm(m);
    const T lsum = std::log(hsum(view.template sum<1>([&](Vec v) { return Acc<1, T>{{M::exp(v - vm)}}; }).v[0]));
    const auto acc = class_sum<6, T>(C, [&](int64_t k, int64_t n) {
      const auto d = row::soft_terms<M>(row_vectors.logits(k, n), row_vectors.target(k, n), row_vectors.weight(k, n), m,
                                        lsum, a.coefs);
      return Acc<6, T>{{d.ce, d.ce_mass, d.mae_abs, d.mae_sign, d.rce_value, d.rce_mass}};
    });
    const row::SoftSums<T> sums{hsum(acc.v[0]), hsum(acc.v[1]), hsum(acc.v[2]),
                                hsum(acc.v[3]), hsum(acc.v[4]), hsum(acc.v[5])};
    const T denom = row::soft_mean_share(a.weight, a.target, i);
    row::soft_row_stats(st, m, lsum, sums, a.coefs, denom);
  }
}

template <typename T>
void soft_backward_rows(const SoftRows<T>& a, const T* stats, const T* grad_rows, int64_t grad_stride, T* grad) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t C = a.C;
  for (int64_t i = 0; i < a.rows; ++i) {
    T* out = grad + i * C;
    if (soft_row_ignored(a, i)) {
      std::fill(out, out + C, T(0));
      continue;
    }
    const SoftRowVectors<T> row_vectors{a, a.logits + i * C, a.probs != nullptr ? a.probs + i * C : nullptr,
                                        a.probs != nullptr ? int64_t(-1) : a.target[i]};
    const row::SoftGrad<T> g = row::soft_row_grad(stats + i * row::NUM_STATS, a.coefs, grad_rows[i * grad_stride]);
    for (int64_t k = 0; k < C; k += W) {
      const int64_t n = std::min<int64_t>(W, C - k);
      const Vec v = row::soft_grad<VecMath<T>>(g, row_vectors.logits(k, n), row_vectors.target(k, n),
                                               row_vectors.weight(k, n), a.coefs);
      if (n == W)
        v.store(out + k);
      else
        v.store(out + k, n);
    }
  }
}

// F.cross_entropy's (N, C, D) layout in place: the lanes hold W consecutive positions, and a
// class of them is one vector (gathered where a block straddles two samples or is the last,
// partial one). Every pass is across classes within a lane: no reduction across lanes.
template <typename T>
struct PositionBlock {
  using Vec = Vectorized<T>;
  static constexpr int64_t W = Vec::size();
  int64_t C, D, first, rows;
  bool direct;   // one sample, W positions: plain loads and stores
  int64_t base;  // offset of class 0 of the first position (direct)

  PositionBlock(const SoftRows<T>& a, int64_t i0)
      : C(a.C), D(a.D), first(a.row0 + i0), rows(std::min<int64_t>(W, a.rows - i0)) {
    direct = rows == W && first % D + W <= D;
    base = (first / D) * C * D + first % D;
  }
  inline int64_t offset(int64_t r, int64_t k) const { return ((first + r) / D) * C * D + k * D + (first + r) % D; }
  inline Vec load(const T* p, int64_t k) const {
    if (direct) return Vec::loadu(p + base + k * D);
    alignas(64) T v[W] = {};
    for (int64_t r = 0; r < rows; ++r) v[r] = p[offset(r, k)];
    return Vec::loadu(v);
  }
  inline void store(T* p, int64_t k, const Vec& x) const {
    if (direct) return x.store(p + base + k * D);
    alignas(64) T v[W];
    x.store(v);
    for (int64_t r = 0; r < rows; ++r) p[offset(r, k)] = v[r];
  }
};

// The lanes' class index (-1 where probabilities, ignored or missing) and validity.
template <typename T>
inline Vectorized<T> position_targets(const SoftRows<T>& a, int64_t i0, int64_t rows, bool* valid) {
  alignas(64) T y[Vectorized<T>::size()];
  for (int64_t r = 0; r < Vectorized<T>::size(); ++r) {
    const int64_t t = a.probs == nullptr && r < rows ? a.target[i0 + r] : -1;
    valid[r] = r < rows && (a.probs != nullptr || t != a.ignore_index);
    y[r] = valid[r] ? static_cast<T>(t) : T(-1);
  }
  return Vectorized<T>::loadu(y);
}

template <typename T>
inline Vectorized<T> position_target(const SoftRows<T>& a, const PositionBlock<T>& blk, const Vectorized<T>& y,
                                     int64_t k) {
  using Vec = Vectorized<T>;
  const Vec b =
      a.probs != nullptr ? blk.load(a.probs, k) : Vec::blendv(Vec(T(0)), Vec(T(1)), y == Vec(static_cast<T>(k)));
  return row::soft_target<VecMath<T>>(b, a.coefs);
}

template <typename T>
void soft_forward_positions(const SoftRows<T>& a, T* stats) {
  using Vec = Vectorized<T>;
  using M = VecMath<T>;
  constexpr int64_t W = Vec::size();
  const Vec zero(T(0)), one(T(1));
  for (int64_t i0 = 0; i0 < a.rows; i0 += W) {
    const PositionBlock<T> blk(a, i0);
    bool valid[W];
    const Vec y = position_targets(a, i0, blk.rows, valid);
    Vec m(-std::numeric_limits<T>::infinity());
    for (int64_t k = 0; k < a.C; ++k) m = at::vec::maximum(m, blk.load(a.logits, k));
    Vec s = zero;
    for (int64_t k = 0; k < a.C; ++k) s = s + M::exp(blk.load(a.logits, k) - m);
    const Vec lsum = M::log(s);
    row::SoftSums<Vec> sums{zero, zero, zero, zero, zero, zero};
    for (int64_t k = 0; k < a.C; ++k) {
      const Vec w = a.weight != nullptr ? Vec(a.weight[k]) : one;
      sums.add(row::soft_terms<M>(blk.load(a.logits, k), position_target(a, blk, y, k), w, m, lsum, a.coefs));
    }
    alignas(64) T denom[W];
    for (int64_t r = 0; r < W; ++r) denom[r] = valid[r] ? row::soft_mean_share(a.weight, a.target, i0 + r) : T(1);
    Vec st[row::NUM_STATS];
    for (auto& v : st) v = zero;
    row::soft_row_stats(st, m, lsum, sums, a.coefs, Vec::loadu(denom));
    store_lane_stats(st, valid, blk.rows, stats + i0 * row::NUM_STATS);
  }
}

template <typename T>
void soft_backward_positions(const SoftRows<T>& a, const T* stats, const T* grad_rows, int64_t grad_stride, T* grad) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec zero(T(0)), one(T(1));
  for (int64_t i0 = 0; i0 < a.rows; i0 += W) {
    const PositionBlock<T> blk(a, i0);
    bool valid[W];
    const Vec y = position_targets(a, i0, blk.rows, valid);
    Lanes<T> columns[row::NUM_SOFT_STATS], g_row, invalid;
    for (int64_t r = 0; r < W; ++r) {
      for (int j = 0; j < row::NUM_SOFT_STATS; ++j)
        columns[j].v[r] = valid[r] ? stats[(i0 + r) * row::NUM_STATS + j] : T(0);
      g_row.v[r] = valid[r] ? grad_rows[(i0 + r) * grad_stride] : T(0);
      invalid.v[r] = valid[r] ? T(0) : T(1);
    }
    Vec st[row::NUM_SOFT_STATS];
    for (int j = 0; j < row::NUM_SOFT_STATS; ++j) st[j] = columns[j].load();
    const row::SoftGrad<Vec> g = row::soft_row_grad(st, a.coefs, g_row.load());
    const Vec skip = invalid.load() == one;
    for (int64_t k = 0; k < a.C; ++k) {
      const Vec w = a.weight != nullptr ? Vec(a.weight[k]) : one;
      const Vec v = row::soft_grad<VecMath<T>>(g, blk.load(a.logits, k), position_target(a, blk, y, k), w, a.coefs);
      blk.store(grad, k, Vec::blendv(v, zero, skip));
    }
  }
}

template <typename T>
void soft_forward(const SoftRows<T>& a, T* stats) {
  if (a.D > 1)
    soft_forward_positions(a, stats);
  else
    soft_forward_rows(a, stats);
}

template <typename T>
void soft_backward(const SoftRows<T>& a, const T* stats, const T* grad_rows, int64_t grad_stride, T* grad) {
  if (a.D > 1)
    soft_backward_positions(a, stats, grad_rows, grad_stride, grad);
  else
    soft_backward_rows(a, stats, grad_rows, grad_stride, grad);
}

inline RowKernels table(const char* isa) {
  return RowKernels{&forward_block<float>,   &forward_block<double>, &backward_block<float>,
                    &backward_block<double>, &soft_forward<float>,   &soft_forward<double>,
                    &soft_backward<float>,   &soft_backward<double>, isa};
}

}  // namespace APL_ISA_NS
}  // namespace cpu
}  // namespace apl
