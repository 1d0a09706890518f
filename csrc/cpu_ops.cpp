// CPU kernels of the megads:: ops (schemas in registration.cpp, reference in
// megads/ops/reference.py). Parallel over tokens with at::parallel_for (OpenMP in torch's
// builds); row loops are written so that the compiler vectorises them (-O3).
//
// Bit-compatibility with the reference where it is cheap: scores come from ATen (common.h);
// the weighted combine and the gradient of permute add each token's rows in ascending row
// order, as index_add does, so float32 results match the torch path exactly.
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MEGADS_X86 1  // AVX2 kernels compiled with a target attribute, chosen at run time
#include <immintrin.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace megads {
namespace {

using at::Tensor;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// at::empty for the big row buffers (x_sorted, y, gradients), advised to use transparent huge
// pages before their first touch. A fresh multi-MiB buffer otherwise takes one page fault per
// 4 KiB on its first write, which on small machines costs several times the copy itself. Only
// advice: no effect where THP is off (and THP_MEM_ALLOC_ENABLE=1 does the same for all of torch).
Tensor empty_rows(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t n = t.nbytes();
  if (n >= 4 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t b = (p + kHuge - 1) & ~(kHuge - 1), e = (p + n) & ~(kHuge - 1);
    if (e > b) (void)madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// ------------------------------------------------------------------------------------------
// routing

// Indices of the k largest of v[0..n) into ti (values into tv), in descending order; equal
// values keep ascending index order, so the lower index wins a tie (= a stable descending sort).
template <typename V>
inline void topk_stable(const V* v, int64_t n, int64_t k, V* tv, int64_t* ti) {
  int64_t cnt = 0;
  for (int64_t i = 0; i < n; ++i) {
    const V x = v[i];
    if (cnt == k && !(x > tv[k - 1])) continue;
    int64_t p = cnt < k ? cnt++ : k - 1;
    for (; p > 0 && x > tv[p - 1]; --p) {
      tv[p] = tv[p - 1];
      ti[p] = ti[p - 1];
    }
    tv[p] = x;
    ti[p] = i;
  }
}

template <typename acc_t>
void route_kernel(const acc_t* scores, const acc_t* bias, int64_t T, int64_t E, int64_t k, int64_t G, int64_t tg,
                  acc_t route_scale, bool norm, acc_t* weights, int64_t* indices) {
  const int64_t gs = E / G;  // experts per group
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sel(E), gscore(G), tv(std::max(k, tg));
    std::vector<int64_t> ti(std::max(k, tg));
    std::vector<char> keep(G);
    for (int64_t t = begin; t < end; ++t) {
      const acc_t* s = scores + t * E;
      for (int64_t e = 0; e < E; ++e) {
        const acc_t v = bias ? s[e] + bias[e] : s[e];
        sel[e] = std::isnan(v) ? -neg_inf : v;  // NaN ranks first, as in torch.sort(descending=True)
      }
      if (G > 1) {  // group-limited: keep the tg best groups, mask out the others
        for (int64_t g = 0; g < G; ++g) {
          const acc_t* p = sel.data() + g * gs;
          acc_t m1 = p[0], m2 = neg_inf;
          for (int64_t i = 1; i < gs; ++i) {
            if (p[i] > m1) {
              m2 = m1;
              m1 = p[i];
            } else if (p[i] > m2) {
              m2 = p[i];
            }
          }
          // V3 (with bias): sum of the top-2; V2 (no bias): the max; a group of one: its score
          const acc_t v = (bias && gs > 1) ? m1 + m2 : m1;
          gscore[g] = std::isnan(v) ? -neg_inf : v;
        }
        topk_stable(gscore.data(), G, tg, tv.data(), ti.data());
        std::fill(keep.begin(), keep.end(), 0);
        for (int64_t i = 0; i < tg; ++i) keep[ti[i]] = 1;
        for (int64_t g = 0; g < G; ++g)
          if (!keep[g]) std::fill(sel.begin() + g * gs, sel.begin() + (g + 1) * gs, neg_inf);
      }
      topk_stable(sel.data(), E, k, tv.data(), ti.data());
      acc_t* w = weights + t * k;
      int64_t* idx = indices + t * k;
      acc_t sum = 0;
      for (int64_t j = 0; j < k; ++j) {
        idx[j] = ti[j];
        w[j] = s[ti[j]];  // weights from the unbiased scores
        sum += w[j];
      }
      if (norm) {
        const acc_t denom = sum + acc_t(1e-20);
        for (int64_t j = 0; j < k; ++j) w[j] = w[j] / denom;
      }
      for (int64_t j = 0; j < k; ++j) w[j] = w[j] * route_scale;
    }
  });
}

// d scores (dense, zero-initialised [T, E]) from d weights, through the normalisation.
template <typename acc_t>
void route_backward_kernel(const acc_t* grad_w, const acc_t* scores, const int64_t* indices, int64_t T, int64_t E,
                           int64_t k, acc_t route_scale, bool norm, acc_t* grad_s) {
  // a few flops per (token, slot): threads only pay off for very large batches
  at::parallel_for(0, T, std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const acc_t* gw = grad_w + t * k;
      const int64_t* idx = indices + t * k;
      const acc_t* s = scores + t * E;
      acc_t* ds = grad_s + t * E;
      if (!norm) {
        for (int64_t j = 0; j < k; ++j) ds[idx[j]] += gw[j] * route_scale;
        continue;
      }
      // w_j = rs * g_j / D, D = sum_i g_i + 1e-20  =>  dg_j = rs*gw_j/D - sum_i rs*gw_i*g_i/D^2
      acc_t sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += s[idx[j]];
      const acc_t D = sum + acc_t(1e-20);
      acc_t gD = 0;
      for (int64_t j = 0; j < k; ++j) gD += -(gw[j] * route_scale) * ((s[idx[j]] / D) / D);
      for (int64_t j = 0; j < k; ++j) ds[idx[j]] += (gw[j] * route_scale) / D + gD;
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> route_cpu(const Tensor& logits, const std::optional<Tensor>& bias, int64_t top_k,
                                             int64_t n_group, int64_t topk_group, c10::string_view score_func,
                                             double route_scale, bool norm_topk_prob) {
  check_route_args(logits, bias, top_k, n_group, topk_group);
  const bool softmax = parse_score_func(score_func);
  const int64_t T = logits.size(0), E = logits.size(1), k = top_k;
  const int64_t G = n_group > 1 ? n_group : 1, tg = n_group > 1 ? topk_group : 1;
  Tensor s = router_scores(logits, softmax);
  Tensor b = bias.has_value() ? bias->to(s.scalar_type()).contiguous() : Tensor();
  Tensor w = at::empty({T, k}, s.options());
  Tensor idx = at::empty({T, k}, logits.options().dtype(at::kLong));
  Tensor counts = at::zeros({E}, logits.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "megads_route_cpu", [&] {
    route_kernel<scalar_t>(s.const_data_ptr<scalar_t>(), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, T, E,
                           k, G, tg, static_cast<scalar_t>(route_scale), norm_topk_prob, w.data_ptr<scalar_t>(),
                           idx.data_ptr<int64_t>());
  });
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * k; ++i) ++cp[ip[i]];
  return {w, idx, counts};
}

Tensor route_backward_cpu(const Tensor& grad_weights, const Tensor& logits, const Tensor& indices,
                          c10::string_view score_func, double route_scale, bool norm_topk_prob) {
  const bool softmax = parse_score_func(score_func);
  const int64_t T = logits.size(0), E = logits.size(1), k = indices.size(1);
  TORCH_CHECK(grad_weights.sizes() == indices.sizes() && indices.size(0) == T,
              "megads::route_backward: grad_weights and indices must be [T, k]");
  Tensor s = router_scores(logits, softmax);
  Tensor gw = grad_weights.to(s.scalar_type()).contiguous();
  Tensor idx = indices.to(at::kLong).contiguous();
  Tensor ds = at::zeros({T, E}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "megads_route_backward_cpu", [&] {
    route_backward_kernel<scalar_t>(gw.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
                                    idx.const_data_ptr<int64_t>(), T, E, k, static_cast<scalar_t>(route_scale),
                                    norm_topk_prob, ds.data_ptr<scalar_t>());
  });
  return scores_backward(ds, s, softmax, logits.scalar_type());
}

// ------------------------------------------------------------------------------------------
// dispatch

// Stable counting sort of the flat (token, slot) expert ids: histograms per chunk of the flat
// range, a prefix sum in (expert, chunk) order, then a scatter per chunk. Rows are copied after.
std::tuple<Tensor, Tensor, Tensor, Tensor> permute_cpu(const Tensor& x_in, const Tensor& indices_in,
                                                       int64_t num_experts) {
  check_permute_args(x_in, indices_in, num_experts);
  const Tensor x = x_in.contiguous();
  const Tensor indices = indices_in.to(at::kLong).contiguous();
  const int64_t T = x.size(0), H = x.size(1), k = indices.size(1), N = T * k, E = num_experts;
  Tensor x_sorted = empty_rows({N, H}, x.options());
  Tensor offsets = at::empty({E + 1}, indices.options());
  Tensor order = at::empty({N}, indices.options());
  Tensor inv = at::empty({N}, indices.options());

  const int64_t* flat = indices.const_data_ptr<int64_t>();
  int64_t* ord = order.data_ptr<int64_t>();
  int64_t* iv = inv.data_ptr<int64_t>();
  int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / 4096));
  const int64_t chunk = std::max<int64_t>(1, divup(N, nchunks));
  std::vector<int64_t> hist(nchunks * E, 0);
  std::atomic<bool> bad{false};
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int64_t* h = hist.data() + c * E;
      for (int64_t i = c * chunk, end = std::min(N, (c + 1) * chunk); i < end; ++i) {
        const int64_t e = flat[i];
        if (e < 0 || e >= E) {
          bad = true;
          continue;
        }
        ++h[e];
      }
    }
  });
  TORCH_CHECK(!bad, "megads::permute: expert indices must be in [0, ", E, ")");
  int64_t run = 0;
  for (int64_t e = 0; e < E; ++e) {
    off[e] = run;
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t n = hist[c * E + e];
      hist[c * E + e] = run;
      run += n;
    }
  }
  off[E] = run;
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int64_t* h = hist.data() + c * E;
      for (int64_t i = c * chunk, end = std::min(N, (c + 1) * chunk); i < end; ++i) {
        const int64_t pos = h[flat[i]]++;
        ord[pos] = i;
        iv[i] = pos;
      }
    }
  });
  const size_t row_bytes = static_cast<size_t>(H) * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(x_sorted.data_ptr());
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<size_t>(row_bytes, 1));
  at::parallel_for(0, N, grain, [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) std::memcpy(dst + r * row_bytes, src + (ord[r] / k) * row_bytes, row_bytes);
  });
  return {x_sorted, offsets, order, inv};
}

// out[t] = sum_j w[t, j] * src[inv[t*k + j]] (w == nullptr: plain sum), accumulated in acc_t in
// ascending row order (the order index_add adds them in), rounded to scalar_t once at the end.
template <typename scalar_t>
void gather_rows_sum(const scalar_t* src, const int64_t* inv, const typename Acc<scalar_t>::type* w, int64_t T,
                     int64_t k, int64_t H, scalar_t* out) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr bool same = std::is_same<scalar_t, acc_t>::value;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k * H, 1));
  at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(same ? 0 : H);
    std::vector<std::pair<int64_t, acc_t>> rows(k);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t j = 0; j < k; ++j) rows[j] = {inv[t * k + j], w ? w[t * k + j] : acc_t(1)};
      for (int64_t j = 1; j < k; ++j)  // insertion sort by row: k is small
        for (int64_t i = j; i > 0 && rows[i].first < rows[i - 1].first; --i) std::swap(rows[i], rows[i - 1]);
      acc_t* __restrict__ acc = same ? reinterpret_cast<acc_t*>(out + t * H) : buf.data();
      for (int64_t j = 0; j < k; ++j) {
        const scalar_t* __restrict__ y = src + rows[j].first * H;
        const acc_t wj = rows[j].second;
        if (j == 0) {
          if (w) {
            for (int64_t h = 0; h < H; ++h) acc[h] = static_cast<acc_t>(y[h]) * wj;
          } else {
            for (int64_t h = 0; h < H; ++h) acc[h] = static_cast<acc_t>(y[h]);
          }
        } else if (w) {
          for (int64_t h = 0; h < H; ++h) acc[h] += static_cast<acc_t>(y[h]) * wj;
        } else {
          for (int64_t h = 0; h < H; ++h) acc[h] += static_cast<acc_t>(y[h]);
        }
      }
      if (k == 0) std::fill(acc, acc + H, acc_t(0));
      if (!same) {
        scalar_t* o = out + t * H;
        for (int64_t h = 0; h < H; ++h) o[h] = static_cast<scalar_t>(acc[h]);
      }
    }
  });
}

Tensor permute_backward_cpu(const Tensor& grad_x_sorted, const Tensor& inv_in, int64_t top_k) {
  TORCH_CHECK(grad_x_sorted.dim() == 2 && top_k >= 1 && grad_x_sorted.size(0) % top_k == 0 &&
                  inv_in.numel() == grad_x_sorted.size(0),
              "megads::permute_backward: bad shapes");
  const Tensor g = grad_x_sorted.contiguous();
  const Tensor inv = inv_in.contiguous();
  const int64_t k = top_k, T = g.size(0) / k, H = g.size(1);
  Tensor out = empty_rows({T, H}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "megads_permute_backward_cpu", [&] {
    gather_rows_sum<scalar_t>(g.const_data_ptr<scalar_t>(), inv.const_data_ptr<int64_t>(), nullptr, T, k, H,
                              out.data_ptr<scalar_t>());
  });
  return out;
}

Tensor unpermute_cpu(const Tensor& y_sorted_in, const Tensor& weights, const Tensor& inv_in) {
  check_unpermute_args(y_sorted_in, weights, inv_in);
  const Tensor ys = y_sorted_in.contiguous();
  const Tensor inv = inv_in.contiguous();
  const Tensor w = weights.to(acc_type(ys.scalar_type())).contiguous();
  const int64_t T = weights.size(0), k = weights.size(1), H = ys.size(1);
  Tensor out = empty_rows({T, H}, ys.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ys.scalar_type(), "megads_unpermute_cpu", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    gather_rows_sum<scalar_t>(ys.const_data_ptr<scalar_t>(), inv.const_data_ptr<int64_t>(), w.const_data_ptr<acc_t>(),
                              T, k, H, out.data_ptr<scalar_t>());
  });
  return out;
}

// Per (token, slot): d y_sorted[row] = w * dy[t]; d w = <dy[t], y_sorted[row]>. Each row is
// written by exactly one (token, slot), so no atomics; the dot uses 16 partial sums (vectorised).
template <typename scalar_t>
void unpermute_backward_kernel(const scalar_t* gy, const scalar_t* ys, const typename Acc<scalar_t>::type* w,
                               const int64_t* inv, int64_t T, int64_t k, int64_t H, scalar_t* gys,
                               typename Acc<scalar_t>::type* gw) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr int64_t L = 16;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k * H, 1));
  at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gbuf(H);
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* g_row = gy + t * H;
      for (int64_t h = 0; h < H; ++h) gbuf[h] = static_cast<acc_t>(g_row[h]);
      const acc_t* __restrict__ g = gbuf.data();
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = inv[t * k + j];
        const acc_t wj = w[t * k + j];
        const scalar_t* __restrict__ y = ys + r * H;
        scalar_t* __restrict__ d = gys + r * H;
        acc_t part[L] = {};
        int64_t h = 0;
        for (; h + L <= H; h += L) {
          for (int64_t l = 0; l < L; ++l) {
            d[h + l] = static_cast<scalar_t>(g[h + l] * wj);
            part[l] += g[h + l] * static_cast<acc_t>(y[h + l]);
          }
        }
        for (; h < H; ++h) {
          d[h] = static_cast<scalar_t>(g[h] * wj);
          part[0] += g[h] * static_cast<acc_t>(y[h]);
        }
        acc_t dot = 0;
        for (int64_t l = 0; l < L; ++l) dot += part[l];
        gw[t * k + j] = dot;
      }
    }
  });
}

std::tuple<Tensor, Tensor> unpermute_backward_cpu(const Tensor& grad_y, const Tensor& y_sorted_in,
                                                  const Tensor& weights, const Tensor& inv_in) {
  check_unpermute_args(y_sorted_in, weights, inv_in);
  const Tensor ys = y_sorted_in.contiguous();
  const Tensor gy = grad_y.to(ys.scalar_type()).contiguous();
  const Tensor inv = inv_in.contiguous();
  const auto acc = acc_type(ys.scalar_type());
  const Tensor w = weights.to(acc).contiguous();
  const int64_t T = weights.size(0), k = weights.size(1), H = ys.size(1);
  TORCH_CHECK(gy.dim() == 2 && gy.size(0) == T && gy.size(1) == H, "megads::unpermute_backward: grad_y must be [", T,
              ", ", H, "], got ", gy.sizes());
  Tensor gys = empty_rows(ys.sizes(), ys.options());
  Tensor gw = at::empty({T, k}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ys.scalar_type(), "megads_unpermute_backward_cpu", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    unpermute_backward_kernel<scalar_t>(gy.const_data_ptr<scalar_t>(), ys.const_data_ptr<scalar_t>(),
                                        w.const_data_ptr<acc_t>(), inv.const_data_ptr<int64_t>(), T, k, H,
                                        gys.data_ptr<scalar_t>(), gw.data_ptr<acc_t>());
  });
  return {gys, gw.to(weights.scalar_type())};
}

// ------------------------------------------------------------------ products with few rows
// Decode steps multiply a handful of rows by each weight matrix (and route a handful of rows to
// each expert), so every product is bound by reading the weights. These kernels compute dot
// products of up to three weight rows with up to four (L1-resident) input rows at once (a tile
// of accumulators in registers), in parallel over blocks of weight rows:
//   linear_rows:        y[r] = W x[r]
//   expert_swiglu_rows: y[r] = W2[e] (silu(W1[e] x[r]) * (W3[e] x[r])) for the rows r of expert e
// float32 only, inference only (no autograd); AVX2+FMA where the CPU has it, plain loops
// otherwise (the dispatch is at run time, so the library still builds for any x86-64).

// MEGADS_CPU_PLAIN=1 (read once per process) makes the kernels below take their plain loops and
// products, which CPUs without AVX2 and non-x86 or BLAS-less builds use: the tests run them this way
bool plain_requested() {
  static const bool yes = [] {
    const char* v = std::getenv("MEGADS_CPU_PLAIN");
    return v && v[0] && std::strcmp(v, "0") != 0;
  }();
  return yes;
}

#ifdef MEGADS_X86
// The AVX2+FMA kernels where the CPU has them, unless MEGADS_CPU_PLAIN=1
bool use_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !plain_requested();
  return yes;
}
#endif

// out[r * ostride] = w . x[r * ld ..] for r < R (R <= 4), n elements each
using DotsFn = void (*)(const float* w, const float* x, int64_t ld, int R, int64_t n, float* out, int64_t ostride);

void dots_plain(const float* w, const float* x, int64_t ld, int R, int64_t n, float* out, int64_t ostride) {
  for (int r = 0; r < R; ++r) {
    float v = 0.f;
    for (int64_t i = 0; i < n; ++i) v += w[i] * x[r * ld + i];
    out[r * ostride] = v;
  }
}

#ifdef MEGADS_X86
// the sum of 8 floats
__attribute__((target("avx2,fma"))) inline float hsum_avx2(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}

// exp on 8 floats (Cephes' expf: range reduction by ln 2, degree-5 polynomial; ~2 ulp), the
// arguments clamped to [-87, 88] (exp(-87) ~ 1.6e-38, exp(88) ~ 1.7e38)
__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.f)), _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

template <int R>
__attribute__((target("avx2,fma"))) void dots_avx2_r(const float* w, const float* x, int64_t ld, int64_t n, float* out,
                                                      int64_t ostride) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {  // each weight vector feeds R rows
    const __m256 w0 = _mm256_loadu_ps(w + i), w1 = _mm256_loadu_ps(w + i + 8);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * ld + i), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * ld + i + 8), acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m256 s = _mm256_add_ps(acc[r][0], acc[r][1]);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    float v = _mm_cvtss_f32(h);
    for (int64_t j = i; j < n; ++j) v += w[j] * x[r * ld + j];
    out[r * ostride] = v;
  }
}

__attribute__((target("avx2,fma"))) void dots_avx2(const float* w, const float* x, int64_t ld, int R, int64_t n,
                                                    float* out, int64_t ostride) {
  switch (R) {
    case 4: dots_avx2_r<4>(w, x, ld, n, out, ostride); break;
    case 3: dots_avx2_r<3>(w, x, ld, n, out, ostride); break;
    case 2: dots_avx2_r<2>(w, x, ld, n, out, ostride); break;
    default: dots_avx2_r<1>(w, x, ld, n, out, ostride); break;
  }
}
#endif

DotsFn pick_dots() {
#ifdef MEGADS_X86
  if (use_avx2()) return &dots_avx2;
#endif
  return &dots_plain;
}

// y[r, j] = W[j] . x[r] for rows r in [r0, r1) and weight rows j in [j0, j1); x rows of length n
// (stride ld), y rows of stride ystride
using RowsFn = void (*)(const float* W, int64_t j0, int64_t j1, const float* x, int64_t ld, int64_t r0, int64_t r1,
                        int64_t n, float* y, int64_t ystride);

void rows_times_plain(const float* W, int64_t j0, int64_t j1, const float* x, int64_t ld, int64_t r0, int64_t r1,
                      int64_t n, float* y, int64_t ystride) {
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t r = r0; r < r1; r += 4)
      dots_plain(W + j * n, x + r * ld, ld, static_cast<int>(std::min<int64_t>(4, r1 - r)), n, y + r * ystride + j,
                 ystride);
}

#ifdef MEGADS_X86
// A tile of R (<= 4) input rows by J (<= 3) weight rows: R x J accumulators (12 of the 16 ymm
// registers at 4 x 3), so each 8 floats loaded from a weight row feed R products and each loaded
// from an input row J (dots_avx2 reloads the inputs for every weight row: 10 loads per 8 FMAs
// there, 7 per 12 here), and one horizontal sum per output; 4 rows' sums of one weight row are
// reduced together (three hadds).
// pf: where to prefetch from alongside (the next tile's first weight row), or null.
template <int R, int J>
__attribute__((target("avx2,fma"))) void tile_avx2(const float* w, const float* x, int64_t ld, int64_t n, float* y,
                                                    int64_t ystride, const float* pf = nullptr) {
  __m256 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    if (pf && (i & 15) == 0)
      for (int j = 0; j < 3; ++j) _mm_prefetch(reinterpret_cast<const char*>(pf + j * n + i), _MM_HINT_T0);
    __m256 wv[J];
    for (int j = 0; j < J; ++j) wv[j] = _mm256_loadu_ps(w + j * n + i);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * ld + i);
      for (int j = 0; j < J; ++j) acc[r][j] = _mm256_fmadd_ps(wv[j], xv, acc[r][j]);
    }
  }
  for (int j = 0; j < J; ++j) {
    float v[4];
    if constexpr (R == 4) {
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0][j], acc[1][j]), _mm256_hadd_ps(acc[2][j], acc[3][j]));
      _mm_storeu_ps(v, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    } else {
      for (int r = 0; r < R; ++r) v[r] = hsum_avx2(acc[r][j]);
    }
    for (int r = 0; r < R; ++r) {
      for (int64_t k = i; k < n; ++k) v[r] += w[j * n + k] * x[r * ld + k];
      y[r * ystride + j] = v[r];
    }
  }
}

template <int J>
__attribute__((target("avx2,fma"))) void tile_rows_avx2(const float* w, const float* x, int64_t ld, int64_t R,
                                                         int64_t n, float* y, int64_t ystride, const float* pf) {
  switch (R) {
    case 4: tile_avx2<4, J>(w, x, ld, n, y, ystride, pf); break;
    case 3: tile_avx2<3, J>(w, x, ld, n, y, ystride, pf); break;
    case 2: tile_avx2<2, J>(w, x, ld, n, y, ystride, pf); break;
    default: tile_avx2<1, J>(w, x, ld, n, y, ystride, pf); break;
  }
}

__attribute__((target("avx2,fma"))) void rows_times_avx2(const float* W, int64_t j0, int64_t j1, const float* x,
                                                          int64_t ld, int64_t r0, int64_t r1, int64_t n, float* y,
                                                          int64_t ystride) {
  if (r1 <= r0) return;
  if (r1 - r0 < 4) {  // fewer rows than a tile: dots_avx2 (two accumulators per row) streams the weights faster
    for (int64_t j = j0; j < j1; ++j)
      dots_avx2(W + j * n, x + r0 * ld, ld, static_cast<int>(r1 - r0), n, y + r0 * ystride + j, ystride);
    return;
  }
  // weight rows outer: each tile of weight rows is read from memory once and stays in L1 for
  // every group of input rows; while the first group runs, the next tile's rows are prefetched
  // into L1 a cache line at a time (the rollout shape's experts ran 12-17% faster with it; a whole
  // tile prefetched ahead into L2 was slower than none)
  for (int64_t j = j0; j < j1; j += 3) {
    const int64_t J = std::min<int64_t>(3, j1 - j);
    for (int64_t r = r0; r < r1; r += 4) {
      const int64_t R = std::min<int64_t>(4, r1 - r);
      const float *w = W + j * n, *xr = x + r * ld;
      float* yr = y + r * ystride + j;
      const float* pf = (r == r0 && j + 6 <= j1) ? w + 3 * n : nullptr;
      if (J == 3) tile_rows_avx2<3>(w, xr, ld, R, n, yr, ystride, pf);
      else if (J == 2) tile_rows_avx2<2>(w, xr, ld, R, n, yr, ystride, pf);
      else tile_rows_avx2<1>(w, xr, ld, R, n, yr, ystride, pf);
    }
  }
}

// a[i] = silu(a[i]) * b[i] for i < n
__attribute__((target("avx2,fma"))) void swiglu_avx2(float* a, const float* b, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(a + i);
    const __m256 e = exp_avx2(_mm256_sub_ps(zero, g));
    _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(b + i)));
  }
  for (; i < n; ++i) a[i] = a[i] / (1.f + std::exp(-a[i])) * b[i];
}
#endif

void swiglu_plain(float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = a[i] / (1.f + std::exp(-a[i])) * b[i];
}

RowsFn pick_rows() {
#ifdef MEGADS_X86
  if (use_avx2()) return &rows_times_avx2;
#endif
  return &rows_times_plain;
}

void check_float(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": float32 only");
}

Tensor linear_rows_cpu(const Tensor& x_in, const Tensor& w_in) {
  check_float("linear_rows", {&x_in, &w_in});
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2 && x_in.size(1) == w_in.size(1),
              "linear_rows: x [R, K], w [N, K]");
  const Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t R = x.size(0), K = x.size(1), N = w.size(0), B = 32;
  Tensor y = at::empty({R, N}, x.options());
  if (R == 0 || N == 0) return y;
  const float *xp = x.const_data_ptr<float>(), *wp = w.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const RowsFn rows_times = pick_rows();
  at::parallel_for(0, divup(N, B), 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it)
      rows_times(wp, it * B, std::min(N, it * B + B), xp, K, 0, R, K, yp, N);
  });
  return y;
}

Tensor expert_swiglu_rows_cpu(const Tensor& x_in, const Tensor& offsets, const Tensor& w1_in, const Tensor& w3_in,
                              const Tensor& w2_in) {
  check_float("expert_swiglu_rows", {&x_in, &w1_in, &w3_in, &w2_in});
  TORCH_CHECK(x_in.dim() == 2 && w1_in.dim() == 3 && w3_in.sizes() == w1_in.sizes() && w2_in.dim() == 3,
              "expert_swiglu_rows: x [N, D], w1/w3 [E, I, D], w2 [E, D, I]");
  const Tensor x = x_in.contiguous(), w1 = w1_in.contiguous(), w3 = w3_in.contiguous(), w2 = w2_in.contiguous();
  const int64_t N = x.size(0), D = x.size(1), E = w1.size(0), I = w1.size(1);
  TORCH_CHECK(w1.size(2) == D && w2.size(0) == E && w2.size(1) == D && w2.size(2) == I,
              "expert_swiglu_rows: weight shapes do not match x");
  const Tensor off = offsets.to(at::kLong).contiguous();
  TORCH_CHECK(off.numel() == E + 1, "expert_swiglu_rows: offsets must have E+1 entries");
  const int64_t* o = off.const_data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0 && o[E] == N, "expert_swiglu_rows: offsets must run from 0 to N");
  std::vector<int64_t> hit;  // experts with rows
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(o[e + 1] >= o[e], "expert_swiglu_rows: offsets must be non-decreasing");
    if (o[e + 1] > o[e]) hit.push_back(e);
  }
  Tensor a = at::empty({N, I}, x.options()), b = at::empty({N, I}, x.options());
  Tensor y = at::empty({N, D}, x.options());
  if (N == 0) return y;
  const float *xp = x.const_data_ptr<float>(), *p1 = w1.const_data_ptr<float>(), *p3 = w3.const_data_ptr<float>(),
              *p2 = w2.const_data_ptr<float>();
  float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>(), *yp = y.data_ptr<float>();
  const RowsFn rows_times = pick_rows();
  void (*swiglu)(float*, const float*, int64_t) = &swiglu_plain;
#ifdef MEGADS_X86
  if (use_avx2()) swiglu = &swiglu_avx2;
#endif
  const int64_t H = static_cast<int64_t>(hit.size()), B1 = 24, B2 = 30, n1 = divup(I, B1), n2 = divup(D, B2);
  // tasks ordered block-major (every expert's block 0, then block 1, ...): the threads' contiguous
  // shares of the range then hold about the same number of rows however unevenly tokens are routed
  at::parallel_for(0, H * n1, 1, [&](int64_t begin, int64_t end) {  // a = silu(W1 x) * (W3 x)
    for (int64_t it = begin; it < end; ++it) {
      const int64_t e = hit[it % H], j0 = (it / H) * B1, j1 = std::min(I, j0 + B1);
      rows_times(p1 + e * I * D, j0, j1, xp, D, o[e], o[e + 1], D, ap, I);
      rows_times(p3 + e * I * D, j0, j1, xp, D, o[e], o[e + 1], D, bp, I);
      for (int64_t r = o[e]; r < o[e + 1]; ++r) swiglu(ap + r * I + j0, bp + r * I + j0, j1 - j0);
    }
  });
  at::parallel_for(0, H * n2, 1, [&](int64_t begin, int64_t end) {  // y = W2 a
    for (int64_t it = begin; it < end; ++it) {
      const int64_t e = hit[it % H], j0 = (it / H) * B2, j1 = std::min(D, j0 + B2);
      rows_times(p2 + e * D * I, j0, j1, ap, I, o[e], o[e + 1], I, yp, D);
    }
  });
  return y;
}

// ------------------------------------------------------------------ decode attention over latents
// One query position per row attends over its cached [latent | rope key] rows (MLA's absorbed
// decode): o[b, h] = sum_t softmax_t(scale * q[b, h] . joint[b, t]) joint[b, t, :value_dim],
// over the kept rows t (key_mask[b, t]); a (b, h) with no kept row gives zeros. The cache is read
// once, in chunks of rows (an online softmax within each chunk), in parallel over (row, chunk);
// the chunks of a row are merged after (log-sum-exp). The product with the query is the few-row
// dot kernel above (each cached row against up to four heads at once).

// One block of n kept rows (rows[i]: the cached row, values first) for every head: scale the
// scores s[h * SB + i], then the online-softmax update of the running max m[h], sum l[h] and
// unnormalised output acc[h * V ..] (acc = acc * exp(m_old - m_new) + sum_i exp(s_i - m_new) v_i).
using BlockFn = void (*)(const float* const* rows, int64_t n, float* s, int64_t SB, int64_t H, int64_t V, float scale,
                         float* m, float* l, float* acc);

void block_plain(const float* const* rows, int64_t n, float* s, int64_t SB, int64_t H, int64_t V, float scale,
                 float* m, float* l, float* acc) {
  for (int64_t h = 0; h < H; ++h) {
    float* sh = s + h * SB;
    float mx = m[h];
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, sh[i] *= scale);
    const float alpha = std::exp(m[h] - mx);  // 0 when nothing was kept before (m = -inf)
    float* ah = acc + h * V;
    float sum = l[h] * alpha;
    for (int64_t j = 0; j < V; ++j) ah[j] *= alpha;
    for (int64_t i = 0; i < n; ++i) {
      const float p = std::exp(sh[i] - mx);
      sum += p;
      for (int64_t j = 0; j < V; ++j) ah[j] += p * rows[i][j];
    }
    m[h] = mx;
    l[h] = sum;
  }
}

#ifdef MEGADS_X86
// acc[0 .. 8*NV) = acc * alpha + sum_i p[i] rows[i][off ..]: the accumulators stay in registers
template <int NV>
__attribute__((target("avx2,fma"))) inline void accumulate_avx2(float* acc, float alpha, const float* p,
                                                                const float* const* rows, int64_t n, int64_t off) {
  __m256 a[NV];
  const __m256 al = _mm256_set1_ps(alpha);
  for (int k = 0; k < NV; ++k) a[k] = _mm256_mul_ps(_mm256_loadu_ps(acc + 8 * k), al);
  for (int64_t i = 0; i < n; ++i) {
    const __m256 pv = _mm256_set1_ps(p[i]);
    const float* v = rows[i] + off;
    for (int k = 0; k < NV; ++k) a[k] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 8 * k), a[k]);
  }
  for (int k = 0; k < NV; ++k) _mm256_storeu_ps(acc + 8 * k, a[k]);
}

__attribute__((target("avx2,fma"))) void block_avx2(const float* const* rows, int64_t n, float* s, int64_t SB,
                                                     int64_t H, int64_t V, float scale, float* m, float* l,
                                                     float* acc) {
  // SB is a multiple of 8: the scores of a head are whole vectors, the unused tail set to -inf
  const __m256 sc = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t h = 0; h < H; ++h) {
    float* sh = s + h * SB;
    __m256 mx = _mm256_set1_ps(m[h]);
    for (int64_t i = 0; i < n; i += 8) {
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)), lane));
      const __m256 v = _mm256_blendv_ps(ninf, _mm256_mul_ps(_mm256_loadu_ps(sh + i), sc), keep);
      _mm256_storeu_ps(sh + i, v);
      mx = _mm256_max_ps(mx, v);
    }
    __m128 h4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h4 = _mm_max_ps(h4, _mm_movehl_ps(h4, h4));
    h4 = _mm_max_ss(h4, _mm_shuffle_ps(h4, h4, 1));
    const float mnew = _mm_cvtss_f32(h4);
    const float alpha = std::exp(m[h] - mnew);  // 0 when nothing was kept before (m = -inf)
    __m256 sum = _mm256_setzero_ps();
    const __m256 mv = _mm256_set1_ps(mnew);
    for (int64_t i = 0; i < n; i += 8) {  // exp(-inf - m) = 0 in the unused tail (the clamp gives ~1e-38)
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)), lane));
      const __m256 p = _mm256_and_ps(exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(sh + i), mv)), keep);
      _mm256_storeu_ps(sh + i, p);
      sum = _mm256_add_ps(sum, p);
    }
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    s4 = _mm_hadd_ps(s4, s4);
    s4 = _mm_hadd_ps(s4, s4);
    l[h] = l[h] * alpha + _mm_cvtss_f32(s4);
    m[h] = mnew;
    float* ah = acc + h * V;
    int64_t off = 0;
    for (; off + 64 <= V; off += 64) accumulate_avx2<8>(ah + off, alpha, sh, rows, n, off);
    for (; off + 8 <= V; off += 8) accumulate_avx2<1>(ah + off, alpha, sh, rows, n, off);
    for (; off < V; ++off) {
      float a = ah[off] * alpha;
      for (int64_t i = 0; i < n; ++i) a += sh[i] * rows[i][off];
      ah[off] = a;
    }
  }
}
#endif

BlockFn pick_block() {
#ifdef MEGADS_X86
  if (use_avx2()) return &block_avx2;
#endif
  return &block_plain;
}

Tensor latent_attention_rows_cpu(const Tensor& q_in, const Tensor& joint, const std::optional<Tensor>& key_mask,
                                 int64_t value_dim, double scale) {
  check_float("latent_attention_rows", {&q_in, &joint});
  TORCH_CHECK(q_in.dim() == 3 && joint.dim() == 3 && q_in.size(0) == joint.size(0) && q_in.size(2) == joint.size(2),
              "latent_attention_rows: q [B, H, C], joint [B, T, C]");
  const int64_t B = q_in.size(0), H = q_in.size(1), C = q_in.size(2), T = joint.size(1);
  TORCH_CHECK(value_dim > 0 && value_dim <= C, "latent_attention_rows: value_dim must be in [1, C]");
  // rows of the cache must be contiguous; the batch stride may be anything (a view of a longer cache)
  const Tensor kv = (joint.stride(2) == 1 && joint.stride(1) == C) ? joint : joint.contiguous();
  const Tensor q = q_in.contiguous();
  Tensor mask;
  if (key_mask.has_value()) {
    TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->dim() == 2 && key_mask->size(0) == B &&
                    key_mask->size(1) == T,
                "latent_attention_rows: key_mask must be bool [B, T]");
    mask = key_mask->contiguous();
  }
  Tensor out = at::zeros({B, H, value_dim}, q.options());
  if (B == 0 || H == 0 || T == 0) return out;
  // chunks of at least 128 cached rows, enough of them for ~16 work items (fixed by the shapes, not
  // the thread count, so results do not depend on it); scratch stays B x chunks x H x V floats
  const int64_t TC = std::max<int64_t>(128, divup(T, divup(16, B))), nC = divup(T, TC), V = value_dim;
  const int64_t SB = 16;  // rows per score block
  // per (b, chunk): running max m [H], sum l [H], unnormalised output acc [H, V]
  std::vector<float> m(B * nC * H), l(B * nC * H), acc(B * nC * H * V);
  const float* qp = q.const_data_ptr<float>();
  const float* kp = kv.const_data_ptr<float>();
  const int64_t kb = kv.stride(0);
  const bool* mp = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  const float sc = static_cast<float>(scale), ninf = -std::numeric_limits<float>::infinity();
  const DotsFn dots = pick_dots();
  const BlockFn block = pick_block();
  at::parallel_for(0, B * nC, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(H * SB);
    std::vector<const float*> kept(SB);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / nC, t0 = (it % nC) * TC, t1 = std::min(T, t0 + TC);
      float *mi = m.data() + it * H, *li = l.data() + it * H, *ai = acc.data() + it * H * V;
      std::fill(mi, mi + H, ninf);
      std::fill(li, li + H, 0.f);
      std::fill(ai, ai + H * V, 0.f);
      const float* qb = qp + b * H * C;
      for (int64_t u0 = t0; u0 < t1; u0 += SB) {
        int64_t n = 0;  // the kept rows of this block
        for (int64_t t = u0; t < std::min(t1, u0 + SB); ++t)
          if (!mp || mp[b * T + t]) kept[n++] = kp + b * kb + t * C;
        if (n == 0) continue;
        for (int64_t i = 0; i < n; ++i)  // s[h, i] = q[h] . row i
          for (int64_t h = 0; h < H; h += 4)
            dots(kept[i], qb + h * C, C, static_cast<int>(std::min<int64_t>(4, H - h)), C, s.data() + h * SB + i, SB);
        block(kept.data(), n, s.data(), SB, H, V, sc, mi, li, ai);
      }
    }
  });
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {  // merge the chunks of each (b, h)
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      float mx = ninf;
      for (int64_t c = 0; c < nC; ++c) mx = std::max(mx, m[(b * nC + c) * H + h]);
      if (mx == ninf) continue;  // no kept row: zeros
      float total = 0.f;
      float* o = op + bh * V;
      for (int64_t c = 0; c < nC; ++c) {
        const int64_t i = (b * nC + c) * H + h;
        if (l[i] == 0.f) continue;
        const float w = std::exp(m[i] - mx);
        total += l[i] * w;
        const float* a = acc.data() + i * V;
        for (int64_t j = 0; j < V; ++j) o[j] += w * a[j];
      }
      const float inv = 1.f / total;
      for (int64_t j = 0; j < V; ++j) o[j] *= inv;
    }
  });
  return out;
}

// ------------------------------------------------------------------ RMSNorm of a few rows
// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, float32, inference only: a decode step normalises a
// handful of rows 25 times, where torch's rms_norm spends ~20 us in the ops it is made of.
using RmsFn = void (*)(const float* x, const float* w, int64_t n, float eps, float* y);

void rms_plain(const float* x, const float* w, int64_t n, float eps, float* y) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * w[i];
}

#ifdef MEGADS_X86
__attribute__((target("avx2,fma"))) void rms_avx2(const float* x, const float* w, int64_t n, float eps, float* y) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
  }
  const __m256 s = _mm256_add_ps(a0, a1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  float ss = _mm_cvtss_f32(h);
  for (; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  const __m256 iv = _mm256_set1_ps(inv);
  i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), iv), _mm256_loadu_ps(w + i)));
  for (; i < n; ++i) y[i] = x[i] * inv * w[i];
}
#endif

Tensor rms_norm_rows_cpu(const Tensor& x_in, const Tensor& w_in, double eps) {
  check_float("rms_norm_rows", {&x_in, &w_in});
  TORCH_CHECK(x_in.dim() >= 1 && w_in.dim() == 1 && x_in.size(-1) == w_in.size(0),
              "rms_norm_rows: x [..., D], w [D]");
  const Tensor x = x_in.contiguous(), w = w_in.contiguous();
  Tensor y = at::empty_like(x);
  const int64_t D = x.size(-1), R = D ? x.numel() / D : 0;
  if (R == 0) return y;
  RmsFn fn = &rms_plain;
#ifdef MEGADS_X86
  if (use_avx2()) fn = &rms_avx2;
#endif
  const float *xp = x.const_data_ptr<float>(), *wp = w.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, R, std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) fn(xp + r * D, wp, D, e, yp + r * D);
  });
  return y;
}


// The backward of y = x r w, r = 1 / sqrt(mean(x^2) + eps) per row (r recomputed from x):
//   dx = r (dy w) - x r^3 sum(dy w x) / D,   dw = sum over rows of dy x r.
// dw is summed per block of kRmsRows rows, then over the blocks in order (in double): the same
// result whatever the thread count.
constexpr int64_t kRmsRows = 64;

// one row: dx, and dy x r added into dw_part
void rms_backward_row_plain(const float* x, const float* w, const float* dy, int64_t n, float eps, float* dx,
                            float* dw_part) {
  float ss = 0.f, c = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    ss += x[i] * x[i];
    c += dy[i] * w[i] * x[i];
  }
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps), k = r * r * r * c / static_cast<float>(n);
  for (int64_t i = 0; i < n; ++i) {
    dx[i] = r * dy[i] * w[i] - x[i] * k;
    dw_part[i] += dy[i] * x[i] * r;
  }
}

#ifdef MEGADS_X86
__attribute__((target("avx2,fma"))) void rms_backward_row_avx2(const float* x, const float* w, const float* dy,
                                                                int64_t n, float eps, float* dx, float* dw_part) {
  __m256 s0 = _mm256_setzero_ps(), c0 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    s0 = _mm256_fmadd_ps(v, v, s0);
    c0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(dy + i), _mm256_loadu_ps(w + i)), v, c0);
  }
  float ss = hsum_avx2(s0), c = hsum_avx2(c0);
  for (; i < n; ++i) {
    ss += x[i] * x[i];
    c += dy[i] * w[i] * x[i];
  }
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps), k = r * r * r * c / static_cast<float>(n);
  const __m256 rv = _mm256_set1_ps(r), kv = _mm256_set1_ps(k);
  i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i), g = _mm256_loadu_ps(dy + i);
    _mm256_storeu_ps(dx + i, _mm256_fnmadd_ps(v, kv, _mm256_mul_ps(rv, _mm256_mul_ps(g, _mm256_loadu_ps(w + i)))));
    _mm256_storeu_ps(dw_part + i, _mm256_fmadd_ps(_mm256_mul_ps(g, v), rv, _mm256_loadu_ps(dw_part + i)));
  }
  for (; i < n; ++i) {
    dx[i] = r * dy[i] * w[i] - x[i] * k;
    dw_part[i] += dy[i] * x[i] * r;
  }
}
#endif

std::tuple<Tensor, Tensor> rms_norm_backward_cpu(const Tensor& dy_in, const Tensor& x_in, const Tensor& w_in,
                                                 double eps) {
  check_float("rms_norm_backward", {&dy_in, &x_in, &w_in});
  TORCH_CHECK(x_in.dim() >= 1 && w_in.dim() == 1 && x_in.size(-1) == w_in.size(0) && dy_in.sizes() == x_in.sizes(),
              "rms_norm_backward: dy and x [..., D], w [D]");
  const Tensor x = x_in.contiguous(), w = w_in.contiguous(), dy = dy_in.contiguous();
  const int64_t D = x.size(-1), R = D ? x.numel() / D : 0, nb = divup(R, kRmsRows);
  Tensor dx = at::empty_like(x), dw = at::zeros({D}, w.options());
  if (R == 0) return {dx, dw};
  using Fn = void (*)(const float*, const float*, const float*, int64_t, float, float*, float*);
  Fn fn = &rms_backward_row_plain;
#ifdef MEGADS_X86
  if (use_avx2()) fn = &rms_backward_row_avx2;
#endif
  const float *xp = x.const_data_ptr<float>(), *wp = w.const_data_ptr<float>(), *gp = dy.const_data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  std::vector<float> part(nb * D, 0.f);
  const float e = static_cast<float>(eps);
  at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t r = b * kRmsRows; r < std::min(R, (b + 1) * kRmsRows); ++r)
        fn(xp + r * D, wp, gp + r * D, D, e, dxp + r * D, part.data() + b * D);
  });
  float* dwp = dw.data_ptr<float>();
  at::parallel_for(0, D, 64, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      double acc = 0;
      for (int64_t b = 0; b < nb; ++b) acc += part[b * D + j];
      dwp[j] = static_cast<float>(acc);
    }
  });
  return {dx, dw};
}

// ------------------------------------------------------------------ causal self-attention (training)
// softmax(scale q k^T + causal mask + key mask) v, forward and backward, float32/float64, for the
// layout the model has: q [B, Sq, H, Dq], k [B, Sk, H, Dq], v [B, Sk, H, Dv] (any strides, last dim
// contiguous; Sq <= Sk, the queries being the last Sq positions: query i sees keys j <= Sk - Sq + i),
// key_mask [B, Sk] of kept keys or none; o [B, Sq, H, Dv], lse [B, H, Sq] (log of each row's softmax
// sum, for the backward; -inf for a row with no kept key, whose output is 0).
// Queries are taken in blocks of kRows rows against the keys up to the block's last row, so the
// scores of a block ([kRows, <= Sk]) stay in cache and the products run in BLAS (sgemm_/dgemm_, the
// library torch links: MKL on x86 wheels) at close to the matmul peak. Causal work skipped: all key
// columns past a block's last row; the diagonal block is masked.
// Tasks: each (batch, head)'s blocks are paired first with last, second with second-to-last, ...,
// so every pair costs about the same (a causal block's cost grows with its row). The forward runs
// one task per pair: each row's arithmetic is the same whichever task runs it, so its result does
// not depend on the split. The backward sums dK and dV over the blocks: with at least as many
// (batch, head) pairs as threads it runs one task per (batch, head), accumulating from the last
// block down; with fewer (a long sequence of few heads, e.g. under tensor parallelism, on a
// many-core host) G tasks per (batch, head), just enough to occupy the threads, task g taking the
// pairs g, g + G, ..., each summing into its own dK/dV buffer ([Sk, Dq + Dv]: about threads x Sk x
// (Dq + Dv) values in all), added up in task order after.
// Backward (lse saved, D = rowsum(dO o)): P = exp(scale q k^T - lse); dV += P^T dO;
// dS = P (dO v^T - D) scale; dQ = dS k; dK += dS^T q.

extern "C" {
// Fortran BLAS as torch's CPU library exports it; weak, so a torch built without BLAS still loads
// (the products then go through at::mm, slower; also with MEGADS_CPU_PLAIN=1).
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

constexpr int64_t kRows = 64;  // query rows per block

// Row-major C[M, N] = alpha op(A) op(B) + beta C (op = transpose where ta / tb), leading dims in
// elements. Column-major BLAS computes C^T = op(B)^T op(A)^T: the same flags, operands swapped.
template <typename T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
             int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ && !plain_requested()) return sgemm_(&cb, &ca, &n, &m, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
  } else {
    if (dgemm_ && !plain_requested()) return dgemm_(&cb, &ca, &n, &m, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
  }
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, bool t, int64_t rows, int64_t cols, int64_t ld) {  // op(X) [rows, cols]
    Tensor x = t ? at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1}, opt).t()
                 : at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, opt);
    return x;
  };
  Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
  Tensor r = at::mm(view(A, ta, M, K, lda), view(B, tb, K, N, ldb)).mul_(alpha);
  if (beta == T(0)) c.copy_(r);
  else c.mul_(beta).add_(r);
}

// s[0, n) -> exp(s - sub) on the kept keys of [0, c) (kept: keep[j] != 0, or all without keep), 0
// elsewhere; returns the sum
template <typename T>
T exp_row_plain(T* s, const T* keep, int64_t c, int64_t n, T sub) {
  T sum = 0;
  for (int64_t j = 0; j < c; ++j) sum += (s[j] = (keep && keep[j] == T(0)) ? T(0) : std::exp(s[j] - sub));
  for (int64_t j = c; j < n; ++j) s[j] = 0;
  return sum;
}

// the largest kept s[j], j < c (-inf where none is kept)
template <typename T>
T max_row_plain(const T* s, const T* keep, int64_t c) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < c; ++j)
    if (!keep || keep[j] != T(0)) mx = std::max(mx, s[j]);
  return mx;
}

// ds[j] = p[j] (ds[j] - d) scale, in place over dp
template <typename T>
void ds_row_plain(const T* p, T* dp, int64_t n, T d, T scale) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - d) * scale;
}

#ifdef MEGADS_X86
__attribute__((target("avx2,fma"))) float exp_row_avx2(float* s, const float* keep, int64_t c, int64_t n, float sub) {
  const __m256 sv = _mm256_set1_ps(sub);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= c; j += 8) {  // a dropped key's exp is multiplied by its 0 (exp_avx2 clamps -inf)
    __m256 p = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), sv));
    if (keep) p = _mm256_mul_ps(p, _mm256_loadu_ps(keep + j));
    _mm256_storeu_ps(s + j, p);
    acc = _mm256_add_ps(acc, p);
  }
  float sum = hsum_avx2(acc);
  for (; j < c; ++j) sum += (s[j] = (keep && keep[j] == 0.f) ? 0.f : std::exp(s[j] - sub));
  for (; j < n; ++j) s[j] = 0.f;
  return sum;
}

__attribute__((target("avx2,fma"))) float max_row_avx2(const float* s, const float* keep, int64_t c) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), zero = _mm256_setzero_ps();
  __m256 mx = ninf;
  int64_t j = 0;
  for (; j + 8 <= c; j += 8) {
    __m256 v = _mm256_loadu_ps(s + j);
    if (keep) v = _mm256_blendv_ps(v, ninf, _mm256_cmp_ps(_mm256_loadu_ps(keep + j), zero, _CMP_EQ_OQ));
    mx = _mm256_max_ps(mx, v);
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  float m = _mm_cvtss_f32(h);
  for (; j < c; ++j)
    if (!keep || keep[j] != 0.f) m = std::max(m, s[j]);
  return m;
}

__attribute__((target("avx2,fma"))) void ds_row_avx2(const float* p, float* dp, int64_t n, float d, float scale) {
  const __m256 dv = _mm256_set1_ps(d), sc = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dp + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(p + j),
                                                         _mm256_sub_ps(_mm256_loadu_ps(dp + j), dv)), sc));
  for (; j < n; ++j) dp[j] = p[j] * (dp[j] - d) * scale;
}
#endif

template <typename T>
struct RowFns {
  T (*exp_row)(T*, const T*, int64_t, int64_t, T) = &exp_row_plain<T>;
  T (*max_of)(const T*, const T*, int64_t) = &max_row_plain<T>;
  void (*ds_row)(const T*, T*, int64_t, T, T) = &ds_row_plain<T>;
};

template <typename T>
RowFns<T> pick_row_fns() {
  RowFns<T> f;
#ifdef MEGADS_X86
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx2()) {
      f.exp_row = &exp_row_avx2;
      f.max_of = &max_row_avx2;
      f.ds_row = &ds_row_avx2;
    }
  }
#endif
  return f;
}

// A [B, S, H, D] operand of one (b, h): the first row and the row stride
template <typename T>
struct Rows {
  const T* p;
  int64_t ld;
};

template <typename T>
Rows<T> rows_of(const Tensor& x, int64_t b, int64_t h) {
  return {x.const_data_ptr<T>() + b * x.stride(0) + h * x.stride(2), x.stride(1)};
}

// The key mask as 0/1 in the inputs' dtype [B, Sk] (undefined without one)
Tensor check_attention(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& key_mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
                  q.size(3) == k.size(3) && q.size(1) <= k.size(1) && v.size(0) == k.size(0) &&
                  v.size(1) == k.size(1) && v.size(2) == k.size(2),
              "causal_attention: q [B, Sq, H, Dq], k [B, Sk, H, Dq], v [B, Sk, H, Dv] with Sq <= Sk");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble),
              "causal_attention: float32 or float64 inputs of one dtype");
  if (!key_mask.has_value()) return Tensor();
  TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->dim() == 2 && key_mask->size(0) == k.size(0) &&
                  key_mask->size(1) == k.size(1),
              "causal_attention: key_mask must be bool [B, Sk]");
  return key_mask->to(q.scalar_type()).contiguous();
}

// An operand [B, S, H, D] as BLAS can read its rows: unit stride along D and a row stride of at least
// D (an expanded or overlapping view, e.g. stride 0 along S, is copied)
Tensor last_contiguous(const Tensor& x) {
  return (x.stride(3) == 1 && x.stride(1) >= std::max<int64_t>(x.size(3), 1)) ? x : x.contiguous();
}

template <typename T>
void attention_forward_kernel(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& keep, Tensor& o,
                              Tensor& lse, T scale) {
  const int64_t B = q.size(0), Sq = q.size(1), Sk = k.size(1), H = q.size(2), Dq = q.size(3), Dv = v.size(3);
  const int64_t off = Sk - Sq;
  const RowFns<T> fn = pick_row_fns<T>();
  T* op = o.data_ptr<T>();
  T* lp = lse.data_ptr<T>();
  const T* kp = keep.defined() ? keep.const_data_ptr<T>() : nullptr;
  const int64_t nb = divup(Sq, kRows), np = divup(nb, 2);
  at::parallel_for(0, B * H * np, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(std::min(kRows, Sq) * Sk);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (H * np), h = (t / np) % H, pair = t % np;
      const Rows<T> Q = rows_of<T>(q, b, h), K = rows_of<T>(k, b, h), V = rows_of<T>(v, b, h);
      const T* kb = kp ? kp + b * Sk : nullptr;
      T* O = op + (b * Sq * H + h) * Dv;
      T* L = lp + (b * H + h) * Sq;
      const int64_t blocks[2] = {pair, nb - 1 - pair};
      for (int u = 0; u < (blocks[0] == blocks[1] ? 1 : 2); ++u) {
        const int64_t r0 = blocks[u] * kRows;
        const int64_t m = std::min(kRows, Sq - r0), n = off + r0 + m;  // rows [r0, r0 + m) see keys [0, n)
        T* s = buf.data();
        gemm_rm<T>(false, true, m, n, Dq, scale, Q.p + r0 * Q.ld, Q.ld, K.p, K.ld, T(0), s, n);
        for (int64_t i = 0; i < m; ++i) {
          T* si = s + i * n;
          const int64_t c = off + r0 + i + 1;
          const T mx = fn.max_of(si, kb, c);
          if (mx == -std::numeric_limits<T>::infinity()) {  // no kept key: a zero row
            std::fill(si, si + n, T(0));
            L[r0 + i] = mx;
            continue;
          }
          const T sum = fn.exp_row(si, kb, c, n, mx);
          L[r0 + i] = mx + std::log(sum);
          const T inv = T(1) / sum;
          for (int64_t j = 0; j < c; ++j) si[j] *= inv;
        }
        gemm_rm<T>(false, false, m, Dv, n, T(1), s, n, V.p, V.ld, T(0), O + r0 * H * Dv, H * Dv);
      }
    }
  });
}

std::tuple<Tensor, Tensor> causal_attention_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                const std::optional<Tensor>& key_mask, double scale) {
  const Tensor keep = check_attention(q_in, k_in, v_in, key_mask);
  const Tensor q = last_contiguous(q_in), k = last_contiguous(k_in), v = last_contiguous(v_in);
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), Dv = v.size(3);
  Tensor o = at::empty({B, Sq, H, Dv}, q.options());
  Tensor lse = at::empty({B, H, Sq}, q.options());
  if (q.numel() == 0 || Dv == 0) return {o.zero_(), lse.fill_(-std::numeric_limits<double>::infinity())};
  if (q.scalar_type() == at::kDouble) attention_forward_kernel<double>(q, k, v, keep, o, lse, scale);
  else attention_forward_kernel<float>(q, k, v, keep, o, lse, static_cast<float>(scale));
  return {o, lse};
}

template <typename T>
void attention_backward_kernel(const Tensor& go, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                               const Tensor& lse, const Tensor& keep, Tensor& dq, Tensor& dk, Tensor& dv, T scale) {
  const int64_t B = q.size(0), Sq = q.size(1), Sk = k.size(1), H = q.size(2), Dq = q.size(3), Dv = v.size(3);
  const int64_t off = Sk - Sq, nb = divup(Sq, kRows), np = divup(nb, 2);
  const RowFns<T> fn = pick_row_fns<T>();
  const T* lp = lse.const_data_ptr<T>();
  const T* kp = keep.defined() ? keep.const_data_ptr<T>() : nullptr;
  T *dqp = dq.data_ptr<T>(), *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();
  // G tasks per (b, h), task g taking the pairs g, g + G, ...: G = 1 (dK/dV summed in place) unless
  // there are fewer (b, h) than threads; then just enough to give every thread work, each task
  // summing into its own buffer of [Sk, Dq + Dv] (added up in task order below)
  const int64_t threads = at::get_num_threads();
  const int64_t G = B * H >= threads ? 1 : std::min(np, divup(threads, B * H));
  std::vector<T> part(G > 1 ? B * H * G * Sk * (Dq + Dv) : 0);
  at::parallel_for(0, B * H * G, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows = std::min(kRows, Sq);
    std::vector<T> pbuf(rows * Sk), dpbuf(rows * Sk), d(rows);
    std::vector<int64_t> blocks;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / G, g = t % G, b = bh / H, h = bh % H;
      const Rows<T> Q = rows_of<T>(q, b, h), K = rows_of<T>(k, b, h), V = rows_of<T>(v, b, h);
      const Rows<T> GO = rows_of<T>(go, b, h), O = rows_of<T>(o, b, h);
      const T* kb = kp ? kp + b * Sk : nullptr;
      const T* L = lp + bh * Sq;
      const int64_t lq = H * Dq;
      T* DQ = dqp + (b * Sq * H + h) * Dq;
      T *DK = dkp + (b * Sk * H + h) * Dq, *DV = dvp + (b * Sk * H + h) * Dv;
      int64_t lk = H * Dq, lv = H * Dv;
      if (G > 1) {
        DK = part.data() + t * Sk * (Dq + Dv);
        DV = DK + Sk * Dq;
        lk = Dq;
        lv = Dv;
      }
      blocks.clear();  // this task's blocks, largest first: the first one writes every key it sees
      for (int64_t pr = g; pr < np; pr += G) {
        blocks.push_back(nb - 1 - pr);
        if (pr != nb - 1 - pr) blocks.push_back(pr);
      }
      std::sort(blocks.begin(), blocks.end(), std::greater<int64_t>());
      for (size_t u = 0; u < blocks.size(); ++u) {
        // rows [r0, r0 + m) see keys [0, n); dK/dV rows [0, n0) are summed into, [n0, n) written
        const int64_t r0 = blocks[u] * kRows, m = std::min(kRows, Sq - r0), n = off + r0 + m, n0 = u ? n : 0;
        T *p = pbuf.data(), *dp = dpbuf.data();
        for (int64_t i = 0; i < m; ++i) {  // D = rowsum(dO o)
          T acc = 0;
          const T *gr = GO.p + (r0 + i) * GO.ld, *x = O.p + (r0 + i) * O.ld;
          for (int64_t j = 0; j < Dv; ++j) acc += gr[j] * x[j];
          d[i] = acc;
        }
        gemm_rm<T>(false, true, m, n, Dq, scale, Q.p + r0 * Q.ld, Q.ld, K.p, K.ld, T(0), p, n);
        for (int64_t i = 0; i < m; ++i) {
          if (L[r0 + i] == -std::numeric_limits<T>::infinity()) std::fill(p + i * n, p + (i + 1) * n, T(0));
          else fn.exp_row(p + i * n, kb, off + r0 + i + 1, n, L[r0 + i]);
        }
        const T* go_blk = GO.p + r0 * GO.ld;
        gemm_rm<T>(true, false, n0, Dv, m, T(1), p, n, go_blk, GO.ld, T(1), DV, lv);  // dV += P^T dO
        gemm_rm<T>(true, false, n - n0, Dv, m, T(1), p + n0, n, go_blk, GO.ld, T(0), DV + n0 * lv, lv);
        gemm_rm<T>(false, true, m, n, Dv, T(1), go_blk, GO.ld, V.p, V.ld, T(0), dp, n);  // dP = dO v^T
        for (int64_t i = 0; i < m; ++i) fn.ds_row(p + i * n, dp + i * n, n, d[i], scale);
        gemm_rm<T>(false, false, m, Dq, n, T(1), dp, n, K.p, K.ld, T(0), DQ + r0 * lq, lq);  // dQ = dS k
        const T* q_blk = Q.p + r0 * Q.ld;
        gemm_rm<T>(true, false, n0, Dq, m, T(1), dp, n, q_blk, Q.ld, T(1), DK, lk);  // dK += dS^T q
        gemm_rm<T>(true, false, n - n0, Dq, m, T(1), dp + n0, n, q_blk, Q.ld, T(0), DK + n0 * lk, lk);
      }
    }
  });
  if (G == 1) return;
  // key row j of (b, h): the sum over its tasks g, in order, of those whose largest block sees j
  // (task 0's sees every key: it holds the last block)
  std::vector<int64_t> seen(G);
  for (int64_t g = 0; g < G; ++g) seen[g] = off + std::min(Sq, (nb - g) * kRows);
  at::parallel_for(0, B * H * Sk, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / Sk, j = i % Sk, b = bh / H, h = bh % H;
      T* dkr = dkp + ((b * Sk + j) * H + h) * Dq;
      T* dvr = dvp + ((b * Sk + j) * H + h) * Dv;
      for (int64_t g = 0; g < G && j < seen[g]; ++g) {
        const T* src = part.data() + (bh * G + g) * Sk * (Dq + Dv);
        const T *pk = src + j * Dq, *pv = src + Sk * Dq + j * Dv;
        for (int64_t c = 0; c < Dq; ++c) dkr[c] = g ? dkr[c] + pk[c] : pk[c];
        for (int64_t c = 0; c < Dv; ++c) dvr[c] = g ? dvr[c] + pv[c] : pv[c];
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> causal_attention_backward_cpu(const Tensor& grad_o, const Tensor& q_in,
                                                                 const Tensor& k_in, const Tensor& v_in,
                                                                 const std::optional<Tensor>& key_mask,
                                                                 const Tensor& o_in, const Tensor& lse_in,
                                                                 double scale) {
  const Tensor keep = check_attention(q_in, k_in, v_in, key_mask);
  const Tensor q = last_contiguous(q_in), k = last_contiguous(k_in), v = last_contiguous(v_in);
  const Tensor go = last_contiguous(grad_o.to(q.scalar_type())), o = last_contiguous(o_in);
  const Tensor lse = lse_in.contiguous();
  TORCH_CHECK(go.sizes() == o.sizes() && o.size(1) == q.size(1) && o.size(3) == v.size(3) && lse.dim() == 3,
              "causal_attention_backward: grad_o and o [B, Sq, H, Dv], lse [B, H, Sq]");
  const int64_t B = q.size(0), Sq = q.size(1), Sk = k.size(1), H = q.size(2), Dq = q.size(3), Dv = v.size(3);
  Tensor dq = at::empty({B, Sq, H, Dq}, q.options()), dk = at::empty({B, Sk, H, Dq}, q.options());
  Tensor dv = at::empty({B, Sk, H, Dv}, q.options());
  if (q.numel() == 0 || Dv == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  if (q.scalar_type() == at::kDouble) attention_backward_kernel<double>(go, q, k, v, o, lse, keep, dq, dk, dv, scale);
  else attention_backward_kernel<float>(go, q, k, v, o, lse, keep, dq, dk, dv, static_cast<float>(scale));
  return {dq, dk, dv};
}

// ------------------------------------------------------------------ cross entropy's softmax rows
// x [N, V] (logits, overwritten), target [N] (a vocabulary index, or outside [0, V): none) ->
// x = exp(x - rowmax), (rowmax [N], sum of the row's exps [N], x[target] before the exp [N], 0
// where none). One read and one write of the logits (torch's amax, sub, gather, exp and sum take
// five passes over them). A row holding a NaN or an infinity takes the plain loop with torch's
// propagation (its max NaN where a NaN is; inf - inf = NaN), so a non-finite logit still makes a
// non-finite loss; a -inf logit (a masked token) there gets its exact exp of 0 (exp_avx2 clamps).

// max over the row, NaN if it holds one (torch.amax propagates NaN)
template <typename T>
T max_propagating(const T* x, int64_t n) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(x[j])) return x[j];
    mx = std::max(mx, x[j]);
  }
  return mx;
}

template <typename T>
T softmax_row_plain(T* x, int64_t n, T* mx_out) {
  const T mx = max_propagating(x, n);
  double sum = 0;  // (double: see exp_sum_row_avx2)
  for (int64_t j = 0; j < n; ++j) sum += (x[j] = std::exp(x[j] - mx));
  *mx_out = mx;
  return static_cast<T>(sum);
}

#ifdef MEGADS_X86
// the max of a row of finite values, with *finite cleared where one is not (x - x is NaN only then)
__attribute__((target("avx2,fma"))) float max_row_checked_avx2(const float* x, int64_t n, bool* finite) {
  __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), bad = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    mx = _mm256_max_ps(mx, v);
    bad = _mm256_add_ps(bad, _mm256_sub_ps(v, v));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  float m = _mm_cvtss_f32(h), b = hsum_avx2(bad);
  for (; j < n; ++j) {
    m = std::max(m, x[j]);
    b += x[j] - x[j];
  }
  *finite = b == 0.f;
  return m;
}

// x[j] = exp(x[j] - sub) for j < n; returns their sum, accumulated in double (a vocabulary-long
// row: float lanes would add ~n/8 terms each, ~4x torch's summation error)
__attribute__((target("avx2,fma"))) double exp_sum_row_avx2(float* x, int64_t n, float sub) {
  const __m256 sv = _mm256_set1_ps(sub);
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 p = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), sv));
    _mm256_storeu_ps(x + j, p);
    a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(p)));
    a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(p, 1)));
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(a0, a1));
  double sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; j < n; ++j) sum += (x[j] = std::exp(x[j] - sub));
  return sum;
}
#endif

template <typename T>
void softmax_rows_kernel(T* x, const int64_t* target, int64_t N, int64_t V, T* rowmax, T* sums, T* picked) {
#ifdef MEGADS_X86
  const bool avx = std::is_same_v<T, float> && use_avx2();
#endif
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* r = x + i * V;
      const int64_t t = target[i];
      picked[i] = (t >= 0 && t < V) ? r[t] : T(0);
#ifdef MEGADS_X86
      if constexpr (std::is_same_v<T, float>) {
        if (avx) {
          bool finite = true;
          const float mx = max_row_checked_avx2(r, V, &finite);
          if (finite) {
            rowmax[i] = mx;
            sums[i] = static_cast<float>(exp_sum_row_avx2(r, V, mx));
            continue;
          }
        }
      }
#endif
      sums[i] = softmax_row_plain(r, V, rowmax + i);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> softmax_rows_cpu(Tensor& x, const Tensor& target_in) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "softmax_rows_: x must be contiguous float32/float64 [N, V]");
  const Tensor target = target_in.to(at::kLong).contiguous();
  TORCH_CHECK(target.dim() == 1 && target.size(0) == x.size(0), "softmax_rows_: target must be [N] for x [N, V]");
  const int64_t N = x.size(0), V = x.size(1);
  Tensor rowmax = at::empty({N}, x.options()), sums = at::empty({N}, x.options()), picked = at::empty({N}, x.options());
  if (x.scalar_type() == at::kDouble)
    softmax_rows_kernel<double>(x.data_ptr<double>(), target.const_data_ptr<int64_t>(), N, V, rowmax.data_ptr<double>(),
                                sums.data_ptr<double>(), picked.data_ptr<double>());
  else
    softmax_rows_kernel<float>(x.data_ptr<float>(), target.const_data_ptr<int64_t>(), N, V, rowmax.data_ptr<float>(),
                               sums.data_ptr<float>(), picked.data_ptr<float>());
  return {rowmax, sums, picked};
}

}  // namespace

TORCH_LIBRARY_IMPL(megads, CPU, m) {
  m.impl("route", &route_cpu);
  m.impl("route_backward", &route_backward_cpu);
  m.impl("permute", &permute_cpu);
  m.impl("permute_backward", &permute_backward_cpu);
  m.impl("unpermute", &unpermute_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
  m.impl("linear_rows", &linear_rows_cpu);
  m.impl("expert_swiglu_rows", &expert_swiglu_rows_cpu);
  m.impl("latent_attention_rows", &latent_attention_rows_cpu);
  m.impl("rms_norm_rows", &rms_norm_rows_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
  m.impl("causal_attention", &causal_attention_cpu);
  m.impl("causal_attention_backward", &causal_attention_backward_cpu);
  m.impl("softmax_rows_", &softmax_rows_cpu);
}

}  // namespace megads
