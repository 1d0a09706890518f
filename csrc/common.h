// Shared host-side helpers of the CPU and CUDA op wrappers: argument checks, dtypes, scores.
//
// The router scores are computed with ATen's own sigmoid/softmax (the very kernels the torch
// reference calls), so that both paths see bit-identical scores and hence make identical
// top-k choices, ties included. Everything after the scores (bias, group-limited top-k,
// normalised weights, counts) is one fused kernel per backend.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/_softmax.h>
#include <ATen/ops/_softmax_backward_data.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/sigmoid_backward.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

namespace megads {

// Float64 inputs compute in float64 (so torch.autograd.gradcheck applies); everything else
// (float32, bfloat16, float16) computes and accumulates in float32, like the reference.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline bool parse_score_func(std::string_view f) {
  TORCH_CHECK(f == "sigmoid" || f == "softmax", "megads::route: score_func must be 'sigmoid' or 'softmax', got '",
              std::string(f), "'");
  return f == "softmax";
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", s);
}

inline void check_route_args(const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t top_k,
                             int64_t n_group, int64_t topk_group) {
  TORCH_CHECK(logits.dim() == 2, "megads::route: logits must be [T, E], got ", logits.sizes());
  check_floating(logits, "megads::route", "logits");
  const int64_t E = logits.size(1);
  TORCH_CHECK(E >= 1, "megads::route: need at least one expert");
  TORCH_CHECK(top_k >= 1 && top_k <= E, "megads::route: top_k must be in [1, ", E, "], got ", top_k);
  TORCH_CHECK(n_group >= 1 && E % n_group == 0, "megads::route: n_group (", n_group,
              ") must be >= 1 and divide the number of experts (", E, ")");
  if (n_group > 1) {
    TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "megads::route: topk_group must be in [1, ", n_group,
                "], got ", topk_group);
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == E, "megads::route: bias must be [", E, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->device() == logits.device(), "megads::route: bias is on ", bias->device(),
                ", logits on ", logits.device());
  }
}

// Unbiased scores [T, E] in the accumulation dtype, exactly as the reference computes them.
inline at::Tensor router_scores(const at::Tensor& logits, bool softmax) {
  at::Tensor lf = logits.to(acc_type(logits.scalar_type())).contiguous();
  return softmax ? at::_softmax(lf, 1, false) : at::sigmoid(lf);
}

// d logits from d scores (dense [T, E]), through ATen's sigmoid/softmax backward.
inline at::Tensor scores_backward(const at::Tensor& grad_scores, const at::Tensor& scores, bool softmax,
                                  at::ScalarType out_dtype) {
  at::Tensor g = softmax ? at::_softmax_backward_data(grad_scores, scores, 1, scores.scalar_type())
                         : at::sigmoid_backward(grad_scores, scores);
  return g.to(out_dtype);
}

inline void check_permute_args(const at::Tensor& x, const at::Tensor& indices, int64_t num_experts) {
  TORCH_CHECK(x.dim() == 2, "megads::permute: x must be [T, H], got ", x.sizes());
  check_floating(x, "megads::permute", "x");
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == x.size(0), "megads::permute: indices must be [T, k] with T = ",
              x.size(0), ", got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "megads::permute: indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK(num_experts >= 1, "megads::permute: num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(indices.device() == x.device(), "megads::permute: indices on ", indices.device(), ", x on ", x.device());
}

inline void check_unpermute_args(const at::Tensor& y_sorted, const at::Tensor& weights, const at::Tensor& inv) {
  TORCH_CHECK(y_sorted.dim() == 2, "megads::unpermute: y_sorted must be [T*k, H], got ", y_sorted.sizes());
  check_floating(y_sorted, "megads::unpermute", "y_sorted");
  check_floating(weights, "megads::unpermute", "weights");
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) * weights.size(1) == y_sorted.size(0),
              "megads::unpermute: weights must be [T, k] with T*k = ", y_sorted.size(0), " rows, got ",
              weights.sizes());
  TORCH_CHECK(inv.dim() == 1 && inv.numel() == y_sorted.size(0) && inv.scalar_type() == at::kLong,
              "megads::unpermute: state.inv must be int64 [", y_sorted.size(0), "]");
  TORCH_CHECK(weights.device() == y_sorted.device() && inv.device() == y_sorted.device(),
              "megads::unpermute: y_sorted, weights and state must be on one device");
}

}  // namespace megads
