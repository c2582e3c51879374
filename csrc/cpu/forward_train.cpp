// CPU forward ops of training mode: forward_train, batch_stats (schemas in ../bnfused.cpp).
// (The eval-mode ops are in forward_eval.cpp: a translation unit each, so that they compile in parallel.)
#include <ATen/MemoryOverlap.h>

#include "forward_common.h"

namespace bnfused::cpu {
namespace {

using at::Tensor;
using std::optional;

// 1 / sqrt(var + eps) for var = m2 * unscale^2 / M, with the scale taken out of the square root, so
// that a variance beyond double's range (|x| >~ 1e155) still gives its (representable) invstd.
double invstd_of(const Moments& mo, int64_t M, double eps) {
  // Unscaled (every channel but exact_moments' extremes): the same value without the two divisions by u.
  if (mo.unscale == 1.0) return 1.0 / std::sqrt(mo.m2 / double(M) + eps);
  const double u = mo.unscale, var_scaled = mo.m2 / double(M);
  return u >= 1.0 ? 1.0 / (u * std::sqrt(var_scaled + eps / u / u)) : 1.0 / std::sqrt(var_scaled * u * u + eps);
}

// torch updates the running stats before it normalises and adds the residual, so a running stat that
// is also x, the weight, the bias or the residual would change the output: refused rather than
// silently computed another way. Strided views whose overlap ATen cannot decide ("too hard") are
// refused when they share a storage.
void check_running_not_aliased(const optional<Tensor>& running, const char* name, const Tensor& x,
                               const optional<Tensor>& weight, const optional<Tensor>& bias,
                               const optional<Tensor>& residual) {
  if (!present(running)) return;
  const std::pair<const optional<Tensor>*, const char*> others[] = {
      {&weight, "weight"}, {&bias, "bias"}, {&residual, "residual"}};
  auto overlaps = [&](const Tensor& t) {
    const auto status = at::get_overlap_status(*running, t);
    return status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial ||
           (status == at::MemOverlapStatus::TooHard && running->storage().is_alias_of(t.storage()));
  };
  TORCH_CHECK(!overlaps(x), "bnfused_native: ", name, " shares memory with the input x; pass a separate tensor");
  for (const auto& [other, other_name] : others) {
    TORCH_CHECK(!present(*other) || !overlaps(**other), "bnfused_native: ", name, " shares memory with ", other_name,
                " (torch would use the updated values); pass separate tensors");
  }
}

// running <- (1 - momentum) * running + momentum * batch, in place.
void update_running(const optional<Tensor>& running, const std::vector<double>& batch, double momentum) {
  if (!present(running)) return;
  Tensor r = *running;
  const auto dtype = r.scalar_type();
  if ((dtype == at::kFloat || dtype == at::kDouble) && r.is_contiguous()) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "bnfused_native::update_running", [&] {
      scalar_t* p = r.mutable_data_ptr<scalar_t>();
      for (size_t c = 0; c < batch.size(); ++c) {
        p[c] = static_cast<scalar_t>((1.0 - momentum) * double(p[c]) + momentum * batch[c]);
      }
    });
  } else {  // float16/bfloat16 running stats: the same update, rounded once to their dtype (as torch's
            // kernels, which compute it in float; three operations in the 16-bit dtype would round thrice)
    r.copy_(r.to(at::kDouble).mul_(1.0 - momentum).add_(channel_tensor(batch, at::kDouble), momentum));
  }
}

std::tuple<Tensor, Tensor, Tensor> forward_train(const Tensor& x, const optional<Tensor>& weight,
                                                 const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                                                 const optional<Tensor>& running_var, double momentum, double eps,
                                                 int64_t act, double slope, const optional<Tensor>& residual) {
  check_forward_args(x, weight, bias, act, slope);
  check_running_args(x, running_mean, running_var);
  check_running_not_aliased(running_mean, "running_mean", x, weight, bias, residual);
  check_running_not_aliased(running_var, "running_var", x, weight, bias, residual);
  const Tiling tl = Tiling::of(ncs_of(x));
  const Tensor r = residual_of(residual, x, tl);
  const int64_t C = tl.L.c, M = tl.L.per_channel();
  std::vector<double> mean(C), m2(C);
  Tensor y, mean_out, invstd_out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_native::forward_train", [&] {
    using A = acc_t<scalar_t>;
    std::vector<A> mean_a(C), invstd_a(C), scale = channel_values<A>(weight, C, A(1));
    const std::vector<A> shift = channel_values<A>(bias, C, A(0));
    y = at::empty_like(x);
    auto finish = [&](int64_t c, const Moments& mo) {
      mean[c] = mo.mean;
      m2[c] = mo.m2 * mo.unscale * mo.unscale;  // inf past double's range: so is torch's running_var
      mean_a[c] = static_cast<A>(mo.mean);
      invstd_a[c] = static_cast<A>(invstd_of(mo, M, eps));
      scale[c] *= invstd_a[c];
    };
    stats_then_normalize<scalar_t>(x.const_data_ptr<scalar_t>(), tl, finish, mean_a.data(), scale.data(),
                                   shift.data(), act, slope, r.defined() ? r.const_data_ptr<scalar_t>() : nullptr,
                                   y.mutable_data_ptr<scalar_t>());
    mean_out = channel_tensor(mean_a, acc_type(x.scalar_type()));
    invstd_out = channel_tensor(invstd_a, acc_type(x.scalar_type()));
  });
  update_running(running_mean, mean, momentum);
  if (present(running_var)) {
    std::vector<double> unbiased(C);
    for (int64_t c = 0; c < C; ++c) unbiased[c] = m2[c] / double(M - 1);
    update_running(running_var, unbiased, momentum);
  }
  return {y, mean_out, invstd_out};
}

std::tuple<Tensor, Tensor> batch_stats(const Tensor& x) {
  check_input_dtype(x);
  const Tiling tl = Tiling::of(ncs_of(x));
  const int64_t C = tl.L.c;
  std::vector<double> mean(C), var(C);
  const double M = double(tl.L.per_channel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_native::batch_stats", [&] {
    auto finish = [&](int64_t c, const Moments& mo) {
      mean[c] = mo.mean;
      var[c] = mo.m2 / M * mo.unscale * mo.unscale;
    };
    channel_stats<scalar_t>(x.const_data_ptr<scalar_t>(), tl, finish);
  });
  const auto acc = acc_type(x.scalar_type());
  return {channel_tensor(mean, acc), channel_tensor(var, acc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfused_native, CPU, m) {
  m.impl("forward_train", &forward_train);
  m.impl("batch_stats", &batch_stats);
}

}  // namespace bnfused::cpu
