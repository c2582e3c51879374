// CPU backward ops: backward, backward_reduce, backward_elemt (schemas in ../bnfused.cpp).
//
// With g = dy * act'(z), x_hat = (x - mean) * invstd and M values per channel:
//   dbias = sum(g)            dweight = sum(g * x_hat) = invstd * sum(g * (x - mean))
//   training: dx = w * invstd * (g - dbias / M - x_hat * dweight / M)
//               = g * k1 - x_hat * k2 - k3,  k1 = w * invstd, k2 = k1 * dweight / M, k3 = k1 * dbias / M
//   eval:     dx = g * k1                    (the stats are constants; x is not read)
#include <torch/library.h>

#include "../layout.h"
#include "channel_values.h"
#include "kernels.h"

namespace bnfused::cpu {
namespace {

using at::Tensor;
using std::optional;

// dy and y (when an activation is fused) brought to x's layout, and checked.
struct GradInputs {
  Tensor dy, y;
  Tiling tl;

  GradInputs(const Tensor& dy_in, const Tensor& x, const optional<Tensor>& y_in, int64_t act, double slope)
      : tl(Tiling::of(ncs_of(x))) {
    check_input_dtype(x);
    check_act(act, slope);
    dy = conform(dy_in, x, tl.L, "dy");
    if (act != kNone) {
      TORCH_CHECK(present(y_in), "bnfused_native: y (the forward output) is needed to differentiate the activation");
      y = conform(*y_in, x, tl.L, "y");
    }
  }
  template <typename T>
  const T* y_ptr() const {
    return y.defined() ? y.const_data_ptr<T>() : nullptr;
  }
};

// The one backward pass every op here uses. With `reduce`, the per-channel sums are computed into
// sum_g and sum_gxhat; without, the given ones are used. dx (when wanted) is the training-mode dx
// from those sums and `count` = M when `training`, else the eval-mode dx (k2 = k3 = 0).
template <typename T>
Tensor run_backward(const GradInputs& in, const Tensor& x, const optional<Tensor>& weight, const Tensor& mean,
                    const Tensor& invstd, bool reduce, std::vector<double>& sum_g, std::vector<double>& sum_gxhat,
                    double count, bool training, bool want_dx, int64_t act, double slope) {
  using A = acc_t<T>;
  const int64_t C = in.tl.L.c;
  const std::vector<A> mean_a = channel_values<A>(mean, C, A(0)), invstd_a = channel_values<A>(invstd, C, A(0));
  std::vector<A> k1 = channel_values<A>(weight, C, A(1)), k2(C, A(0)), k3(C, A(0));
  for (int64_t c = 0; c < C; ++c) k1[c] *= invstd_a[c];
  auto coefficients = [&](int64_t c) {
    if (!training) return;
    k2[c] = static_cast<A>(double(k1[c]) * sum_gxhat[c] / count);
    k3[c] = static_cast<A>(double(k1[c]) * sum_g[c] / count);
  };
  if (!reduce) {
    for (int64_t c = 0; c < C; ++c) coefficients(c);
  }
  auto finish = [&](int64_t c, double sum_g_c, double sum_gxhat_c) {
    sum_g[c] = sum_g_c;
    sum_gxhat[c] = sum_gxhat_c;
    coefficients(c);
  };
  Tensor dx = want_dx ? at::empty_like(x) : Tensor();
  grad_sums_then_input<T>(in.dy.const_data_ptr<T>(), x.const_data_ptr<T>(), in.y_ptr<T>(), in.tl, mean_a.data(),
                          invstd_a.data(), reduce, finish, k1.data(), k2.data(), k3.data(), training, act, slope,
                          want_dx ? dx.mutable_data_ptr<T>() : nullptr);
  return dx;
}

std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& dy, const Tensor& x, const optional<Tensor>& y,
                                            const optional<Tensor>& weight, const Tensor& mean, const Tensor& invstd,
                                            int64_t act, double slope, bool training, bool needs_input,
                                            bool needs_weight, bool needs_bias) {
  const GradInputs in(dy, x, y, act, slope);
  check_channel_arg(weight, x, "weight");
  check_stats_args(x, mean, invstd);
  const int64_t C = in.tl.L.c;
  const auto acc = acc_type(x.scalar_type());
  const bool reduce = needs_weight || needs_bias || (training && needs_input);
  std::vector<double> sum_g(C, 0.0), sum_gxhat(C, 0.0);
  Tensor dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_native::backward", [&] {
    dx = run_backward<scalar_t>(in, x, weight, mean, invstd, reduce, sum_g, sum_gxhat, double(in.tl.L.per_channel()),
                                training, needs_input, act, slope);
  });
  // Undefined (None in Python) unless asked for.
  return {dx, needs_weight ? channel_tensor(sum_gxhat, acc) : Tensor(), needs_bias ? channel_tensor(sum_g, acc) : Tensor()};
}

std::tuple<Tensor, Tensor> backward_reduce(const Tensor& dy, const Tensor& x, const optional<Tensor>& y,
                                           const Tensor& mean, const Tensor& invstd, int64_t act, double slope) {
  const GradInputs in(dy, x, y, act, slope);
  check_stats_args(x, mean, invstd);
  const int64_t C = in.tl.L.c;
  std::vector<double> sum_g(C), sum_gxhat(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_native::backward_reduce", [&] {
    run_backward<scalar_t>(in, x, std::nullopt, mean, invstd, true, sum_g, sum_gxhat, 1.0, false, false, act, slope);
  });
  const auto acc = acc_type(x.scalar_type());
  return {channel_tensor(sum_g, acc), channel_tensor(sum_gxhat, acc)};
}

Tensor backward_elemt(const Tensor& dy, const Tensor& x, const optional<Tensor>& y, const optional<Tensor>& weight,
                      const Tensor& mean, const Tensor& invstd, const Tensor& sum_dy, const Tensor& sum_dy_xhat,
                      int64_t count, int64_t act, double slope) {
  const GradInputs in(dy, x, y, act, slope);
  check_elemt_args(x, weight, mean, invstd, sum_dy, sum_dy_xhat, count);
  const int64_t C = in.tl.L.c;
  std::vector<double> sum_g = channel_values<double>(sum_dy, C, 0.0);
  std::vector<double> sum_gxhat = channel_values<double>(sum_dy_xhat, C, 0.0);
  Tensor dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_native::backward_elemt", [&] {
    dx = run_backward<scalar_t>(in, x, weight, mean, invstd, false, sum_g, sum_gxhat, double(count), true, true, act,
                                slope);
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
