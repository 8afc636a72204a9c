// Autograd of apl::apl_loss, registered for the Autograd dispatch key (every device).
//
// The forward saves (logits, target, stats, batch, weight) and the backward calls apl::apl_loss_backward.
// It is written in C++ rather than with torch.library.register_autograd because the Python
// formula costs ~60 us of interpreter time per training step, more than the whole fused loss
// for small batches (measured: 108 -> 50 us for a 128 x 10 CE forward + backward on this
// project's 2-core test machine). The backward op's own autograd formula only raises: second
// derivatives are not supported (LOSSES.md, "The fused operator").
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace apl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using OptTensor = std::optional<at::Tensor>;

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // loss, stats, batch

Outputs call_forward(const at::Tensor& logits, const at::Tensor& target, int64_t active, int64_t passive,
                     double alpha, double beta, double gamma, double q, int64_t reduction, int64_t ignore_index,
                     const OptTensor& weight) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("apl::apl_loss", "")
                       .typed<Outputs(const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, double,
                                      double, double, int64_t, int64_t, const OptTensor&)>();
  return op.call(logits, target, active, passive, alpha, beta, gamma, q, reduction, ignore_index, weight);
}

at::Tensor call_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                         const at::Tensor& stats, const at::Tensor& batch, int64_t active, int64_t passive,
                         double alpha, double beta, double gamma, double q, int64_t reduction, int64_t ignore_index,
                         const OptTensor& weight) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("apl::apl_loss_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t, int64_t, double, double, double, double, int64_t,
                                         int64_t, const OptTensor&)>();
  return op.call(grad_loss, logits, target, stats, batch, active, passive, alpha, beta, gamma, q, reduction,
                 ignore_index, weight);
}

// The scalar arguments, saved in the context.
struct Params {
  int64_t active, passive;
  double alpha, beta, gamma, q;
  int64_t reduction, ignore_index;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["active"] = active;
    ctx->saved_data["passive"] = passive;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["gamma"] = gamma;
    ctx->saved_data["q"] = q;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["ignore_index"] = ignore_index;
  }
  static Params load(AutogradContext* ctx) {
    auto& d = ctx->saved_data;
    return Params{d["active"].toInt(), d["passive"].toInt(), d["alpha"].toDouble(), d["beta"].toDouble(),
                  d["gamma"].toDouble(), d["q"].toDouble(), d["reduction"].toInt(), d["ignore_index"].toInt()};
  }
};

constexpr int kNumForwardInputs = 11;

// The weight saved for the backward (an undefined tensor stands for "none").
OptTensor saved_weight(const at::Tensor& w) { return w.defined() ? OptTensor(w) : std::nullopt; }

class AplLossFunction : public torch::autograd::Function<AplLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               int64_t active, int64_t passive, double alpha, double beta, double gamma, double q,
                               int64_t reduction, int64_t ignore_index, const OptTensor& weight) {
    const at::Tensor w = weight.has_value() ? *weight : at::Tensor();
    TORCH_CHECK_VALUE(!w.defined() || !w.requires_grad(), "apl_loss: weight must not require grad (the fused "
                      "operator has no gradient for it); pass weight.detach()");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, stats, batch] = call_forward(logits, target, active, passive, alpha, beta, gamma, q, reduction,
                                             ignore_index, weight);
    ctx->save_for_backward({logits, target, stats, batch, w});
    Params{active, passive, alpha, beta, gamma, q, reduction, ignore_index}.save(ctx);
    ctx->mark_non_differentiable({stats, batch});
    return {loss, stats, batch};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Params p = Params::load(ctx);
    variable_list grads(kNumForwardInputs);
    if (ctx->needs_input_grad(0)) {
      grads[0] = call_backward(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], p.active, p.passive,
                               p.alpha, p.beta, p.gamma, p.q, p.reduction, p.ignore_index, saved_weight(saved[4]));
    }
    return grads;
  }
};

// apl_loss_backward under autograd: computes the gradient, and any attempt to differentiate
// it again raises.
class AplLossBackwardFunction : public torch::autograd::Function<AplLossBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_loss, const at::Tensor& logits,
                               const at::Tensor& target, const at::Tensor& stats, const at::Tensor& batch,
                               int64_t active, int64_t passive, double alpha, double beta, double gamma, double q,
                               int64_t reduction, int64_t ignore_index, const OptTensor& weight) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return {call_backward(grad_loss, logits, target, stats, batch, active, passive, alpha, beta, gamma, q, reduction,
                          ignore_index, weight)};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "apl: the fused loss does not support double backward (second derivatives); "
                       "use apl.losses.reference_loss for higher-order gradients");
    return {};
  }
};

Outputs apl_loss_autograd(const at::Tensor& logits, const at::Tensor& target, int64_t active, int64_t passive,
                          double alpha, double beta, double gamma, double q, int64_t reduction, int64_t ignore_index,
                          const OptTensor& weight) {
  auto out = AplLossFunction::apply(logits, target, active, passive, alpha, beta, gamma, q, reduction, ignore_index,
                                    weight);
  return {out[0], out[1], out[2]};
}

at::Tensor apl_loss_backward_autograd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                      const at::Tensor& stats, const at::Tensor& batch, int64_t active,
                                      int64_t passive, double alpha, double beta, double gamma, double q,
                                      int64_t reduction, int64_t ignore_index, const OptTensor& weight) {
  return AplLossBackwardFunction::apply(grad_loss, logits, target, stats, batch, active, passive, alpha, beta, gamma,
                                        q, reduction, ignore_index, weight)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(apl, Autograd, m) {
  m.impl("apl_loss", &apl_loss_autograd);
  m.impl("apl_loss_backward", &apl_loss_backward_autograd);
}

}  // namespace apl
