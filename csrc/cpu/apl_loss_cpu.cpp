// CPU implementation of apl::apl_loss and apl::apl_loss_backward.
//
// Rows are split over threads with at::parallel_for and handed to the row kernels of the
// best instruction set (row_kernels.h). float16/bfloat16 rows are converted to float32 a few
// rows at a time (the gradient is written back in the input dtype). The batch statistic of
// the paper's forms (label entropy H, mean focal weight B) and the reduction are a short
// serial loop over the N rows after the row kernel: no ATen calls, so small batches pay no
// per-op overhead. Per-class weights scale each row's loss and its upstream gradient there;
// the row kernels never see them.
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

// Rows per task: enough elements (~32K) that threading pays off.
int64_t grain_rows(int64_t C) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)); }

// Rows converted at once for float16/bfloat16 logits: a few thousand elements, at least 16
// rows so the few-class kernels can fill their vector lanes.
int64_t half_rows(int64_t C) { return std::max<int64_t>(16, 4096 / std::max<int64_t>(C, 1)); }

struct BatchInfo {
  int64_t n_valid = 0;
  double scale = 1.0;       // batch scale of the active term
  double mean_weight = 0;   // NFL_PAPER's B
};

// N_valid and the active term's batch scale (LOSSES.md, paper forms and their edge cases).
template <typename acc_t>
BatchInfo batch_info(const acc_t* stats, const int64_t* target, int64_t N, int64_t C,
                     int64_t ignore_index, int active) {
  BatchInfo info;
  for (int64_t i = 0; i < N; ++i) info.n_valid += target[i] != ignore_index;
  if (active == row::NCE_PAPER) {
    std::vector<int64_t> counts(C, 0);
    for (int64_t i = 0; i < N; ++i)
      if (target[i] != ignore_index) ++counts[target[i]];
    double h = 0;
    for (int64_t c = 0; c < C; ++c) {
      if (counts[c] == 0) continue;
      const double pi = static_cast<double>(counts[c]) / static_cast<double>(info.n_valid);
      h -= pi * std::log(pi);
    }
    info.scale = row::nce_paper_scale<double>(h, static_cast<double>(C));
  } else if (active == row::NFL_PAPER) {
    double wsum = 0;  // ignored rows have zero stats
    for (int64_t i = 0; i < N; ++i) wsum += stats[i * row::NUM_STATS + row::ST_FOCAL_W];
    info.mean_weight = wsum / static_cast<double>(info.n_valid);
    info.scale = row::nfl_paper_scale<double>(info.mean_weight);
  }
  return info;
}

// The 'mean' denominator: the number of non-ignored rows, or the sum of their targets' weights
// (as F.cross_entropy). 0 when there is none: the mean is then 0/0 = NaN, as F.cross_entropy.
template <typename acc_t>
double mean_denominator(const int64_t* target, int64_t N, int64_t ignore_index, const acc_t* w,
                        const BatchInfo& info) {
  if (w == nullptr) return static_cast<double>(info.n_valid);
  double total = 0;  // double: the sum of N weights loses nothing for any N
  for (int64_t i = 0; i < N; ++i)
    if (target[i] != ignore_index) total += static_cast<double>(w[target[i]]);
  return total;
}

template <typename scalar_t, typename acc_t>
void forward_rows(const at::Tensor& logits, const at::Tensor& target,
                  const row::LossParams<acc_t>& params, int64_t ignore_index, at::Tensor& stats) {
  const int64_t N = logits.size(0), C = logits.size(1);
  const scalar_t* z = logits.const_data_ptr<scalar_t>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  acc_t* st = stats.mutable_data_ptr<acc_t>();
  at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      run_forward(ForwardBlock<acc_t>{z + begin * C, t + begin, end - begin, C, ignore_index,
                                      params, st + begin * row::NUM_STATS});
    } else {  // float16 / bfloat16: kHalfRows rows at a time through a float32 buffer
      const int64_t rows = half_rows(C);
      std::unique_ptr<acc_t[]> buf(new acc_t[rows * C]);
      for (int64_t i = begin; i < end; i += rows) {
        const int64_t n = std::min(rows, end - i);
        const scalar_t* src = z + i * C;
        for (int64_t k = 0; k < n * C; ++k) buf[k] = static_cast<acc_t>(src[k]);
        run_forward(ForwardBlock<acc_t>{buf.get(), t + i, n, C, ignore_index, params,
                                        st + i * row::NUM_STATS});
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
at::Tensor reduce_rows(const at::Tensor& stats, const at::Tensor& target,
                       const row::LossParams<acc_t>& p, int64_t C, int64_t reduction,
                       int64_t ignore_index, const at::Tensor& weight, const at::TensorOptions& out_options) {
  const int64_t N = target.size(0);
  const acc_t* st = stats.const_data_ptr<acc_t>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  const BatchInfo info = batch_info(st, t, N, C, ignore_index, p.active);
  const acc_t a_scale = p.alpha * static_cast<acc_t>(info.scale);
  auto row_loss = [&](int64_t i) -> acc_t {
    if (t[i] == ignore_index) return acc_t(0);
    const acc_t* s = st + i * row::NUM_STATS;
    acc_t v = a_scale * s[row::ST_ACTIVE];
    if (p.passive != row::NONE) v += p.beta * s[row::ST_PASSIVE];
    return w ? v * w[t[i]] : v;
  };
  if (reduction == kNone) {
    at::Tensor out = at::empty({N}, out_options);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < N; ++i) o[i] = static_cast<scalar_t>(row_loss(i));
    return out;
  }
  double total = 0;  // double: the sum of N rows loses nothing for any N
  for (int64_t i = 0; i < N; ++i) total += static_cast<double>(row_loss(i));
  if (reduction == kMean) total /= mean_denominator(t, N, ignore_index, w, info);
  at::Tensor out = at::empty({}, out_options);
  *out.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(total);
  return out;
}

std::tuple<at::Tensor, at::Tensor> apl_loss_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                int64_t active, int64_t passive, double alpha,
                                                double beta, double gamma, double q,
                                                int64_t reduction, int64_t ignore_index,
                                                const std::optional<at::Tensor>& weight_arg) {
  check_forward_args(logits, target, active, passive, alpha, beta, gamma, q, reduction, weight_arg);
  const int64_t N = logits.size(0), C = logits.size(1);
  check_target_range(target, C, ignore_index);
  const at::Tensor weight = weight_for(weight_arg, logits);
  at::Tensor stats = at::empty({N, kNumStats}, logits.options().dtype(acc_type_of(logits.scalar_type())));
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto params = make_params<acc_t>(active, passive, alpha, beta, gamma, q);
    forward_rows<scalar_t, acc_t>(logits, target, params, ignore_index, stats);
    loss = reduce_rows<scalar_t, acc_t>(stats, target, params, C, reduction, ignore_index, weight, logits.options());
  });
  return {loss, stats};
}

template <typename scalar_t, typename acc_t>
void backward_rows(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                   const at::Tensor& stats, const row::LossParams<acc_t>& p, int64_t reduction,
                   int64_t ignore_index, const at::Tensor& weight, at::Tensor& grad) {
  const int64_t N = logits.size(0), C = logits.size(1);
  const acc_t* st = stats.const_data_ptr<acc_t>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  const BatchInfo info = batch_info(st, t, N, C, ignore_index, p.active);

  // Upstream gradient of each row's loss (its weight included).
  at::Tensor g_tensor;
  acc_t g_scalar = 0;
  const acc_t* g_rows;
  int64_t g_stride;
  if (reduction == kNone) {
    g_tensor = grad_loss.to(stats.scalar_type()).contiguous();
    g_rows = g_tensor.const_data_ptr<acc_t>();
    g_stride = 1;
  } else {
    g_scalar = grad_loss.item<acc_t>();
    if (reduction == kMean) g_scalar /= static_cast<acc_t>(mean_denominator(t, N, ignore_index, w, info));
    g_rows = &g_scalar;
    g_stride = 0;
  }
  std::vector<acc_t> g_weighted;
  if (w != nullptr) {
    g_weighted.resize(N);
    for (int64_t i = 0; i < N; ++i)
      g_weighted[i] = t[i] == ignore_index ? acc_t(0) : g_rows[i * g_stride] * w[t[i]];
    g_rows = g_weighted.data();
    g_stride = 1;
  }
  acc_t batch_coef = 0;
  if (p.active == row::NFL_PAPER) {
    double sum_g_fl = 0;  // sum_i g_i FL_i over valid rows (ignored rows have FL = 0)
    for (int64_t i = 0; i < N; ++i)
      if (t[i] != ignore_index)
        sum_g_fl += static_cast<double>(g_rows[i * g_stride]) * st[i * row::NUM_STATS + row::ST_ACTIVE];
    batch_coef = static_cast<acc_t>(row::nfl_paper_batch_coef<double>(
        p.alpha, sum_g_fl, static_cast<double>(info.n_valid), info.mean_weight));
  }
  const acc_t scale = static_cast<acc_t>(info.scale);
  const scalar_t* z = logits.const_data_ptr<scalar_t>();
  scalar_t* out = grad.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      run_backward(BackwardBlock<acc_t>{z + begin * C, t + begin, end - begin, C, ignore_index, p,
                                        st + begin * row::NUM_STATS, g_rows + begin * g_stride,
                                        g_stride, scale, batch_coef, out + begin * C});
    } else {  // float16 / bfloat16 through float32 buffers, as the forward
      const int64_t rows = half_rows(C);
      std::unique_ptr<acc_t[]> zbuf(new acc_t[rows * C]), gbuf(new acc_t[rows * C]);
      for (int64_t i = begin; i < end; i += rows) {
        const int64_t n = std::min(rows, end - i);
        const scalar_t* src = z + i * C;
        for (int64_t k = 0; k < n * C; ++k) zbuf[k] = static_cast<acc_t>(src[k]);
        run_backward(BackwardBlock<acc_t>{zbuf.get(), t + i, n, C, ignore_index, p,
                                          st + i * row::NUM_STATS, g_rows + i * g_stride, g_stride,
                                          scale, batch_coef, gbuf.get()});
        scalar_t* dst = out + i * C;
        for (int64_t k = 0; k < n * C; ++k) dst[k] = static_cast<scalar_t>(gbuf[k]);
      }
    }
  });
}

at::Tensor apl_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                 const at::Tensor& target, const at::Tensor& stats, int64_t active,
                                 int64_t passive, double alpha, double beta, double gamma, double q,
                                 int64_t reduction, int64_t ignore_index,
                                 const std::optional<at::Tensor>& weight_arg) {
  check_backward_args(grad_loss, logits, target, stats, active, passive, alpha, beta, gamma, q, reduction,
                      weight_arg);
  check_target_range(target, logits.size(1), ignore_index);
  const at::Tensor weight = weight_for(weight_arg, logits);
  at::Tensor grad = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto params = make_params<acc_t>(active, passive, alpha, beta, gamma, q);
    backward_rows<scalar_t, acc_t>(grad_loss, logits, target, stats, params, reduction, ignore_index, weight, grad);
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
