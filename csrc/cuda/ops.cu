// CUDA implementations of the bnfused_native ops (schemas in ../bnfused.cpp; formulas as in
// ../cpu/backward.cpp and bnfused/backends/reference.py). Kernels are in kernels.cuh.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which a
// minimal CUDA toolkit (compiler + runtime) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../channel_args.h"
#include "kernels.cuh"

namespace bnfused::cuda {
namespace {

using at::Tensor;
using std::optional;

constexpr int64_t kRowsPerThread = 16;  // rows a reduction thread walks before the tree
constexpr int64_t kMaxChunks = 1024;    // bounds the partial buffers and the stage-2 loop

// Thread shape and chunking of a two-stage reduction over x's (N, C, S) grid.
Grid2 reduction_shape(const Ncs& L, dim3& grid) {
  Grid2 g{L, 0, 1, kThreads};
  const bool spatial_contiguous = L.s > 1 && L.ss == 1;
  if (!spatial_contiguous && (L.sc == 1 || L.c == 1)) {
    g.bx = kRowChannels;
    g.by = kThreads / kRowChannels;
  }
  const int64_t M = L.n * L.s;
  g.chunk = std::max<int64_t>(g.by * kRowsPerThread, (M + kMaxChunks - 1) / kMaxChunks);
  const int64_t channel_blocks = (L.c + g.bx - 1) / g.bx;
  TORCH_CHECK(channel_blocks <= 65535, "bnfused_native: too many channels for the CUDA kernels: ", L.c);
  grid = dim3(static_cast<unsigned>((M + g.chunk - 1) / g.chunk), static_cast<unsigned>(channel_blocks));
  return g;
}

int elementwise_blocks(int64_t numel) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t most = int64_t(sms) * 32;  // enough blocks to fill the GPU; the kernels grid-stride
  return static_cast<int>(std::min<int64_t>((numel + kThreads - 1) / kThreads, most));
}

// A (C,) argument as a contiguous tensor of the accumulation dtype (undefined when absent).
Tensor as_acc(const optional<Tensor>& t, at::ScalarType acc) {
  if (!present(t)) return Tensor();
  return t->to(acc).contiguous();
}

// The stride the elementwise kernels divide by: a size-1 channel dim may carry any stride, even 0.
int64_t channel_stride(const Ncs& L) {
  return L.c == 1 ? 1 : L.sc;
}

template <typename A>
const A* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<A>() : nullptr;
}

// An (N, C, *) argument read with x's offsets (dy, y, residual): t itself, or a copy in x's layout.
Tensor like_x(const Tensor& t, const Tensor& x, const Ncs& L, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "bnfused_native: ", name, " is on ", t.device(), " but x is on ",
              x.device());
  return conform(t, x, L, name);
}

Tensor optional_like_x(const optional<Tensor>& t, const Tensor& x, const Ncs& L, const char* name) {
  return present(t) ? like_x(*t, x, L, name) : Tensor();
}

// The kernels' view of z's terms; the tensors must outlive the launch.
template <typename T>
LayerTerms<T> layer_terms(const Tensor& mean, const Tensor& invstd, const Tensor& w, const Tensor& b,
                          const Tensor& residual) {
  using A = acc_t<T>;
  return {mean.const_data_ptr<A>(), invstd.const_data_ptr<A>(), ptr_or_null<A>(w), ptr_or_null<A>(b),
          ptr_or_null<T>(residual)};
}

// Calls f(index type) with int32_t when every offset of x fits, else int64_t.
template <typename F>
void with_index(int64_t numel, F&& f) {
  if (numel <= std::numeric_limits<int32_t>::max()) {
    f(int32_t{0});
  } else {
    f(int64_t{0});
  }
}

struct Stats {
  Tensor mean, var, invstd;
};

// Per-channel mean, biased var and invstd of x; updates running stats of the accumulation dtype
// inside the kernel, others (float16 running stats) afterwards with the same formula.
Stats batch_statistics(const Tensor& x, const Ncs& L, double eps, double momentum, const optional<Tensor>& rm,
                       const optional<Tensor>& rv) {
  const auto acc = acc_type(x.scalar_type());
  const auto opts = x.options().dtype(acc);
  Stats st{at::empty({L.c}, opts), at::empty({L.c}, opts), at::empty({L.c}, opts)};
  dim3 grid;
  const Grid2 g = reduction_shape(L, grid);
  Tensor part = at::empty({2, int64_t(grid.x), L.c}, opts);
  auto direct = [&](const optional<Tensor>& r) { return present(r) && r->scalar_type() == acc && r->is_contiguous(); };
  const bool rm_direct = direct(rm), rv_direct = direct(rv);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_native::stats", [&] {
    using A = acc_t<scalar_t>;
    A* pm = part[0].mutable_data_ptr<A>();
    A* pq = part[1].mutable_data_ptr<A>();
    stats_partial<scalar_t><<<grid, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), g, pm, pq);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int threads = 128;
    stats_finalize<A, A><<<unsigned((L.c + threads - 1) / threads), threads, 0, stream>>>(
        pm, pq, int64_t(grid.x), g.chunk, L.c, L.per_channel(), eps, momentum, st.mean.mutable_data_ptr<A>(),
        st.var.mutable_data_ptr<A>(), st.invstd.mutable_data_ptr<A>(),
        rm_direct ? rm->mutable_data_ptr<A>() : nullptr, rv_direct ? rv->mutable_data_ptr<A>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t M = L.per_channel();
  if (present(rm) && !rm_direct) rm->mul_(1.0 - momentum).add_(st.mean.to(rm->scalar_type()), momentum);
  if (present(rv) && !rv_direct) {
    rv->mul_(1.0 - momentum).add_((st.var * (double(M) / double(M - 1))).to(rv->scalar_type()), momentum);
  }
  return st;
}

// residual: undefined, or in x's layout (like_x).
Tensor normalize_impl(const Tensor& x, const Ncs& L, const Tensor& mean, const Tensor& invstd,
                      const optional<Tensor>& weight, const optional<Tensor>& bias, const Tensor& residual,
                      int64_t act, double slope) {
  const auto acc = acc_type(x.scalar_type());
  const Tensor w = as_acc(weight, acc), b = as_acc(bias, acc);
  const Tensor mean_a = mean.to(acc).contiguous(), invstd_a = invstd.to(acc).contiguous();
  Tensor y = at::empty_like(x);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_native::normalize", [&] {
    using A = acc_t<scalar_t>;
    with_act(act, [&](auto act_c) {
      with_index(x.numel(), [&](auto index) {
        using I = decltype(index);
        normalize_kernel<scalar_t, decltype(act_c)::value, I><<<elementwise_blocks(x.numel()), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), I(x.numel()), I(channel_stride(L)), I(L.c),
            layer_terms<scalar_t>(mean_a, invstd_a, w, b, residual), static_cast<A>(slope));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> forward_train(const Tensor& x, const optional<Tensor>& weight,
                                                 const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                                                 const optional<Tensor>& running_var, double momentum, double eps,
                                                 int64_t act, double slope, const optional<Tensor>& residual) {
  check_forward_args(x, weight, bias, act, slope);
  check_running_args(x, running_mean, running_var);
  const c10::cuda::CUDAGuard guard(x.device());
  const Ncs L = ncs_of(x);
  const Tensor r = optional_like_x(residual, x, L, "residual");
  Stats st = batch_statistics(x, L, eps, momentum, running_mean, running_var);
  return {normalize_impl(x, L, st.mean, st.invstd, weight, bias, r, act, slope), st.mean, st.invstd};
}

Tensor forward_eval(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                    const Tensor& running_mean, const Tensor& running_var, double eps, int64_t act, double slope,
                    const optional<Tensor>& residual) {
  check_forward_args(x, weight, bias, act, slope);
  check_running_args(x, running_mean, running_var);
  const c10::cuda::CUDAGuard guard(x.device());
  const Ncs L = ncs_of(x);
  // invstd in double, rounded once (as the CPU kernels and reference.eval_stats): the backward of
  // hardswish and silu recomputes z from the invstd its caller saved, which must be this one.
  const Tensor invstd = at::rsqrt(running_var.to(at::kDouble) + eps).to(acc_type(x.scalar_type()));
  return normalize_impl(x, L, running_mean, invstd, weight, bias, optional_like_x(residual, x, L, "residual"), act,
                        slope);
}

std::tuple<Tensor, Tensor> batch_stats(const Tensor& x) {
  check_input_dtype(x);
  const c10::cuda::CUDAGuard guard(x.device());
  Stats st = batch_statistics(x, ncs_of(x), 0.0, 0.0, std::nullopt, std::nullopt);
  return {st.mean, st.var};
}

Tensor normalize_op(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias, const Tensor& mean,
                    const Tensor& invstd, int64_t act, double slope) {
  check_forward_args(x, weight, bias, act, slope);
  check_stats_args(x, mean, invstd);
  const c10::cuda::CUDAGuard guard(x.device());
  return normalize_impl(x, ncs_of(x), mean, invstd, weight, bias, Tensor(), act, slope);
}

// What the backward kernels read besides x, in x's layout: dy; y for relu, leaky_relu and relu6;
// for hardswish and silu, z's bias and residual (undefined when the forward had none).
struct GradInputs {
  Ncs L;
  Tensor dy, y, bias, residual;

  GradInputs(const Tensor& dy_in, const Tensor& x, const optional<Tensor>& y_in, int64_t act, double slope,
             const optional<Tensor>& bias_in = std::nullopt, const optional<Tensor>& residual_in = std::nullopt)
      : L(ncs_of(x)) {
    check_input_dtype(x);
    check_act(act, slope);
    check_channel_arg(bias_in, x, "bias");
    dy = like_x(dy_in, x, L, "dy");
    if (grad_from_output(act)) {
      TORCH_CHECK(present(y_in), "bnfused_native: y (the forward output) is needed to differentiate the activation");
      y = like_x(*y_in, x, L, "y");
    }
    if (grad_from_input(act)) {
      bias = as_acc(bias_in, acc_type(x.scalar_type()));
      residual = optional_like_x(residual_in, x, L, "residual");
    }
  }

  template <typename T>
  GradTerms<T> terms(const Tensor& x, const Tensor& mean, const Tensor& invstd, const Tensor& w, double slope) const {
    return {dy.const_data_ptr<T>(), x.const_data_ptr<T>(), ptr_or_null<T>(y),
            layer_terms<T>(mean, invstd, w, bias, residual), static_cast<acc_t<T>>(slope)};
  }
};

// The split backward (SyncBatchNorm) has no bias or residual to recompute z from.
void check_split_backward_act(int64_t act) {
  TORCH_CHECK(!grad_from_input(act), "bnfused_native: backward_reduce and backward_elemt take activations 0 (none), "
              "1 (relu), 2 (leaky_relu) or 3 (relu6), got ", act, "; hardswish and silu need backward's bias and "
              "residual");
}

std::tuple<Tensor, Tensor> reduce_impl(const GradInputs& in, const Tensor& x, const optional<Tensor>& weight,
                                       const Tensor& mean, const Tensor& invstd, int64_t act, double slope) {
  const auto acc = acc_type(x.scalar_type());
  const auto opts = x.options().dtype(acc);
  // weight enters only z, recomputed for hardswish and silu; the sums are of g and g * (x - mean).
  const Tensor w = grad_from_input(act) ? as_acc(weight, acc) : Tensor();
  const Tensor mean_a = mean.to(acc).contiguous(), invstd_a = invstd.to(acc).contiguous();
  dim3 grid;
  const Grid2 g = reduction_shape(in.L, grid);
  Tensor part = at::empty({2, int64_t(grid.x), in.L.c}, opts);
  Tensor sum_g = at::empty({in.L.c}, opts), sum_gxhat = at::empty({in.L.c}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_native::backward_reduce", [&] {
    using A = acc_t<scalar_t>;
    A* pg = part[0].mutable_data_ptr<A>();
    A* pgx = part[1].mutable_data_ptr<A>();
    with_act(act, [&](auto act_c) {
      grad_partial<scalar_t, decltype(act_c)::value><<<grid, kThreads, 0, stream>>>(
          in.terms<scalar_t>(x, mean_a, invstd_a, w, slope), g, pg, pgx);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const int threads = 128;
    grad_finalize<A><<<unsigned((in.L.c + threads - 1) / threads), threads, 0, stream>>>(
        pg, pgx, int64_t(grid.x), in.L.c, invstd_a.const_data_ptr<A>(), sum_g.mutable_data_ptr<A>(),
        sum_gxhat.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_g, sum_gxhat};
}

// dx (when write_dx; eval mode when sum_g / sum_gxhat are undefined) and dresidual = g (when
// write_dresidual), both in x's layout, from one pass.
std::tuple<Tensor, Tensor> elemt_impl(const GradInputs& in, const Tensor& x, const optional<Tensor>& weight,
                                      const Tensor& mean, const Tensor& invstd, const Tensor& sum_g,
                                      const Tensor& sum_gxhat, double count, int64_t act, double slope, bool write_dx,
                                      bool write_dresidual) {
  if (!write_dx && !write_dresidual) return {};
  const auto acc = acc_type(x.scalar_type());
  const Tensor w = as_acc(weight, acc);
  const Tensor mean_a = mean.to(acc).contiguous(), invstd_a = invstd.to(acc).contiguous();
  const Tensor sg = sum_g.defined() ? sum_g.to(acc).contiguous() : Tensor();
  const Tensor sgx = sum_gxhat.defined() ? sum_gxhat.to(acc).contiguous() : Tensor();
  Tensor dx = write_dx ? at::empty_like(x) : Tensor();
  Tensor dresidual = write_dresidual ? at::empty_like(x) : Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_native::backward_elemt", [&] {
    using A = acc_t<scalar_t>;
    auto out = [](Tensor& t) { return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr; };
    with_act(act, [&](auto act_c) {
      with_index(x.numel(), [&](auto index) {
        using I = decltype(index);
        grad_input_kernel<scalar_t, decltype(act_c)::value, I><<<elementwise_blocks(x.numel()), kThreads, 0, stream>>>(
            in.terms<scalar_t>(x, mean_a, invstd_a, w, slope), out(dx), out(dresidual), I(x.numel()),
            I(channel_stride(in.L)), I(in.L.c), ptr_or_null<A>(sg), ptr_or_null<A>(sgx), static_cast<A>(1.0 / count));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {dx, dresidual};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Tensor& dy, const Tensor& x, const optional<Tensor>& y,
                                                    const optional<Tensor>& weight, const Tensor& mean,
                                                    const Tensor& invstd, int64_t act, double slope, bool training,
                                                    bool needs_input, bool needs_weight, bool needs_bias,
                                                    const optional<Tensor>& bias, const optional<Tensor>& residual,
                                                    bool needs_residual) {
  check_channel_arg(weight, x, "weight");
  check_stats_args(x, mean, invstd);
  const c10::cuda::CUDAGuard guard(x.device());
  const GradInputs in(dy, x, y, act, slope, bias, residual);
  Tensor sum_g, sum_gxhat;
  if (needs_weight || needs_bias || (training && needs_input)) {
    std::tie(sum_g, sum_gxhat) = reduce_impl(in, x, weight, mean, invstd, act, slope);
  }
  // With no activation g is dy itself (already in x's layout): no pass writes it.
  const bool write_dresidual = needs_residual && act != kNone;
  // In eval mode the statistics are constants: dx takes no sums.
  auto [dx, dresidual] = elemt_impl(in, x, weight, mean, invstd, training ? sum_g : Tensor(),
                                    training ? sum_gxhat : Tensor(), double(in.L.per_channel()), act, slope,
                                    needs_input, write_dresidual);
  if (needs_residual && act == kNone) dresidual = in.dy;
  return {dx, needs_weight ? sum_gxhat : Tensor(), needs_bias ? sum_g : Tensor(), dresidual};
}

std::tuple<Tensor, Tensor> backward_reduce(const Tensor& dy, const Tensor& x, const optional<Tensor>& y,
                                           const Tensor& mean, const Tensor& invstd, int64_t act, double slope) {
  check_stats_args(x, mean, invstd);
  check_split_backward_act(act);
  const c10::cuda::CUDAGuard guard(x.device());
  return reduce_impl(GradInputs(dy, x, y, act, slope), x, std::nullopt, mean, invstd, act, slope);
}

Tensor backward_elemt(const Tensor& dy, const Tensor& x, const optional<Tensor>& y, const optional<Tensor>& weight,
                      const Tensor& mean, const Tensor& invstd, const Tensor& sum_dy, const Tensor& sum_dy_xhat,
                      int64_t count, int64_t act, double slope) {
  check_elemt_args(x, weight, mean, invstd, sum_dy, sum_dy_xhat, count);
  check_split_backward_act(act);
  const c10::cuda::CUDAGuard guard(x.device());
  return std::get<0>(elemt_impl(GradInputs(dy, x, y, act, slope), x, weight, mean, invstd, sum_dy, sum_dy_xhat,
                                double(count), act, slope, true, false));
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfused_native, CUDA, m) {
  m.impl("forward_train", &forward_train);
  m.impl("forward_eval", &forward_eval);
  m.impl("backward", &backward);
  m.impl("batch_stats", &batch_stats);
  m.impl("normalize", &normalize_op);
  m.impl("backward_reduce", &backward_reduce);
  m.impl("backward_elemt", &backward_elemt);
}

}  // namespace bnfused::cuda
