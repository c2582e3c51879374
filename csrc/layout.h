// The (N, C, S) view every kernel indexes, and the checks that make a tensor kernel-ready.
// Mirrors bnfused/layout.py: contiguous, channels_last(_3d) and (N, L, C)-as-(N, C, L) tensors
// are all one N x C x S grid with three strides, so no kernel ever needs a copy of its input.
#pragma once

#include <ATen/ATen.h>

namespace bnfused {

struct Ncs {
  int64_t n, c, s;     // batch, channels, flattened spatial size
  int64_t sn, sc, ss;  // element strides of the three axes

  int64_t numel() const { return n * c * s; }
  int64_t per_channel() const { return n * s; }  // M: the values each channel's statistics cover
};

// Stride between consecutive flattened spatial positions, or -1 when the spatial dims don't collapse.
inline int64_t spatial_stride(const at::Tensor& x) {
  int64_t stride = -1, expected = -1;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    const int64_t size = x.size(d);
    if (size == 1) continue;  // a size-1 dim's stride is arbitrary and never used
    if (stride < 0) {
      stride = x.stride(d);
      expected = stride * size;
    } else if (x.stride(d) != expected) {
      return -1;
    } else {
      expected *= size;
    }
  }
  return stride < 0 ? 1 : stride;
}

// The (N, C, S) view of x; raises a clear error for layouts the kernels cannot index.
inline Ncs ncs_of(const at::Tensor& x, const char* name = "x") {
  TORCH_CHECK(x.dim() >= 2, "bnfused_native: ", name, " must be (N, C, *), got ", x.dim(), " dims");
  TORCH_CHECK(x.numel() > 0, "bnfused_native: ", name, " must not be empty");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "bnfused_native: ", name,
              " must be dense (contiguous or channels_last), got strides ", x.strides());
  const int64_t ss = spatial_stride(x);
  TORCH_CHECK(ss >= 0, "bnfused_native: ", name, "'s spatial dims do not collapse to one stride (strides ",
              x.strides(), "); pass a contiguous or channels_last tensor");
  const int64_t n = x.size(0), c = x.size(1);
  return {n, c, x.numel() / (n * c), x.stride(0), x.stride(1), ss};
}

// t itself when it can be indexed with x's (N, C, S) offsets, else a copy with x's layout.
inline at::Tensor conform(const at::Tensor& t, const at::Tensor& x, const Ncs& lx, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), "bnfused_native: ", name, " must have x's shape ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "bnfused_native: ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  if (t.is_non_overlapping_and_dense()) {
    const int64_t ss = spatial_stride(t);
    const bool same = (lx.n == 1 || t.stride(0) == lx.sn) && (lx.c == 1 || t.stride(1) == lx.sc) &&
                      (lx.s == 1 || ss == lx.ss);
    if (same) return t;
  }
  return at::empty_like(x).copy_(t);
}

}  // namespace bnfused
