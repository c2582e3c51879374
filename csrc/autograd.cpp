// bnfused_native::batch_norm: the whole BatchNorm(+activation) with its autograd in C++.
//
// The per-step cost of a Python autograd.Function (apply, ctx, the backward's Python frame) is
// tens of microseconds: the whole run time of LeNet's or an MLP's small layers. Here the forward
// and the backward node are C++ (torch::autograd::Function), and they call the same
// forward_train / forward_eval / backward ops as every other route, so the math exists once.
// Like bnfused.ops.BatchNormFunction, the backward is once-differentiable.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "activation.h"
#include "channel_args.h"

namespace bnfused {
namespace {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardTrainFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const optional<Tensor>&,
                                                          const optional<Tensor>&, const optional<Tensor>&,
                                                          const optional<Tensor>&, double, double, int64_t, double);
using ForwardEvalFn = Tensor(const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const Tensor&,
                             const Tensor&, double, int64_t, double);
using BackwardFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const optional<Tensor>&,
                                                      const optional<Tensor>&, const Tensor&, const Tensor&, int64_t,
                                                      double, bool, bool, bool, bool);

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Returns (y, mean, invstd): batch statistics when training, else the running stats as given.
std::tuple<Tensor, Tensor, Tensor> run_forward(const Tensor& x, const optional<Tensor>& weight,
                                               const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                                               const optional<Tensor>& running_var, bool training, double momentum,
                                               double eps, int64_t act, double slope) {
  static const auto forward_train = op<ForwardTrainFn>("bnfused_native::forward_train");
  static const auto forward_eval = op<ForwardEvalFn>("bnfused_native::forward_eval");
  if (training) {
    return forward_train.call(x, weight, bias, running_mean, running_var, momentum, eps, act, slope);
  }
  TORCH_CHECK(present(running_mean) && present(running_var),
              "bnfused_native: running_mean and running_var are needed in evaluation mode");
  return {forward_eval.call(x, weight, bias, *running_mean, *running_var, eps, act, slope), *running_mean,
          *running_var};
}

bool requires_grad(const optional<Tensor>& t) {
  return present(t) && t->requires_grad();
}

struct BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const optional<Tensor>& weight,
                        const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                        const optional<Tensor>& running_var, bool training, double momentum, double eps, int64_t act,
                        double slope) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, invstd] = run_forward(x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope);
    // Eval mode keeps the running stats (constants of the backward), not batch statistics: as copies,
    // because a later training step updates the buffers in place before this graph may backpropagate.
    if (!training && (x.requires_grad() || requires_grad(weight) || requires_grad(bias))) {
      mean = mean.clone();
      invstd = invstd.clone();
    }
    ctx->save_for_backward({x, act != kNone ? y : Tensor(), weight.value_or(Tensor()), mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["needs"] = c10::List<bool>({x.requires_grad(), requires_grad(weight), requires_grad(bias)});
    if (present(bias)) ctx->saved_data["bias_dtype"] = bias->scalar_type();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op<BackwardFn>("bnfused_native::backward");
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "bnfused: the BatchNorm backward is not differentiable (double backward / create_graph=True)");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &y = saved[1], &weight = saved[2];
    Tensor mean = saved[3], invstd = saved[4];
    const bool training = ctx->saved_data["training"].toBool();
    const int64_t act = ctx->saved_data["act"].toInt();
    const double slope = ctx->saved_data["slope"].toDouble();
    const c10::List<bool> needs = ctx->saved_data["needs"].toBoolList();
    if (!training) {
      const auto acc = acc_type(x.scalar_type());
      mean = mean.to(acc);
      invstd = (invstd.to(acc) + ctx->saved_data["eps"].toDouble()).rsqrt();
    }
    auto [dx, dweight, dbias] = backward_op.call(grads[0], x, y.defined() ? optional<Tensor>(y) : std::nullopt,
                                                 weight.defined() ? optional<Tensor>(weight) : std::nullopt, mean,
                                                 invstd, act, slope, training, needs[0], needs[1], needs[2]);
    if (dweight.defined() && dweight.scalar_type() != weight.scalar_type()) dweight = dweight.to(weight.scalar_type());
    if (dbias.defined()) {
      const auto bias_dtype = ctx->saved_data["bias_dtype"].toScalarType();
      if (dbias.scalar_type() != bias_dtype) dbias = dbias.to(bias_dtype);
    }
    return {dx, dweight, dbias, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor batch_norm_autograd(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                           const optional<Tensor>& running_mean, const optional<Tensor>& running_var, bool training,
                           double momentum, double eps, int64_t act, double slope) {
  return BatchNormFunction::apply(x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope);
}

// Below autograd (inference tensors, fake tensors): the forward alone.
Tensor batch_norm_forward(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                          const optional<Tensor>& running_mean, const optional<Tensor>& running_var, bool training,
                          double momentum, double eps, int64_t act, double slope) {
  return std::get<0>(run_forward(x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope));
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfused_native, Autograd, m) {
  m.impl("batch_norm", &batch_norm_autograd);
}

TORCH_LIBRARY_IMPL(bnfused_native, CompositeExplicitAutograd, m) {
  m.impl("batch_norm", &batch_norm_forward);
}

}  // namespace bnfused
