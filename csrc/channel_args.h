// Checks and reads of the per-channel (C,) arguments shared by the CPU and CUDA op wrappers.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "activation.h"

namespace bnfused {

// float32 for float16/bfloat16/float32 inputs, float64 for float64: the dtype of every sum.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_input_dtype(const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "bnfused_native: x must be float16, bfloat16, float32 or float64, got ", t);
}

inline void check_channel_arg(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == x.size(1), "bnfused_native: ", name, " must have shape (",
              x.size(1), ",), got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), "bnfused_native: ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "bnfused_native: ", name, " must be floating point, got ",
              t.scalar_type());
}

inline void check_channel_arg(const std::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (t.has_value() && t->defined()) check_channel_arg(*t, x, name);
}

inline bool present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// The argument checks of each op, shared by its CPU and CUDA implementations.

inline void check_forward_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, int64_t act, double slope) {
  check_input_dtype(x);
  check_channel_arg(weight, x, "weight");
  check_channel_arg(bias, x, "bias");
  check_act(act, slope);
}

template <typename MaybeTensor>  // at::Tensor or std::optional<at::Tensor>
void check_running_args(const at::Tensor& x, const MaybeTensor& running_mean, const MaybeTensor& running_var) {
  check_channel_arg(running_mean, x, "running_mean");
  check_channel_arg(running_var, x, "running_var");
}

inline void check_stats_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd) {
  check_channel_arg(mean, x, "mean");
  check_channel_arg(invstd, x, "invstd");
}

inline void check_elemt_args(const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                             const at::Tensor& invstd, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat,
                             int64_t count) {
  check_channel_arg(weight, x, "weight");
  check_stats_args(x, mean, invstd);
  check_channel_arg(sum_dy, x, "sum_dy");
  check_channel_arg(sum_dy_xhat, x, "sum_dy_xhat");
  TORCH_CHECK(count > 0, "bnfused_native: count must be positive, got ", count);
}

}  // namespace bnfused
