// CUDA router: one warp per token does bias, group scores, group-limited top-k, normalised
// weights and the per-expert counts. Ties go to the lower index, as in the reference's stable
// sorts; scores arrive precomputed by ATen (see common.h), so selection matches the torch path.
#include "cuda_utils.cuh"

#include <climits>

namespace megads {
namespace cuda {
namespace {

template <typename acc_t>
__device__ __forceinline__ acc_t inf_value() {
  return static_cast<acc_t>(INFINITY);
}

// NaN ranks above everything, as in torch.sort(descending=True)
template <typename acc_t>
__device__ __forceinline__ acc_t nan_as_top(acc_t v) {
  return isnan(v) ? inf_value<acc_t>() : v;
}

// (v, i) beats (bv, bi): larger value, or equal value and lower index
template <typename acc_t>
__device__ __forceinline__ bool beats(acc_t v, int i, acc_t bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

// Every lane ends with the warp's best (value, index).
template <typename acc_t>
__device__ __forceinline__ void warp_argmax(acc_t& v, int& i) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const acc_t ov = __shfl_xor_sync(kFullMask, v, o);
    const int oi = __shfl_xor_sync(kFullMask, i, o);
    if (beats(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
}

// Lane l owns entries l, l+32, l+64, ... of vals[0..n) (n <= 1024); bit m of `taken` marks entry
// l + 32m as already chosen. Returns the best untaken entry (all lanes agree) and marks it.
template <typename acc_t>
__device__ __forceinline__ int take_best(const acc_t* vals, int n, unsigned& taken, int lane) {
  acc_t bv = -inf_value<acc_t>();
  int bi = INT_MAX;
  for (int m = 0, e = lane; e < n; ++m, e += kWarp) {
    if (!((taken >> m) & 1u) && beats(vals[e], e, bv, bi)) {
      bv = vals[e];
      bi = e;
    }
  }
  warp_argmax(bv, bi);
  if (bi >= n) bi = 0;  // unreachable while fewer than n entries are taken
  if ((bi & (kWarp - 1)) == lane) taken |= 1u << (bi / kWarp);
  return bi;
}

template <typename acc_t>
__global__ void route_kernel(const acc_t* __restrict__ scores, const acc_t* __restrict__ bias, int64_t T, int E,
                             int k, int G, int tg, acc_t route_scale, bool norm, acc_t* __restrict__ weights,
                             int64_t* __restrict__ indices, unsigned long long* __restrict__ counts) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * warps + warp;
  if (t >= T) return;  // whole warps only: no block-wide barrier below
  acc_t* sel = reinterpret_cast<acc_t*>(smem_raw) + static_cast<size_t>(warp) * (E + G);  // [E] selection scores
  acc_t* gsc = sel + E;                                                                     // [G] group scores
  const acc_t* s = scores + t * E;
  const acc_t neg_inf = -inf_value<acc_t>();

  for (int e = lane; e < E; e += kWarp) sel[e] = nan_as_top(bias ? s[e] + bias[e] : s[e]);
  __syncwarp();
  if (G > 1) {
    const int gs = E / G;
    for (int g = lane; g < G; g += kWarp) {
      const acc_t* p = sel + g * gs;
      acc_t m1 = p[0], m2 = neg_inf;
      for (int i = 1; i < gs; ++i) {
        const acc_t v = p[i];
        if (v > m1) {
          m2 = m1;
          m1 = v;
        } else if (v > m2) {
          m2 = v;
        }
      }
      // V3 (with bias): sum of the top-2; V2 (no bias): the max; a group of one: its score
      gsc[g] = nan_as_top((bias && gs > 1) ? m1 + m2 : m1);
    }
    __syncwarp();
    unsigned keep = 0;
    for (int r = 0; r < tg; ++r) take_best(gsc, G, keep, lane);
    __syncwarp();  // every lane is done reading gsc
    for (int m = 0, g = lane; g < G; ++m, g += kWarp) gsc[g] = ((keep >> m) & 1u) ? acc_t(1) : acc_t(0);
    __syncwarp();
    for (int e = lane; e < E; e += kWarp)
      if (gsc[e / gs] == acc_t(0)) sel[e] = neg_inf;
    __syncwarp();
  }

  int64_t* idx = indices + t * k;
  unsigned taken = 0;
  for (int j = 0; j < k; ++j) {
    const int best = take_best(sel, E, taken, lane);
    if (lane == 0) idx[j] = best;
  }
  __syncwarp();  // orders lane 0's index stores before the other lanes' loads

  acc_t part = 0;
  for (int j = lane; j < k; j += kWarp) part += s[idx[j]];
  const acc_t denom = warp_sum(part) + acc_t(1e-20);
  acc_t* w = weights + t * k;
  for (int j = lane; j < k; j += kWarp) {
    const int64_t e = idx[j];
    const acc_t g = s[e];  // weights come from the unbiased scores
    w[j] = (norm ? g / denom : g) * route_scale;
    atomicAdd(counts + e, 1ull);
  }
}

// One thread per token: d scores at the chosen experts from d weights, through the normalisation.
template <typename acc_t>
__global__ void route_backward_kernel(const acc_t* __restrict__ grad_w, const acc_t* __restrict__ scores,
                                      const int64_t* __restrict__ indices, int64_t T, int E, int k, acc_t route_scale,
                                      bool norm, acc_t* __restrict__ grad_s) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const acc_t* gw = grad_w + t * k;
  const int64_t* idx = indices + t * k;
  const acc_t* s = scores + t * E;
  acc_t* ds = grad_s + t * E;
  if (!norm) {
    for (int j = 0; j < k; ++j) ds[idx[j]] += gw[j] * route_scale;
    return;
  }
  // w_j = rs * g_j / D, D = sum_i g_i + 1e-20  =>  dg_j = rs*gw_j/D - sum_i rs*gw_i*g_i/D^2
  acc_t sum = 0;
  for (int j = 0; j < k; ++j) sum += s[idx[j]];
  const acc_t D = sum + acc_t(1e-20);
  acc_t gD = 0;
  for (int j = 0; j < k; ++j) gD += -(gw[j] * route_scale) * ((s[idx[j]] / D) / D);
  for (int j = 0; j < k; ++j) ds[idx[j]] += (gw[j] * route_scale) / D + gD;
}

}  // namespace

int route_forward(DType acc, const void* scores, const void* bias, int64_t T, int64_t E, int64_t k, int64_t n_group,
                  int64_t topk_group, double route_scale, bool norm_topk_prob, void* weights, int64_t* indices,
                  int64_t* counts, void* stream) {
  if (T == 0) return 0;
  if (E > kMaxRouteExperts || k > E || (acc != DType::kFloat32 && acc != DType::kFloat64))
    return static_cast<int>(cudaErrorInvalidValue);
  const int G = n_group > 1 ? static_cast<int>(n_group) : 1, tg = n_group > 1 ? static_cast<int>(topk_group) : 1;
  return dispatch_dtype(acc, [&](auto tag) -> int {
    using acc_t = typename decltype(tag)::type;
    if constexpr (std::is_same<acc_t, float>::value || std::is_same<acc_t, double>::value) {
      const size_t per_warp = sizeof(acc_t) * static_cast<size_t>(E + G);
      int warps = static_cast<int>((48u << 10) / per_warp);
      warps = warps < 1 ? 1 : (warps > 8 ? 8 : warps);
      const unsigned grid = static_cast<unsigned>(divup(T, warps));
      route_kernel<acc_t><<<grid, warps * kWarp, warps * per_warp, static_cast<cudaStream_t>(stream)>>>(
          static_cast<const acc_t*>(scores), static_cast<const acc_t*>(bias), T, static_cast<int>(E),
          static_cast<int>(k), G, tg, static_cast<acc_t>(route_scale), norm_topk_prob, static_cast<acc_t*>(weights),
          indices, reinterpret_cast<unsigned long long*>(counts));
      return static_cast<int>(cudaGetLastError());
    } else {
      return static_cast<int>(cudaErrorInvalidValue);
    }
  });
}

int route_backward(DType acc, const void* grad_weights, const void* scores, const int64_t* indices, int64_t T,
                   int64_t E, int64_t k, double route_scale, bool norm_topk_prob, void* grad_scores, void* stream) {
  if (T == 0) return 0;
  return dispatch_dtype(acc, [&](auto tag) -> int {
    using acc_t = typename decltype(tag)::type;
    if constexpr (std::is_same<acc_t, float>::value || std::is_same<acc_t, double>::value) {
      constexpr int threads = 128;
      route_backward_kernel<acc_t><<<static_cast<unsigned>(divup(T, threads)), threads, 0,
                                     static_cast<cudaStream_t>(stream)>>>(
          static_cast<const acc_t*>(grad_weights), static_cast<const acc_t*>(scores), indices, T,
          static_cast<int>(E), static_cast<int>(k), static_cast<acc_t>(route_scale), norm_topk_prob,
          static_cast<acc_t*>(grad_scores));
      return static_cast<int>(cudaGetLastError());
    } else {
      return static_cast<int>(cudaErrorInvalidValue);
    }
  });
}

}  // namespace cuda
}  // namespace megads
