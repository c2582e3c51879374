// What the CPU forward ops share (forward_train.cpp, forward_eval.cpp).
#pragma once

#include <torch/library.h>

#include "../layout.h"
#include "channel_values.h"
#include "forward_kernels.h"

namespace bnfused::cpu {

// The residual brought to x's layout (undefined when absent), so that the kernels read it with x's offsets.
inline at::Tensor residual_of(const std::optional<at::Tensor>& residual, const at::Tensor& x, const Tiling& tl) {
  if (!present(residual)) return at::Tensor();
  TORCH_CHECK(residual->device() == x.device(), "bnfused_native: residual is on ", residual->device(),
              " but x is on ", x.device());
  return conform(*residual, x, tl.L, "residual");
}

}  // namespace bnfused::cpu
