// bnfused_native::batch_norm: the whole BatchNorm(+activation) with its autograd in C++.
//
// The per-step cost of a Python autograd.Function (apply, ctx, the backward's Python frame) is
// tens of microseconds: the whole run time of LeNet's or an MLP's small layers. Here the forward
// and the backward node are C++, and they call the same forward_train / forward_eval / backward
// ops as every other route, so the math exists once. The node is written the way torch's generated
// ones are (fields, not torch::autograd::Function's ctx->saved_data dictionary): that dictionary and
// its CppNode wrapper cost microseconds per step, as much as the kernels of a (64, 120) layer.
// Like bnfused.ops.BatchNormFunction, the backward runs the fused kernel, except under
// create_graph=True, where it is written in differentiable ATen ops (differentiable_backward).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include "activation.h"
#include "channel_args.h"

namespace bnfused {
namespace {

using at::Tensor;
using std::optional;

using ForwardTrainFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const optional<Tensor>&,
                                                          const optional<Tensor>&, const optional<Tensor>&,
                                                          const optional<Tensor>&, double, double, int64_t, double,
                                                          const optional<Tensor>&);
using ForwardEvalFn = Tensor(const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const Tensor&,
                             const Tensor&, double, int64_t, double, const optional<Tensor>&);
using BackwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const optional<Tensor>&,
                                                              const optional<Tensor>&, const Tensor&, const Tensor&,
                                                              int64_t, double, bool, bool, bool, bool,
                                                              const optional<Tensor>&, const optional<Tensor>&, bool);

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Returns (y, mean, invstd): batch statistics when training, else the running stats as given.
std::tuple<Tensor, Tensor, Tensor> run_forward(const Tensor& x, const optional<Tensor>& weight,
                                               const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                                               const optional<Tensor>& running_var, bool training, double momentum,
                                               double eps, int64_t act, double slope,
                                               const optional<Tensor>& residual) {
  static const auto forward_train = op<ForwardTrainFn>("bnfused_native::forward_train");
  static const auto forward_eval = op<ForwardEvalFn>("bnfused_native::forward_eval");
  if (training) {
    return forward_train.call(x, weight, bias, running_mean, running_var, momentum, eps, act, slope, residual);
  }
  TORCH_CHECK(present(running_mean) && present(running_var),
              "bnfused_native: running_mean and running_var are needed in evaluation mode");
  return {forward_eval.call(x, weight, bias, *running_mean, *running_var, eps, act, slope, residual), *running_mean,
          *running_var};
}

bool requires_grad(const optional<Tensor>& t) {
  return present(t) && t->requires_grad();
}

optional<Tensor> maybe(const Tensor& t) {
  return t.defined() ? optional<Tensor>(t) : std::nullopt;
}

// torch 2.12 made autograd nodes c10::intrusive_ptr targets (std::shared_ptr before). Both are
// supported: only the branch matching the installed torch is instantiated.
using NodePtr = decltype(torch::autograd::Edge{}.function);
constexpr bool kIntrusiveNodes = !std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>;

template <typename N>
auto make_node() {
  if constexpr (kIntrusiveNodes) {
    return c10::make_intrusive<N>();
  } else {
    return std::shared_ptr<N>(new N(), [](N* node) { deleteNode(node); });  // found by ADL on Node
  }
}

// An owning pointer to `node`, for SavedVariable::unpack of an output the node itself saved.
template <typename N>
NodePtr owning(N* node) {
  if constexpr (kIntrusiveNodes) {
    using Ptr = std::conditional_t<sizeof(N) != 0, NodePtr, void>;  // dependent: not looked up otherwise
    return Ptr::unsafe_reclaim_from_nonowning(node);
  } else {
    return node->shared_from_this();
  }
}

// create_graph=True (double backward, MAML, gradient penalties): the kernels' formula
// (bnfused/backends/reference.py) in differentiable ATen ops, so that autograd records it. In
// training, mean and invstd are recomputed from x, so the recorded graph holds their dependence on
// x; in eval mode they are the running stats, constants. For relu, leaky_relu and relu6 the mask is
// read off the saved output and is a constant of the graph (act'' = 0; torch's conventions at the
// kinks: y > 0 exactly where z > 0, 0 < y < 6 exactly where 0 < z < 6). For hardswish and silu, z is
// recomputed from x, weight, bias and residual, so act'(z) is differentiated too. Returns (dx,
// dweight, dbias, dresidual) with dx and dresidual in x's dtype and the sums in the accumulation dtype.
std::tuple<Tensor, Tensor, Tensor, Tensor> differentiable_backward(const Tensor& dy, const Tensor& x, const Tensor& y,
                                                                   const Tensor& weight, const Tensor& bias,
                                                                   const Tensor& residual, Tensor mean, Tensor invstd,
                                                                   bool training, double eps, int64_t act,
                                                                   double slope) {
  const auto acc = acc_type(x.scalar_type());
  std::vector<int64_t> dims{0}, per_channel(x.dim(), 1);
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  per_channel[1] = -1;
  const Tensor xf = x.to(acc);
  if (training) {
    auto [var, batch_mean] = at::var_mean(xf, dims, at::Scalar(0), /*keepdim=*/false);
    mean = batch_mean;
    invstd = (var + eps).rsqrt();
  }
  const Tensor x_hat = (xf - mean.view(per_channel)) * invstd.view(per_channel);
  Tensor g = dy.to(acc);
  if (act == kRelu6) {
    g = at::where(at::logical_and(y > 0, y < 6), g, at::Scalar(0.0));
  } else if (act == kRelu) {  // dy where y is NaN, as torch (and 0, not dy * 0, where dy is inf)
    g = at::where(y <= 0, at::Scalar(0.0), g);
  } else if (grad_from_output(act)) {
    g = at::where(y > 0, g, g * slope);
  } else if (grad_from_input(act)) {
    Tensor z = weight.defined() ? x_hat * weight.to(acc).view(per_channel) : x_hat;
    if (bias.defined()) z = z + bias.to(acc).view(per_channel);
    if (residual.defined()) z = z + residual.to(acc);
    if (act == kHardswish) {
      g = g * at::where(z <= -3, at::zeros_like(z), at::where(z < 3, z / 3 + 0.5, at::ones_like(z)));
    } else if (act == kSigmoid) {
      const Tensor s = at::sigmoid(z);
      g = g * (s * (1 - s));
    } else {
      const Tensor s = at::sigmoid(z);
      g = g * s * (1 + z * (1 - s));
    }
  }
  const Tensor dresidual = g.to(x.scalar_type());
  const Tensor sum_g = g.sum(dims), sum_g_xhat = (g * x_hat).sum(dims);
  if (training) {
    const double count = static_cast<double>(x.numel() / x.size(1));
    g = g - (sum_g / count).view(per_channel) - x_hat * (sum_g_xhat / count).view(per_channel);
  }
  const Tensor scale = weight.defined() ? invstd * weight.to(acc) : invstd;
  return {(g * scale.view(per_channel)).to(x.scalar_type()), sum_g_xhat, sum_g, dresidual};
}

// `value` recorded as a function of `sources` with derivative zero (no gradient flows back). Under
// create_graph=True torch's BatchNorm gradients require grad whenever an input of its backward does
// (dy, x, weight; and always after an activation, whose backward reads y), even where they do not
// depend on it: eval mode's dx without a trainable weight, the affine sums when dy is a constant.
// Code that differentiates them again (a gradient penalty on a frozen model) must find a graph
// there, as with torch, and gets no gradient for the sources. bnfused.ops._ZeroDerivative likewise.
struct ZeroDerivative : public torch::autograd::Function<ZeroDerivative> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& value, at::TensorList sources) {
    ctx->saved_data["inputs"] = static_cast<int64_t>(1 + sources.size());
    return value.clone();  // a new tensor: an input returned as is would be a view, refusing in-place ops
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 const torch::autograd::variable_list&) {
    return torch::autograd::variable_list(ctx->saved_data["inputs"].toInt(), Tensor());
  }
};

// The create_graph gradients with torch's requires_grad (see ZeroDerivative): dx, dweight and dbias
// come from batch_norm's backward, whose inputs are g (the activation's gradient, which requires
// grad after an activation, through y or z), x and weight; dresidual is g itself.
void record_like_torch(Tensor& dx, Tensor& dweight, Tensor& dbias, Tensor& dresidual, const Tensor& dy,
                       const Tensor& x, const Tensor& y, const Tensor& weight, const Tensor& bias,
                       const Tensor& residual, int64_t act) {
  // is_grads_batched=True (jacobian(..., vectorize=True)): a batched tensor reports requires_grad
  // false even where autograd records it, so nothing can be told apart, and a link would cut the graph.
  const auto keys = dy.key_set();
  if (keys.has(c10::DispatchKey::Batched) || keys.has(c10::DispatchKey::FuncTorchBatched)) return;
  std::vector<Tensor> sources;
  for (const Tensor* t : {&dy, &x, &y, &weight, &bias, &residual}) {
    if (t->defined() && t->requires_grad()) sources.push_back(*t);
  }
  if (sources.empty()) return;
  const bool g_recorded = act != kNone || dy.requires_grad();
  const bool bn_recorded = g_recorded || x.requires_grad() || (weight.defined() && weight.requires_grad());
  auto link = [&](Tensor& grad, bool recorded) {
    // as a TensorList: apply() takes a std::vector argument for a non-tensor and would record no edge
    if (grad.defined() && !grad.requires_grad() && recorded) {
      grad = ZeroDerivative::apply(grad, at::TensorList(sources));
    }
  };
  link(dx, bn_recorded);
  link(dweight, bn_recorded);
  link(dbias, bn_recorded);
  link(dresidual, g_recorded);
}

struct BatchNormBackward : public torch::autograd::Node {
  using SavedVariable = torch::autograd::SavedVariable;
  // x, y (relu, leaky_relu, relu6: their derivative is read off y), bias and residual (hardswish,
  // silu: z is recomputed from them), weight, and the statistics: batch mean and invstd when
  // training; copies of the running mean and var in eval mode. d(residual) = g needs nothing saved.
  SavedVariable x, y, weight, bias, residual, mean, invstd;
  bool training = true;
  double eps = 0.0;
  int64_t act = kNone;
  double slope = 0.0;
  std::optional<at::ScalarType> weight_dtype, bias_dtype;

  std::string name() const override { return "BatchNormBackward"; }

  // Nodes of a graph that several threads backpropagate through are shared (see torch's Note
  // [Thread Safety on Autograd Node]): the saved variables are read and released under the lock.
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&x, &y, &weight, &bias, &residual, &mean, &invstd}) v->reset_data();
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    static const auto backward_op = op<BackwardFn>("bnfused_native::backward");
    std::lock_guard<std::mutex> lock(mutex_);
    // Unpacked first: a second backward through a released graph must fail even with no gradient.
    const Tensor x_ = x.unpack(), y_ = y.unpack(owning(this)), weight_ = weight.unpack(), bias_ = bias.unpack(),
                 residual_ = residual.unpack();
    Tensor mean_ = mean.unpack(), invstd_ = invstd.unpack();
    const bool needs_input = task_should_compute_output(0), needs_weight = task_should_compute_output(1),
               needs_bias = task_should_compute_output(2), needs_residual = task_should_compute_output(3);
    if (!grads[0].defined() || !(needs_input || needs_weight || needs_bias || needs_residual)) {
      return {Tensor(), Tensor(), Tensor(), Tensor()};
    }
    if (!training) {
      // invstd in double, rounded once, as forward_eval forms it: hardswish and silu recompute z
      // from it, and must find the forward's z.
      const auto acc = acc_type(x_.scalar_type());
      mean_ = mean_.to(acc);
      invstd_ = (invstd_.to(acc).to(at::kDouble) + eps).rsqrt().to(acc);
    }
    Tensor dx, dweight, dbias, dresidual;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      std::tie(dx, dweight, dbias, dresidual) = differentiable_backward(grads[0], x_, y_, weight_, bias_, residual_,
                                                                        mean_, invstd_, training, eps, act, slope);
      if (!needs_input) dx = Tensor();
      if (!needs_weight) dweight = Tensor();
      if (!needs_bias) dbias = Tensor();
      if (!needs_residual) dresidual = Tensor();
      record_like_torch(dx, dweight, dbias, dresidual, grads[0], x_, y_, weight_, bias_, residual_, act);
    } else {
      // Without an activation, d(residual) is dy itself: no pass, no copy.
      const bool kernel_dresidual = needs_residual && act != kNone;
      if (needs_input || needs_weight || needs_bias || kernel_dresidual) {
        // Below autograd, as the forward runs: the op has no autograd kernel, and x requires grad, so
        // the dispatcher would otherwise box all fifteen arguments for torch's autograd fallback
        // (about 1 us a call, 5% of a (64, 16, 8, 8) layer's backward).
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        std::tie(dx, dweight, dbias, dresidual) =
            backward_op.call(grads[0], x_, maybe(y_), maybe(weight_), mean_, invstd_, act, slope, training,
                             needs_input, needs_weight, needs_bias, maybe(bias_), maybe(residual_), kernel_dresidual);
      }
      if (needs_residual && act == kNone) dresidual = grads[0];
    }
    if (dweight.defined() && dweight.scalar_type() != *weight_dtype) dweight = dweight.to(*weight_dtype);
    if (dbias.defined() && dbias.scalar_type() != *bias_dtype) dbias = dbias.to(*bias_dtype);
    return {dx, dweight, dbias, dresidual};
  }
};

Tensor batch_norm_autograd(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                           const optional<Tensor>& running_mean, const optional<Tensor>& running_var, bool training,
                           double momentum, double eps, int64_t act, double slope,
                           const optional<Tensor>& residual) {
  TORCH_CHECK(!torch::autograd::isFwGradDefined(x) && !torch::autograd::isFwGradDefined(weight) &&
                  !torch::autograd::isFwGradDefined(bias) && !torch::autograd::isFwGradDefined(residual),
              "bnfused_native::batch_norm has no forward-mode AD (dual tensors, jvp) formula; call "
              "bnfused.functional.batch_norm, which computes dual inputs with torch's ops");
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || requires_grad(weight) || requires_grad(bias) || requires_grad(residual));
  auto node = grad ? make_node<BatchNormBackward>() : decltype(make_node<BatchNormBackward>())();
  if (grad) {
    node->set_next_edges(torch::autograd::collect_next_edges(x, weight.value_or(Tensor()), bias.value_or(Tensor()),
                                                             residual.value_or(Tensor())));
  }
  auto [y, mean, invstd] = [&] {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return run_forward(x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope, residual);
  }();
  if (!grad) return y;
  torch::autograd::set_history(y, node);
  node->x = torch::autograd::SavedVariable(x, false);
  if (grad_from_output(act)) node->y = torch::autograd::SavedVariable(y, true);
  if (grad_from_input(act)) {
    if (present(bias)) node->bias = torch::autograd::SavedVariable(*bias, false);
    if (present(residual)) node->residual = torch::autograd::SavedVariable(*residual, false);
  }
  if (present(weight)) {
    node->weight = torch::autograd::SavedVariable(*weight, false);
    node->weight_dtype = weight->scalar_type();
  }
  if (present(bias)) node->bias_dtype = bias->scalar_type();
  // Eval mode keeps the running stats (constants of the backward), not batch statistics: as copies,
  // because a later training step updates the buffers in place before this graph may backpropagate.
  node->mean = torch::autograd::SavedVariable(training ? mean : mean.clone(), false);
  node->invstd = torch::autograd::SavedVariable(training ? invstd : invstd.clone(), false);
  node->training = training;
  node->eps = eps;
  node->act = act;
  node->slope = slope;
  return y;
}

// Below autograd (inference tensors, fake tensors): the forward alone.
Tensor batch_norm_forward(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                          const optional<Tensor>& running_mean, const optional<Tensor>& running_var, bool training,
                          double momentum, double eps, int64_t act, double slope, const optional<Tensor>& residual) {
  return std::get<0>(
      run_forward(x, weight, bias, running_mean, running_var, training, momentum, eps, act, slope, residual));
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfused_native, Autograd, m) {
  m.impl("batch_norm", &batch_norm_autograd);
}

TORCH_LIBRARY_IMPL(bnfused_native, CompositeExplicitAutograd, m) {
  m.impl("batch_norm", &batch_norm_forward);
}

}  // namespace bnfused
