// CUDA token dispatch: a stable counting sort of the (token, slot) expert ids, row copies into
// expert order, and the weighted gather-combine back (plus both backwards), all without atomics
// on rows.
//
// Sort: the flat id array is cut into chunks of kChunk entries, one warp per chunk.
//   1. histogram per chunk ([chunks, E]),
//   2. one block turns it into start positions: offsets[e] + entries of e in earlier chunks,
//   3. each warp walks its chunk 32 entries at a time; __match_any_sync groups the lanes holding
//      the same expert, and a lane's rank among them (lower lanes first) keeps the order stable.
#include "cuda_utils.cuh"

namespace megads {
namespace cuda {
namespace {

constexpr int kSteps = 32;                 // 32-entry steps per warp chunk
constexpr int64_t kChunk = kSteps * kWarp;  // entries per warp chunk
constexpr int kBlock = 256;

__device__ __forceinline__ int expert_of(const int64_t* flat, int64_t i, int64_t N, int E) {
  if (i >= N) return -1;
  const int64_t v = flat[i];
  return (v >= 0 && v < E) ? static_cast<int>(v) : -1;
}

__global__ void histogram_kernel(const int64_t* __restrict__ flat, int64_t N, int E, int64_t chunks,
                                 int* __restrict__ hist) {
  const int lane = threadIdx.x % kWarp;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (c >= chunks) return;
  int* h = hist + c * E;
  for (int step = 0; step < kSteps; ++step) {
    const int e = expert_of(flat, c * kChunk + step * kWarp + lane, N, E);
    const unsigned peers = __match_any_sync(kFullMask, e);
    if (e >= 0 && lane == __ffs(peers) - 1) h[e] += __popc(peers);
    __syncwarp();  // the next step's leader for e may be another lane
  }
}

// One block: hist[c][e] becomes the first sorted row of chunk c's entries of expert e.
__global__ void scan_kernel(int* __restrict__ hist, int64_t chunks, int E, int64_t* __restrict__ totals,
                            int64_t* __restrict__ offsets) {
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int64_t run = 0;
#pragma unroll 8
    for (int64_t c = 0; c < chunks; ++c) run += hist[c * E + e];
    totals[e] = run;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t run = 0;
    for (int e = 0; e < E; ++e) {
      offsets[e] = run;
      run += totals[e];
    }
    offsets[E] = run;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int64_t run = offsets[e];
    for (int64_t c = 0; c < chunks; ++c) {
      const int n = hist[c * E + e];
      hist[c * E + e] = static_cast<int>(run);
      run += n;
    }
  }
}

__global__ void scatter_kernel(const int64_t* __restrict__ flat, int64_t N, int E, int64_t chunks,
                               int* __restrict__ hist, int64_t* __restrict__ order, int64_t* __restrict__ inv) {
  const int lane = threadIdx.x % kWarp;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (c >= chunks) return;
  int* h = hist + c * E;
  const unsigned lower = (1u << lane) - 1u;  // lanes below this one
  for (int step = 0; step < kSteps; ++step) {
    const int64_t i = c * kChunk + step * kWarp + lane;
    const int e = expert_of(flat, i, N, E);
    const unsigned peers = __match_any_sync(kFullMask, e);
    const int start = e >= 0 ? h[e] : 0;
    __syncwarp();  // every lane has read h[e] before the leader bumps it
    if (e >= 0) {
      const int64_t pos = start + __popc(peers & lower);
      order[pos] = i;
      inv[i] = pos;
      if (lane == __ffs(peers) - 1) h[e] = start + __popc(peers);
    }
    __syncwarp();
  }
}

// One warp per sorted row: x_sorted[r] = x[order[r] / k], copied as V-typed words.
template <typename V>
__global__ void copy_rows_kernel(const V* __restrict__ x, const int64_t* __restrict__ order, int64_t N, int64_t k,
                                 int64_t words, V* __restrict__ out) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (r >= N) return;
  const V* src = x + (order[r] / k) * words;
  V* dst = out + r * words;
  for (int64_t p = threadIdx.x % kWarp; p < words; p += kWarp) dst[p] = src[p];
}

// One block per token: out[t] = sum_j w_j * src[row_j] over its k rows, in ascending row order
// (deterministic, and the order of the CPU kernel and the reference's index_add).
template <typename T, int V, bool kWeighted>
__global__ void gather_sum_kernel(const T* __restrict__ src, const int64_t* __restrict__ inv,
                                  const typename Acc<T>::type* __restrict__ w, int k, int64_t H, T* __restrict__ out) {
  using acc_t = typename Acc<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* ws = reinterpret_cast<acc_t*>(smem_raw);   // [k]
  int64_t* rows = reinterpret_cast<int64_t*>(ws + k + (k & 1));  // [k], 8-byte aligned
  const int64_t t = blockIdx.x;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    rows[j] = inv[t * k + j];
    ws[j] = kWeighted ? w[t * k + j] : acc_t(1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // insertion sort by row; k is small
    for (int j = 1; j < k; ++j) {
      const int64_t r = rows[j];
      const acc_t wj = ws[j];
      int i = j;
      for (; i > 0 && rows[i - 1] > r; --i) {
        rows[i] = rows[i - 1];
        ws[i] = ws[i - 1];
      }
      rows[i] = r;
      ws[i] = wj;
    }
  }
  __syncthreads();
  using P = Pack<T, V>;
  const int64_t packs = H / V;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    acc_t acc[V];
#pragma unroll
    for (int l = 0; l < V; ++l) acc[l] = acc_t(0);
    for (int j = 0; j < k; ++j) {
      const P y = reinterpret_cast<const P*>(src + rows[j] * H)[p];
#pragma unroll
      for (int l = 0; l < V; ++l) acc[l] += kWeighted ? to_acc(y.v[l]) * ws[j] : to_acc(y.v[l]);
    }
    P o;
#pragma unroll
    for (int l = 0; l < V; ++l) o.v[l] = from_acc<T>(acc[l]);
    reinterpret_cast<P*>(out + t * H)[p] = o;
  }
}

// One warp per (token, slot) q: grad_y_sorted[row] = w_q * grad_y[t]; grad_w[q] = <grad_y[t], y_sorted[row]>.
template <typename T, int V>
__global__ void unpermute_backward_kernel(const T* __restrict__ gy, const T* __restrict__ ys,
                                          const typename Acc<T>::type* __restrict__ w, const int64_t* __restrict__ inv,
                                          int64_t Q, int k, int64_t H, T* __restrict__ gys,
                                          typename Acc<T>::type* __restrict__ gw) {
  using acc_t = typename Acc<T>::type;
  using P = Pack<T, V>;
  const int64_t q = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (q >= Q) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t t = q / k, r = inv[q];
  const acc_t wq = w[q];
  const P* g_row = reinterpret_cast<const P*>(gy + t * H);
  const P* y_row = reinterpret_cast<const P*>(ys + r * H);
  P* d_row = reinterpret_cast<P*>(gys + r * H);
  acc_t dot = 0;
  for (int64_t p = lane; p < H / V; p += kWarp) {
    const P g = g_row[p], y = y_row[p];
    P d;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const acc_t gl = to_acc(g.v[l]);
      d.v[l] = from_acc<T>(gl * wq);
      dot += gl * to_acc(y.v[l]);
    }
    d_row[p] = d;
  }
  dot = warp_sum(dot);
  if (lane == 0) gw[q] = dot;
}

template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

}  // namespace

size_t permute_workspace_bytes(int64_t N, int64_t E) {
  const int64_t chunks = divup(N > 0 ? N : 1, kChunk);
  return static_cast<size_t>(chunks * E) * sizeof(int) + 16 + static_cast<size_t>(E) * sizeof(int64_t);
}

int permute(DType dtype, const void* x, const int64_t* flat, int64_t T, int64_t k, int64_t H, int64_t E,
            void* x_sorted, int64_t* offsets, int64_t* order, int64_t* inv, void* workspace, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  const int64_t N = T * k;
  const int64_t chunks = divup(N > 0 ? N : 1, kChunk);
  int* hist = static_cast<int*>(workspace);
  const size_t hist_bytes = static_cast<size_t>(chunks * E) * sizeof(int);
  int64_t* totals = reinterpret_cast<int64_t*>(static_cast<char*>(workspace) + ((hist_bytes + 15) & ~size_t(15)));
  cudaError_t err = cudaMemsetAsync(hist, 0, hist_bytes, st);
  if (err != cudaSuccess) return static_cast<int>(err);
  const unsigned sort_grid = static_cast<unsigned>(divup(chunks * kWarp, kBlock));
  histogram_kernel<<<sort_grid, kBlock, 0, st>>>(flat, N, static_cast<int>(E), chunks, hist);
  scan_kernel<<<1, 1024, 0, st>>>(hist, chunks, static_cast<int>(E), totals, offsets);
  scatter_kernel<<<sort_grid, kBlock, 0, st>>>(flat, N, static_cast<int>(E), chunks, hist, order, inv);
  if (N > 0 && H > 0) {
    const int64_t elem = dtype == DType::kFloat64 ? 8 : (dtype == DType::kFloat32 ? 4 : 2);
    const int64_t row_bytes = H * elem;
    const unsigned grid = static_cast<unsigned>(divup(N * kWarp, kBlock));
    const bool al = aligned16(x) && aligned16(x_sorted);
    if (al && row_bytes % 16 == 0) {
      copy_rows_kernel<uint4><<<grid, kBlock, 0, st>>>(static_cast<const uint4*>(x), order, N, k, row_bytes / 16,
                                                       static_cast<uint4*>(x_sorted));
    } else if (row_bytes % 4 == 0 && aligned_to(x, 4) && aligned_to(x_sorted, 4)) {
      copy_rows_kernel<unsigned><<<grid, kBlock, 0, st>>>(static_cast<const unsigned*>(x), order, N, k,
                                                          row_bytes / 4, static_cast<unsigned*>(x_sorted));
    } else {
      copy_rows_kernel<unsigned short><<<grid, kBlock, 0, st>>>(static_cast<const unsigned short*>(x), order, N, k,
                                                                row_bytes / 2,
                                                                static_cast<unsigned short*>(x_sorted));
    }
  }
  return static_cast<int>(cudaGetLastError());
}

int gather_rows_sum(DType dtype, const void* src, const int64_t* inv, const void* w, int64_t T, int64_t k, int64_t H,
                    void* out, void* stream) {
  if (T == 0 || H == 0) return 0;
  return dispatch_dtype(dtype, [&](auto tag) -> int {
    using T_ = typename decltype(tag)::type;
    using acc_t = typename Acc<T_>::type;
    constexpr int VW = vec_width<T_>();
    const bool vec = H % VW == 0 && aligned16(src) && aligned16(out);
    const int64_t packs = vec ? H / VW : H;
    const int threads = static_cast<int>(packs >= kBlock ? kBlock : divup(packs, kWarp) * kWarp);
    const size_t smem = static_cast<size_t>(k + 1) * sizeof(acc_t) + static_cast<size_t>(k) * sizeof(int64_t) + 16;
    const auto* s = static_cast<const T_*>(src);
    const auto* ww = static_cast<const acc_t*>(w);
    auto* o = static_cast<T_*>(out);
    auto st = static_cast<cudaStream_t>(stream);
    const int kk = static_cast<int>(k);
    const unsigned grid = static_cast<unsigned>(T);
    if (vec && w) gather_sum_kernel<T_, VW, true><<<grid, threads, smem, st>>>(s, inv, ww, kk, H, o);
    else if (vec) gather_sum_kernel<T_, VW, false><<<grid, threads, smem, st>>>(s, inv, ww, kk, H, o);
    else if (w) gather_sum_kernel<T_, 1, true><<<grid, threads, smem, st>>>(s, inv, ww, kk, H, o);
    else gather_sum_kernel<T_, 1, false><<<grid, threads, smem, st>>>(s, inv, ww, kk, H, o);
    return static_cast<int>(cudaGetLastError());
  });
}

int unpermute_backward(DType dtype, const void* grad_y, const void* y_sorted, const void* w, const int64_t* inv,
                       int64_t T, int64_t k, int64_t H, void* grad_y_sorted, void* grad_w, void* stream) {
  const int64_t Q = T * k;
  if (Q == 0) return 0;
  return dispatch_dtype(dtype, [&](auto tag) -> int {
    using T_ = typename decltype(tag)::type;
    using acc_t = typename Acc<T_>::type;
    constexpr int VW = vec_width<T_>();
    const bool vec = H % VW == 0 && aligned16(grad_y) && aligned16(y_sorted) && aligned16(grad_y_sorted);
    const unsigned grid = static_cast<unsigned>(divup(Q * kWarp, kBlock));
    auto st = static_cast<cudaStream_t>(stream);
    const auto* g = static_cast<const T_*>(grad_y);
    const auto* y = static_cast<const T_*>(y_sorted);
    const auto* ww = static_cast<const acc_t*>(w);
    auto* d = static_cast<T_*>(grad_y_sorted);
    auto* gw = static_cast<acc_t*>(grad_w);
    if (vec) unpermute_backward_kernel<T_, VW><<<grid, kBlock, 0, st>>>(g, y, ww, inv, Q, static_cast<int>(k), H, d, gw);
    else unpermute_backward_kernel<T_, 1><<<grid, kBlock, 0, st>>>(g, y, ww, inv, Q, static_cast<int>(k), H, d, gw);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace cuda
}  // namespace megads
