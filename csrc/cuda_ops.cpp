// CUDA implementations of the megads:: ops: torch-side wrappers (checks, dtypes, allocation,
// stream) around the plain launchers of route.cu / dispatch.cu (declared in cuda_kernels.h).
// Built only into the CUDA flavour of megads._C (setup_ext.py).
#include "common.h"
#include "cuda_kernels.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

namespace megads {
namespace {

using at::Tensor;

cuda::DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: TORCH_CHECK(false, "megads: unsupported dtype ", t);
  }
}

void check(int err) { C10_CUDA_CHECK(static_cast<cudaError_t>(err)); }

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::tuple<Tensor, Tensor, Tensor> route_cuda(const Tensor& logits, const std::optional<Tensor>& bias, int64_t top_k,
                                              int64_t n_group, int64_t topk_group, c10::string_view score_func,
                                              double route_scale, bool norm_topk_prob) {
  check_route_args(logits, bias, top_k, n_group, topk_group);
  const bool softmax = parse_score_func(score_func);
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(E <= cuda::kMaxRouteExperts, "megads::route on CUDA takes at most ", cuda::kMaxRouteExperts,
              " experts, got ", E, " (set MEGADS_OPS=torch)");
  c10::cuda::CUDAGuard guard(logits.device());
  Tensor s = router_scores(logits, softmax);
  Tensor b = bias.has_value() ? bias->to(s.scalar_type()).contiguous() : Tensor();
  Tensor w = at::empty({T, top_k}, s.options());
  Tensor idx = at::empty({T, top_k}, logits.options().dtype(at::kLong));
  Tensor counts = at::zeros({E}, logits.options().dtype(at::kLong));
  check(cuda::route_forward(dtype_of(s.scalar_type()), s.const_data_ptr(), b.defined() ? b.const_data_ptr() : nullptr,
                            T, E, top_k, n_group, topk_group, route_scale, norm_topk_prob, w.data_ptr(),
                            idx.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), current_stream()));
  return {w, idx, counts};
}

Tensor route_backward_cuda(const Tensor& grad_weights, const Tensor& logits, const Tensor& indices,
                           c10::string_view score_func, double route_scale, bool norm_topk_prob) {
  const bool softmax = parse_score_func(score_func);
  const int64_t T = logits.size(0), E = logits.size(1), k = indices.size(1);
  TORCH_CHECK(grad_weights.sizes() == indices.sizes() && indices.size(0) == T,
              "megads::route_backward: grad_weights and indices must be [T, k]");
  c10::cuda::CUDAGuard guard(logits.device());
  Tensor s = router_scores(logits, softmax);
  Tensor gw = grad_weights.to(s.scalar_type()).contiguous();
  Tensor idx = indices.to(at::kLong).contiguous();
  Tensor ds = at::zeros({T, E}, s.options());
  check(cuda::route_backward(dtype_of(s.scalar_type()), gw.const_data_ptr(), s.const_data_ptr(),
                             idx.const_data_ptr<int64_t>(), T, E, k, route_scale, norm_topk_prob, ds.data_ptr(),
                             current_stream()));
  return scores_backward(ds, s, softmax, logits.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> permute_cuda(const Tensor& x_in, const Tensor& indices_in,
                                                        int64_t num_experts) {
  check_permute_args(x_in, indices_in, num_experts);
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor indices = indices_in.to(at::kLong).contiguous();
  const int64_t T = x.size(0), H = x.size(1), k = indices.size(1), N = T * k, E = num_experts;
  TORCH_CHECK(N < std::numeric_limits<int>::max(), "megads::permute on CUDA takes fewer than 2^31 rows, got ", N);
  Tensor x_sorted = at::empty({N, H}, x.options());
  Tensor offsets = at::empty({E + 1}, indices.options());
  Tensor order = at::empty({N}, indices.options());
  Tensor inv = at::empty({N}, indices.options());
  Tensor workspace = at::empty({static_cast<int64_t>(cuda::permute_workspace_bytes(N, E))},
                               x.options().dtype(at::kByte));
  check(cuda::permute(dtype_of(x.scalar_type()), x.const_data_ptr(), indices.const_data_ptr<int64_t>(), T, k, H, E,
                      x_sorted.data_ptr(), offsets.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
                      inv.data_ptr<int64_t>(), workspace.data_ptr(), current_stream()));
  return {x_sorted, offsets, order, inv};
}

Tensor permute_backward_cuda(const Tensor& grad_x_sorted, const Tensor& inv_in, int64_t top_k) {
  TORCH_CHECK(grad_x_sorted.dim() == 2 && top_k >= 1 && grad_x_sorted.size(0) % top_k == 0 &&
                  inv_in.numel() == grad_x_sorted.size(0),
              "megads::permute_backward: bad shapes");
  c10::cuda::CUDAGuard guard(grad_x_sorted.device());
  const Tensor g = grad_x_sorted.contiguous();
  const Tensor inv = inv_in.contiguous();
  const int64_t k = top_k, T = g.size(0) / k, H = g.size(1);
  Tensor out = at::empty({T, H}, g.options());
  check(cuda::gather_rows_sum(dtype_of(g.scalar_type()), g.const_data_ptr(), inv.const_data_ptr<int64_t>(), nullptr,
                              T, k, H, out.data_ptr(), current_stream()));
  return out;
}

Tensor unpermute_cuda(const Tensor& y_sorted_in, const Tensor& weights, const Tensor& inv_in) {
  check_unpermute_args(y_sorted_in, weights, inv_in);
  c10::cuda::CUDAGuard guard(y_sorted_in.device());
  const Tensor ys = y_sorted_in.contiguous();
  const Tensor inv = inv_in.contiguous();
  const Tensor w = weights.to(acc_type(ys.scalar_type())).contiguous();
  const int64_t T = weights.size(0), k = weights.size(1), H = ys.size(1);
  Tensor out = at::empty({T, H}, ys.options());
  check(cuda::gather_rows_sum(dtype_of(ys.scalar_type()), ys.const_data_ptr(), inv.const_data_ptr<int64_t>(),
                              w.const_data_ptr(), T, k, H, out.data_ptr(), current_stream()));
  return out;
}

std::tuple<Tensor, Tensor> unpermute_backward_cuda(const Tensor& grad_y, const Tensor& y_sorted_in,
                                                   const Tensor& weights, const Tensor& inv_in) {
  check_unpermute_args(y_sorted_in, weights, inv_in);
  c10::cuda::CUDAGuard guard(y_sorted_in.device());
  const Tensor ys = y_sorted_in.contiguous();
  const Tensor gy = grad_y.to(ys.scalar_type()).contiguous();
  const Tensor inv = inv_in.contiguous();
  const Tensor w = weights.to(acc_type(ys.scalar_type())).contiguous();
  const int64_t T = weights.size(0), k = weights.size(1), H = ys.size(1);
  TORCH_CHECK(gy.dim() == 2 && gy.size(0) == T && gy.size(1) == H, "megads::unpermute_backward: grad_y must be [", T,
              ", ", H, "], got ", gy.sizes());
  Tensor gys = at::empty_like(ys);
  Tensor gw = at::empty({T, k}, w.options());
  check(cuda::unpermute_backward(dtype_of(ys.scalar_type()), gy.const_data_ptr(), ys.const_data_ptr(),
                                 w.const_data_ptr(), inv.const_data_ptr<int64_t>(), T, k, H, gys.data_ptr(),
                                 gw.data_ptr(), current_stream()));
  return {gys, gw.to(weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(megads, CUDA, m) {
  m.impl("route", &route_cuda);
  m.impl("route_backward", &route_backward_cuda);
  m.impl("permute", &permute_cuda);
  m.impl("permute_backward", &permute_backward_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
}

}  // namespace megads
