// Activation codes shared with Python (bnfused/activation.py): the ops take them as an int.
#pragma once

#include <c10/util/Exception.h>

#include <type_traits>

namespace bnfused {

enum Act : int64_t { kNone = 0, kRelu = 1, kLeakyRelu = 2 };

inline void check_act(int64_t act, double slope) {
  TORCH_CHECK(act == kNone || act == kRelu || act == kLeakyRelu,
              "bnfused_native: act must be 0 (none), 1 (relu) or 2 (leaky_relu), got ", act);
  // The backward recovers act' from the saved output (y > 0 exactly where z > 0): needs slope >= 0.
  TORCH_CHECK(slope >= 0.0, "bnfused_native: leaky_relu slope must be >= 0, got ", slope);
}

// Calls f(std::integral_constant<int, act>) so that kernels are specialised per activation.
template <typename F>
decltype(auto) with_act(int64_t act, F&& f) {
  switch (act) {
    case kRelu:
      return f(std::integral_constant<int, kRelu>{});
    case kLeakyRelu:
      return f(std::integral_constant<int, kLeakyRelu>{});
    default:
      return f(std::integral_constant<int, kNone>{});
  }
}

}  // namespace bnfused
