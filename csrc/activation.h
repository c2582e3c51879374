// Activation codes shared with Python (bnfused/activation.py): the ops take them as an int.
#pragma once

#include <c10/util/Exception.h>

#include <type_traits>

namespace bnfused {

enum Act : int64_t { kNone = 0, kRelu = 1, kLeakyRelu = 2, kRelu6 = 3, kHardswish = 4, kSilu = 5, kSigmoid = 6 };

inline void check_act(int64_t act, double slope) {
  TORCH_CHECK(act >= kNone && act <= kSigmoid,
              "bnfused_native: act must be 0 (none), 1 (relu), 2 (leaky_relu), 3 (relu6), 4 (hardswish), 5 "
              "(silu) or 6 (sigmoid), got ",
              act);
  // The backward recovers act' from the saved output (y > 0 exactly where z > 0): needs slope >= 0.
  TORCH_CHECK(slope >= 0.0, "bnfused_native: leaky_relu slope must be >= 0, got ", slope);
}

// relu, leaky_relu and relu6 read act' off the saved output y (0 < y exactly where 0 < z, and
// 0 < y < 6 exactly where 0 < z < 6); hardswish, silu and sigmoid recompute z from x (and bias, residual).
constexpr bool grad_from_output(int64_t act) { return act == kRelu || act == kLeakyRelu || act == kRelu6; }
constexpr bool grad_from_input(int64_t act) { return act == kHardswish || act == kSilu || act == kSigmoid; }

// Calls f(std::integral_constant<int, act>) so that kernels are specialised per activation.
template <typename F>
decltype(auto) with_act(int64_t act, F&& f) {
  switch (act) {
    case kRelu:
      return f(std::integral_constant<int, kRelu>{});
    case kLeakyRelu:
      return f(std::integral_constant<int, kLeakyRelu>{});
    case kRelu6:
      return f(std::integral_constant<int, kRelu6>{});
    case kHardswish:
      return f(std::integral_constant<int, kHardswish>{});
    case kSilu:
      return f(std::integral_constant<int, kSilu>{});
    case kSigmoid:
      return f(std::integral_constant<int, kSigmoid>{});
    default:
      return f(std::integral_constant<int, kNone>{});
  }
}

}  // namespace bnfused
