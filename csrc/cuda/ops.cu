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

Tensor normalize_impl(const Tensor& x, const Ncs& L, const Tensor& mean, const Tensor& invstd,
                      const optional<Tensor>& weight, const optional<Tensor>& bias, int64_t act, double slope) {
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
            mean_a.const_data_ptr<A>(), invstd_a.const_data_ptr<A>(), ptr_or_null<A>(w), ptr_or_null<A>(b),
            static_cast<A>(slope));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> forward_train(const Tensor& x, const optional<Tensor>& weight,
                                                 const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                                                 const optional<Tensor>& running_var, double momentum, double eps,
                                                 int64_t act, double slope) {
  check_forward_args(x, weight, bias, act, slope);
  check_running_args(x, running_mean, running_var);
  const c10::cuda::CUDAGuard guard(x.device());
  const Ncs L = ncs_of(x);
  Stats st = batch_statistics(x, L, eps, momentum, running_mean, running_var);
  return {normalize_impl(x, L, st.mean, st.invstd, weight, bias, act, slope), st.mean, st.invstd};
}

Tensor forward_eval(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                    const Tensor& running_mean, const Tensor& running_var, double eps, int64_t act, double slope) {
  check_forward_args(x, weight, bias, act, slope);
  check_running_args(x, running_mean, running_var);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type(x.scalar_type());
  return normalize_impl(x, ncs_of(x), running_mean, at::rsqrt(running_var.to(acc) + eps), weight, bias, act, slope);
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
  return normalize_impl(x, ncs_of(x), mean, invstd, weight, bias, act, slope);
}

// dy and y (when an activation is fused) in x's layout.
struct GradInputs {
  Ncs L;
  Tensor dy, y;

  GradInputs(const Tensor& dy_in, const Tensor& x, const optional<Tensor>& y_in, int64_t act, double slope)
      : L(ncs_of(x)) {
    check_input_dtype(x);
    check_act(act, slope);
    dy = conform(dy_in, x, L, "dy");
    if (act != kNone) {
      TORCH_CHECK(present(y_in), "bnfused_native: y (the forward output) is needed to differentiate the activation");
      y = conform(*y_in, x, L, "y");
    }
  }
};

std::tuple<Tensor, Tensor> reduce_impl(const GradInputs& in, const Tensor& x, const Tensor& mean,
                                       const Tensor& invstd, int64_t act, double slope) {
  const auto acc = acc_type(x.scalar_type());
  const auto opts = x.options().dtype(acc);
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
          in.dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
          in.y.defined() ? in.y.const_data_ptr<scalar_t>() : nullptr, mean_a.const_data_ptr<A>(),
          static_cast<A>(slope), g, pg, pgx);
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

// sum_g / sum_gxhat undefined: eval-mode dx.
Tensor elemt_impl(const GradInputs& in, const Tensor& x, const optional<Tensor>& weight, const Tensor& mean,
                  const Tensor& invstd, const Tensor& sum_g, const Tensor& sum_gxhat, double count, int64_t act,
                  double slope) {
  const auto acc = acc_type(x.scalar_type());
  const Tensor w = as_acc(weight, acc);
  const Tensor mean_a = mean.to(acc).contiguous(), invstd_a = invstd.to(acc).contiguous();
  const Tensor sg = sum_g.defined() ? sum_g.to(acc).contiguous() : Tensor();
  const Tensor sgx = sum_gxhat.defined() ? sum_gxhat.to(acc).contiguous() : Tensor();
  Tensor dx = at::empty_like(x);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_native::backward_elemt", [&] {
    using A = acc_t<scalar_t>;
    with_act(act, [&](auto act_c) {
      with_index(x.numel(), [&](auto index) {
        using I = decltype(index);
        grad_input_kernel<scalar_t, decltype(act_c)::value, I><<<elementwise_blocks(x.numel()), kThreads, 0, stream>>>(
            in.dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            in.y.defined() ? in.y.const_data_ptr<scalar_t>() : nullptr, dx.mutable_data_ptr<scalar_t>(),
            I(x.numel()), I(channel_stride(in.L)), I(in.L.c), mean_a.const_data_ptr<A>(), invstd_a.const_data_ptr<A>(),
            ptr_or_null<A>(w), ptr_or_null<A>(sg), ptr_or_null<A>(sgx), static_cast<A>(1.0 / count),
            static_cast<A>(slope));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return dx;
}

std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& dy, const Tensor& x, const optional<Tensor>& y,
                                            const optional<Tensor>& weight, const Tensor& mean, const Tensor& invstd,
                                            int64_t act, double slope, bool training, bool needs_input,
                                            bool needs_weight, bool needs_bias) {
  check_channel_arg(weight, x, "weight");
  check_stats_args(x, mean, invstd);
  const c10::cuda::CUDAGuard guard(x.device());
  const GradInputs in(dy, x, y, act, slope);
  Tensor sum_g, sum_gxhat, dx;
  if (needs_weight || needs_bias || (training && needs_input)) {
    std::tie(sum_g, sum_gxhat) = reduce_impl(in, x, mean, invstd, act, slope);
  }
  if (needs_input) {
    dx = training ? elemt_impl(in, x, weight, mean, invstd, sum_g, sum_gxhat, double(in.L.per_channel()), act, slope)
                  : elemt_impl(in, x, weight, mean, invstd, Tensor(), Tensor(), 1.0, act, slope);
  }
  return {dx, needs_weight ? sum_gxhat : Tensor(), needs_bias ? sum_g : Tensor()};
}

std::tuple<Tensor, Tensor> backward_reduce(const Tensor& dy, const Tensor& x, const optional<Tensor>& y,
                                           const Tensor& mean, const Tensor& invstd, int64_t act, double slope) {
  check_stats_args(x, mean, invstd);
  const c10::cuda::CUDAGuard guard(x.device());
  return reduce_impl(GradInputs(dy, x, y, act, slope), x, mean, invstd, act, slope);
}

Tensor backward_elemt(const Tensor& dy, const Tensor& x, const optional<Tensor>& y, const optional<Tensor>& weight,
                      const Tensor& mean, const Tensor& invstd, const Tensor& sum_dy, const Tensor& sum_dy_xhat,
                      int64_t count, int64_t act, double slope) {
  check_elemt_args(x, weight, mean, invstd, sum_dy, sum_dy_xhat, count);
  const c10::cuda::CUDAGuard guard(x.device());
  return elemt_impl(GradInputs(dy, x, y, act, slope), x, weight, mean, invstd, sum_dy, sum_dy_xhat, double(count),
                    act, slope);
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
