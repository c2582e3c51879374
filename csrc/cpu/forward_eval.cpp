// CPU forward ops with known statistics: forward_eval, normalize (schemas in ../bnfused.cpp).
#include "forward_common.h"

namespace bnfused::cpu {
namespace {

using at::Tensor;
using std::optional;

// y = act((x - mean) * invstd * weight + bias (+ residual)) with per-channel A arrays mean and invstd;
// residual is undefined or kernel-ready (see residual_of).
template <typename T>
Tensor normalize_with(const Tensor& x, const Tiling& tl, const std::vector<acc_t<T>>& mean,
                      const std::vector<acc_t<T>>& invstd, const optional<Tensor>& weight,
                      const optional<Tensor>& bias, int64_t act, double slope, const Tensor& residual) {
  using A = acc_t<T>;
  const int64_t C = tl.L.c;
  std::vector<A> scale = channel_values<A>(weight, C, A(1));
  for (int64_t c = 0; c < C; ++c) scale[c] *= invstd[c];
  const std::vector<A> shift = channel_values<A>(bias, C, A(0));
  Tensor y = at::empty_like(x);
  normalize<T>(x.const_data_ptr<T>(), tl, mean.data(), scale.data(), shift.data(), act, slope,
               residual.defined() ? residual.const_data_ptr<T>() : nullptr, y.mutable_data_ptr<T>());
  return y;
}

Tensor forward_eval(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                    const Tensor& running_mean, const Tensor& running_var, double eps, int64_t act, double slope,
                    const optional<Tensor>& residual) {
  check_forward_args(x, weight, bias, act, slope);
  check_running_args(x, running_mean, running_var);
  const Tiling tl = Tiling::of(ncs_of(x));
  const Tensor r = residual_of(residual, x, tl);
  const int64_t C = tl.L.c;
  Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_native::forward_eval", [&] {
    using A = acc_t<scalar_t>;
    const std::vector<A> mean = channel_values<A>(running_mean, C, A(0));
    std::vector<A> invstd = channel_values<A>(running_var, C, A(0));
    // In double, as torch: a float eps of 1e-45 would round to a subnormal.
    for (int64_t c = 0; c < C; ++c) invstd[c] = static_cast<A>(1.0 / std::sqrt(double(invstd[c]) + eps));
    y = normalize_with<scalar_t>(x, tl, mean, invstd, weight, bias, act, slope, r);
  });
  return y;
}

Tensor normalize_op(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                    const Tensor& mean, const Tensor& invstd, int64_t act, double slope) {
  check_forward_args(x, weight, bias, act, slope);
  check_stats_args(x, mean, invstd);
  const Tiling tl = Tiling::of(ncs_of(x));
  Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_native::normalize", [&] {
    using A = acc_t<scalar_t>;
    y = normalize_with<scalar_t>(x, tl, channel_values<A>(mean, tl.L.c, A(0)),
                                 channel_values<A>(invstd, tl.L.c, A(0)), weight, bias, act, slope, Tensor());
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfused_native, CPU, m) {
  m.impl("forward_eval", &forward_eval);
  m.impl("normalize", &normalize_op);
}

}  // namespace bnfused::cpu
