"""The fixed-shape decode step (megads.model.static) against generate's plain step: the same
greedy tokens and logits in float32 (left-padded rows, a quantized cache, sampling with
log-probs), compiled as well, and the cases it refuses. The CUDA-graph mode runs where torch sees
a GPU (bench/gpu_check.sh runs it there)."""
import pytest
import torch
from test_mtp_generate import cfg_for, make

from megads.model.cache import new_cache
from megads.model.static import StaticDecode, graph_support


def _prompts(cfg, B=3, S=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, cfg.vocab_size, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    mask[-1, :1] = False
    return tokens.masked_fill(~mask, 0), mask


@pytest.mark.parametrize("kw", [dict(), dict(cache_quant="int8"), dict(temperature=0.9, top_p=0.8)])
def test_static_step_equals_the_plain_step(kw):
    cfg = cfg_for(mtp_depth=0)
    model = make(cfg).float()
    tokens, mask = _prompts(cfg)
    outs = {}
    for decode in ("eager", "static"):
        g = torch.Generator().manual_seed(5) if kw.get("temperature") else None
        outs[decode] = model.generate(tokens, max_new_tokens=9, attention_mask=mask, return_logprobs=True,
                                      generator=g, decode=decode, **kw)
    (t0, lp0, ent0, n0), (t1, lp1, ent1, n1) = outs["eager"], outs["static"]
    assert torch.equal(t0, t1) and torch.equal(n0, n1)
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent1, ent0, rtol=1e-5, atol=1e-5)


def test_static_step_logits_and_cache_match_step_by_step():
    """Drive both steps by hand: the logits agree at each position and the cache holds the same
    latents (the fixed-shape step writes at a device index, the plain step at a slice)."""
    cfg = cfg_for(mtp_depth=0)
    model = make(cfg).float().eval()
    tokens, amask = _prompts(cfg)
    B, S = tokens.shape
    N = 6
    mask = torch.zeros(B, S + N, dtype=torch.bool)
    mask[:, :S] = amask
    pos = (amask.long().cumsum(-1) - 1).clamp_min(0)
    caches = [new_cache(cfg, B, S + N) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            model(tokens, positions=pos, cache=c, attention_mask=mask[:, :S])
        step = StaticDecode(model, caches[1], mask, "static")
        nxt, p = torch.arange(B) + 3, pos[:, -1] + 1
        for t in range(N):
            mask[:, S + t] = True
            ref = model(nxt.unsqueeze(1), positions=p.unsqueeze(1), cache=caches[0],
                        attention_mask=mask[:, :S + t + 1])[:, -1]
            got = step(nxt, p, S + t)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            assert caches[1].length == caches[0].length == S + t + 1
            nxt, p = ref.argmax(-1), p + 1
    for a, b in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(b.kv, a.kv, rtol=0, atol=1e-6)
        torch.testing.assert_close(b.pe, a.pe, rtol=0, atol=1e-6)


def test_compiled_static_step_gives_the_same_greedy_tokens():
    """...traced once: no graph break, no recompilation over a generation's steps or for the next
    generation of the same shapes (as GRPO's next rollout batch)."""
    from torch._dynamo.utils import counters

    cfg = cfg_for(mtp_depth=0, num_layers=2)
    model = make(cfg).float()
    tokens, mask = _prompts(cfg, B=2, S=5)
    ref = model.generate(tokens, max_new_tokens=6, attention_mask=mask, decode="eager")
    torch._dynamo.reset()
    counters.clear()
    got = model.generate(tokens, max_new_tokens=6, attention_mask=mask, decode="compile")
    assert torch.equal(got, ref)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    tokens2 = torch.randint(1, cfg.vocab_size, tokens.shape)
    again = model.generate(tokens2, max_new_tokens=6, decode="compile")
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(again, model.generate(tokens2, max_new_tokens=6, decode="eager"))


def test_compiled_step_writes_the_cache_in_place():
    """The compiled step's graph (inductor's post-grad graph, before its reinplacing pass) touches
    the cache buffers only to write this step's rows (index_put, and the functional write-back
    copy_ of the mutated input, which the reinplacing turns into one in-place index_put_) and to
    read them (the attention kernel). Writes into views of the buffer (index_copy_ into its latent
    and rope parts, as before) became as_strided_scatter ops there, lowered to copying every
    layer's whole cache out and back at every step."""
    import torch._inductor.config as inductor_config

    cfg = cfg_for(mtp_depth=0, num_layers=2)
    model = make(cfg).float().eval()
    B, S, N = 3, 5, 36
    tokens = torch.randint(1, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    cache = new_cache(cfg, B, S + N)
    full = tuple(cache.layers[0].latent.shape)
    ops = []

    def record(graph):
        for n in graph.nodes:
            if n.op == "call_function":
                shapes = [tuple(a.meta["val"].shape) for a in n.args
                          if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)]
                ops.append((str(n.target), shapes))

    with torch.no_grad():
        model(tokens, cache=cache)
        ref = new_cache(cfg, B, S + N)
        model(tokens, cache=ref)
        mask = torch.zeros(B, S + N, dtype=torch.bool)
        mask[:, :S + 1] = True
        torch._dynamo.reset()
        # fx_graph_cache off: compiled here, not fetched from an earlier run's cache
        with inductor_config.patch(post_grad_custom_post_pass=record, fx_graph_cache=False):
            got = StaticDecode(model, cache, mask, "compile")(tokens[:, -1], torch.full((B,), S), S)
        want = model(tokens[:, -1:], positions=torch.full((B, 1), S), cache=ref, attention_mask=mask[:, :S + 1])[:, -1]
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(cache.layers, ref.layers):
        torch.testing.assert_close(a.latent, b.latent, rtol=0, atol=1e-6)
    on_cache = [(t, shapes) for t, shapes in ops if full in shapes]
    assert on_cache, ops  # the graph was recorded
    assert any(t == "aten.index_put.default" for t, _ in on_cache), on_cache
    assert {t for t, _ in on_cache} <= {"aten.index_put.default", "aten.copy_.default",
                                        "megads.latent_attention_rows.default"}, on_cache


def test_refusals_and_auto():
    cfg = cfg_for(mtp_depth=0)
    model = make(cfg)
    cache = new_cache(cfg, 2, 8)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    assert graph_support(model, cache) is None
    assert "CUDA" in graph_support(model, cache, "cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        StaticDecode(model, cache, mask, "graph")
    with pytest.raises(ValueError, match="decode mode must be one of"):
        StaticDecode(model, cache, mask, "fast")
    with pytest.raises(ValueError, match="mask covers 5 positions"):
        StaticDecode(model, cache, mask[:, :5], "static")
    with pytest.raises(ValueError, match="naive cache"):
        StaticDecode(model, new_cache(cfg, 2, 8, naive=True), mask, "static")
    mha = make(cfg_for(mtp_depth=0, attention="mha"))
    assert "MHA" in graph_support(mha)
    from megads.model.quant import quantize_int8

    q8 = make(cfg)
    quantize_int8(q8, min_elements=0)
    with pytest.raises(ValueError, match="int8 weights"):
        StaticDecode(q8, cache, mask, "static")
    tokens = torch.randint(1, cfg.vocab_size, (2, 4))
    with pytest.raises(ValueError, match="decode must be"):
        model.generate(tokens, max_new_tokens=2, decode="fast")
    # auto on CPU is the plain step: the same tokens as asking for it
    assert torch.equal(model.generate(tokens, max_new_tokens=4), model.generate(tokens, max_new_tokens=4, decode="eager"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_step_equals_the_plain_step():
    cfg = cfg_for(mtp_depth=0)
    model = make(cfg).float().cuda()
    tokens, mask = (t.cuda() for t in _prompts(cfg))
    ref = model.generate(tokens, max_new_tokens=9, attention_mask=mask, return_logprobs=True, decode="eager")
    got = model.generate(tokens, max_new_tokens=9, attention_mask=mask, return_logprobs=True, decode="graph")
    auto = model.generate(tokens, max_new_tokens=9, attention_mask=mask, decode="auto")
    assert torch.equal(got[0], ref[0]) and torch.equal(auto, ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-4)


def test_graph_support_names_the_torch_moe_path_on_a_device_without_native_kernels(monkeypatch):
    """On CUDA the torch routing path reads the host (bincount): such a model is refused for
    graphs (auto falls back to the plain step) unless the native kernels serve that device."""
    from megads.ops import native

    model = make(cfg_for(mtp_depth=0))
    monkeypatch.setattr(native, "has_kernels", lambda device: False)
    # a device string is only parsed, so "cuda" can be named on a machine without one
    assert graph_support(model, None, "cuda") == ("the MoE ops run the torch path here "
                                                   "(build megads._C with its CUDA kernels)")
    monkeypatch.setattr(native, "has_kernels", lambda device: True)
    from megads import ops

    if ops.backend() == "native":  # the native library loaded (as CI builds it)
        assert graph_support(model, None, "cuda") is None
    dense = make(cfg_for(mtp_depth=0, n_routed_experts=0, first_k_dense=2))
    assert graph_support(dense, None, "cuda") is None
