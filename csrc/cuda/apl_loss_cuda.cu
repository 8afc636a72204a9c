// The CUDA row paths of apl::apl_loss and apl::apl_loss_backward (ops.h DeviceKernels; the entry in
// ops.cpp checks the call first; compiled only in CUDA builds, see setup.py).
//
// A group of G threads owns a row (row_group): one thread for F.cross_entropy's (N, C, d1, ..., dK)
// layout, read in place (positions across threads, so each class's loads coalesce) and for
// C <= 8; 16 lanes (two rows per warp) up to C = 16; a warp up to C = 1024; a whole block (CUB
// BlockReduce) above, so any C works. The forward makes 2 passes over the row (max, sum of exp),
// a third for the kinds with sums over the classes, and writes the row's stats; the backward makes
// one pass and writes every element of the row's gradient (no atomics on floats). Logits of any
// floating dtype are read and computed in float32 (float64 for float64 inputs). All row math:
// ../loss_row.h.
//
// Probability targets and label smoothing take loss_row.h's soft-target path: the same row
// schedule, three passes forward (max, sum of exp, soft_terms) and one backward.
//
// The batch step (the paper forms' statistic, the per-class weights, the reduction) runs a block
// per loss_row.h batch block of rows: each writes its partial sums (in double) to scratch, and the
// last block to finish (a ticket the row kernel zeroed) combines them in block order. One launch,
// no float atomics, deterministic. No host sync and no data-dependent allocation (a step can be
// captured in a CUDA graph): targets are checked on the device (an assert, as F.cross_entropy; the
// debug switch of ops.h restores the host check). Launches per call: ops.h's launch_plan.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <cub/block/block_reduce.cuh>

#include <limits>
#include <tuple>
#include <type_traits>

#include "../ops.h"

namespace apl {
namespace gpu {
namespace {

using namespace apl::row;

constexpr int kWarpSize = 32;
constexpr int64_t kWarpMaxC = 1024;      // up to this many classes, a warp (or less) per row
constexpr int kGroupBlockThreads = 128;  // blocks of sub-warp and warp groups
constexpr int kRowBlockThreads = 512;    // a block per row above kWarpMaxC
constexpr int kBatchThreads = 512;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops beyond this
constexpr int64_t kSharedHistC = 12288;  // NCE_PAPER's label histogram in shared memory up to this C

// Threads per row for C classes in a layout of D positions per sample (kRowBlockThreads: a block),
// unless the GPU check forces a group (ops.h cuda_row_group_override).
int row_group(int64_t C, int64_t D) {
  if (const int64_t forced = cuda_row_group_override()) return static_cast<int>(forced);
  if (D > 1 || C <= 8) return 1;
  if (C <= 16) return 16;
  if (C <= kWarpMaxC) return kWarpSize;
  return kRowBlockThreads;
}

template <typename T>
struct SumOp {
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
template <typename T>
struct NanMaxOp {
  __device__ __forceinline__ T operator()(T a, T b) const { return nanmax(a, b); }
};
struct SumsOp {
  __device__ __forceinline__ BatchSums operator()(BatchSums a, const BatchSums& b) const {
    add_sums(a, b);
    return a;
  }
};

// G lanes of one warp that own a row (G = 1: a thread). Their shuffles name only their own lanes,
// so groups of a warp that take different branches (an ignored row, the grid's tail) never wait on
// each other.
template <int G>
struct SubGroup {
  static constexpr int kSize = G;
  static_assert(G == 1 || G == 2 || G == 4 || G == 8 || G == 16 || G == 32, "a power of two up to a warp");
  int lane;
  unsigned mask;
  __device__ SubGroup() : lane(threadIdx.x % G), mask(group_mask()) {}
  __device__ static unsigned group_mask() {
    if constexpr (G == kWarpSize) {
      return 0xffffffffu;
    } else {
      return ((1u << G) - 1u) << ((threadIdx.x % kWarpSize) / G * G);
    }
  }
  template <typename T, class Op>
  __device__ __forceinline__ T all_reduce(T v, Op op) const {
#pragma unroll
    for (int offset = G / 2; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(mask, v, offset));
    return v;
  }
};

// A block that owns a row.
template <int kThreads>
struct BlockGroup {
  static constexpr int kSize = kThreads;
  int lane;
  __device__ BlockGroup() : lane(threadIdx.x) {}
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

template <int G>
using GroupOf = std::conditional_t<G == kRowBlockThreads, BlockGroup<kRowBlockThreads>, SubGroup<G>>;
template <int G>
constexpr int threads_of() {
  return G == kRowBlockThreads ? kRowBlockThreads : kGroupBlockThreads;
}

// Row r of the grid and where its classes are: class k of row r at base(r) + k * D (loss_row's
// row = position r % D of sample r / D; D = 1 for (N, C)).
struct Layout {
  int64_t N, C, D;
  __device__ __forceinline__ int64_t base(int64_t r) const { return D == 1 ? r * C : (r / D) * C * D + r % D; }
};

// The rows a block visits: every thread of the block takes the same number of steps (row slots),
// and a group skips a slot past N as a whole.
template <int G>
struct RowSlots {
  static constexpr int kRowsPerBlock = threads_of<G>() / G;
  __device__ static int64_t first() { return static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; }
  __device__ static int64_t stride() { return static_cast<int64_t>(gridDim.x) * kRowsPerBlock; }
  __device__ static int64_t row(int64_t slot) { return slot + (G == kRowBlockThreads ? 0 : threadIdx.x / G); }
};

// The target of row r, asserted on the device to be a class or ignore_index (no host sync).
__device__ __forceinline__ int64_t checked_target(const int64_t* __restrict__ target, int64_t r, int64_t C,
                                                  int64_t ignore_index) {
  const int64_t y = target[r];
  CUDA_KERNEL_ASSERT((y >= 0 && y < C) || y == ignore_index);
  return y;
}

// Scratch of the forward's batch step, zeroed where it must be by the row kernel that precedes it.
struct BatchScratch {
  BatchSums* partials;  // one per batch block
  int* counts;          // NCE_PAPER's label histogram [C], or nullptr
  unsigned* ticket;     // blocks done
};

// Block 0 of the row kernel zeroes the batch step's ticket and histogram (the step runs after it).
__device__ __forceinline__ void zero_scratch(const BatchScratch& s, int64_t C) {
  if (blockIdx.x != 0) return;
  if (s.ticket != nullptr && threadIdx.x == 0) *s.ticket = 0u;
  if (s.counts != nullptr)
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s.counts[c] = 0;
}

template <typename scalar_t, typename acc_t, class Group>
__device__ void forward_row(const Group& g, const scalar_t* __restrict__ z, int64_t D, int64_t C, int64_t y,
                            const LossParams<acc_t>& p, acc_t* __restrict__ st) {
  using M = ScalarMath<acc_t>;
  constexpr int G = Group::kSize;
  const acc_t zero(0);
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t k = g.lane; k < C; k += G)
    if (k != y) m = nanmax(m, static_cast<acc_t>(z[k * D]));
  m = g.all_reduce(m, NanMaxOp<acc_t>());
  const acc_t z_y = static_cast<acc_t>(z[y * D]);

  acc_t top = zero;
  if (needs_argmax(p)) {  // y is the argmax unless a logit before it equals it (only looked for on a tie)
    acc_t tie = zero;
    if (z_y == m) {
      for (int64_t k = g.lane; k < y; k += G)
        if (static_cast<acc_t>(z[k * D]) == z_y) tie = acc_t(1);
      tie = g.all_reduce(tie, NanMaxOp<acc_t>());
    }
    top = argmax_flag<M>(z_y, m, tie);
  }
  const bool want_zsum = needs_zsum(p);
  acc_t s = 0, zsum = 0;
  for (int64_t k = g.lane; k < C; k += G) {
    if (k == y) continue;
    const acc_t d = static_cast<acc_t>(z[k * D]) - m;
    s += apl_exp(d);
    zsum += d;
  }
  s = g.all_reduce(s, SumOp<acc_t>());
  if (want_zsum) zsum = g.all_reduce(zsum, SumOp<acc_t>());
  const RowSums<acc_t> sums{m, s, want_zsum ? zsum : zero, top};
  const RowBasics<acc_t> basics = basics_from_sums<M>(sums, z_y);
  RowExtra<acc_t> extra{{zero_sums(zero), zero_sums(zero)}};
  if (needs_pass3(p)) {
    for (int64_t k = g.lane; k < C; k += G) {
      if (k == y) continue;
      const acc_t zk = static_cast<acc_t>(z[k * D]);
      pass3<M>(p, zk, apl_exp((zk - m) - basics.lsum), basics, extra);
    }
    for (int t = 0; t < 2; ++t) {
      extra.t[t].s0 = g.all_reduce(extra.t[t].s0, SumOp<acc_t>());
      extra.t[t].s1 = g.all_reduce(extra.t[t].s1, SumOp<acc_t>());
      extra.t[t].s2 = g.all_reduce(extra.t[t].s2, SumOp<acc_t>());
    }
  }
  if (g.lane == 0) row_stats<M>(st, basics, sums, extra, p, static_cast<acc_t>(C));
}

// Where the row kernel writes each row's loss itself (row::row_pass_writes_loss): the loss,
// the class weights, and the batch terms of a per-row loss (scale 1, the rest 0).
template <typename scalar_t, typename acc_t>
struct RowLossOut {
  scalar_t* loss;       // [N], or nullptr when the batch step writes the loss
  const acc_t* weight;  // [C] or nullptr
  acc_t* batch;         // [NUM_BATCH]
};

template <typename scalar_t, typename acc_t, int G>
__global__ void __launch_bounds__(threads_of<G>())
    forward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target, Layout lay,
                   int64_t ignore_index, LossParams<acc_t> p, acc_t* __restrict__ stats,
                   RowLossOut<scalar_t, acc_t> out, BatchScratch scratch) {
  using S = RowSlots<G>;
  const GroupOf<G> g;
  zero_scratch(scratch, lay.C);
  if (out.loss != nullptr && blockIdx.x == 0 && threadIdx.x == 0) per_row_batch_terms(out.batch);
  for (int64_t slot = S::first(); slot < lay.N; slot += S::stride()) {
    const int64_t r = S::row(slot);
    if (r >= lay.N) continue;
    acc_t* st = stats + r * NUM_STATS;
    const int64_t y = checked_target(target, r, lay.C, ignore_index);
    if (y == ignore_index) {
      for (int i = g.lane; i < NUM_STATS; i += G) st[i] = acc_t(0);
      if (out.loss != nullptr && g.lane == 0) out.loss[r] = scalar_t(0);
      continue;
    }
    forward_row<scalar_t, acc_t>(g, logits + lay.base(r), lay.D, lay.C, y, p, st);
    if (out.loss != nullptr && g.lane == 0) {
      // lane 0 wrote st (row_stats), so it reads its own writes
      out.loss[r] = static_cast<scalar_t>(row_loss<acc_t>(st, p.alpha, p.beta, p.passive != NONE, out.weight, y));
    }
  }
}

// The upstream gradient the backward kernel needs: grad_loss (in the loss's dtype, or converted to
// the accumulation dtype when it came in another) with its stride for 'none' (0 when expanded), the
// class weights, and NFL_PAPER's 'none' coefficient from the backward batch step.
template <typename scalar_t, typename acc_t>
struct Upstream {
  const scalar_t* grad;  // or nullptr, then grad_acc
  const acc_t* grad_acc;
  int64_t stride;
  int reduction;
  const acc_t* weight;      // [C] or nullptr
  const acc_t* batch_coef;  // [1] (NFL_PAPER 'none') or nullptr
  __device__ __forceinline__ acc_t at(int64_t i) const {
    return grad != nullptr ? static_cast<acc_t>(grad[i * stride]) : grad_acc[i * stride];
  }
};

template <typename scalar_t, typename acc_t, int G>
__global__ void __launch_bounds__(threads_of<G>())
    backward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target, Layout lay,
                    int64_t ignore_index, LossParams<acc_t> p, const acc_t* __restrict__ stats,
                    const acc_t* __restrict__ batch, Upstream<scalar_t, acc_t> up, scalar_t* __restrict__ grad) {
  using S = RowSlots<G>;
  const GroupOf<G> g;
  const unsigned present = grad_features(p);
  const acc_t scale = batch[BT_SCALE];
  const acc_t g_unit = up.reduction == RED_NONE ? acc_t(0) : reduced_grad<acc_t>(up.reduction, up.at(0), batch);
  acc_t batch_coef = 0;
  if (p.active == NFL_PAPER)
    batch_coef = up.batch_coef != nullptr ? up.batch_coef[0] : nfl_paper_reduced_coef<acc_t>(p.alpha, g_unit, batch);
  for (int64_t slot = S::first(); slot < lay.N; slot += S::stride()) {
    const int64_t r = S::row(slot);
    if (r >= lay.N) continue;
    const int64_t base = lay.base(r);
    const int64_t y = checked_target(target, r, lay.C, ignore_index);
    if (y == ignore_index) {
      for (int64_t k = g.lane; k < lay.C; k += G) grad[base + k * lay.D] = scalar_t(0);
      continue;
    }
    acc_t g_row = up.reduction == RED_NONE ? up.at(r) : g_unit;
    if (up.weight != nullptr) g_row *= up.weight[y];
    const RowGrad<acc_t> rg =
        row_grad<ScalarMath<acc_t>>(stats + r * NUM_STATS, p, static_cast<acc_t>(lay.C), g_row, scale, batch_coef);
    for (int64_t k = g.lane; k < lay.C; k += G) {
      const acc_t v = k == y ? rg.grad_y
                             : grad_not_target<GF_ALL, ScalarMath<acc_t>>(rg, p, present,
                                                                          static_cast<acc_t>(logits[base + k * lay.D]));
      grad[base + k * lay.D] = static_cast<scalar_t>(v);
    }
  }
}

// ---------------------------------------------------------------- batch steps
template <typename T>
__device__ __forceinline__ T block_reduce(T v) {
  using Reduce = cub::BlockReduce<T, kBatchThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ T result;
  T r = Reduce(tmp).Reduce(v, SumOp<T>());
  if (threadIdx.x == 0) result = r;
  __syncthreads();
  r = result;
  __syncthreads();
  return r;
}

__device__ __forceinline__ BatchSums block_reduce_sums(const BatchSums& v) {
  using Reduce = cub::BlockReduce<BatchSums, kBatchThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ BatchSums result;
  BatchSums r = Reduce(tmp).Reduce(v, SumsOp());
  if (threadIdx.x == 0) result = r;
  __syncthreads();
  r = result;
  __syncthreads();
  return r;
}

// This block's partial into scratch; true in the one block that finishes last, which then sees
// every partial (the others return). With a single block there is no ticket to take.
__device__ bool publish_partial(const BatchSums& part, const BatchScratch& scratch) {
  __shared__ bool last;
  __threadfence();  // every thread's histogram atomics before the block takes its ticket
  __syncthreads();
  if (threadIdx.x == 0) {
    scratch.partials[blockIdx.x] = part;
    __threadfence();  // the partial (and the histogram's atomics) before the ticket
    last = gridDim.x == 1 || atomicAdd(scratch.ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// The partials of every block, combined (each thread sums a strided share in block order; L2 reads,
// so no stale L1 copy of another block's write).
__device__ BatchSums combine_partials(const BatchScratch& scratch) {
  BatchSums total = zero_batch_sums();
  for (unsigned b = threadIdx.x; b < gridDim.x; b += kBatchThreads) {
    const BatchSums* part = scratch.partials + b;
    BatchSums v;
    v.n_valid = __ldcg(&part->n_valid), v.wsum = __ldcg(&part->wsum), v.wact = __ldcg(&part->wact);
    v.wpas = __ldcg(&part->wpas), v.focal = __ldcg(&part->focal);
    add_sums(total, v);
  }
  return block_reduce_sums(total);
}

// loss_row.h's batch step, a block per batch block of rows: the sums over its valid rows and, for
// NCE_PAPER, the label histogram (in shared memory where C fits, then added to `counts` with integer
// atomics: exact in any order); the last block combines the partials, makes the batch terms and the
// reduced loss, or each row's loss of a 'none' paper form.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBatchThreads)
    batch_step_kernel(const acc_t* __restrict__ stats, const int64_t* __restrict__ target, int64_t N, int64_t C,
                      int64_t ignore_index, LossParams<acc_t> p, int reduction, const acc_t* __restrict__ weight,
                      BatchScratch scratch, acc_t* __restrict__ batch, scalar_t* __restrict__ loss) {
  extern __shared__ int shared_counts[];
  const int tid = threadIdx.x;
  const bool hist = scratch.counts != nullptr, shared_hist = hist && C <= kSharedHistC;
  if (shared_hist) {
    for (int64_t c = tid; c < C; c += kBatchThreads) shared_counts[c] = 0;
    __syncthreads();
  }
  BatchSums part = zero_batch_sums();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kBatchRows, end = min(N, begin + kBatchRows);
  for (int64_t i = begin + tid; i < end; i += kBatchThreads) {
    const int64_t y = checked_target(target, i, C, ignore_index);
    if (y == ignore_index) continue;
    add_row(part, stats + i * NUM_STATS, weight != nullptr ? static_cast<double>(weight[y]) : 1.0);
    if (shared_hist) {
      atomicAdd(shared_counts + y, 1);
    } else if (hist) {
      atomicAdd(scratch.counts + y, 1);
    }
  }
  part = block_reduce_sums(part);  // synchronises: the shared histogram is complete after it
  if (shared_hist)
    for (int64_t c = tid; c < C; c += kBatchThreads)
      if (shared_counts[c] != 0) atomicAdd(scratch.counts + c, shared_counts[c]);
  if (!publish_partial(part, scratch)) return;

  const BatchSums sums = combine_partials(scratch);
  double entropy = 0;
  if (hist) {
    for (int64_t c = tid; c < C; c += kBatchThreads)
      entropy += entropy_term(static_cast<double>(__ldcg(scratch.counts + c)), sums.n_valid);
    entropy = block_reduce(entropy);
  }
  __shared__ double bt[NUM_BATCH];
  if (tid == 0) batch_terms(p.active, weight != nullptr, sums, entropy, static_cast<double>(C), bt);
  __syncthreads();
  if (tid < NUM_BATCH) batch[tid] = static_cast<acc_t>(bt[tid]);
  const bool has_passive = p.passive != NONE;
  if (reduction != RED_NONE) {
    if (tid == 0)
      loss[0] = static_cast<scalar_t>(
          reduced_loss(reduction, static_cast<double>(p.alpha), static_cast<double>(p.beta), has_passive, sums, bt));
    return;
  }
  const acc_t alpha_scale = p.alpha * static_cast<acc_t>(bt[BT_SCALE]);
  for (int64_t i = tid; i < N; i += kBatchThreads) {
    const int64_t y = target[i];
    loss[i] = static_cast<scalar_t>(
        y == ignore_index ? acc_t(0)
                          : row_loss<acc_t>(stats + i * NUM_STATS, alpha_scale, p.beta, has_passive, weight, y));
  }
}

// NFL_PAPER's backward batch step for 'none': c = nfl_paper_batch_coef(sum_i g_i w_i FL_i), summed in
// double by one block (the only backward that needs a batch sum; a rare form).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBatchThreads)
    backward_batch_kernel(const acc_t* __restrict__ stats, const int64_t* __restrict__ target, int64_t N, int64_t C,
                          int64_t ignore_index, double alpha, const acc_t* __restrict__ batch,
                          Upstream<scalar_t, acc_t> up, acc_t* __restrict__ coef) {
  double sum = 0;
  for (int64_t i = threadIdx.x; i < N; i += kBatchThreads) {
    const int64_t y = checked_target(target, i, C, ignore_index);
    if (y == ignore_index) continue;
    double g = static_cast<double>(up.at(i));
    if (up.weight != nullptr) g *= static_cast<double>(up.weight[y]);
    sum += g * static_cast<double>(stats[i * NUM_STATS + ST_ACTIVE]);
  }
  sum = block_reduce(sum);
  if (threadIdx.x == 0)
    coef[0] = static_cast<acc_t>(nfl_paper_batch_coef(alpha, sum, static_cast<double>(batch[BT_N_VALID]),
                                                      static_cast<double>(batch[BT_MEAN_W])));
}

// ---------------------------------------------------------------- soft targets
// Probability targets or label smoothing (loss_row.h, "soft targets"): the same row schedule and
// layouts, three passes forward (max, sum of exp, soft_terms) and one backward; the batch step sums
// the rows' losses and 'mean' shares.
template <typename scalar_t, typename acc_t>
struct SoftInputs {
  const scalar_t* logits;
  const acc_t* probs;     // laid out as the logits, in the accumulation dtype, or nullptr for class indices
  const int64_t* target;  // [N] class indices, or nullptr for probabilities
  Layout lay;
  int64_t ignore_index;
  SoftCoefs<acc_t> coefs;
  const acc_t* weight;  // [C] or nullptr
};

// t_k of row r at element offset `at` (y: its class index, or -1 for probabilities)
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t soft_target_at(const SoftInputs<scalar_t, acc_t>& in, int64_t at, int64_t y,
                                                int64_t k) {
  const acc_t b = in.probs != nullptr ? in.probs[at] : acc_t(k == y ? 1 : 0);
  return soft_target<ScalarMath<acc_t>>(b, in.coefs);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t soft_weight_at(const SoftInputs<scalar_t, acc_t>& in, int64_t k) {
  return in.weight != nullptr ? in.weight[k] : acc_t(1);
}

// Row r's class index (-1 for probabilities), asserted on the device as the index path's.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ int64_t soft_row_target(const SoftInputs<scalar_t, acc_t>& in, int64_t r) {
  return in.probs != nullptr ? int64_t(-1) : checked_target(in.target, r, in.lay.C, in.ignore_index);
}

template <typename scalar_t, typename acc_t, int G>
__global__ void __launch_bounds__(threads_of<G>())
    soft_forward_kernel(SoftInputs<scalar_t, acc_t> in, acc_t* __restrict__ stats, scalar_t* __restrict__ loss,
                        acc_t* __restrict__ batch, BatchScratch scratch) {
  using S = RowSlots<G>;
  using M = ScalarMath<acc_t>;
  const GroupOf<G> g;
  const Layout lay = in.lay;
  zero_scratch(scratch, 0);
  if (loss != nullptr && blockIdx.x == 0 && threadIdx.x == 0) per_row_batch_terms(batch);
  for (int64_t slot = S::first(); slot < lay.N; slot += S::stride()) {
    const int64_t r = S::row(slot);
    if (r >= lay.N) continue;
    acc_t* st = stats + r * NUM_STATS;
    const int64_t y = soft_row_target(in, r);
    if (in.probs == nullptr && y == in.ignore_index) {
      for (int i = g.lane; i < NUM_STATS; i += G) st[i] = acc_t(0);
      if (loss != nullptr && g.lane == 0) loss[r] = scalar_t(0);
      continue;
    }
    const int64_t base = lay.base(r);
    const scalar_t* z = in.logits + base;
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t k = g.lane; k < lay.C; k += G) m = nanmax(m, static_cast<acc_t>(z[k * lay.D]));
    m = g.all_reduce(m, NanMaxOp<acc_t>());
    acc_t s = 0;
    for (int64_t k = g.lane; k < lay.C; k += G) s += apl_exp(static_cast<acc_t>(z[k * lay.D]) - m);
    const acc_t lsum = apl_log(g.all_reduce(s, SumOp<acc_t>()));
    SoftSums<acc_t> sums{acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t k = g.lane; k < lay.C; k += G) {
      sums.add(soft_terms<M>(static_cast<acc_t>(z[k * lay.D]), soft_target_at(in, base + k * lay.D, y, k),
                             soft_weight_at(in, k), m, lsum, in.coefs));
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
      const acc_t denom = soft_mean_share(in.weight, in.target, r);
      soft_row_stats(st, m, lsum, sums, in.coefs, denom);
      for (int i = NUM_SOFT_STATS; i < NUM_STATS; ++i) st[i] = acc_t(0);
      if (loss != nullptr) loss[r] = static_cast<scalar_t>(st[SS_LOSS]);
    }
  }
}

// The sums of the rows' stats and the reduced loss ('mean' or 'sum'), a block per batch block.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBatchThreads)
    soft_batch_kernel(const acc_t* __restrict__ stats, int64_t N, int reduction, BatchScratch scratch,
                      acc_t* __restrict__ batch, scalar_t* __restrict__ loss) {
  BatchSums part = zero_batch_sums();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kBatchRows, end = min(N, begin + kBatchRows);
  for (int64_t i = begin + threadIdx.x; i < end; i += kBatchThreads) soft_add_row(part, stats + i * NUM_STATS);
  part = block_reduce_sums(part);
  if (!publish_partial(part, scratch)) return;
  const BatchSums sums = combine_partials(scratch);
  if (threadIdx.x == 0) {
    double terms[NUM_BATCH];
    soft_batch_terms(sums, terms);
    for (int j = 0; j < NUM_BATCH; ++j) batch[j] = static_cast<acc_t>(terms[j]);
    loss[0] = static_cast<scalar_t>(soft_reduced_loss(reduction, terms));
  }
}

template <typename scalar_t, typename acc_t, int G>
__global__ void __launch_bounds__(threads_of<G>())
    soft_backward_kernel(SoftInputs<scalar_t, acc_t> in, const acc_t* __restrict__ stats,
                         const acc_t* __restrict__ batch, Upstream<scalar_t, acc_t> up, scalar_t* __restrict__ grad) {
  using S = RowSlots<G>;
  const GroupOf<G> g;
  const Layout lay = in.lay;
  const acc_t g_unit = up.reduction == RED_NONE ? acc_t(0) : reduced_grad<acc_t>(up.reduction, up.at(0), batch);
  for (int64_t slot = S::first(); slot < lay.N; slot += S::stride()) {
    const int64_t r = S::row(slot);
    if (r >= lay.N) continue;
    const int64_t base = lay.base(r);
    const int64_t y = soft_row_target(in, r);
    if (in.probs == nullptr && y == in.ignore_index) {
      for (int64_t k = g.lane; k < lay.C; k += G) grad[base + k * lay.D] = scalar_t(0);
      continue;
    }
    const acc_t g_row = up.reduction == RED_NONE ? up.at(r) : g_unit;
    const SoftGrad<acc_t> rg = soft_row_grad(stats + r * NUM_STATS, in.coefs, g_row);
    for (int64_t k = g.lane; k < lay.C; k += G) {
      const int64_t at = base + k * lay.D;
      grad[at] = static_cast<scalar_t>(soft_grad<ScalarMath<acc_t>>(
          rg, static_cast<acc_t>(in.logits[at]), soft_target_at(in, at, y, k), soft_weight_at(in, k), in.coefs));
    }
  }
}

// ---------------------------------------------------------------- host side
// Blocks for N rows at rows_per_block rows each (grid-stride beyond kMaxBlocks).
int64_t blocks_for(int64_t N, int64_t rows_per_block) {
  return std::min<int64_t>(kMaxBlocks, (N + rows_per_block - 1) / rows_per_block);
}

// The row kernel's group for this call (row_group), as a compile-time G, with its grid.
template <typename Launch>
void launch_rows(const Call& call, Launch&& launch) {
  auto go = [&](auto group) {
    constexpr int G = decltype(group)::value;
    launch(group, blocks_for(call.rows, RowSlots<G>::kRowsPerBlock));
  };
  switch (row_group(call.C, call.D)) {
    case 1:
      go(std::integral_constant<int, 1>{});
      break;
    case 16:
      go(std::integral_constant<int, 16>{});
      break;
    case kWarpSize:
      go(std::integral_constant<int, kWarpSize>{});
      break;
    default:
      go(std::integral_constant<int, kRowBlockThreads>{});
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
const acc_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

Layout layout_of(const Call& call) { return Layout{call.rows, call.C, call.D}; }

// The batch step's scratch (by shape only): a partial per batch block, the ticket, and NCE_PAPER's
// histogram of C counts; `bytes` keeps it alive.
BatchScratch make_scratch(const Call& call, bool histogram, at::Tensor& bytes) {
  const int64_t blocks = batch_blocks(call.rows);
  const int64_t partial_bytes = blocks * static_cast<int64_t>(sizeof(BatchSums));
  const int64_t count_bytes = histogram ? (call.C * static_cast<int64_t>(sizeof(int)) + 15) / 16 * 16 : 0;
  bytes = at::empty({partial_bytes + count_bytes + 16}, call.logits.options().dtype(at::kByte));
  char* base = static_cast<char*>(bytes.mutable_data_ptr());
  BatchScratch s;
  s.partials = reinterpret_cast<BatchSums*>(base);
  s.counts = histogram ? reinterpret_cast<int*>(base + partial_bytes) : nullptr;
  s.ticket = reinterpret_cast<unsigned*>(base + partial_bytes + count_bytes);
  return s;
}

// grad_loss as the kernels read it: the loss's own dtype as it is (autograd's case), any other
// dtype converted to the accumulation dtype (as the CPU does); 'none' flattened to the rows.
template <typename scalar_t, typename acc_t>
Upstream<scalar_t, acc_t> upstream_of(const at::Tensor& grad_loss, const Call& call, at::Tensor& converted) {
  at::Tensor g = call.args.reduction == RED_NONE ? grad_loss.reshape({-1}) : grad_loss.reshape({1});
  Upstream<scalar_t, acc_t> up{nullptr, nullptr, g.stride(0), static_cast<int>(call.args.reduction), nullptr, nullptr};
  if (g.scalar_type() == call.logits.scalar_type()) {
    converted = g;
    up.grad = converted.const_data_ptr<scalar_t>();
  } else {
    converted = g.to(acc_type_of(call.logits.scalar_type()));
    up.stride = converted.stride(0);
    up.grad_acc = converted.const_data_ptr<acc_t>();
  }
  return up;
}

Outputs index_forward(const Call& call) {
  const int64_t N = call.rows, C = call.C;
  const int red = static_cast<int>(call.args.reduction);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor loss, stats, batch;
  std::tie(loss, stats, batch) = empty_outputs(call.logits, call.args.reduction);
  const bool rows_write_loss = row_pass_writes_loss(static_cast<int>(call.args.active), red);
  at::Tensor scratch_bytes;
  const bool histogram = call.args.active == NCE_PAPER && N > 0;
  const BatchScratch scratch =
      rows_write_loss ? BatchScratch{nullptr, nullptr, nullptr} : make_scratch(call, histogram, scratch_bytes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.logits.scalar_type(), "apl_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = make_params<acc_t>(call.args, C);
    const int64_t* t = call.target.const_data_ptr<int64_t>();
    acc_t* st = stats.mutable_data_ptr<acc_t>();
    const acc_t* w = data_or_null<acc_t>(call.weight);
    if (N > 0) {
      count_step();
      const RowLossOut<scalar_t, acc_t> out{rows_write_loss ? loss.mutable_data_ptr<scalar_t>() : nullptr, w,
                                            batch.mutable_data_ptr<acc_t>()};
      launch_rows(call, [&](auto group, int64_t blocks) {
        constexpr int G = decltype(group)::value;
        forward_kernel<scalar_t, acc_t, G><<<blocks, threads_of<G>(), 0, stream>>>(
            call.logits.const_data_ptr<scalar_t>(), t, layout_of(call), call.args.ignore_index, p, st, out, scratch);
      });
    } else if (rows_write_loss) {  // nothing reads it for N = 0; the terms of a per-row loss all the same
      batch.zero_();
      batch.narrow(0, BT_SCALE, 1).fill_(1);
    }
    if (!rows_write_loss) {
      count_step();
      const size_t shared = histogram && C <= kSharedHistC ? static_cast<size_t>(C) * sizeof(int) : 0;
      batch_step_kernel<scalar_t, acc_t><<<batch_blocks(N), kBatchThreads, shared, stream>>>(
          st, t, N, C, call.args.ignore_index, p, red, w, scratch, batch.mutable_data_ptr<acc_t>(),
          loss.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, stats, batch};
}

at::Tensor index_backward(const at::Tensor& grad_loss, const at::Tensor& stats, const at::Tensor& batch,
                          const Call& call) {
  const int64_t N = call.rows, C = call.C;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad = at::empty_like(call.logits);
  if (N == 0) return grad;
  const bool coef_step =
      needs_backward_batch_step(static_cast<int>(call.args.active), static_cast<int>(call.args.reduction));
  at::Tensor coef = coef_step ? at::empty({1}, stats.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.logits.scalar_type(), "apl_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = make_params<acc_t>(call.args, C);
    const int64_t* t = call.target.const_data_ptr<int64_t>();
    const acc_t* st = stats.const_data_ptr<acc_t>();
    const acc_t* bt = batch.const_data_ptr<acc_t>();
    at::Tensor g_kept;
    Upstream<scalar_t, acc_t> up = upstream_of<scalar_t, acc_t>(grad_loss, call, g_kept);
    up.weight = data_or_null<acc_t>(call.weight);
    if (coef_step) {
      count_step();
      backward_batch_kernel<scalar_t, acc_t><<<1, kBatchThreads, 0, stream>>>(
          st, t, N, C, call.args.ignore_index, call.args.alpha, bt, up, coef.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      up.batch_coef = coef.const_data_ptr<acc_t>();
    }
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    count_step();
    launch_rows(call, [&](auto group, int64_t blocks) {
      constexpr int G = decltype(group)::value;
      backward_kernel<scalar_t, acc_t, G><<<blocks, threads_of<G>(), 0, stream>>>(
          call.logits.const_data_ptr<scalar_t>(), t, layout_of(call), call.args.ignore_index, p, st, bt, up, out);
    });
  });
  return grad;
}

template <typename scalar_t, typename acc_t>
SoftInputs<scalar_t, acc_t> soft_inputs(const Call& call) {
  const bool probs = at::isFloatingType(call.target.scalar_type());
  const auto p = make_params<acc_t>(call.args, call.C);
  return SoftInputs<scalar_t, acc_t>{
      call.logits.const_data_ptr<scalar_t>(),
      probs ? call.target.const_data_ptr<acc_t>() : nullptr,
      probs ? nullptr : call.target.const_data_ptr<int64_t>(),
      layout_of(call),
      call.args.ignore_index,
      soft_coefs<acc_t>(p, static_cast<acc_t>(call.args.label_smoothing), static_cast<acc_t>(call.C)),
      data_or_null<acc_t>(call.weight)};
}

Outputs soft_forward(const Call& call) {
  const int64_t N = call.rows;
  const int red = static_cast<int>(call.args.reduction);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor loss, stats, batch;
  std::tie(loss, stats, batch) = empty_outputs(call.logits, call.args.reduction);
  const bool rows_write_loss = row_pass_writes_loss(static_cast<int>(call.args.active), red);
  at::Tensor scratch_bytes;
  const BatchScratch scratch =
      rows_write_loss ? BatchScratch{nullptr, nullptr, nullptr} : make_scratch(call, false, scratch_bytes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.logits.scalar_type(), "apl_soft_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = soft_inputs<scalar_t, acc_t>(call);
    acc_t* st = stats.mutable_data_ptr<acc_t>();
    acc_t* bt = batch.mutable_data_ptr<acc_t>();
    if (N > 0) {
      count_step();
      scalar_t* row_loss_out = rows_write_loss ? loss.mutable_data_ptr<scalar_t>() : nullptr;
      launch_rows(call, [&](auto group, int64_t blocks) {
        constexpr int G = decltype(group)::value;
        soft_forward_kernel<scalar_t, acc_t, G>
            <<<blocks, threads_of<G>(), 0, stream>>>(in, st, row_loss_out, bt, scratch);
      });
    } else if (rows_write_loss) {
      batch.zero_();
      batch.narrow(0, BT_SCALE, 1).fill_(1);
    }
    if (!rows_write_loss) {
      count_step();
      soft_batch_kernel<scalar_t, acc_t>
          <<<batch_blocks(N), kBatchThreads, 0, stream>>>(st, N, red, scratch, bt, loss.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, stats, batch};
}

at::Tensor soft_backward(const at::Tensor& grad_loss, const at::Tensor& stats, const at::Tensor& batch,
                         const Call& call) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad = at::empty_like(call.logits);
  if (call.rows == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.logits.scalar_type(), "apl_soft_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = soft_inputs<scalar_t, acc_t>(call);
    at::Tensor g_kept;
    const Upstream<scalar_t, acc_t> up = upstream_of<scalar_t, acc_t>(grad_loss, call, g_kept);
    const acc_t* st = stats.const_data_ptr<acc_t>();
    const acc_t* bt = batch.const_data_ptr<acc_t>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    count_step();
    launch_rows(call, [&](auto group, int64_t blocks) {
      constexpr int G = decltype(group)::value;
      soft_backward_kernel<scalar_t, acc_t, G><<<blocks, threads_of<G>(), 0, stream>>>(in, st, bt, up, out);
    });
  });
  return grad;
}

// The CUDA kernels read F.cross_entropy's (N, C, d1, ..., dK) layout in place (a thread per position).
bool reads_layout(const at::Tensor&, bool) { return true; }

Outputs forward(const Call& call) { return call.soft ? soft_forward(call) : index_forward(call); }

at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& stats, const at::Tensor& batch, const Call& call) {
  return call.soft ? soft_backward(grad_loss, stats, batch, call) : index_backward(grad_loss, stats, batch, call);
}

}  // namespace
}  // namespace gpu

const DeviceKernels& cuda_kernels() {
  static const DeviceKernels k{&gpu::reads_layout, &gpu::forward, &gpu::backward};
  return k;
}

}  // namespace apl
