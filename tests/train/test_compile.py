"""train.compile: regional torch.compile of the transformer blocks equals eager (fp32: loss and
gradients within rounding), traces the MoE blocks without graph breaks, and trains."""
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import megads, train_args
from megads.config import load_config, preset_path
from megads.model import Transformer


def _model(compiled: bool):
    # the model of train_args (test_train_compile): its compiled kernels are then in inductor's
    # on-disk cache when the trainer compiles the same blocks
    sets = [a for a in train_args(Path("."), Path("."))[2:] if a.startswith("model.")]
    cfg = load_config(preset_path("tiny"), sets + ["model.mtp_depth=1"])
    torch.manual_seed(0)
    m = Transformer(cfg.model)
    if compiled:
        assert m.compile_blocks() == 3  # 2 blocks + the MTP block
    return cfg, m


def test_compiled_blocks_equal_eager():
    torch._dynamo.reset()
    cfg, eager = _model(False)
    _, comp = _model(True)
    assert all(torch.equal(a, b) for a, b in zip(eager.parameters(), comp.parameters()))
    x = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # the second call runs the cached compiled code
        outs = [m(x[:, :-1], labels=x[:, 1:]) for m in (eager, comp)]
        for m, o in zip((eager, comp), outs):
            m.zero_grad(set_to_none=True)
            o.loss.backward()
        assert outs[1].loss.item() == pytest.approx(outs[0].loss.item(), rel=1e-6)
        assert outs[1].mtp_loss.item() == pytest.approx(outs[0].mtp_loss.item(), rel=1e-6)
        for (name, a), b in zip(eager.named_parameters(), comp.parameters()):
            if a.grad is None:
                assert b.grad is None, name
                continue
            err = (a.grad - b.grad).abs().max() / a.grad.abs().max().clamp_min(1e-12)
            assert err < 1e-4, (name, float(err))


def test_moe_and_dense_blocks_trace_whole():
    cfg, m = _model(False)
    from megads import ops

    ops.backend()  # what compile_blocks does first
    x = torch.randint(0, cfg.model.vocab_size, (2, 32))
    h = m.embed(x)
    cos, sin = m.rope(torch.arange(32), h.dtype)
    kinds = set()
    for block in list(m.layers) + [m.mtp[0].block]:
        e = torch._dynamo.explain(block)(h, cos, sin)
        assert (e.graph_count, e.graph_break_count) == (1, 0), [r.reason for r in e.break_reasons]
        kinds.add(block.is_moe)
    assert kinds == {True, False}


def test_train_compile(corpus, tmp_path):
    base = tmp_path / "eager"
    r = megads(*train_args(corpus, base, steps=2, extra=["train.samples_at_end=0"]))
    assert r.returncode == 0, r.stderr[-3000:]
    comp = tmp_path / "compiled"
    r = megads(*train_args(corpus, comp, steps=2, extra=["train.samples_at_end=0", "train.compile=true"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"torch\.compile: 2 blocks compiled, [\d.]+ s compiling", r.stdout), r.stdout[-2000:]
    assert r.stdout.count("torch.compile:") == 1  # logged once

    def losses(d):
        return [x["loss"] for x in map(json.loads, Path(d, "metrics.jsonl").read_text().splitlines()) if "loss" in x]

    a, b = losses(base), losses(comp)
    assert len(a) == len(b) == 2
    assert b == pytest.approx(a, rel=1e-5)
