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

#include <limits>

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
  // value, which is harmless here: a NaN logit already makes the row's max (or z_y) NaN,
  // and every row quantity goes through that.
  static inline V exp(V x) { return x.exp_u20(); }
  static inline V log(V x) { return x.log(); }
  static inline V expm1(V x) { return x.expm1(); }
  static inline V sqrt(V x) { return x.sqrt(); }
  static inline bool any_gt(V x, T t) {  // zero_mask: bit i set when lane i is 0 (false)
    return (x > V(t)).zero_mask() != (1 << V::size()) - 1;
  }
  static inline V select_gt(V x, T t, V a, V b) { return V::blendv(b, a, x > V(t)); }
  static inline V select_lt(V x, T t, V a, V b) { return V::blendv(b, a, x < V(t)); }
  static inline V select_eq(V x, T t, V a, V b) { return V::blendv(b, a, x == V(t)); }
  static inline V select_inside(V x, T lo, T hi, V a, V b) {
    return V::blendv(b, a, (x > V(lo)) & (x < V(hi)));
  }
  static inline V clamp(V x, T lo, T hi) {
    return V::blendv(V::blendv(x, V(hi), x > V(hi)), V(lo), x < V(lo));
  }
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

  // max_{k != y} z_k, NaN-propagating (two chains for throughput).
  T max() const {
    const Vec neg_inf(-std::numeric_limits<T>::infinity());
    Vec a0 = neg_inf, a1 = neg_inf;
    int64_t k = 0;
    for (; k + 2 * W <= full; k += 2 * W) {
      Vec v0 = Vec::loadu(z + k), v1 = Vec::loadu(z + k + W);
      if (k == y_vec) v0 = Vec::blendv(neg_inf, v0, keep(k));
      if (k + W == y_vec) v1 = Vec::blendv(neg_inf, v1, keep(k + W));
      a0 = at::vec::maximum(a0, v0);
      a1 = at::vec::maximum(a1, v1);
    }
    for (; k < C; k += W) {  // at most one full vector, then the partial one
      Vec v = k + W <= C ? Vec::loadu(z + k) : Vec::loadu(z + k, C - k);
      if (k == y_vec || k + W > C) v = Vec::blendv(neg_inf, v, keep(k));
      a0 = at::vec::maximum(a0, v);
    }
    return hmax(at::vec::maximum(a0, a1));
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
// Vector lanes are classes of one row; the row's scalar quantities use the scalar policy.
// The forward for C > kRowsMaxC, the backward always.

template <typename T>
void forward_rows_serial(const ForwardBlock<T>& a) {
  using Vec = Vectorized<T>;
  using M = VecMath<T>;
  using SM = row::ScalarMath<T>;
  const row::LossParams<T>& p = a.params;
  const int64_t C = a.C;
  const bool want_zsum = row::needs_zsum(p);
  for (int64_t i = 0; i < a.rows; ++i) {
    const T* z = a.logits + i * C;
    T* st = a.stats + i * row::NUM_STATS;
    const int64_t y = a.target[i];
    if (y == a.ignore_index) {
      row::write_ignored_stats(st);
      continue;
    }
    const RowView<T> row(z, C, y);
    // pass 1: m = max_{k != y} z_k, NaN-propagating
    const T m = row.max();
    // pass 2: sum_{k != y} exp(z_k - m)  (and sum (z_k - m) for NCE_MA2020)
    const Vec vm(m);
    row::RowSums<T> sums{m, T(0), T(0)};
    if (want_zsum) {
      const auto s = row.template sum<2>([&](Vec v) {
        const Vec d = v - vm;
        return Acc<2, T>{{M::exp(d), d}};
      });
      sums.sum_ny = hsum(s.v[0]);
      sums.zsum_ny = hsum(s.v[1]);
    } else {
      const auto s = row.template sum<1>([&](Vec v) { return Acc<1, T>{{M::exp(v - vm)}}; });
      sums.sum_ny = hsum(s.v[0]);
    }
    const row::RowBasics<T> b = row::basics_from_sums<SM>(sums, z[y]);
    row::RowExtra<T> extra{T(0), T(0), T(0), T(0), T(0)};
    // pass 3 (RCE): clamped and unclamped probability mass of the classes != y
    if (row::needs_rce_pass(p)) {
      const auto s = row.template sum<3>([&](Vec v) {
        Acc<3, T> r;
        row::rce_terms<M>(v, b, r.v[0], r.v[1], r.v[2]);
        return r;
      });
      extra.rce_value = hsum(s.v[0]);
      extra.rce_mass = hsum(s.v[1]);
      extra.rce_outside = hsum(s.v[2]);
    }
    // pass 3 (NFL_MA2020): sum_{k != y} w_k log p_k and sum_{k != y} w_k
    if (row::needs_nfl_pass(p)) {
      const auto s = row.template sum<2>([&](Vec v) {
        Acc<2, T> r;
        row::nfl_terms<M>(v, b, p.gamma, r.v[0], r.v[1]);
        return r;
      });
      extra.nfl_norm = hsum(s.v[0]);
      extra.nfl_wsum = hsum(s.v[1]);
    }
    row::row_stats<SM>(st, b, sums, extra, p, static_cast<T>(C));
  }
}

template <bool kMask, bool kW, typename T>
inline void write_row_grad(const T* z, int64_t C, const row::RowGrad<T>& g, T gamma, T* out) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t k = 0;
  for (; k + W <= C; k += W)
    row::grad_not_target<kMask, kW, VecMath<T>>(g, gamma, Vec::loadu(z + k)).store(out + k);
  if (k < C)
    row::grad_not_target<kMask, kW, VecMath<T>>(g, gamma, Vec::loadu(z + k, C - k)).store(out + k, C - k);
}

template <typename T>
void backward_rows_serial(const BackwardBlock<T>& a) {
  using Vec = Vectorized<T>;
  const row::LossParams<T>& p = a.params;
  const int64_t C = a.C;
  const bool mask = row::uses(p, row::RCE);
  const bool wterm = p.active == row::NFL_MA2020;
  for (int64_t i = 0; i < a.rows; ++i) {
    const T* z = a.logits + i * C;
    T* out = a.grad + i * C;
    const int64_t y = a.target[i];
    if (y == a.ignore_index) {
      int64_t k = 0;
      for (; k + Vec::size() <= C; k += Vec::size()) Vec(T(0)).store(out + k);
      for (; k < C; ++k) out[k] = T(0);
      continue;
    }
    const T g_row = a.grad_rows[i * a.grad_stride];
    const row::RowGrad<T> g = row::row_grad<row::ScalarMath<T>>(
        a.stats + i * row::NUM_STATS, p, static_cast<T>(C), g_row, a.scale, a.batch_coef);
    if (mask && wterm) write_row_grad<true, true>(z, C, g, p.gamma, out);
    else if (mask) write_row_grad<true, false>(z, C, g, p.gamma, out);
    else if (wterm) write_row_grad<false, true>(z, C, g, p.gamma, out);
    else write_row_grad<false, false>(z, C, g, p.gamma, out);
    out[y] = g.grad_y;
  }
}

// ------------------------------------------------------------ rows in lanes (forward, C <= kRowsMaxC)
// For few classes (CIFAR-10's 10) the forward's per-row bookkeeping (reductions across lanes,
// the log/exp of the row's basics) would dominate, so the vector lanes hold W rows instead: a
// block of W rows is transposed into a class-major buffer and every row quantity, the scalar
// math included, is computed for the W rows at once with the same loss_row.h functions.
// Ignored and missing rows are computed on zeros and discarded. Up to C = 100 this forward is
// faster than the one-row-at-a-time one for every loss kind; at C = 128 it is not for all
// (measured on AVX-512, N = 8192: CE 27 vs 118 ns/row at C = 10, 114 vs 130 at C = 100).
constexpr int64_t kRowsMaxC = 112;

// A block of up to W rows, class-major: buf[k * W + r] = z[row r, class k].
template <typename T>
struct RowBlock {
  using Vec = Vectorized<T>;
  static constexpr int64_t W = Vec::size();
  int64_t rows;
  bool valid[W];
  Vec yv;   // target of each lane (-1 for ignored / missing rows)
  Vec zy;   // target logit of each lane
  alignas(64) T buf[kRowsMaxC * W];

  RowBlock(const T* logits, const int64_t* target, int64_t rows_, int64_t C, int64_t ignore_index)
      : rows(rows_) {
    alignas(64) T y_arr[W], zy_arr[W];
    for (int64_t r = 0; r < W; ++r) {
      valid[r] = r < rows && target[r] != ignore_index;
      const T* z = logits + r * C;
      if (valid[r]) {
        for (int64_t k = 0; k < C; ++k) buf[k * W + r] = z[k];
        y_arr[r] = static_cast<T>(target[r]);
        zy_arr[r] = z[target[r]];
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
  for (int64_t i0 = 0; i0 < a.rows; i0 += W) {
    const RowBlock<T> blk(a.logits + i0 * C, a.target + i0, std::min<int64_t>(W, a.rows - i0), C,
                          a.ignore_index);
    // pass 1: max over k != y, NaN-propagating
    Vec m(-std::numeric_limits<T>::infinity());
    for (int64_t k = 0; k < C; ++k) m = at::vec::maximum(m, Vec::blendv(blk.col(k), m, blk.is_target(k)));
    // pass 2
    Vec s = zero, zs = zero;
    const bool want_zsum = row::needs_zsum(p);
    for (int64_t k = 0; k < C; ++k) {
      const Vec out = blk.is_target(k);
      const Vec d = blk.col(k) - m;
      s = s + Vec::blendv(M::exp(d), zero, out);
      if (want_zsum) zs = zs + Vec::blendv(d, zero, out);
    }
    const row::RowSums<Vec> sums{m, s, zs};
    const row::RowBasics<Vec> b = row::basics_from_sums<M>(sums, blk.zy);
    row::RowExtra<Vec> x{zero, zero, zero, zero, zero};
    if (row::needs_rce_pass(p)) {
      for (int64_t k = 0; k < C; ++k) {
        const Vec out = blk.is_target(k);
        Vec val, mass, outside;
        row::rce_terms<M>(blk.col(k), b, val, mass, outside);
        x.rce_value = x.rce_value + Vec::blendv(val, zero, out);
        x.rce_mass = x.rce_mass + Vec::blendv(mass, zero, out);
        x.rce_outside = x.rce_outside + Vec::blendv(outside, zero, out);
      }
    }
    if (row::needs_nfl_pass(p)) {
      for (int64_t k = 0; k < C; ++k) {
        const Vec out = blk.is_target(k);
        Vec wlogp, w;
        row::nfl_terms<M>(blk.col(k), b, p.gamma, wlogp, w);
        x.nfl_norm = x.nfl_norm + Vec::blendv(wlogp, zero, out);
        x.nfl_wsum = x.nfl_wsum + Vec::blendv(w, zero, out);
      }
    }
    Vec st[row::NUM_STATS];
    row::row_stats<M>(st, b, sums, x, p, static_cast<T>(C));
    alignas(64) T column[W];
    for (int j = 0; j < row::NUM_STATS; ++j) {
      st[j].store(column);
      for (int64_t r = 0; r < blk.rows; ++r)
        a.stats[(i0 + r) * row::NUM_STATS + j] = blk.valid[r] ? column[r] : T(0);
    }
  }
}

template <typename T>
void forward_block(const ForwardBlock<T>& a) {
  if (a.C <= kRowsMaxC) forward_rows_in_lanes(a);
  else forward_rows_serial(a);
}

// The backward is one masked pass per row whatever C: its per-row bookkeeping (row_grad) is
// light, and transposing a block in and out cost more than it saved (measured).
template <typename T>
void backward_block(const BackwardBlock<T>& a) {
  backward_rows_serial(a);
}

inline RowKernels table(const char* isa) {
  return RowKernels{&forward_block<float>, &forward_block<double>, &backward_block<float>,
                    &backward_block<double>, isa};
}

}  // namespace APL_ISA_NS
}  // namespace cpu
}  // namespace apl
