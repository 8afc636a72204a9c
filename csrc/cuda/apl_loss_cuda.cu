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
// Probability targets and label smoothing take loss_row.h's distribution path: the same row
// schedule, three passes forward (max, sum of exp, dist_terms) and one backward.
//
// No host sync and no data-dependent allocation (a step can be captured in a CUDA graph):
// targets are checked on the device (an assert, as F.cross_entropy; the debug switch of ops.h
// restores the host check), and loss_row.h's batch step — the paper forms' statistic, the
// per-class weights, the reduction — is one single-block kernel. Launches per call: ops.h's
// launch_plan (forward: the row kernel, plus the batch step unless 'none' of a per-row loss;
// backward: the row kernel, plus one step for NFL_PAPER's 'none').
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

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
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
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
  acc_t s = 0, zsum = 0;
  for (int64_t k = g.lane; k < C; k += Group::kSize) {
    if (k == y) continue;
    const acc_t d = static_cast<acc_t>(z[k]) - m;
    s += apl_exp(d);
    zsum += d;
  }
  s = g.all_reduce(s, SumOp<acc_t>());
  if (want_zsum) zsum = g.all_reduce(zsum, SumOp<acc_t>());
  const RowSums<acc_t> sums{m, s, want_zsum ? zsum : acc_t(0)};
  const RowBasics<acc_t> basics = basics_from_sums<M>(sums, static_cast<acc_t>(z[y]));
  RowExtra<acc_t> extra{acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};

  if (needs_rce_pass(p)) {
    acc_t val = 0, mass = 0, out = 0;
    for (int64_t k = g.lane; k < C; k += Group::kSize) {
      if (k == y) continue;
      acc_t v, ms, o;
      rce_terms<M>(static_cast<acc_t>(z[k]), basics, v, ms, o);
      val += v;
      mass += ms;
      out += o;
    }
    extra.rce_value = g.all_reduce(val, SumOp<acc_t>());
    extra.rce_mass = g.all_reduce(mass, SumOp<acc_t>());
    extra.rce_outside = g.all_reduce(out, SumOp<acc_t>());
  }
  if (needs_nfl_pass(p)) {
    acc_t norm = 0, wsum = 0;
    for (int64_t k = g.lane; k < C; k += Group::kSize) {
      if (k == y) continue;
      acc_t wlogp, w;
      nfl_terms<M>(static_cast<acc_t>(z[k]), basics, p.gamma, wlogp, w);
      norm += wlogp;
      wsum += w;
    }
    extra.nfl_norm = g.all_reduce(norm, SumOp<acc_t>());
    extra.nfl_wsum = g.all_reduce(wsum, SumOp<acc_t>());
  }
  if (g.lane == 0) row_stats<M>(st, basics, sums, extra, p, static_cast<acc_t>(C));
}

template <bool kMask, bool kW, typename scalar_t, typename acc_t, class Group>
__device__ __forceinline__ void write_row_grad(const Group& g, const scalar_t* __restrict__ z, int64_t C, int64_t y,
                                               const RowGrad<acc_t>& rg, acc_t gamma, scalar_t* __restrict__ out) {
  for (int64_t k = g.lane; k < C; k += Group::kSize) {
    const acc_t v =
        k == y ? rg.grad_y : grad_not_target<kMask, kW, ScalarMath<acc_t>>(rg, gamma, static_cast<acc_t>(z[k]));
    out[k] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, typename acc_t, class Group>
__device__ void backward_row(const Group& g, const scalar_t* __restrict__ z, int64_t C, int64_t y,
                             const LossParams<acc_t>& p, const acc_t* __restrict__ st, acc_t g_row, acc_t scale,
                             acc_t batch_coef, scalar_t* __restrict__ out) {
  const RowGrad<acc_t> rg = row_grad<ScalarMath<acc_t>>(st, p, static_cast<acc_t>(C), g_row, scale, batch_coef);
  const bool mask = uses(p, RCE);
  const bool wterm = p.active == NFL_MA2020;
  if (mask && wterm)
    write_row_grad<true, true>(g, z, C, y, rg, p.gamma, out);
  else if (mask)
    write_row_grad<true, false>(g, z, C, y, rg, p.gamma, out);
  else if (wterm)
    write_row_grad<false, true>(g, z, C, y, rg, p.gamma, out);
  else
    write_row_grad<false, false>(g, z, C, y, rg, p.gamma, out);
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

// The target of row r, asserted on the device to be a class or ignore_index (no host sync).
__device__ __forceinline__ int64_t checked_target(const int64_t* __restrict__ target, int64_t r, int64_t C,
                                                  int64_t ignore_index) {
  const int64_t y = target[r];
  CUDA_KERNEL_ASSERT_PRINTF((y >= 0 && y < C) || y == ignore_index,
                            "apl_loss: target %lld (row %lld) is out of range for C=%lld classes",
                            static_cast<long long>(y), static_cast<long long>(r), static_cast<long long>(C));
  return y;
}

// Where the row kernel writes each row's loss itself (row::row_pass_writes_loss): the loss,
// the class weights, and the batch terms of a per-row loss (scale 1, the rest 0).
template <typename scalar_t, typename acc_t>
struct RowLossOut {
  scalar_t* loss;       // [N], or nullptr when the batch step writes the loss
  const acc_t* weight;  // [C] or nullptr
  acc_t* batch;         // [NUM_BATCH]
};

template <typename scalar_t, typename acc_t, bool kWarpPerRow, int kThreads>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target, int64_t N, int64_t C,
                   int64_t ignore_index, LossParams<acc_t> p, acc_t* __restrict__ stats,
                   RowLossOut<scalar_t, acc_t> out) {
  using S = RowSchedule<kWarpPerRow, kThreads>;
  const GroupOf<kWarpPerRow, kThreads> g{S::lane()};
  if (out.loss != nullptr && blockIdx.x == 0 && threadIdx.x < NUM_BATCH)
    out.batch[threadIdx.x] = threadIdx.x == BT_SCALE ? acc_t(1) : acc_t(0);
  // Every thread of a group sees the same rows, so the block-wide reductions stay uniform.
  for (int64_t r = S::first(); r < N; r += S::stride()) {
    acc_t* st = stats + r * NUM_STATS;
    const int64_t y = checked_target(target, r, C, ignore_index);
    if (y == ignore_index) {
      for (int i = g.lane; i < NUM_STATS; i += GroupOf<kWarpPerRow, kThreads>::kSize) st[i] = acc_t(0);
      if (out.loss != nullptr && g.lane == 0) out.loss[r] = scalar_t(0);
      continue;
    }
    forward_row<scalar_t, acc_t>(g, logits + r * C, C, y, p, st);
    if (out.loss != nullptr && g.lane == 0) {
      // lane 0 wrote st (row_stats), so it reads its own writes
      out.loss[r] = static_cast<scalar_t>(row_loss<acc_t>(st, p.alpha, p.beta, p.passive != NONE, out.weight, y));
    }
  }
}

// The upstream gradient the backward kernel needs: grad_loss (the loss's dtype) with its
// stride for 'none' (0 when expanded), the class weights, and NFL_PAPER's 'none' coefficient
// from the backward batch step.
template <typename scalar_t, typename acc_t>
struct Upstream {
  const scalar_t* grad;
  int64_t stride;
  int reduction;
  const acc_t* weight;      // [C] or nullptr
  const acc_t* batch_coef;  // [1] (NFL_PAPER 'none') or nullptr
};

template <typename scalar_t, typename acc_t, bool kWarpPerRow, int kThreads>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target, int64_t N, int64_t C,
                    int64_t ignore_index, LossParams<acc_t> p, const acc_t* __restrict__ stats,
                    const acc_t* __restrict__ batch, Upstream<scalar_t, acc_t> up, scalar_t* __restrict__ grad) {
  using S = RowSchedule<kWarpPerRow, kThreads>;
  const GroupOf<kWarpPerRow, kThreads> g{S::lane()};
  const acc_t scale = batch[BT_SCALE];
  const acc_t g_unit =
      up.reduction == RED_NONE ? acc_t(0) : reduced_grad<acc_t>(up.reduction, static_cast<acc_t>(up.grad[0]), batch);
  acc_t batch_coef = 0;
  if (p.active == NFL_PAPER)
    batch_coef = up.batch_coef != nullptr ? up.batch_coef[0] : nfl_paper_reduced_coef<acc_t>(p.alpha, g_unit, batch);
  for (int64_t r = S::first(); r < N; r += S::stride()) {
    scalar_t* out = grad + r * C;
    const int64_t y = checked_target(target, r, C, ignore_index);
    if (y == ignore_index) {
      for (int64_t k = g.lane; k < C; k += GroupOf<kWarpPerRow, kThreads>::kSize) out[k] = scalar_t(0);
      continue;
    }
    acc_t g_row = up.reduction == RED_NONE ? static_cast<acc_t>(up.grad[r * up.stride]) : g_unit;
    if (up.weight != nullptr) g_row *= up.weight[y];
    backward_row<scalar_t, acc_t>(g, logits + r * C, C, y, p, stats + r * NUM_STATS, g_row, scale, batch_coef, out);
  }
}

// ---------------------------------------------------------------- batch steps (one block)
constexpr int kBatchThreads = 512;

template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  return BlockGroup<kBatchThreads>{static_cast<int>(threadIdx.x)}.all_reduce(v, SumOp<T>());
}

// loss_row.h's batch step: the sums over the valid rows, the label histogram (NCE_PAPER, in
// `counts`, C ints of scratch), the batch terms, and the reduced loss or each row's loss.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBatchThreads)
    batch_step_kernel(const acc_t* __restrict__ stats, const int64_t* __restrict__ target, int64_t N, int64_t C,
                      int64_t ignore_index, LossParams<acc_t> p, int reduction, const acc_t* __restrict__ weight,
                      int* __restrict__ counts, acc_t* __restrict__ batch, scalar_t* __restrict__ loss) {
  const int tid = threadIdx.x;
  if (counts != nullptr) {
    for (int64_t c = tid; c < C; c += kBatchThreads) counts[c] = 0;
    __syncthreads();
  }
  BatchSums<acc_t> s{acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  long long n_valid = 0;
  for (int64_t i = tid; i < N; i += kBatchThreads) {
    const int64_t y = target[i];
    if (y == ignore_index) continue;
    ++n_valid;
    add_row(s, stats + i * NUM_STATS, weight != nullptr ? weight[y] : acc_t(1));
    if (counts != nullptr) atomicAdd(counts + y, 1);
  }
  // counted in 64-bit integers: exact for any N
  s.n_valid = static_cast<acc_t>(block_sum(n_valid));
  s.wsum = block_sum(s.wsum);
  s.wact = block_sum(s.wact);
  s.wpas = block_sum(s.wpas);
  s.focal = block_sum(s.focal);  // block_sum synchronises: every count is in place after it
  acc_t entropy = 0;
  if (counts != nullptr) {
    for (int64_t c = tid; c < C; c += kBatchThreads) entropy += entropy_term(static_cast<acc_t>(counts[c]), s.n_valid);
    entropy = block_sum(entropy);
  }
  acc_t bt[NUM_BATCH];
  batch_terms<acc_t>(p.active, weight != nullptr, s, entropy, static_cast<acc_t>(C), bt);
  if (tid < NUM_BATCH) batch[tid] = bt[tid];
  const bool has_passive = p.passive != NONE;
  if (reduction != RED_NONE) {
    if (tid == 0) loss[0] = static_cast<scalar_t>(reduced_loss<acc_t>(reduction, p.alpha, p.beta, has_passive, s, bt));
    return;
  }
  const acc_t alpha_scale = p.alpha * bt[BT_SCALE];
  for (int64_t i = tid; i < N; i += kBatchThreads) {
    const int64_t y = target[i];
    loss[i] = static_cast<scalar_t>(
        y == ignore_index ? acc_t(0)
                          : row_loss<acc_t>(stats + i * NUM_STATS, alpha_scale, p.beta, has_passive, weight, y));
  }
}

// NFL_PAPER's backward batch step for 'none': c = nfl_paper_batch_coef(sum_i g_i w_i FL_i).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBatchThreads)
    backward_batch_kernel(const acc_t* __restrict__ stats, const int64_t* __restrict__ target, int64_t N,
                          int64_t ignore_index, acc_t alpha, const acc_t* __restrict__ batch,
                          Upstream<scalar_t, acc_t> up, acc_t* __restrict__ coef) {
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < N; i += kBatchThreads) {
    const int64_t y = target[i];
    if (y == ignore_index) continue;
    acc_t g = static_cast<acc_t>(up.grad[i * up.stride]);
    if (up.weight != nullptr) g *= up.weight[y];
    sum += g * stats[i * NUM_STATS + ST_ACTIVE];
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) coef[0] = nfl_paper_batch_coef(alpha, sum, batch[BT_N_VALID], batch[BT_MEAN_W]);
}

// ---------------------------------------------------------------- distribution targets
// Probability targets or label smoothing (loss_row.h, "distribution targets"): the same row
// schedule, three passes forward (max, sum of exp, dist_terms) and one backward; the batch
// step sums the rows' losses and 'mean' shares.
template <typename scalar_t, typename acc_t>
struct DistInputs {
  const scalar_t* logits;
  const scalar_t* probs;  // [N, C] in the logits' dtype, or nullptr for class indices
  const int64_t* target;  // [N] class indices, or nullptr for probabilities
  int64_t N, C, ignore_index;
  DistCoefs<acc_t> coefs;
  const acc_t* weight;  // [C] or nullptr
};

// t_k of row r (y: its class index, or -1 for probabilities)
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t dist_target_at(const DistInputs<scalar_t, acc_t>& in, int64_t r, int64_t y,
                                                int64_t k) {
  const acc_t b = in.probs != nullptr ? static_cast<acc_t>(in.probs[r * in.C + k]) : acc_t(k == y ? 1 : 0);
  return dist_target<ScalarMath<acc_t>>(b, in.coefs);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t dist_weight_at(const DistInputs<scalar_t, acc_t>& in, int64_t k) {
  return in.weight != nullptr ? in.weight[k] : acc_t(1);
}

// Row r's class index (-1 for probabilities), asserted on the device as the index path's.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ int64_t dist_row_target(const DistInputs<scalar_t, acc_t>& in, int64_t r) {
  return in.probs != nullptr ? int64_t(-1) : checked_target(in.target, r, in.C, in.ignore_index);
}

template <typename scalar_t, typename acc_t, bool kWarpPerRow, int kThreads>
__global__ void __launch_bounds__(kThreads)
    dist_forward_kernel(DistInputs<scalar_t, acc_t> in, acc_t* __restrict__ stats, scalar_t* __restrict__ loss,
                        acc_t* __restrict__ batch) {
  using S = RowSchedule<kWarpPerRow, kThreads>;
  using M = ScalarMath<acc_t>;
  const GroupOf<kWarpPerRow, kThreads> g{S::lane()};
  constexpr int kSize = GroupOf<kWarpPerRow, kThreads>::kSize;
  if (loss != nullptr && blockIdx.x == 0 && threadIdx.x < NUM_BATCH)
    batch[threadIdx.x] = threadIdx.x == BT_SCALE ? acc_t(1) : acc_t(0);
  for (int64_t r = S::first(); r < in.N; r += S::stride()) {
    acc_t* st = stats + r * NUM_STATS;
    const int64_t y = dist_row_target(in, r);
    if (in.probs == nullptr && y == in.ignore_index) {
      for (int i = g.lane; i < NUM_STATS; i += kSize) st[i] = acc_t(0);
      if (loss != nullptr && g.lane == 0) loss[r] = scalar_t(0);
      continue;
    }
    const scalar_t* z = in.logits + r * in.C;
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t k = g.lane; k < in.C; k += kSize) m = nanmax(m, static_cast<acc_t>(z[k]));
    m = g.all_reduce(m, NanMaxOp<acc_t>());
    acc_t s = 0;
    for (int64_t k = g.lane; k < in.C; k += kSize) s += apl_exp(static_cast<acc_t>(z[k]) - m);
    const acc_t lsum = apl_log(g.all_reduce(s, SumOp<acc_t>()));
    DistSums<acc_t> sums{acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t k = g.lane; k < in.C; k += kSize) {
      sums.add(dist_terms<M>(static_cast<acc_t>(z[k]), dist_target_at(in, r, y, k), dist_weight_at(in, k), m, lsum,
                             in.coefs));
    }
    if (in.coefs.ce != acc_t(0)) {
      sums.ce = g.all_reduce(sums.ce, SumOp<acc_t>());
      sums.ce_mass = g.all_reduce(sums.ce_mass, SumOp<acc_t>());
    }
    if (in.coefs.mae != acc_t(0)) {
      sums.mae_abs = g.all_reduce(sums.mae_abs, SumOp<acc_t>());
      sums.mae_sign = g.all_reduce(sums.mae_sign, SumOp<acc_t>());
    }
    if (in.coefs.rce != acc_t(0)) {
      sums.rce_value = g.all_reduce(sums.rce_value, SumOp<acc_t>());
      sums.rce_mass = g.all_reduce(sums.rce_mass, SumOp<acc_t>());
    }
    if (g.lane == 0) {
      const acc_t denom = dist_mean_share(in.weight, in.target, r);
      dist_row_stats(st, m, lsum, sums, in.coefs, denom);
      for (int i = NUM_DIST_STATS; i < NUM_STATS; ++i) st[i] = acc_t(0);
      if (loss != nullptr) loss[r] = static_cast<scalar_t>(st[DS_LOSS]);
    }
  }
}

// The sums of the rows' stats and the reduced loss ('mean' or 'sum').
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBatchThreads)
    dist_batch_kernel(const acc_t* __restrict__ stats, int64_t N, int reduction, acc_t* __restrict__ batch,
                      scalar_t* __restrict__ loss) {
  long long n_valid = 0;  // counted in 64-bit integers: exact for any N
  acc_t denom = 0, total = 0;
  for (int64_t i = threadIdx.x; i < N; i += kBatchThreads) {
    const acc_t* st = stats + i * NUM_STATS;
    n_valid += st[DS_VALID] != acc_t(0), denom += st[DS_DENOM], total += st[DS_LOSS];
  }
  const acc_t valid_rows = static_cast<acc_t>(block_sum(n_valid));
  denom = block_sum(denom);
  total = block_sum(total);
  if (threadIdx.x == 0) {
    dist_batch_terms<acc_t>(valid_rows, denom, total, batch);
    loss[0] = static_cast<scalar_t>(dist_reduced_loss<acc_t>(reduction, batch));
  }
}

template <typename scalar_t, typename acc_t, bool kWarpPerRow, int kThreads>
__global__ void __launch_bounds__(kThreads)
    dist_backward_kernel(DistInputs<scalar_t, acc_t> in, const acc_t* __restrict__ stats,
                         const acc_t* __restrict__ batch, Upstream<scalar_t, acc_t> up, scalar_t* __restrict__ grad) {
  using S = RowSchedule<kWarpPerRow, kThreads>;
  const GroupOf<kWarpPerRow, kThreads> g{S::lane()};
  constexpr int kSize = GroupOf<kWarpPerRow, kThreads>::kSize;
  const acc_t g_unit =
      up.reduction == RED_NONE ? acc_t(0) : reduced_grad<acc_t>(up.reduction, static_cast<acc_t>(up.grad[0]), batch);
  for (int64_t r = S::first(); r < in.N; r += S::stride()) {
    scalar_t* out = grad + r * in.C;
    const int64_t y = dist_row_target(in, r);
    if (in.probs == nullptr && y == in.ignore_index) {
      for (int64_t k = g.lane; k < in.C; k += kSize) out[k] = scalar_t(0);
      continue;
    }
    const acc_t g_row = up.reduction == RED_NONE ? static_cast<acc_t>(up.grad[r * up.stride]) : g_unit;
    const DistGrad<acc_t> rg = dist_row_grad(stats + r * NUM_STATS, in.coefs, g_row);
    const scalar_t* z = in.logits + r * in.C;
    for (int64_t k = g.lane; k < in.C; k += kSize) {
      out[k] = static_cast<scalar_t>(dist_grad<ScalarMath<acc_t>>(
          rg, static_cast<acc_t>(z[k]), dist_target_at(in, r, y, k), dist_weight_at(in, k), in.coefs));
    }
  }
}

// Blocks for N rows at rows_per_block rows each (grid-stride beyond kMaxBlocks).
int64_t blocks_for(int64_t N, int64_t rows_per_block) {
  return std::min<int64_t>(kMaxBlocks, (N + rows_per_block - 1) / rows_per_block);
}

// The row kernel's layout for C classes: a warp per row, or a block per row.
template <typename Launch>
void launch_rows(int64_t N, int64_t C, Launch&& launch) {
  if (C <= kWarpMaxC) {
    launch(std::true_type{}, blocks_for(N, kWarpBlockThreads / kWarpSize));
  } else {
    launch(std::false_type{}, blocks_for(N, 1));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
const acc_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

// The distribution path's inputs: probabilities read in the logits' dtype (a copy, one launch
// more, only when they come in another dtype), the class weights.
template <typename scalar_t, typename acc_t>
DistInputs<scalar_t, acc_t> dist_inputs(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& target,
                                        int64_t active, int64_t passive, double alpha, double beta, double gamma,
                                        double q, int64_t ignore_index, const at::Tensor& weight, double smoothing) {
  const int64_t C = logits.size(1);
  return DistInputs<scalar_t, acc_t>{logits.const_data_ptr<scalar_t>(),
                                     probs.defined() ? probs.const_data_ptr<scalar_t>() : nullptr,
                                     probs.defined() ? nullptr : target.const_data_ptr<int64_t>(),
                                     logits.size(0),
                                     C,
                                     ignore_index,
                                     dist_coefs<acc_t>(make_params<acc_t>(active, passive, alpha, beta, gamma, q),
                                                       static_cast<acc_t>(smoothing), static_cast<acc_t>(C)),
                                     data_or_null<acc_t>(weight)};
}

at::Tensor dist_probs(const at::Tensor& logits, const at::Tensor& target) {
  return at::isFloatingType(target.scalar_type()) ? target.to(logits.scalar_type()).contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_loss_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                              int64_t active, int64_t passive, double alpha,
                                                              double beta, double gamma, double q, int64_t reduction,
                                                              int64_t ignore_index,
                                                              const std::optional<at::Tensor>& weight_arg,
                                                              double smoothing) {
  const int64_t N = logits.size(0), C = logits.size(1);
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const at::Tensor probs = dist_probs(logits, target);
  if (!probs.defined() && sync_target_check()) check_target_range(target, C, ignore_index);
  const at::Tensor weight = weight_for(weight_arg, logits);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor loss, stats, batch;
  std::tie(loss, stats, batch) = empty_outputs(logits, reduction);
  const bool rows_write_loss = row_pass_writes_loss(static_cast<int>(active), static_cast<int>(reduction));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_dist_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = dist_inputs<scalar_t, acc_t>(logits, probs, target, active, passive, alpha, beta, gamma, q,
                                                 ignore_index, weight, smoothing);
    acc_t* st = stats.mutable_data_ptr<acc_t>();
    acc_t* bt = batch.mutable_data_ptr<acc_t>();
    if (N > 0) {
      count_step();
      scalar_t* row_loss_out = rows_write_loss ? loss.mutable_data_ptr<scalar_t>() : nullptr;
      launch_rows(N, C, [&](auto warp_per_row, int64_t blocks) {
        constexpr bool kWarp = decltype(warp_per_row)::value;
        constexpr int kThreads = kWarp ? kWarpBlockThreads : kRowBlockThreads;
        dist_forward_kernel<scalar_t, acc_t, kWarp, kThreads>
            <<<blocks, kThreads, 0, stream>>>(in, st, row_loss_out, bt);
      });
    } else if (rows_write_loss) {
      batch.zero_();
    }
    if (!rows_write_loss) {
      count_step();
      dist_batch_kernel<scalar_t, acc_t>
          <<<1, kBatchThreads, 0, stream>>>(st, N, static_cast<int>(reduction), bt, loss.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, stats, batch};
}

at::Tensor dist_loss_backward_cuda(const at::Tensor& grad_loss_arg, const at::Tensor& logits, const at::Tensor& target,
                                   const at::Tensor& stats, const at::Tensor& batch, int64_t active, int64_t passive,
                                   double alpha, double beta, double gamma, double q, int64_t reduction,
                                   int64_t ignore_index, const std::optional<at::Tensor>& weight_arg,
                                   double smoothing) {
  const int64_t N = logits.size(0), C = logits.size(1);
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const at::Tensor probs = dist_probs(logits, target);
  const at::Tensor weight = weight_for(weight_arg, logits);
  const at::Tensor grad_loss = grad_loss_arg.to(logits.scalar_type());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad = at::empty_like(logits);
  if (N == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_dist_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = dist_inputs<scalar_t, acc_t>(logits, probs, target, active, passive, alpha, beta, gamma, q,
                                                 ignore_index, weight, smoothing);
    const Upstream<scalar_t, acc_t> up{grad_loss.const_data_ptr<scalar_t>(),
                                       reduction == row::RED_NONE ? grad_loss.stride(0) : 0,
                                       static_cast<int>(reduction), nullptr, nullptr};
    const acc_t* st = stats.const_data_ptr<acc_t>();
    const acc_t* bt = batch.const_data_ptr<acc_t>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    count_step();
    launch_rows(N, C, [&](auto warp_per_row, int64_t blocks) {
      constexpr bool kWarp = decltype(warp_per_row)::value;
      constexpr int kThreads = kWarp ? kWarpBlockThreads : kRowBlockThreads;
      dist_backward_kernel<scalar_t, acc_t, kWarp, kThreads><<<blocks, kThreads, 0, stream>>>(in, st, bt, up, out);
    });
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> apl_loss_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                             int64_t active, int64_t passive, double alpha, double beta,
                                                             double gamma, double q, int64_t reduction,
                                                             int64_t ignore_index,
                                                             const std::optional<at::Tensor>& weight_arg,
                                                             double smoothing) {
  check_forward_args(logits, target, active, passive, alpha, beta, gamma, q, reduction, ignore_index, weight_arg,
                     smoothing);
  if (logits.dim() > 2) {  // F.cross_entropy's (N, C, d1, ..., dK) layout, computed as rows of a copy
    return forward_on_rows(logits, target, reduction, [&](const at::Tensor& l, const at::Tensor& t) {
      return apl_loss_cuda(l, t, active, passive, alpha, beta, gamma, q, reduction, ignore_index, weight_arg,
                           smoothing);
    });
  }
  if (is_distribution(target, smoothing))
    return dist_loss_cuda(logits, target, active, passive, alpha, beta, gamma, q, reduction, ignore_index, weight_arg,
                          smoothing);
  const int64_t N = logits.size(0), C = logits.size(1);
  if (sync_target_check()) check_target_range(target, C, ignore_index);
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const at::Tensor weight = weight_for(weight_arg, logits);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor loss, stats, batch;
  std::tie(loss, stats, batch) = empty_outputs(logits, reduction);
  const bool rows_write_loss = row_pass_writes_loss(static_cast<int>(active), static_cast<int>(reduction));
  // Only NCE_PAPER's histogram needs scratch; its size depends on C alone.
  at::Tensor counts = active == NCE_PAPER ? at::empty({C}, logits.options().dtype(at::kInt)) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = make_params<acc_t>(active, passive, alpha, beta, gamma, q);
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    acc_t* st = stats.mutable_data_ptr<acc_t>();
    const acc_t* w = data_or_null<acc_t>(weight);
    if (N > 0) {
      count_step();
      const RowLossOut<scalar_t, acc_t> out{rows_write_loss ? loss.mutable_data_ptr<scalar_t>() : nullptr, w,
                                            batch.mutable_data_ptr<acc_t>()};
      launch_rows(N, C, [&](auto warp_per_row, int64_t blocks) {
        constexpr bool kWarp = decltype(warp_per_row)::value;
        constexpr int kThreads = kWarp ? kWarpBlockThreads : kRowBlockThreads;
        forward_kernel<scalar_t, acc_t, kWarp, kThreads>
            <<<blocks, kThreads, 0, stream>>>(z, t, N, C, ignore_index, p, st, out);
      });
    } else if (rows_write_loss) {
      batch.zero_();  // nothing reads it for N = 0; defined contents all the same
    }
    if (!rows_write_loss) {
      count_step();
      batch_step_kernel<scalar_t, acc_t>
          <<<1, kBatchThreads, 0, stream>>>(st, t, N, C, ignore_index, p, static_cast<int>(reduction), w,
                                            counts.defined() ? counts.mutable_data_ptr<int>() : nullptr,
                                            batch.mutable_data_ptr<acc_t>(), loss.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, stats, batch};
}

at::Tensor apl_loss_backward_cuda(const at::Tensor& grad_loss_arg, const at::Tensor& logits, const at::Tensor& target,
                                  const at::Tensor& stats, const at::Tensor& batch, int64_t active, int64_t passive,
                                  double alpha, double beta, double gamma, double q, int64_t reduction,
                                  int64_t ignore_index, const std::optional<at::Tensor>& weight_arg, double smoothing) {
  check_backward_args(grad_loss_arg, logits, target, stats, batch, active, passive, alpha, beta, gamma, q, reduction,
                      ignore_index, weight_arg, smoothing);
  if (logits.dim() > 2) {  // as the forward: rows of a copy, the gradient copied back
    return backward_on_rows(grad_loss_arg, logits, target, reduction,
                            [&](const at::Tensor& g, const at::Tensor& l, const at::Tensor& t) {
                              return apl_loss_backward_cuda(g, l, t, stats, batch, active, passive, alpha, beta, gamma,
                                                            q, reduction, ignore_index, weight_arg, smoothing);
                            });
  }
  if (is_distribution(target, smoothing))
    return dist_loss_backward_cuda(grad_loss_arg, logits, target, stats, batch, active, passive, alpha, beta, gamma, q,
                                   reduction, ignore_index, weight_arg, smoothing);
  const int64_t N = logits.size(0), C = logits.size(1);
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const at::Tensor weight = weight_for(weight_arg, logits);
  // Autograd hands the loss's own dtype; any other is converted (one extra launch).
  const at::Tensor grad_loss = grad_loss_arg.to(logits.scalar_type());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad = at::empty_like(logits);
  if (N == 0) return grad;
  const bool coef_step = needs_backward_batch_step(static_cast<int>(active), static_cast<int>(reduction));
  at::Tensor coef = coef_step ? at::empty({1}, stats.options()) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = make_params<acc_t>(active, passive, alpha, beta, gamma, q);
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    const acc_t* st = stats.const_data_ptr<acc_t>();
    const acc_t* bt = batch.const_data_ptr<acc_t>();
    Upstream<scalar_t, acc_t> up{grad_loss.const_data_ptr<scalar_t>(),
                                 reduction == row::RED_NONE ? grad_loss.stride(0) : 0, static_cast<int>(reduction),
                                 data_or_null<acc_t>(weight), nullptr};
    if (coef_step) {
      count_step();
      backward_batch_kernel<scalar_t, acc_t><<<1, kBatchThreads, 0, stream>>>(
          st, t, N, ignore_index, static_cast<acc_t>(alpha), bt, up, coef.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      up.batch_coef = coef.const_data_ptr<acc_t>();
    }
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    count_step();
    launch_rows(N, C, [&](auto warp_per_row, int64_t blocks) {
      constexpr bool kWarp = decltype(warp_per_row)::value;
      constexpr int kThreads = kWarp ? kWarpBlockThreads : kRowBlockThreads;
      backward_kernel<scalar_t, acc_t, kWarp, kThreads>
          <<<blocks, kThreads, 0, stream>>>(z, t, N, C, ignore_index, p, st, bt, up, out);
    });
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
