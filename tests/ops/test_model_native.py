"""Whole model: the `small` preset gives the same logits, loss and gradients on both op paths."""
from __future__ import annotations

import pytest
import torch

from megads import ops


def _run(model, tokens, labels, backend):
    ops.set_backend(backend)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(tokens)
    out = model(tokens, labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits, out.loss.detach(), grads, model.expert_counts()


@pytest.mark.parametrize("device_name", ["cpu", "cuda"])
def test_small_preset_native_equals_torch(native, device_name):
    if device_name == "cuda" and not (torch.cuda.is_available() and native.has_kernels("cuda")):
        pytest.skip("no CUDA device or no CUDA kernels")
    from megads.config import load_model_preset
    from megads.model import Transformer

    device = torch.device(device_name)
    cfg = load_model_preset("small")
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).train()
    with torch.no_grad():  # non-zero balancing biases, so that they steer the selection
        for moe in model.moe_layers():
            if moe.gate.bias is not None:
                moe.gate.bias.uniform_(-0.02, 0.02)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), device=device)
    labels = torch.roll(tokens, -1, dims=1)
    previous = ops.backend()
    try:
        ref = _run(model, tokens, labels, "torch")
        nat = _run(model, tokens, labels, "native")
    finally:
        ops.set_backend(previous)
    logits0, loss0, grads0, counts0 = ref
    logits1, loss1, grads1, counts1 = nat
    torch.testing.assert_close(counts1, counts0, rtol=0, atol=0)  # identical routing
    torch.testing.assert_close(logits1, logits0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert grads1.keys() == grads0.keys() and len(grads0) > 0
    gate_grads = [n for n in grads0 if n.endswith("gate.weight")]
    assert gate_grads and all(grads0[n].abs().sum() > 0 for n in gate_grads)  # the router is trained
    for name, g0 in grads0.items():
        scale = g0.abs().max().item()
        torch.testing.assert_close(grads1[name], g0, rtol=1e-5, atol=1e-5 * max(scale, 1e-3), msg=name)
