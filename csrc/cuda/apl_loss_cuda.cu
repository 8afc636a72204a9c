// CUDA implementation of apl::apl_loss and apl::apl_loss_backward (compiled only in CUDA
// builds, see setup.py; registers itself for the CUDA dispatch key).
//
// One group of threads owns a row: a warp for C <= kWarpMaxC (several rows per block, warp
// shuffles), the whole block otherwise (CUB BlockReduce), so any C works. The forward makes
// 2 passes over the row (max, sum of exp), a third only for RCE / NFL_MA2020, and writes the
// row's stats; the backward makes one pass and writes every element of the row's gradient
// (no atomics). Logits of any floating dtype are read and computed in float32 (float64 for
// float64 inputs). All row math: ../loss_row.h.
//
// The batch statistic of the paper's forms and the reduction are ATen reductions over the
// N rows plus one single-thread kernel that applies loss_row.h's edge-case rules; the target
// range check is one reduction and one device sync (ops.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <limits>
#include <optional>
#include <type_traits>
#include <tuple>

#include "../ops.h"

namespace apl {
namespace cuda_kernels {
namespace {

using namespace apl::row;

constexpr int kWarpSize = 32;
constexpr int64_t kWarpMaxC = 1024;  // up to this many classes, a warp per row
constexpr int kWarpBlockThreads = 128;
constexpr int kRowBlockThreads = 512;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops beyond this

template <typename T>
struct SumOp {
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
template <typename T>
struct NanMaxOp {
  __device__ __forceinline__ T operator()(T a, T b) const { return nanmax(a, b); }
};

// A warp that owns a row.
struct WarpGroup {
  static constexpr int kSize = kWarpSize;
  int lane;
  template <typename T, class Op>
  __device__ __forceinline__ T all_reduce(T v, Op op) const {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1)
      v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
  }
};

// A block that owns a row.
template <int kThreads>
struct BlockGroup {
  static constexpr int kSize = kThreads;
  int lane;
  template <typename T, class Op>
  __device__ __forceinline__ T all_reduce(T v, Op op) const {
    using Reduce = cub::BlockReduce<T, kThreads>;
    __shared__ typename Reduce::TempStorage tmp;
    __shared__ T result;
    T r = Reduce(tmp).Reduce(v, op);
    if (threadIdx.x == 0) result = r;
    __syncthreads();
    r = result;
    __syncthreads();  // tmp and result may be reused by the next reduction
    return r;
  }
};

template <typename scalar_t, typename acc_t, class Group>
__device__ void forward_row(const Group& g, const scalar_t* __restrict__ z, int64_t C, int64_t y,
                            const LossParams<acc_t>& p, acc_t* __restrict__ st) {
  using M = ScalarMath<acc_t>;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t k = g.lane; k < C; k += Group::kSize)
    if (k != y) m = nanmax(m, static_cast<acc_t>(z[k]));
  m = g.all_reduce(m, NanMaxOp<acc_t>());

  const bool want_zsum = needs_zsum(p);
  acc_t s = 0, zs = 0;
  for (int64_t k = g.lane; k < C; k += Group::kSize) {
    if (k == y) continue;
    const acc_t d = static_cast<acc_t>(z[k]) - m;
    s += apl_exp(d);
    zs += d;
  }
  s = g.all_reduce(s, SumOp<acc_t>());
  if (want_zsum) zs = g.all_reduce(zs, SumOp<acc_t>());
  const RowSums<acc_t> sums{m, s, want_zsum ? zs : acc_t(0)};
  const RowBasics<acc_t> b = basics_from_sums<M>(sums, static_cast<acc_t>(z[y]));
  RowExtra<acc_t> x{acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};

  if (needs_rce_pass(p)) {
    acc_t val = 0, mass = 0, out = 0;
    for (int64_t k = g.lane; k < C; k += Group::kSize) {
      if (k == y) continue;
      acc_t v, ms, o;
      rce_terms<M>(static_cast<acc_t>(z[k]), b, v, ms, o);
      val += v;
      mass += ms;
      out += o;
    }
    x.rce_value = g.all_reduce(val, SumOp<acc_t>());
    x.rce_mass = g.all_reduce(mass, SumOp<acc_t>());
    x.rce_outside = g.all_reduce(out, SumOp<acc_t>());
  }
  if (needs_nfl_pass(p)) {
    acc_t norm = 0, wsum = 0;
    for (int64_t k = g.lane; k < C; k += Group::kSize) {
      if (k == y) continue;
      acc_t wlogp, w;
      nfl_terms<M>(static_cast<acc_t>(z[k]), b, p.gamma, wlogp, w);
      norm += wlogp;
      wsum += w;
    }
    x.nfl_norm = g.all_reduce(norm, SumOp<acc_t>());
    x.nfl_wsum = g.all_reduce(wsum, SumOp<acc_t>());
  }
  if (g.lane == 0) row_stats<M>(st, b, sums, x, p, static_cast<acc_t>(C));
}

template <bool kMask, bool kW, typename scalar_t, typename acc_t, class Group>
__device__ __forceinline__ void write_row_grad(const Group& g, const scalar_t* __restrict__ z, int64_t C,
                                               int64_t y, const RowGrad<acc_t>& rg, acc_t gamma,
                                               scalar_t* __restrict__ out) {
  for (int64_t k = g.lane; k < C; k += Group::kSize) {
    const acc_t v = k == y ? rg.grad_y
                           : grad_not_target<kMask, kW, ScalarMath<acc_t>>(rg, gamma, static_cast<acc_t>(z[k]));
    out[k] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, typename acc_t, class Group>
__device__ void backward_row(const Group& g, const scalar_t* __restrict__ z, int64_t C, int64_t y,
                             const LossParams<acc_t>& p, const acc_t* __restrict__ st, acc_t g_row,
                             acc_t scale, acc_t batch_coef, scalar_t* __restrict__ out) {
  const RowGrad<acc_t> rg = row_grad<ScalarMath<acc_t>>(st, p, static_cast<acc_t>(C), g_row, scale, batch_coef);
  const bool mask = uses(p, RCE);
  const bool wterm = p.active == NFL_MA2020;
  if (mask && wterm) write_row_grad<true, true>(g, z, C, y, rg, p.gamma, out);
  else if (mask) write_row_grad<true, false>(g, z, C, y, rg, p.gamma, out);
  else if (wterm) write_row_grad<false, true>(g, z, C, y, rg, p.gamma, out);
  else write_row_grad<false, false>(g, z, C, y, rg, p.gamma, out);
}

// Row r of the grid-stride loop and the group that owns it.
template <bool kWarpPerRow, int kThreads>
struct RowSchedule {
  static constexpr int kRowsPerBlock = kWarpPerRow ? kThreads / kWarpSize : 1;
  __device__ static int64_t first() {
    return static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (kWarpPerRow ? threadIdx.x / kWarpSize : 0);
  }
  __device__ static int64_t stride() { return static_cast<int64_t>(gridDim.x) * kRowsPerBlock; }
  __device__ static int lane() { return kWarpPerRow ? threadIdx.x % kWarpSize : threadIdx.x; }
};

template <bool kWarpPerRow, int kThreads>
using GroupOf = std::conditional_t<kWarpPerRow, WarpGroup, BlockGroup<kThreads>>;

template <typename scalar_t, typename acc_t, bool kWarpPerRow, int kThreads>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target, int64_t N,
                   int64_t C, int64_t ignore_index, LossParams<acc_t> p, acc_t* __restrict__ stats) {
  using S = RowSchedule<kWarpPerRow, kThreads>;
  const GroupOf<kWarpPerRow, kThreads> g{S::lane()};
  // Every thread of a group sees the same rows, so the block-wide reductions stay uniform.
  for (int64_t r = S::first(); r < N; r += S::stride()) {
    acc_t* st = stats + r * NUM_STATS;
    const int64_t y = target[r];
    if (y == ignore_index) {
      for (int i = g.lane; i < NUM_STATS; i += GroupOf<kWarpPerRow, kThreads>::kSize) st[i] = acc_t(0);
      continue;
    }
    forward_row<scalar_t, acc_t>(g, logits + r * C, C, y, p, st);
  }
}

template <typename scalar_t, typename acc_t, bool kWarpPerRow, int kThreads>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target, int64_t N,
                    int64_t C, int64_t ignore_index, LossParams<acc_t> p, const acc_t* __restrict__ stats,
                    const acc_t* __restrict__ g_rows, int64_t g_stride, const acc_t* __restrict__ batch,
                    scalar_t* __restrict__ grad) {
  using S = RowSchedule<kWarpPerRow, kThreads>;
  const GroupOf<kWarpPerRow, kThreads> g{S::lane()};
  const acc_t scale = batch[0], batch_coef = batch[1];
  for (int64_t r = S::first(); r < N; r += S::stride()) {
    scalar_t* out = grad + r * C;
    const int64_t y = target[r];
    if (y == ignore_index) {
      for (int64_t k = g.lane; k < C; k += GroupOf<kWarpPerRow, kThreads>::kSize) out[k] = scalar_t(0);
      continue;
    }
    backward_row<scalar_t, acc_t>(g, logits + r * C, C, y, p, stats + r * NUM_STATS,
                                  g_rows[r * g_stride], scale, batch_coef, out);
  }
}

// batch = {scale of the active term, NFL_PAPER's batch coefficient} from the batch sums,
// with loss_row.h's edge-case rules. One thread.
template <typename acc_t>
__global__ void batch_terms_kernel(int active, const acc_t* __restrict__ stat, const acc_t* __restrict__ n_valid,
                                   const acc_t* __restrict__ sum_g_fl, acc_t c_classes, acc_t alpha,
                                   acc_t* __restrict__ batch) {
  acc_t scale = 1, coef = 0;
  if (active == NCE_PAPER) {
    scale = nce_paper_scale(*stat, c_classes);  // stat: label entropy H
  } else if (active == NFL_PAPER) {
    const acc_t mean_w = *stat / *n_valid;      // stat: sum of the focal weights
    scale = nfl_paper_scale(mean_w);
    if (sum_g_fl != nullptr) coef = nfl_paper_batch_coef(alpha, *sum_g_fl, *n_valid, mean_w);
  }
  batch[0] = scale;
  batch[1] = coef;
}

// Blocks for N rows at rows_per_block rows each (grid-stride beyond kMaxBlocks).
int64_t blocks_for(int64_t N, int64_t rows_per_block) {
  return std::min<int64_t>(kMaxBlocks, (N + rows_per_block - 1) / rows_per_block);
}

// The batch terms for this loss (a 2-element device tensor). `g_rows` (the upstream gradient
// per row, or a 0-dim tensor for all rows) is given in the backward only.
at::Tensor batch_terms(const at::Tensor& stats, const at::Tensor& target, int64_t C, int active,
                       double alpha, int64_t ignore_index, const at::Tensor& n_valid,
                       const at::Tensor* g_rows) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor batch = at::empty({2}, stats.options());
  at::Tensor stat, sum_g_fl;
  if (active == NCE_PAPER) {
    const at::Tensor valid = target.ne(ignore_index);
    at::Tensor counts = at::zeros({C}, stats.options());
    counts.index_add_(0, target.masked_fill(valid.logical_not(), 0), valid.to(stats.scalar_type()));
    const at::Tensor pi = counts / n_valid.clamp_min(1);
    stat = at::xlogy(pi, pi).sum().neg();
  } else if (active == NFL_PAPER) {
    stat = stats.select(1, ST_FOCAL_W).sum();  // ignored rows have zero stats
    if (g_rows != nullptr) sum_g_fl = (*g_rows * stats.select(1, ST_ACTIVE)).sum();
  }
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "apl_batch_terms", [&] {
    batch_terms_kernel<scalar_t><<<1, 1, 0, stream>>>(
        active, stat.defined() ? stat.const_data_ptr<scalar_t>() : nullptr, n_valid.const_data_ptr<scalar_t>(),
        sum_g_fl.defined() ? sum_g_fl.const_data_ptr<scalar_t>() : nullptr, static_cast<scalar_t>(C),
        static_cast<scalar_t>(alpha), batch.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return batch;
}

// Weight of each row's target, 0 for ignored rows ([N]; undefined without weights).
at::Tensor row_weights(const at::Tensor& weight, const at::Tensor& target, const at::Tensor& valid) {
  if (!weight.defined()) return at::Tensor();
  return at::where(valid, weight.index_select(0, target.masked_fill(valid.logical_not(), 0)),
                   at::zeros({}, weight.options()));
}

// The 'mean' denominator: the number of non-ignored rows, or the sum of their weights (0 when
// there is none: the mean is then 0/0 = NaN, as F.cross_entropy).
at::Tensor mean_denominator(const at::Tensor& n_valid, const at::Tensor& w_rows) {
  return w_rows.defined() ? w_rows.sum() : n_valid;
}

std::tuple<at::Tensor, at::Tensor> apl_loss_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                 int64_t active, int64_t passive, double alpha,
                                                 double beta, double gamma, double q,
                                                 int64_t reduction, int64_t ignore_index,
                                                 const std::optional<at::Tensor>& weight_arg) {
  check_forward_args(logits, target, active, passive, alpha, beta, gamma, q, reduction, weight_arg);
  const int64_t N = logits.size(0), C = logits.size(1);
  check_target_range(target, C, ignore_index);
  const at::Tensor weight = weight_for(weight_arg, logits);
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType acc = acc_type_of(logits.scalar_type());
  at::Tensor stats = at::empty({N, kNumStats}, logits.options().dtype(acc));

  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_loss_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto p = make_params<acc_t>(active, passive, alpha, beta, gamma, q);
      const scalar_t* z = logits.const_data_ptr<scalar_t>();
      const int64_t* t = target.const_data_ptr<int64_t>();
      acc_t* st = stats.mutable_data_ptr<acc_t>();
      if (C <= kWarpMaxC) {
        constexpr int rows = kWarpBlockThreads / kWarpSize;
        forward_kernel<scalar_t, acc_t, true, kWarpBlockThreads>
            <<<blocks_for(N, rows), kWarpBlockThreads, 0, stream>>>(z, t, N, C, ignore_index, p, st);
      } else {
        forward_kernel<scalar_t, acc_t, false, kRowBlockThreads>
            <<<blocks_for(N, 1), kRowBlockThreads, 0, stream>>>(z, t, N, C, ignore_index, p, st);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // Batch step: per-row loss alpha * scale * active + beta * passive, ignored rows 0, reduced.
  const at::Tensor valid = target.ne(ignore_index);
  const at::Tensor n_valid = valid.sum().to(acc);
  const at::Tensor batch = batch_terms(stats, target, C, static_cast<int>(active), alpha, ignore_index, n_valid, nullptr);
  at::Tensor rows = stats.select(1, ST_ACTIVE) * (batch.select(0, 0) * alpha);
  if (passive != NONE) rows = rows + stats.select(1, ST_PASSIVE) * beta;
  rows = at::where(valid, rows, at::zeros({}, rows.options()));
  const at::Tensor w_rows = row_weights(weight, target, valid);
  if (w_rows.defined()) rows = rows * w_rows;
  at::Tensor loss;
  if (reduction == kNone) loss = rows.to(logits.scalar_type());
  else if (reduction == kSum) loss = rows.sum().to(logits.scalar_type());
  else loss = (rows.sum() / mean_denominator(n_valid, w_rows)).to(logits.scalar_type());
  return {loss, stats};
}

at::Tensor apl_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                  const at::Tensor& target, const at::Tensor& stats, int64_t active,
                                  int64_t passive, double alpha, double beta, double gamma, double q,
                                  int64_t reduction, int64_t ignore_index,
                                  const std::optional<at::Tensor>& weight_arg) {
  check_backward_args(grad_loss, logits, target, stats, active, passive, alpha, beta, gamma, q, reduction,
                      weight_arg);
  const int64_t N = logits.size(0), C = logits.size(1);
  check_target_range(target, C, ignore_index);
  const at::Tensor weight = weight_for(weight_arg, logits);
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType acc = acc_type_of(logits.scalar_type());
  at::Tensor grad = at::empty_like(logits);
  if (N == 0) return grad;

  const at::Tensor valid = target.ne(ignore_index);
  const at::Tensor n_valid = valid.sum().to(acc);
  const at::Tensor w_rows = row_weights(weight, target, valid);
  at::Tensor g_rows;  // upstream gradient of each row's loss, weight included ([N], or [] for every row)
  int64_t g_stride;
  if (reduction == kNone) {
    g_rows = grad_loss.to(acc);
    g_stride = 1;
  } else {
    g_rows = grad_loss.to(acc).reshape({});
    if (reduction == kMean) g_rows = g_rows / mean_denominator(n_valid, w_rows);
    g_stride = 0;
  }
  if (w_rows.defined()) {
    g_rows = g_rows * w_rows;
    g_stride = 1;
  }
  g_rows = g_rows.contiguous();
  const at::Tensor batch = batch_terms(stats, target, C, static_cast<int>(active), alpha, ignore_index, n_valid, &g_rows);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = make_params<acc_t>(active, passive, alpha, beta, gamma, q);
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    const acc_t* st = stats.const_data_ptr<acc_t>();
    const acc_t* g = g_rows.const_data_ptr<acc_t>();
    const acc_t* b = batch.const_data_ptr<acc_t>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    if (C <= kWarpMaxC) {
      constexpr int rows = kWarpBlockThreads / kWarpSize;
      backward_kernel<scalar_t, acc_t, true, kWarpBlockThreads>
          <<<blocks_for(N, rows), kWarpBlockThreads, 0, stream>>>(z, t, N, C, ignore_index, p, st, g, g_stride, b, out);
    } else {
      backward_kernel<scalar_t, acc_t, false, kRowBlockThreads>
          <<<blocks_for(N, 1), kRowBlockThreads, 0, stream>>>(z, t, N, C, ignore_index, p, st, g, g_stride, b, out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(apl, CUDA, m) {
  m.impl("apl_loss", &apl_loss_cuda);
  m.impl("apl_loss_backward", &apl_loss_backward_cuda);
}

}  // namespace cuda_kernels
}  // namespace apl
