// (C,) arguments read into plain arrays of the accumulation type, and (C,) results written back.
// C is small, so a scalar loop beats a dispatched at::Tensor::to() call by microseconds per op.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>
#include <vector>

#include "../channel_args.h"

namespace bnfused::cpu {

// The values of a (C,) tensor of any floating dtype as A; `fill` repeated when t is absent.
template <typename A>
std::vector<A> channel_values(const std::optional<at::Tensor>& t, int64_t C, A fill) {
  std::vector<A> out(C, fill);
  if (!present(t)) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "bnfused_native::channel_values", [&] {
    const scalar_t* p = t->const_data_ptr<scalar_t>();
    const int64_t stride = t->stride(0);
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<A>(p[c * stride]);
  });
  return out;
}

// A new (C,) tensor of dtype `dtype` on the CPU holding values (any arithmetic element type).
template <typename V>
at::Tensor channel_tensor(const std::vector<V>& values, at::ScalarType dtype) {
  at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "bnfused_native::channel_tensor", [&] {
    scalar_t* p = out.mutable_data_ptr<scalar_t>();
    for (size_t c = 0; c < values.size(); ++c) p[c] = static_cast<scalar_t>(values[c]);
  });
  return out;
}

}  // namespace bnfused::cpu
