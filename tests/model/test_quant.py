"""Weight-only int8 (megads.model.quant): the per-row quantisation against its formula, the int8
product against a float64 reference of the dequantised weight, every projection and expert of a
model quantised (the float weights gone, the kv up-projection and router kept), and the
quantised model's logits and greedy decode close to the float model's."""
import pytest
import torch

from megads.config import ModelConfig
from megads.model import Transformer
from megads.model.quant import grouped_int8, int8_linear, quantize_int8, quantize_weight


def _cfg(**kw):
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_layers=3,
                first_k_dense=1, num_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
                num_experts_per_tok=2, max_seq_len=128, mtp_depth=1)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def test_quantize_weight_is_symmetric_absmax_per_row():
    w = torch.randn(3, 5, 40, dtype=torch.float64)
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.shape == (3, 5) and s.dtype == torch.float32
    torch.testing.assert_close(s.double(), w.abs().amax(-1) / 127, rtol=1e-6, atol=0)
    assert (q.abs().amax(-1) == 127).all()  # each row's largest entry maps to +-127
    # rounding to the nearest step: |w - q s| <= s / 2 (+ float32 rounding of s)
    err = (w - q.double() * s.double().unsqueeze(-1)).abs()
    assert (err <= s.double().unsqueeze(-1) * (0.5 + 1e-5)).all()


@pytest.mark.parametrize("rows", [1, 4, 64])
def test_int8_linear_equals_the_dequantised_product(rows):
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(48, 96, generator=g), torch.randn(rows, 96, generator=g)
    q, s = quantize_weight(w)
    ref = x.double() @ (q.double() * s.double().unsqueeze(-1)).t()
    y = int8_linear(x, q, s)
    assert y.dtype == torch.float32 and y.shape == (rows, 48)
    # the kernel takes bf16 activations and scales: their rounding (2^-8 relative) and no more
    assert ((y.double() - ref).abs().max() / ref.abs().max()) < 2e-2
    # grouped: expert e's rows through expert e's weight
    qe, se = quantize_weight(torch.randn(3, 48, 96, generator=g))
    xs = torch.randn(7, 96, generator=g)
    off = torch.tensor([0, 2, 2, 7])
    want = torch.cat([int8_linear(xs[0:2], qe[0], se[0]), int8_linear(xs[2:7], qe[2], se[2])])
    assert torch.equal(grouped_int8(xs, qe, se, off), want)


def test_quantized_model_keeps_what_must_stay_float_and_decodes_alike():
    torch.manual_seed(0)
    cfg = _cfg()
    model = Transformer(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits = model(x)
        ref_tokens = model.generate(x, max_new_tokens=10)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    saved = quantize_int8(model, min_elements=0)  # this model's matrices are all small
    after = sum(p.numel() * p.element_size() for p in model.parameters())
    assert saved == before - after - sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                                         if n.endswith(("_int8", "_scale")))
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith(("wq_a.weight", "wq_b.weight", "wkv_a.weight", "wo.weight", "w1", "w2", "w3"))
                   and not n.startswith("mtp") for n in names)
    assert any(n.endswith("wkv_b.weight") for n in names)  # read directly by the absorbed attention
    assert any(n.endswith("gate.weight") for n in names) and "embed.weight" in names
    # every float parameter left is one of those, a norm or MTP's (unused in decoding)
    kept = ("embed.weight", "norm.weight", "wkv_b.weight", "gate.weight")
    assert all(n.endswith(kept) or n.startswith("mtp.") for n in names), sorted(names)
    with torch.no_grad():
        logits = model(x)
        tokens = model.generate(x, max_new_tokens=10)
    rel = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    assert rel < 0.15, rel
    # greedy decoding: the first new token (where both see the same prompt) agrees, most later ones do
    assert torch.equal(tokens[:, 12], ref_tokens[:, 12])
    assert (tokens[:, 12:] == ref_tokens[:, 12:]).float().mean() > 0.6


def test_small_matrices_stay_float():
    """min_elements: a projection is quantized exactly when its weight has that many values (an
    expert stack when one expert's matrix has)."""
    from megads.model.moe import Experts
    from megads.parallel.tensor import ColumnParallelLinear, RowParallelLinear

    torch.manual_seed(0)
    model = Transformer(_cfg()).eval()
    lins = [m for n, m in model.named_modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear,
                                                                 torch.nn.Linear))
            and not n.startswith("mtp") and not n.endswith("wkv_b")]
    want = {id(m): m.weight.numel() >= 4096 for m in lins}
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    want.update({id(m): m.w1[0].numel() >= 4096 for m in experts})
    assert any(want.values()) and not all(want.values())  # this threshold splits the model
    quantize_int8(model, min_elements=4096)
    for m in lins:
        assert hasattr(m, "weight_int8") == want[id(m)] == (not hasattr(m, "weight") or m.weight is None)
    for m in experts:
        assert hasattr(m, "w1_int8") == want[id(m)]
