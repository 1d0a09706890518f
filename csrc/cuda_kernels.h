// Launchers of the CUDA kernels (route.cu, dispatch.cu), called by the torch-side wrappers in
// cuda_ops.cpp. Plain C++ on purpose: the .cu files include no torch header, so that nvcc
// compiles them on their own (csrc/check_cuda.sh) whatever torch build is installed.
//
// All pointers are device pointers of contiguous arrays; `stream` is a cudaStream_t. Each
// launcher returns a cudaError_t as int (0 = success). "acc" arrays are float32, or float64 when
// the data type is float64.
#pragma once

#include <cstddef>
#include <cstdint>

namespace megads {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Largest expert count the router kernel takes (32 lanes x 32-bit masks).
constexpr int64_t kMaxRouteExperts = 1024;

// scores [T, E] acc (unbiased), bias [E] acc or null -> weights [T, k] acc, indices [T, k],
// counts [E] (zeroed by the caller; incremented atomically). acc = kFloat32 or kFloat64.
int route_forward(DType acc, const void* scores, const void* bias, int64_t T, int64_t E, int64_t k, int64_t n_group,
                  int64_t topk_group, double route_scale, bool norm_topk_prob, void* weights, int64_t* indices,
                  int64_t* counts, void* stream);

// grad_weights [T, k] acc, scores [T, E] acc, indices [T, k] -> grad_scores [T, E] acc (zeroed by
// the caller; only the chosen entries are written).
int route_backward(DType acc, const void* grad_weights, const void* scores, const int64_t* indices, int64_t T,
                   int64_t E, int64_t k, double route_scale, bool norm_topk_prob, void* grad_scores, void* stream);

// Bytes of device scratch that permute needs for N = T*k entries and E experts.
size_t permute_workspace_bytes(int64_t N, int64_t E);

// x [T, H] (dtype), flat expert ids [T*k] -> x_sorted [T*k, H], offsets [E+1], order [T*k], inv [T*k].
// Ids must lie in [0, E) (entries outside are skipped and leave their rows unset).
int permute(DType dtype, const void* x, const int64_t* flat, int64_t T, int64_t k, int64_t H, int64_t E,
            void* x_sorted, int64_t* offsets, int64_t* order, int64_t* inv, void* workspace, void* stream);

// out[t] = sum_j w[t*k+j] * src[inv[t*k+j]] (w null: plain sum), acc-accumulated; out [T, H] dtype.
// Serves unpermute (weighted) and the gradient of permute (plain).
int gather_rows_sum(DType dtype, const void* src, const int64_t* inv, const void* w, int64_t T, int64_t k, int64_t H,
                    void* out, void* stream);

// Gradient of unpermute: grad_y_sorted[inv[q]] = w[q] * grad_y[q/k]; grad_w[q] = <grad_y[q/k], y_sorted[inv[q]]>.
int unpermute_backward(DType dtype, const void* grad_y, const void* y_sorted, const void* w, const int64_t* inv,
                       int64_t T, int64_t k, int64_t H, void* grad_y_sorted, void* grad_w, void* stream);

}  // namespace cuda
}  // namespace megads
