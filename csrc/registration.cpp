// Schemas of the megads:: custom ops and the Python module entry point of megads._C.
//
// Importing megads._C runs the static registrations below (and the CPU/CUDA kernels in
// cpu_ops.cpp / cuda_ops.cpp). Autograd formulas and fake (meta) kernels are registered from
// Python in megads/ops/native.py, next to the reference they must agree with.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(megads, m) {
  // logits [T, E], bias [E]? -> weights [T, k] (float32; float64 for float64 logits),
  // indices [T, k] int64, counts [E] int64
  m.def("route(Tensor logits, Tensor? bias, int top_k, int n_group, int topk_group, str score_func, "
        "float route_scale, bool norm_topk_prob) -> (Tensor, Tensor, Tensor)");
  // d weights [T, k] -> d logits [T, E] (logits' dtype)
  m.def("route_backward(Tensor grad_weights, Tensor logits, Tensor indices, str score_func, float route_scale, "
        "bool norm_topk_prob) -> Tensor");
  // x [T, H], indices [T, k] -> x_sorted [T*k, H], offsets [E+1], order [T*k], inv [T*k]
  // order[r] = flat (token, slot) of sorted row r; inv is its inverse: inv[t*k + j] = row of (t, j)
  m.def("permute(Tensor x, Tensor indices, int num_experts) -> (Tensor, Tensor, Tensor, Tensor)");
  // d x_sorted [T*k, H] -> d x [T, H]
  m.def("permute_backward(Tensor grad_x_sorted, Tensor inv, int top_k) -> Tensor");
  // y_sorted [T*k, H], weights [T, k], inv [T*k] -> y [T, H] (y_sorted's dtype)
  m.def("unpermute(Tensor y_sorted, Tensor weights, Tensor inv) -> Tensor");
  // d y [T, H] -> (d y_sorted [T*k, H], d weights [T, k])
  m.def("unpermute_backward(Tensor grad_y, Tensor y_sorted, Tensor weights, Tensor inv) -> (Tensor, Tensor)");
  // inference only (no autograd), CPU float32: x [R, K], w [N, K] -> y [R, N] = x w^T (few rows)
  m.def("linear_rows(Tensor x, Tensor w) -> Tensor");
  // inference only (no autograd), CPU float32: x [N, D] rows sorted by expert, offsets [E+1],
  // w1/w3 [E, I, D], w2 [E, D, I] -> y [N, D], y[r] = w2[e] (silu(w1[e] x[r]) * w3[e] x[r])
  m.def("expert_swiglu_rows(Tensor x, Tensor offsets, Tensor w1, Tensor w3, Tensor w2) -> Tensor");
  // inference only (no autograd), CPU float32, one query position per row: q [B, H, C],
  // joint [B, T, C] cached rows, key_mask [B, T] bool (kept rows) -> o [B, H, value_dim] =
  // softmax(scale q . joint) joint[..., :value_dim]; rows with no kept key give zeros
  m.def("latent_attention_rows(Tensor q, Tensor joint, Tensor? key_mask, int value_dim, float scale) -> Tensor");
  // CPU float32: x [..., D], w [D] -> x / sqrt(mean(x^2) + eps) * w (autograd: rms_norm_backward)
  m.def("rms_norm_rows(Tensor x, Tensor w, float eps) -> Tensor");
  // CPU float32, rms_norm_rows' backward (autograd in megads/ops/native.py): dy, x [..., D], w [D]
  // -> (dx [..., D], dw [D])
  m.def("rms_norm_backward(Tensor dy, Tensor x, Tensor w, float eps) -> (Tensor, Tensor)");
  // CPU float32/float64, causal self-attention: q [B, Sq, H, Dq], k [B, Sk, H, Dq], v [B, Sk, H, Dv]
  // (Sq <= Sk: the queries are the last Sq positions), key_mask [B, Sk] bool kept keys or None
  // -> o [B, Sq, H, Dv] = softmax(scale q k^T, causal, kept keys) v (0 for a row with no kept key),
  // lse [B, H, Sq] (the log of each query row's softmax sum); autograd in megads/ops/native.py
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, Tensor? key_mask, float scale) -> (Tensor, Tensor)");
  // d o [B, Sq, H, Dv] -> (d q [B, Sq, H, Dq], d k [B, Sk, H, Dq], d v [B, Sk, H, Dv])
  m.def("causal_attention_backward(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor o, "
        "Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
  // CPU float32/float64, in place (cross entropy's forward): x [N, V] logits, target [N] (a vocab
  // index, or outside [0, V): none) -> x = exp(x - rowmax); (rowmax [N], sum of exps [N],
  // x[target] before the exp [N], 0 where none)
  m.def("softmax_rows_(Tensor(a!) x, Tensor target) -> (Tensor, Tensor, Tensor)");
}

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "megads._C",
                               "megads native MoE routing and dispatch ops (torch.ops.megads.*)", -1, nullptr};
  return PyModule_Create(&module);
}
