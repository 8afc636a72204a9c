// CPU implementation of apl::apl_loss and apl::apl_loss_backward.
//
// Rows are split over threads with at::parallel_for and handed to the row kernels of the
// best instruction set (row_kernels.h). float16/bfloat16 rows are converted to float32 a few
// rows at a time (the gradient is written back in the input dtype). The batch step of
// loss_row.h (the paper forms' statistic, the per-class weights, the reduction) is a serial
// loop over the N rows' stats after the row pass, as CUDA runs it in one block: no ATen
// calls, so small batches pay no per-op overhead. The class-index row kernels never see the
// weights; those of distribution targets (probabilities, label smoothing) weigh each class.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../ops.h"
#include "row_kernels.h"

namespace apl {
namespace cpu {
namespace {

const RowKernels& kernels() {
  static const RowKernels k = [] {
    // at::get_cpu_capability() honours ATEN_CPU_CAPABILITY, so one can force a variant.
    const std::string cap = at::get_cpu_capability();
    if (cap.find("AVX512") != std::string::npos) return row_kernels_avx512();
    if (cap.find("AVX2") != std::string::npos) return row_kernels_avx2();
    return row_kernels_default();
  }();
  return k;
}

void run_forward(const ForwardBlock<float>& b) { kernels().forward_f32(b); }
void run_forward(const ForwardBlock<double>& b) { kernels().forward_f64(b); }
void run_backward(const BackwardBlock<float>& b) { kernels().backward_f32(b); }
void run_backward(const BackwardBlock<double>& b) { kernels().backward_f64(b); }
void run_dist_forward(const DistRows<float>& r, float* st) { kernels().dist_forward_f32(r, st); }
void run_dist_forward(const DistRows<double>& r, double* st) { kernels().dist_forward_f64(r, st); }
void run_dist_backward(const DistRows<float>& r, const float* st, const float* g, int64_t gs, float* out) {
  kernels().dist_backward_f32(r, st, g, gs, out);
}
void run_dist_backward(const DistRows<double>& r, const double* st, const double* g, int64_t gs, double* out) {
  kernels().dist_backward_f64(r, st, g, gs, out);
}

// Whether the row kernels read F.cross_entropy's (N, C, d1, ..., dK) layout in place, for
// float32/float64: the class-index rows-in-lanes kernels do (C <= kRowsMaxC), those of
// distribution targets for any C. Half types convert rows.
bool reads_layout(const at::Tensor& logits, bool dist) {
  const auto dt = logits.scalar_type();
  return (dist || logits.size(1) <= kRowsMaxC) && (dt == at::kFloat || dt == at::kDouble);
}

// Rows per task: enough elements (~32K) that threading pays off.
int64_t grain_rows(int64_t C) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)); }

// Rows converted at once for float16/bfloat16 logits: a few thousand elements, at least 16
// rows so the few-class kernels can fill their vector lanes.
int64_t half_rows(int64_t C) { return std::max<int64_t>(16, 4096 / std::max<int64_t>(C, 1)); }

template <typename scalar_t, typename acc_t>
void forward_rows(const at::Tensor& logits, const at::Tensor& target, const row::LossParams<acc_t>& params,
                  int64_t ignore_index, at::Tensor& stats) {
  const int64_t N = target.numel(), C = logits.size(1), D = positions_per_sample(logits);
  const scalar_t* z = logits.const_data_ptr<scalar_t>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  acc_t* st = stats.mutable_data_ptr<acc_t>();
  at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (D > 1) {
        run_forward(ForwardBlock<acc_t>{z, t + begin, end - begin, C, ignore_index, params, st + begin * row::NUM_STATS,
                                        D, begin});
      } else {
        run_forward(ForwardBlock<acc_t>{z + begin * C, t + begin, end - begin, C, ignore_index, params,
                                        st + begin * row::NUM_STATS});
      }
    } else {  // float16 / bfloat16: kHalfRows rows at a time through a float32 buffer
      const int64_t rows = half_rows(C);
      std::unique_ptr<acc_t[]> buf(new acc_t[rows * C]);
      for (int64_t i = begin; i < end; i += rows) {
        const int64_t n = std::min(rows, end - i);
        const scalar_t* src = z + i * C;
        for (int64_t k = 0; k < n * C; ++k) buf[k] = static_cast<acc_t>(src[k]);
        run_forward(ForwardBlock<acc_t>{buf.get(), t + i, n, C, ignore_index, params, st + i * row::NUM_STATS});
      }
    }
  });
}

// The batch step (row::needs_batch_step): the sums over the valid rows, the batch terms and the
// reduced loss, or each row's loss of a 'none' paper form. Otherwise only the rows' losses are
// written, as part of the row pass, with the batch terms of a per-row loss (scale 1, rest 0).
template <typename scalar_t, typename acc_t>
void batch_step(const at::Tensor& stats, const at::Tensor& target, const row::LossParams<acc_t>& p, int64_t C,
                int64_t reduction, int64_t ignore_index, const at::Tensor& weight, at::Tensor& batch,
                at::Tensor& loss) {
  const int64_t N = target.numel();
  const acc_t* st = stats.const_data_ptr<acc_t>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  acc_t* b = batch.mutable_data_ptr<acc_t>();
  const bool has_passive = p.passive != row::NONE;
  const int red = static_cast<int>(reduction);
  // double: sums of N rows lose nothing for any N
  double bt[row::NUM_BATCH];
  if (row::needs_batch_step(p.active, red)) {
    count_step();
    row::BatchSums<double> sums{};
    std::vector<int64_t> counts(p.active == row::NCE_PAPER ? C : 0, 0);
    for (int64_t i = 0; i < N; ++i) {
      if (t[i] == ignore_index) continue;
      row::add_row(sums, st + i * row::NUM_STATS, w ? static_cast<double>(w[t[i]]) : 1.0);
      if (!counts.empty()) ++counts[t[i]];
    }
    double entropy = 0;
    for (int64_t c = 0; c < static_cast<int64_t>(counts.size()); ++c)
      entropy += row::entropy_term<double>(static_cast<double>(counts[c]), sums.n_valid);
    row::batch_terms<double>(p.active, w != nullptr, sums, entropy, static_cast<double>(C), bt);
    if (red != row::RED_NONE) {
      *loss.mutable_data_ptr<scalar_t>() =
          static_cast<scalar_t>(row::reduced_loss<double>(red, p.alpha, p.beta, has_passive, sums, bt));
    }
  } else {
    bt[row::BT_SCALE] = 1;
    for (int j = 1; j < row::NUM_BATCH; ++j) bt[j] = 0;
  }
  for (int j = 0; j < row::NUM_BATCH; ++j) b[j] = static_cast<acc_t>(bt[j]);
  if (red == row::RED_NONE) {
    scalar_t* o = loss.mutable_data_ptr<scalar_t>();
    const acc_t alpha_scale = p.alpha * b[row::BT_SCALE];
    for (int64_t i = 0; i < N; ++i) {
      o[i] = static_cast<scalar_t>(t[i] == ignore_index ? acc_t(0)
                                                        : row::row_loss<acc_t>(st + i * row::NUM_STATS, alpha_scale,
                                                                               p.beta, has_passive, w, t[i]));
    }
  }
}

// ------------------------------------------------------------ distribution targets
// Probability targets or label smoothing (loss_row.h, "distribution targets"): (N, C) rows or
// the (N, C, d1, ..., dK) layout in place, in float32/float64 (half types converted once, the
// result converted back), the row kernels, then the batch step over the rows' stats.

template <typename T>
DistRows<T> dist_rows(const at::Tensor& z, const at::Tensor& t, int64_t active, int64_t passive, double alpha,
                      double beta, double gamma, double q, int64_t ignore_index, const at::Tensor& weight,
                      double smoothing) {
  const bool probs = at::isFloatingType(t.scalar_type());
  const int64_t C = z.size(1);
  return DistRows<T>{z.const_data_ptr<T>(),
                     probs ? t.const_data_ptr<T>() : nullptr,
                     probs ? nullptr : t.const_data_ptr<int64_t>(),
                     z.numel() / C,
                     C,
                     ignore_index,
                     row::dist_coefs<T>(make_params<T>(active, passive, alpha, beta, gamma, q),
                                        static_cast<T>(smoothing), static_cast<T>(C)),
                     weight.defined() ? weight.const_data_ptr<T>() : nullptr,
                     positions_per_sample(z)};
}

// Rows b .. e of `rows` (DistRows' layouts).
template <typename T>
DistRows<T> dist_slice(DistRows<T> rows, int64_t b, int64_t e) {
  if (rows.D > 1) {
    rows.row0 = b;
  } else {
    rows.logits += b * rows.C;
    if (rows.probs != nullptr) rows.probs += b * rows.C;
  }
  if (rows.probs == nullptr) rows.target += b;
  rows.rows = e - b;
  return rows;
}

// The logits and a probability target in the accumulation dtype (no copy for float32/float64 logits).
std::pair<at::Tensor, at::Tensor> dist_inputs(const at::Tensor& logits, const at::Tensor& target) {
  const at::ScalarType acc = acc_type_of(logits.scalar_type());
  const at::Tensor t = at::isFloatingType(target.scalar_type()) ? target.to(acc).contiguous() : target;
  return {logits.to(acc).contiguous(), t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_loss_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                             int64_t active, int64_t passive, double alpha, double beta,
                                                             double gamma, double q, int64_t reduction,
                                                             int64_t ignore_index,
                                                             const std::optional<at::Tensor>& weight_arg,
                                                             double smoothing) {
  const int64_t C = logits.size(1), N = logits.numel() / C;
  if (!at::isFloatingType(target.scalar_type())) check_target_range(target, C, ignore_index);
  const std::pair<at::Tensor, at::Tensor> inputs = dist_inputs(logits, target);
  const at::Tensor &z = inputs.first, &t = inputs.second;
  const at::Tensor weight = weight_for(weight_arg, logits);
  at::Tensor loss, stats, batch;
  std::tie(loss, stats, batch) = empty_outputs(z, reduction);  // the loss in z's dtype, converted at the end
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "apl_dist_loss_cpu", [&] {
    const DistRows<scalar_t> rows =
        dist_rows<scalar_t>(z, t, active, passive, alpha, beta, gamma, q, ignore_index, weight, smoothing);
    scalar_t* st = stats.mutable_data_ptr<scalar_t>();
    if (N > 0) {
      count_step();
      at::parallel_for(0, N, grain_rows(C), [&](int64_t b, int64_t e) {
        run_dist_forward(dist_slice(rows, b, e), st + b * row::NUM_STATS);
      });
    }
    scalar_t* bt = batch.mutable_data_ptr<scalar_t>();
    scalar_t* out = loss.mutable_data_ptr<scalar_t>();
    if (row::needs_batch_step(static_cast<int>(active), static_cast<int>(reduction))) {
      count_step();
      double n_valid = 0, denom = 0, total = 0;  // double: sums of N rows lose nothing for any N
      for (int64_t i = 0; i < N; ++i) {
        const scalar_t* r = st + i * row::NUM_STATS;
        n_valid += r[row::DS_VALID], denom += r[row::DS_DENOM], total += r[row::DS_LOSS];
      }
      double terms[row::NUM_BATCH];
      row::dist_batch_terms<double>(n_valid, denom, total, terms);
      for (int j = 0; j < row::NUM_BATCH; ++j) bt[j] = static_cast<scalar_t>(terms[j]);
      if (reduction != row::RED_NONE)
        *out = static_cast<scalar_t>(row::dist_reduced_loss<double>(static_cast<int>(reduction), terms));
    } else {
      row::dist_batch_terms<scalar_t>(0, 0, 0, bt);
      for (int64_t i = 0; i < N; ++i) out[i] = st[i * row::NUM_STATS + row::DS_LOSS];
    }
  });
  return {loss.to(logits.scalar_type()), stats, batch};
}

at::Tensor dist_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                  const at::Tensor& stats, const at::Tensor& batch, int64_t active, int64_t passive,
                                  double alpha, double beta, double gamma, double q, int64_t reduction,
                                  int64_t ignore_index, const std::optional<at::Tensor>& weight_arg, double smoothing) {
  const int64_t C = logits.size(1), N = logits.numel() / C;
  if (!at::isFloatingType(target.scalar_type())) check_target_range(target, C, ignore_index);
  const std::pair<at::Tensor, at::Tensor> inputs = dist_inputs(logits, target);
  const at::Tensor &z = inputs.first, &t = inputs.second;
  const at::Tensor weight = weight_for(weight_arg, logits);
  at::Tensor grad = at::empty_like(z, at::MemoryFormat::Contiguous);
  if (N == 0) return grad.to(logits.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "apl_dist_loss_backward_cpu", [&] {
    const DistRows<scalar_t> rows =
        dist_rows<scalar_t>(z, t, active, passive, alpha, beta, gamma, q, ignore_index, weight, smoothing);
    const scalar_t* st = stats.const_data_ptr<scalar_t>();
    at::Tensor g_tensor;
    scalar_t g_unit = 0;
    const scalar_t* g_rows = &g_unit;
    int64_t g_stride = 0;
    if (reduction == row::RED_NONE) {
      g_tensor = grad_loss.to(z.scalar_type()).contiguous();
      g_rows = g_tensor.const_data_ptr<scalar_t>();
      g_stride = 1;
    } else {
      g_unit = row::reduced_grad<scalar_t>(static_cast<int>(reduction), grad_loss.item<scalar_t>(),
                                           batch.const_data_ptr<scalar_t>());
    }
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    count_step();
    at::parallel_for(0, N, grain_rows(C), [&](int64_t b, int64_t e) {
      // the (N, C, D) layout's kernels write at the positions' own offsets from the tensor's start
      run_dist_backward(dist_slice(rows, b, e), st + b * row::NUM_STATS, g_rows + b * g_stride, g_stride,
                        rows.D > 1 ? out : out + b * C);
    });
  });
  return grad.to(logits.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> apl_loss_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                            int64_t active, int64_t passive, double alpha, double beta,
                                                            double gamma, double q, int64_t reduction,
                                                            int64_t ignore_index,
                                                            const std::optional<at::Tensor>& weight_arg,
                                                            double smoothing) {
  check_forward_args(logits, target, active, passive, alpha, beta, gamma, q, reduction, ignore_index, weight_arg,
                     smoothing);
  const bool dist = is_distribution(target, smoothing);
  if (logits.dim() > 2 && !reads_layout(logits, dist)) {
    return forward_on_rows(logits, target, reduction, [&](const at::Tensor& l, const at::Tensor& t) {
      return apl_loss_cpu(l, t, active, passive, alpha, beta, gamma, q, reduction, ignore_index, weight_arg, smoothing);
    });
  }
  if (dist)
    return dist_loss_cpu(logits, target, active, passive, alpha, beta, gamma, q, reduction, ignore_index, weight_arg,
                         smoothing);
  const int64_t N = target.numel(), C = logits.size(1);
  check_target_range(target, C, ignore_index);
  const at::Tensor weight = weight_for(weight_arg, logits);
  at::Tensor loss, stats, batch;
  std::tie(loss, stats, batch) = empty_outputs(logits, reduction);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto params = make_params<acc_t>(active, passive, alpha, beta, gamma, q);
    if (N > 0) {
      count_step();
      forward_rows<scalar_t, acc_t>(logits, target, params, ignore_index, stats);
    }
    batch_step<scalar_t, acc_t>(stats, target, params, C, reduction, ignore_index, weight, batch, loss);
  });
  return {loss, stats, batch};
}

template <typename scalar_t, typename acc_t>
void backward_rows(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                   const at::Tensor& stats, const at::Tensor& batch, const row::LossParams<acc_t>& p, int64_t reduction,
                   int64_t ignore_index, const at::Tensor& weight, at::Tensor& grad) {
  const int64_t N = target.numel(), C = logits.size(1), D = positions_per_sample(logits);
  const acc_t* st = stats.const_data_ptr<acc_t>();
  const acc_t* bt = batch.const_data_ptr<acc_t>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  const int red = static_cast<int>(reduction);

  // Upstream gradient of each row's loss (its weight included).
  at::Tensor g_tensor;
  acc_t g_unit = 0;
  const acc_t* g_rows;
  int64_t g_stride;
  if (red == row::RED_NONE) {
    g_tensor = grad_loss.to(stats.scalar_type()).contiguous();
    g_rows = g_tensor.const_data_ptr<acc_t>();
    g_stride = 1;
  } else {
    g_unit = row::reduced_grad<acc_t>(red, grad_loss.item<acc_t>(), bt);
    g_rows = &g_unit;
    g_stride = 0;
  }
  std::vector<acc_t> g_weighted;
  if (w != nullptr) {
    g_weighted.resize(N);
    for (int64_t i = 0; i < N; ++i) g_weighted[i] = t[i] == ignore_index ? acc_t(0) : g_rows[i * g_stride] * w[t[i]];
    g_rows = g_weighted.data();
    g_stride = 1;
  }
  acc_t batch_coef = 0;
  if (row::needs_backward_batch_step(p.active, red)) {
    count_step();
    double sum_g_fl = 0;  // sum_i g_i FL_i over valid rows
    for (int64_t i = 0; i < N; ++i)
      if (t[i] != ignore_index)
        sum_g_fl += static_cast<double>(g_rows[i * g_stride]) * st[i * row::NUM_STATS + row::ST_ACTIVE];
    batch_coef = static_cast<acc_t>(row::nfl_paper_batch_coef<double>(
        p.alpha, sum_g_fl, static_cast<double>(bt[row::BT_N_VALID]), static_cast<double>(bt[row::BT_MEAN_W])));
  } else if (p.active == row::NFL_PAPER) {
    batch_coef = row::nfl_paper_reduced_coef<acc_t>(p.alpha, g_unit, bt);
  }
  const acc_t scale = bt[row::BT_SCALE];
  const scalar_t* z = logits.const_data_ptr<scalar_t>();
  scalar_t* out = grad.mutable_data_ptr<scalar_t>();
  count_step();
  at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (D > 1) {
        run_backward(BackwardBlock<acc_t>{z, t + begin, end - begin, C, ignore_index, p, st + begin * row::NUM_STATS,
                                          g_rows + begin * g_stride, g_stride, scale, batch_coef, out, D, begin});
      } else {
        run_backward(BackwardBlock<acc_t>{z + begin * C, t + begin, end - begin, C, ignore_index, p,
                                          st + begin * row::NUM_STATS, g_rows + begin * g_stride, g_stride, scale,
                                          batch_coef, out + begin * C});
      }
    } else {  // float16 / bfloat16 through float32 buffers, as the forward
      const int64_t rows = half_rows(C);
      std::unique_ptr<acc_t[]> zbuf(new acc_t[rows * C]), gbuf(new acc_t[rows * C]);
      for (int64_t i = begin; i < end; i += rows) {
        const int64_t n = std::min(rows, end - i);
        const scalar_t* src = z + i * C;
        for (int64_t k = 0; k < n * C; ++k) zbuf[k] = static_cast<acc_t>(src[k]);
        run_backward(BackwardBlock<acc_t>{zbuf.get(), t + i, n, C, ignore_index, p, st + i * row::NUM_STATS,
                                          g_rows + i * g_stride, g_stride, scale, batch_coef, gbuf.get()});
        scalar_t* dst = out + i * C;
        for (int64_t k = 0; k < n * C; ++k) dst[k] = static_cast<scalar_t>(gbuf[k]);
      }
    }
  });
}

at::Tensor apl_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                 const at::Tensor& stats, const at::Tensor& batch, int64_t active, int64_t passive,
                                 double alpha, double beta, double gamma, double q, int64_t reduction,
                                 int64_t ignore_index, const std::optional<at::Tensor>& weight_arg, double smoothing) {
  check_backward_args(grad_loss, logits, target, stats, batch, active, passive, alpha, beta, gamma, q, reduction,
                      ignore_index, weight_arg, smoothing);
  const bool dist = is_distribution(target, smoothing);
  if (logits.dim() > 2 && !reads_layout(logits, dist)) {
    return backward_on_rows(grad_loss, logits, target, reduction,
                            [&](const at::Tensor& g, const at::Tensor& l, const at::Tensor& t) {
                              return apl_loss_backward_cpu(g, l, t, stats, batch, active, passive, alpha, beta, gamma,
                                                           q, reduction, ignore_index, weight_arg, smoothing);
                            });
  }
  if (dist)
    return dist_loss_backward_cpu(grad_loss, logits, target, stats, batch, active, passive, alpha, beta, gamma, q,
                                  reduction, ignore_index, weight_arg, smoothing);
  // Cheap on the CPU, and it keeps a direct call with bad targets from reading out of bounds.
  check_target_range(target, logits.size(1), ignore_index);
  const at::Tensor weight = weight_for(weight_arg, logits);
  at::Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (target.numel() == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto params = make_params<acc_t>(active, passive, alpha, beta, gamma, q);
    backward_rows<scalar_t, acc_t>(grad_loss, logits, target, stats, batch, params, reduction, ignore_index, weight,
                                   grad);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(apl, CPU, m) {
  m.impl("apl_loss", &apl_loss_cpu);
  m.impl("apl_loss_backward", &apl_loss_backward_cpu);
}

}  // namespace cpu
}  // namespace apl

namespace apl {
namespace cpu {
namespace {
std::string cpu_kernel_isa() { return kernels().isa; }
}  // namespace

// Which instruction set the CPU row kernels run with ("default", "avx2", "avx512").
TORCH_LIBRARY_FRAGMENT(apl, m) { m.def("_cpu_kernel_isa() -> str", &cpu_kernel_isa); }

}  // namespace cpu
}  // namespace apl
