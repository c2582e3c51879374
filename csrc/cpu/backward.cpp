// CPU backward ops: backward, backward_reduce, backward_elemt (schemas in ../bnfused.cpp).
//
// With g = dy * act'(z), x_hat = (x - mean) * invstd and M values per channel:
//   dresidual = g
//   dbias = sum(g)            dweight = sum(g * x_hat) = invstd * sum(g * (x - mean))
//   training: dx = w * invstd * (g - dbias / M - x_hat * dweight / M)
//               = g * k1 - x_hat * k2 - k3,  k1 = w * invstd, k2 = k1 * dweight / M, k3 = k1 * dbias / M
//   eval:     dx = g * k1                    (the stats are constants; x is not read)
#include <torch/library.h>

#include "../layout.h"
#include "channel_values.h"
#include "backward_kernels.h"

namespace bnfused::cpu {
namespace {

using at::Tensor;
using std::optional;

// dy, and what act' needs (y, or the residual that went into z), brought to x's layout and checked.
struct GradInputs {
  Tensor dy, y, residual;
  Tiling tl;

  GradInputs(const Tensor& dy_in, const Tensor& x, const optional<Tensor>& y_in, int64_t act, double slope,
             const optional<Tensor>& residual_in = std::nullopt)
      : tl(Tiling::of(ncs_of(x))) {
    check_input_dtype(x);
    check_act(act, slope);
    dy = conform(dy_in, x, tl.L, "dy");
    if (grad_from_output(act)) {
      TORCH_CHECK(present(y_in), "bnfused_native: y (the forward output) is needed to differentiate the activation");
      y = conform(*y_in, x, tl.L, "y");
    }
    if (grad_from_input(act) && present(residual_in)) residual = conform(*residual_in, x, tl.L, "residual");
  }
  template <typename T>
  static const T* ptr(const Tensor& t) {
    return t.defined() ? t.const_data_ptr<T>() : nullptr;
  }
};

// The one backward pass every op here uses. With `reduce`, the per-channel sums are computed into
// sum_g and sum_gxhat; without, the given ones are used. dx (when wanted) is the training-mode dx
// from those sums and `count` = M when `training`, else the eval-mode dx (k2 = k3 = 0); dresidual
// (when wanted) is g. bias is read only to recompute z (hardswish, silu). Returns (dx, dresidual).
template <typename T>
std::pair<Tensor, Tensor> run_backward(const GradInputs& in, const Tensor& x, const optional<Tensor>& weight,
                                       const optional<Tensor>& bias, const Tensor& mean, const Tensor& invstd,
                                       bool reduce, std::vector<double>& sum_g, std::vector<double>& sum_gxhat,
                                       double count, bool training, bool want_dx, bool want_dresidual, int64_t act,
                                       double slope) {
  using A = acc_t<T>;
  const int64_t C = in.tl.L.c;
  const std::vector<A> mean_a = channel_values<A>(mean, C, A(0)), invstd_a = channel_values<A>(invstd, C, A(0));
  const std::vector<A> shift = grad_from_input(act) ? channel_values<A>(bias, C, A(0)) : std::vector<A>();
  std::vector<A> k1 = channel_values<A>(weight, C, A(1)), k2(C, A(0)), k3(C, A(0));
  for (int64_t c = 0; c < C; ++c) k1[c] *= invstd_a[c];
  // 1 / M multiplied per channel, not a division (Zen 1: 4-5 cycles each)
  const GradCoefs<A> coefs{sum_g.data(), sum_gxhat.data(), k1.data(), k2.data(), k3.data(), 1.0 / count};
  Tensor dx = want_dx ? at::empty_like(x) : Tensor(), dresidual = want_dresidual ? at::empty_like(x) : Tensor();
  const GradTensors<T> io{in.dy.const_data_ptr<T>(),
                          x.const_data_ptr<T>(),
                          GradInputs::ptr<T>(in.y),
                          GradInputs::ptr<T>(in.residual),
                          want_dx ? dx.mutable_data_ptr<T>() : nullptr,
                          want_dresidual ? dresidual.mutable_data_ptr<T>() : nullptr};
  const A* shift_p = shift.empty() ? nullptr : shift.data();  // null: read by no chunk, and by no PlaneCoefs
  grad_sums_then_input<T>(io, in.tl, mean_a.data(), invstd_a.data(), shift_p, reduce, coefs, training, act, slope);
  return {dx, dresidual};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Tensor& dy, const Tensor& x, const optional<Tensor>& y,
                                                    const optional<Tensor>& weight, const Tensor& mean,
                                                    const Tensor& invstd, int64_t act, double slope, bool training,
                                                    bool needs_input, bool needs_weight, bool needs_bias,
                                                    const optional<Tensor>& bias, const optional<Tensor>& residual,
                                                    bool needs_residual) {
  const GradInputs in(dy, x, y, act, slope, residual);
  check_channel_arg(weight, x, "weight");
  check_channel_arg(bias, x, "bias");
  check_stats_args(x, mean, invstd);
  const int64_t C = in.tl.L.c;
  const auto acc = acc_type(x.scalar_type());
  const bool reduce = needs_weight || needs_bias || (training && needs_input);
  std::vector<double> sum_g(C, 0.0), sum_gxhat(C, 0.0);
  Tensor dx, dresidual;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_native::backward", [&] {
    std::tie(dx, dresidual) =
        run_backward<scalar_t>(in, x, weight, bias, mean, invstd, reduce, sum_g, sum_gxhat,
                               double(in.tl.L.per_channel()), training, needs_input, needs_residual, act, slope);
  });
  // Undefined (None in Python) unless asked for.
  return {dx, needs_weight ? channel_tensor(sum_gxhat, acc) : Tensor(),
          needs_bias ? channel_tensor(sum_g, acc) : Tensor(), dresidual};
}

// The split primitives (SyncBatchNorm) take no bias nor residual: z cannot be recomputed from their
// arguments, so they differentiate only the activations read off y.
void check_split_act(int64_t act, const char* op) {
  TORCH_CHECK(!grad_from_input(act), "bnfused_native: ", op,
              " supports activations 0-3 (none, relu, leaky_relu, relu6), got ", act,
              "; hardswish and silu need backward, which recomputes z from the bias and residual");
}

std::tuple<Tensor, Tensor> backward_reduce(const Tensor& dy, const Tensor& x, const optional<Tensor>& y,
                                           const Tensor& mean, const Tensor& invstd, int64_t act, double slope) {
  check_split_act(act, "backward_reduce");
  const GradInputs in(dy, x, y, act, slope);
  check_stats_args(x, mean, invstd);
  const int64_t C = in.tl.L.c;
  std::vector<double> sum_g(C), sum_gxhat(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_native::backward_reduce", [&] {
    run_backward<scalar_t>(in, x, std::nullopt, std::nullopt, mean, invstd, true, sum_g, sum_gxhat, 1.0, false, false,
                           false, act, slope);
  });
  const auto acc = acc_type(x.scalar_type());
  return {channel_tensor(sum_g, acc), channel_tensor(sum_gxhat, acc)};
}

Tensor backward_elemt(const Tensor& dy, const Tensor& x, const optional<Tensor>& y, const optional<Tensor>& weight,
                      const Tensor& mean, const Tensor& invstd, const Tensor& sum_dy, const Tensor& sum_dy_xhat,
                      int64_t count, int64_t act, double slope) {
  check_split_act(act, "backward_elemt");
  const GradInputs in(dy, x, y, act, slope);
  check_elemt_args(x, weight, mean, invstd, sum_dy, sum_dy_xhat, count);
  const int64_t C = in.tl.L.c;
  std::vector<double> sum_g = channel_values<double>(sum_dy, C, 0.0);
  std::vector<double> sum_gxhat = channel_values<double>(sum_dy_xhat, C, 0.0);
  Tensor dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_native::backward_elemt", [&] {
    dx = run_backward<scalar_t>(in, x, weight, std::nullopt, mean, invstd, false, sum_g, sum_gxhat, double(count),
                                true, true, false, act, slope)
             .first;
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfused_native, CPU, m) {
  m.impl("backward", &backward);
  m.impl("backward_reduce", &backward_reduce);
  m.impl("backward_elemt", &backward_elemt);
}

}  // namespace bnfused::cpu
