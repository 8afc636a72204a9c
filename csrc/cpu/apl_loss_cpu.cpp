// The CPU row paths of apl::apl_loss and apl::apl_loss_backward (ops.h DeviceKernels; the entry in
// ops.cpp checks the call and lays it out first).
//
// Rows are split over threads with at::parallel_for and handed to the row kernels of the
// best instruction set (row_kernels.h). float16/bfloat16 rows are converted to float32 a few
// rows at a time (the gradient is written back in the input dtype). The batch step of
// loss_row.h (the paper forms' statistic, the per-class weights, the reduction) sums the rows'
// stats in the same blocks of rows as CUDA (row::batch_blocks), a task per block, and combines
// the blocks' partials in block order: no ATen calls, so small batches pay no per-op overhead.
// The class-index row kernels never see the weights; those of soft targets (probabilities,
// label smoothing) weigh each class.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
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
void run_soft_forward(const SoftRows<float>& r, float* st) { kernels().soft_forward_f32(r, st); }
void run_soft_forward(const SoftRows<double>& r, double* st) { kernels().soft_forward_f64(r, st); }
void run_soft_backward(const SoftRows<float>& r, const float* st, const float* g, int64_t gs, float* out) {
  kernels().soft_backward_f32(r, st, g, gs, out);
}
void run_soft_backward(const SoftRows<double>& r, const double* st, const double* g, int64_t gs, double* out) {
  kernels().soft_backward_f64(r, st, g, gs, out);
}

// Whether the row kernels read F.cross_entropy's (N, C, d1, ..., dK) layout in place, for
// float32/float64: the class-index rows-in-lanes kernels do (C <= kRowsMaxC), those of
// soft targets for any C. Half types convert rows.
bool reads_layout(const at::Tensor& logits, bool soft) {
  const auto dt = logits.scalar_type();
  return (soft || logits.size(1) <= kRowsMaxC) && (dt == at::kFloat || dt == at::kDouble);
}

// The value of a one-element CPU tensor (a reduced loss's upstream gradient) in T, read directly:
// Tensor::item goes through the dispatcher, a few microseconds at the batch sizes people train with.
template <typename T>
T scalar_of(const at::Tensor& t) {
  T value{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "apl_scalar_of",
                                  [&] { value = static_cast<T>(*t.const_data_ptr<scalar_t>()); });
  return value;
}

// Rows per task: enough elements (~32K) that threading pays off.
int64_t grain_rows(int64_t C) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)); }

// Rows converted at once for float16/bfloat16 logits: a few thousand elements, at least 16
// rows so the few-class kernels can fill their vector lanes.
int64_t half_rows(int64_t C) { return std::max<int64_t>(16, 4096 / std::max<int64_t>(C, 1)); }

// The batch sums of N rows: each block of row::kBatchRows rows summed by `add` (a task per block),
// the partials combined in block order, as CUDA's batch step.
template <class AddRow>
row::BatchSums batch_sums(int64_t N, AddRow&& add) {
  const int64_t blocks = row::batch_blocks(N);
  row::BatchSums total = row::zero_batch_sums();
  if (blocks == 1) {  // one block: its partial is the total (no task, no allocation on a small batch)
    for (int64_t i = 0; i < N; ++i) add(total, i);
    return total;
  }
  std::vector<row::BatchSums> partials(blocks, row::zero_batch_sums());
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t i = b * row::kBatchRows, end = std::min(N, i + row::kBatchRows); i < end; ++i) add(partials[b], i);
  });
  for (const row::BatchSums& part : partials) row::add_sums(total, part);
  return total;
}

template <typename scalar_t, typename acc_t>
void forward_rows(const Call& call, const row::LossParams<acc_t>& params, at::Tensor& stats) {
  const int64_t N = call.rows, C = call.C, D = call.D, ignore = call.args.ignore_index;
  const scalar_t* z = call.logits.const_data_ptr<scalar_t>();
  const int64_t* t = call.target.const_data_ptr<int64_t>();
  acc_t* st = stats.mutable_data_ptr<acc_t>();
  at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (D > 1) {
        run_forward(
            ForwardBlock<acc_t>{z, t + begin, end - begin, C, ignore, params, st + begin * row::NUM_STATS, D, begin});
      } else {
        run_forward(
            ForwardBlock<acc_t>{z + begin * C, t + begin, end - begin, C, ignore, params, st + begin * row::NUM_STATS});
      }
    } else {  // float16 / bfloat16: half_rows rows at a time through a float32 buffer
      const int64_t rows = half_rows(C);
      std::unique_ptr<acc_t[]> buf(new acc_t[rows * C]);
      for (int64_t i = begin; i < end; i += rows) {
        const int64_t n = std::min(rows, end - i);
        const scalar_t* src = z + i * C;
        for (int64_t k = 0; k < n * C; ++k) buf[k] = static_cast<acc_t>(src[k]);
        run_forward(ForwardBlock<acc_t>{buf.get(), t + i, n, C, ignore, params, st + i * row::NUM_STATS});
      }
    }
  });
}

// The batch step (row::needs_batch_step): the sums over the valid rows, the batch terms and the
// reduced loss, or each row's loss of a 'none' paper form. Otherwise only the rows' losses are
// written, with the batch terms of a per-row loss (scale 1, rest 0).
template <typename scalar_t, typename acc_t>
void index_batch_step(const Call& call, const row::LossParams<acc_t>& p, const at::Tensor& stats, at::Tensor& batch,
                      at::Tensor& loss) {
  const int64_t N = call.rows, C = call.C, ignore = call.args.ignore_index;
  const acc_t* st = stats.const_data_ptr<acc_t>();
  const int64_t* t = call.target.const_data_ptr<int64_t>();
  const acc_t* w = call.weight.defined() ? call.weight.const_data_ptr<acc_t>() : nullptr;
  acc_t* b = batch.mutable_data_ptr<acc_t>();
  const bool has_passive = p.passive != row::NONE;
  const int red = static_cast<int>(call.args.reduction);
  double bt[row::NUM_BATCH];
  if (row::needs_batch_step(p.active, red)) {
    count_step();
    const row::BatchSums sums = batch_sums(N, [&](row::BatchSums& s, int64_t i) {
      if (t[i] != ignore) row::add_row(s, st + i * row::NUM_STATS, w ? static_cast<double>(w[t[i]]) : 1.0);
    });
    double entropy = 0;
    if (p.active == row::NCE_PAPER) {
      std::vector<int64_t> counts(C, 0);
      for (int64_t i = 0; i < N; ++i)
        if (t[i] != ignore) ++counts[t[i]];
      for (int64_t c = 0; c < C; ++c)
        entropy += row::entropy_term<double>(static_cast<double>(counts[c]), sums.n_valid);
    }
    row::batch_terms(p.active, w != nullptr, sums, entropy, static_cast<double>(C), bt);
    if (red != row::RED_NONE) {
      *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(
          row::reduced_loss(red, static_cast<double>(p.alpha), static_cast<double>(p.beta), has_passive, sums, bt));
    }
  } else {
    row::per_row_batch_terms(bt);
  }
  for (int j = 0; j < row::NUM_BATCH; ++j) b[j] = static_cast<acc_t>(bt[j]);
  if (red == row::RED_NONE) {
    scalar_t* o = loss.mutable_data_ptr<scalar_t>();
    const acc_t alpha_scale = p.alpha * b[row::BT_SCALE];
    for (int64_t i = 0; i < N; ++i) {
      o[i] = static_cast<scalar_t>(
          t[i] == ignore ? acc_t(0)
                         : row::row_loss<acc_t>(st + i * row::NUM_STATS, alpha_scale, p.beta, has_passive, w, t[i]));
    }
  }
}

Outputs index_forward(const Call& call) {
  at::Tensor loss, stats, batch;
  std::tie(loss, stats, batch) = empty_outputs(call.logits, call.args.reduction);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.logits.scalar_type(), "apl_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto params = row::make_params<acc_t>(call.args, call.C);
    if (call.rows > 0) {
      count_step();
      forward_rows<scalar_t, acc_t>(call, params, stats);
    }
    index_batch_step<scalar_t, acc_t>(call, params, stats, batch, loss);
  });
  return {loss, stats, batch};
}

template <typename scalar_t, typename acc_t>
void backward_rows(const at::Tensor& grad_loss, const at::Tensor& stats, const at::Tensor& batch, const Call& call,
                   const row::LossParams<acc_t>& p, at::Tensor& grad) {
  const int64_t N = call.rows, C = call.C, D = call.D, ignore = call.args.ignore_index;
  const acc_t* st = stats.const_data_ptr<acc_t>();
  const acc_t* bt = batch.const_data_ptr<acc_t>();
  const int64_t* t = call.target.const_data_ptr<int64_t>();
  const acc_t* w = call.weight.defined() ? call.weight.const_data_ptr<acc_t>() : nullptr;
  const int red = static_cast<int>(call.args.reduction);

  // Upstream gradient of each row's loss (its weight included), in the accumulation dtype.
  at::Tensor g_tensor;
  acc_t g_unit = 0;
  const acc_t* g_rows;
  int64_t g_stride;
  if (red == row::RED_NONE) {
    g_tensor = grad_loss.to(stats.scalar_type()).contiguous();
    g_rows = g_tensor.const_data_ptr<acc_t>();
    g_stride = 1;
  } else {
    g_unit = row::reduced_grad<acc_t>(red, scalar_of<acc_t>(grad_loss), bt);
    g_rows = &g_unit;
    g_stride = 0;
  }
  std::vector<acc_t> g_weighted;
  if (w != nullptr) {
    g_weighted.resize(N);
    for (int64_t i = 0; i < N; ++i) g_weighted[i] = t[i] == ignore ? acc_t(0) : g_rows[i * g_stride] * w[t[i]];
    g_rows = g_weighted.data();
    g_stride = 1;
  }
  acc_t batch_coef = 0;
  if (row::needs_backward_batch_step(p.active, red)) {
    count_step();
    const row::BatchSums sums = batch_sums(N, [&](row::BatchSums& s, int64_t i) {  // sum_i g_i FL_i in wact
      if (t[i] != ignore)
        s.wact += static_cast<double>(g_rows[i * g_stride]) * static_cast<double>(st[i * row::NUM_STATS]);
    });
    batch_coef = static_cast<acc_t>(row::nfl_paper_batch_coef<double>(
        p.alpha, sums.wact, static_cast<double>(bt[row::BT_N_VALID]), static_cast<double>(bt[row::BT_MEAN_W])));
  } else if (p.active == row::NFL_PAPER) {
    batch_coef = row::nfl_paper_reduced_coef<acc_t>(p.alpha, g_unit, bt);
  }
  const acc_t scale = bt[row::BT_SCALE];
  const scalar_t* z = call.logits.const_data_ptr<scalar_t>();
  scalar_t* out = grad.mutable_data_ptr<scalar_t>();
  count_step();
  at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (D > 1) {
        run_backward(BackwardBlock<acc_t>{z, t + begin, end - begin, C, ignore, p, st + begin * row::NUM_STATS,
                                          g_rows + begin * g_stride, g_stride, scale, batch_coef, out, D, begin});
      } else {
        run_backward(BackwardBlock<acc_t>{z + begin * C, t + begin, end - begin, C, ignore, p,
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
        run_backward(BackwardBlock<acc_t>{zbuf.get(), t + i, n, C, ignore, p, st + i * row::NUM_STATS,
                                          g_rows + i * g_stride, g_stride, scale, batch_coef, gbuf.get()});
        scalar_t* dst = out + i * C;
        for (int64_t k = 0; k < n * C; ++k) dst[k] = static_cast<scalar_t>(gbuf[k]);
      }
    }
  });
}

at::Tensor index_backward(const at::Tensor& grad_loss, const at::Tensor& stats, const at::Tensor& batch,
                          const Call& call) {
  at::Tensor grad = at::empty_like(call.logits, at::MemoryFormat::Contiguous);
  if (call.rows == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.logits.scalar_type(), "apl_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_rows<scalar_t, acc_t>(grad_loss, stats, batch, call, row::make_params<acc_t>(call.args, call.C), grad);
  });
  return grad;
}

// ------------------------------------------------------------ soft targets
// Probability targets or label smoothing (loss_row.h, "soft targets"): (N, C) rows or the
// (N, C, d1, ..., dK) layout in place, in float32/float64 (half types converted once, the result
// converted back), the row kernels, then the batch step over the rows' stats.

template <typename T>
SoftRows<T> soft_rows(const at::Tensor& z, const Call& call) {
  const bool probs = at::isFloatingType(call.target.scalar_type());
  const row::LossParams<T> params = row::make_params<T>(call.args, call.C);
  return SoftRows<T>{z.const_data_ptr<T>(),
                     probs ? call.target.const_data_ptr<T>() : nullptr,
                     probs ? nullptr : call.target.const_data_ptr<int64_t>(),
                     call.rows,
                     call.C,
                     call.args.ignore_index,
                     row::soft_coefs<T>(params, static_cast<T>(call.args.label_smoothing), static_cast<T>(call.C)),
                     call.weight.defined() ? call.weight.const_data_ptr<T>() : nullptr,
                     call.D};
}

// Rows b .. e of `rows` (SoftRows' layouts).
template <typename T>
SoftRows<T> soft_slice(SoftRows<T> rows, int64_t b, int64_t e) {
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

// The logits in the accumulation dtype (no copy for float32/float64; the entry already converted
// probability targets).
at::Tensor soft_logits(const Call& call) { return call.logits.to(acc_type_of(call.logits.scalar_type())).contiguous(); }

Outputs soft_forward(const Call& call) {
  const int64_t N = call.rows, C = call.C;
  const at::Tensor z = soft_logits(call);
  at::Tensor loss, stats, batch;
  std::tie(loss, stats, batch) = empty_outputs(z, call.args.reduction);  // the loss in z's dtype, converted at the end
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "apl_soft_loss_cpu", [&] {
    const SoftRows<scalar_t> rows = soft_rows<scalar_t>(z, call);
    scalar_t* st = stats.mutable_data_ptr<scalar_t>();
    if (N > 0) {
      count_step();
      at::parallel_for(0, N, grain_rows(C), [&](int64_t b, int64_t e) {
        run_soft_forward(soft_slice(rows, b, e), st + b * row::NUM_STATS);
      });
    }
    scalar_t* bt = batch.mutable_data_ptr<scalar_t>();
    scalar_t* out = loss.mutable_data_ptr<scalar_t>();
    const int red = static_cast<int>(call.args.reduction);
    if (row::needs_batch_step(static_cast<int>(call.args.active), red)) {
      count_step();
      const row::BatchSums sums =
          batch_sums(N, [&](row::BatchSums& s, int64_t i) { row::soft_add_row(s, st + i * row::NUM_STATS); });
      double terms[row::NUM_BATCH];
      row::soft_batch_terms(sums, terms);
      for (int j = 0; j < row::NUM_BATCH; ++j) bt[j] = static_cast<scalar_t>(terms[j]);
      if (red != row::RED_NONE) *out = static_cast<scalar_t>(row::soft_reduced_loss(red, terms));
    } else {
      row::per_row_batch_terms(bt);
      for (int64_t i = 0; i < N; ++i) out[i] = st[i * row::NUM_STATS + row::SS_LOSS];
    }
  });
  return {loss.to(call.logits.scalar_type()), stats, batch};
}

at::Tensor soft_backward(const at::Tensor& grad_loss, const at::Tensor& stats, const at::Tensor& batch,
                         const Call& call) {
  const int64_t N = call.rows, C = call.C;
  const at::Tensor z = soft_logits(call);
  at::Tensor grad = at::empty_like(z, at::MemoryFormat::Contiguous);
  if (N == 0) return grad.to(call.logits.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "apl_soft_loss_backward_cpu", [&] {
    const SoftRows<scalar_t> rows = soft_rows<scalar_t>(z, call);
    const scalar_t* st = stats.const_data_ptr<scalar_t>();
    at::Tensor g_tensor;
    scalar_t g_unit = 0;
    const scalar_t* g_rows = &g_unit;
    int64_t g_stride = 0;
    if (call.args.reduction == row::RED_NONE) {
      g_tensor = grad_loss.to(z.scalar_type()).contiguous();
      g_rows = g_tensor.const_data_ptr<scalar_t>();
      g_stride = 1;
    } else {
      g_unit = row::reduced_grad<scalar_t>(static_cast<int>(call.args.reduction), scalar_of<scalar_t>(grad_loss),
                                           batch.const_data_ptr<scalar_t>());
    }
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    count_step();
    at::parallel_for(0, N, grain_rows(C), [&](int64_t b, int64_t e) {
      // the (N, C, D) layout's kernels write at the positions' own offsets from the tensor's start
      run_soft_backward(soft_slice(rows, b, e), st + b * row::NUM_STATS, g_rows + b * g_stride, g_stride,
                        rows.D > 1 ? out : out + b * C);
    });
  });
  return grad.to(call.logits.scalar_type());
}

Outputs forward(const Call& call) { return call.soft ? soft_forward(call) : index_forward(call); }

at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& stats, const at::Tensor& batch, const Call& call) {
  return call.soft ? soft_backward(grad_loss, stats, batch, call) : index_backward(grad_loss, stats, batch, call);
}

std::string cpu_kernel_isa() { return kernels().isa; }

}  // namespace

// Which instruction set the CPU row kernels run with ("default", "avx2", "avx512").
TORCH_LIBRARY_FRAGMENT(apl, m) { m.def("_cpu_kernel_isa() -> str", &cpu_kernel_isa); }

}  // namespace cpu

const DeviceKernels& cpu_kernels() {
  static const DeviceKernels k{&cpu::reads_layout, &cpu::forward, &cpu::backward};
  return k;
}

}  // namespace apl
