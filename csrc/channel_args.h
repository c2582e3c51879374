// Checks and reads of the per-channel (C,) arguments shared by the CPU and CUDA op wrappers.
#pragma once

#include <ATen/ATen.h>

#include <optional>

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

}  // namespace bnfused
