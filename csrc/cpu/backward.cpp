// CPU backward ops: backward, backward_reduce, backward_elemt (schemas in ../bnfused.cpp).
//
// With g = dy * act'(z), x_hat = (x - mean) * invstd and M values per channel:
//   dbias = sum(g)            dweight = sum(g * x_hat) = invstd * sum(g * (x - mean))
//   training: dx = w * invstd * (g - dbias / M - x_hat * dweight / M)
//               = g * k1 - (x - mean) * k2 - k3,  k1 = w * invstd, k2 = k1 * invstd * dweight / M,
//                                                  k3 = k1 * dbias / M
//   eval:     dx = g * k1                          (k2 = k3 = 0: the stats are constants)
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

// Per-channel (sum(g), sum(g * x_hat)) in double.
template <typename T>
std::pair<std::vector<double>, std::vector<double>> reduce(const GradInputs& in, const Tensor& x,
                                                           const std::vector<acc_t<T>>& mean,
                                                           const std::vector<acc_t<T>>& invstd, int64_t act,
                                                           double slope) {
  const int64_t C = in.tl.L.c;
  std::vector<double> sum_g(C), sum_gx(C);
  grad_sums<T>(in.dy.const_data_ptr<T>(), x.const_data_ptr<T>(), in.y_ptr<T>(), in.tl, mean.data(), act, slope,
               sum_g.data(), sum_gx.data());
  for (int64_t c = 0; c < C; ++c) sum_gx[c] *= double(invstd[c]);
  return {sum_g, sum_gx};
}

// dx from the per-channel sums; `count` is M (zero sums and any count give the eval-mode dx).
template <typename T>
Tensor elemt(const GradInputs& in, const Tensor& x, const optional<Tensor>& weight, const std::vector<acc_t<T>>& mean,
             const std::vector<acc_t<T>>& invstd, const std::vector<double>& sum_g, const std::vector<double>& sum_gxhat,
             double count, int64_t act, double slope) {
  using A = acc_t<T>;
  const int64_t C = in.tl.L.c;
  std::vector<A> k1 = channel_values<A>(weight, C, A(1)), k2(C), k3(C);
  for (int64_t c = 0; c < C; ++c) {
    k1[c] *= invstd[c];
    k2[c] = static_cast<A>(double(k1[c]) * double(invstd[c]) * sum_gxhat[c] / count);
    k3[c] = static_cast<A>(double(k1[c]) * sum_g[c] / count);
  }
  Tensor dx = at::empty_like(x);
  grad_input<T>(in.dy.const_data_ptr<T>(), x.const_data_ptr<T>(), in.y_ptr<T>(), in.tl, mean.data(), k1.data(),
                k2.data(), k3.data(), act, slope, dx.mutable_data_ptr<T>());
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
  Tensor dx, dweight, dbias;  // undefined (None in Python) unless asked for
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_native::backward", [&] {
    using A = acc_t<scalar_t>;
    const std::vector<A> mean_a = channel_values<A>(mean, C, A(0)), invstd_a = channel_values<A>(invstd, C, A(0));
    std::vector<double> sum_g(C, 0.0), sum_gxhat(C, 0.0);
    if (needs_weight || needs_bias || (training && needs_input)) {
      std::tie(sum_g, sum_gxhat) = reduce<scalar_t>(in, x, mean_a, invstd_a, act, slope);
      if (needs_weight) dweight = channel_tensor(sum_gxhat, acc);
      if (needs_bias) dbias = channel_tensor(sum_g, acc);
    }
    if (needs_input) {
      if (!training) std::fill(sum_g.begin(), sum_g.end(), 0.0), std::fill(sum_gxhat.begin(), sum_gxhat.end(), 0.0);
      dx = elemt<scalar_t>(in, x, weight, mean_a, invstd_a, sum_g, sum_gxhat, double(in.tl.L.per_channel()), act,
                           slope);
    }
  });
  return {dx, dweight, dbias};
}

std::tuple<Tensor, Tensor> backward_reduce(const Tensor& dy, const Tensor& x, const optional<Tensor>& y,
                                           const Tensor& mean, const Tensor& invstd, int64_t act, double slope) {
  const GradInputs in(dy, x, y, act, slope);
  check_stats_args(x, mean, invstd);
  const int64_t C = in.tl.L.c;
  const auto acc = acc_type(x.scalar_type());
  Tensor sum_g, sum_gxhat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_native::backward_reduce", [&] {
    using A = acc_t<scalar_t>;
    auto sums = reduce<scalar_t>(in, x, channel_values<A>(mean, C, A(0)), channel_values<A>(invstd, C, A(0)), act, slope);
    sum_g = channel_tensor(sums.first, acc);
    sum_gxhat = channel_tensor(sums.second, acc);
  });
  return {sum_g, sum_gxhat};
}

Tensor backward_elemt(const Tensor& dy, const Tensor& x, const optional<Tensor>& y, const optional<Tensor>& weight,
                      const Tensor& mean, const Tensor& invstd, const Tensor& sum_dy, const Tensor& sum_dy_xhat,
                      int64_t count, int64_t act, double slope) {
  const GradInputs in(dy, x, y, act, slope);
  check_elemt_args(x, weight, mean, invstd, sum_dy, sum_dy_xhat, count);
  const int64_t C = in.tl.L.c;
  Tensor dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_native::backward_elemt", [&] {
    using A = acc_t<scalar_t>;
    dx = elemt<scalar_t>(in, x, weight, channel_values<A>(mean, C, A(0)), channel_values<A>(invstd, C, A(0)),
                         channel_values<double>(sum_dy, C, 0.0), channel_values<double>(sum_dy_xhat, C, 0.0),
                         double(count), act, slope);
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
