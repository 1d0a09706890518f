"""The single-rank cross entropy that works in the logits' own storage (the model's loss,
megads.parallel.tensor._VocabParallelCE with owned logits): values and gradients against F.cross_entropy on a
separate copy (float64, float32, bf16 input, ignored targets, a non-unit incoming gradient), the
model's loss and gradients with it against F.cross_entropy on the model's logits, and the refusal
of a second backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megads.parallel.tensor import _VocabParallelCE, vocab_parallel_cross_entropy
from test_mtp_generate import cfg_for, make


@pytest.mark.parametrize("owned", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_owned_ce_equals_cross_entropy(dtype, tol, owned):
    """owned: the loss works in the logits' storage; not owned (the vocab-parallel loss's path for
    logits the caller keeps): in a copy, the logits untouched."""
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(37, 101, generator=g, dtype=torch.float64) * 4).to(dtype)
    target = torch.randint(0, 101, (37,), generator=g)
    target[[3, 10, 11]] = -100
    weight = torch.rand(37, generator=g, dtype=torch.float64)

    ref_in = base.clone().requires_grad_()
    ref = F.cross_entropy(ref_in.to(torch.promote_types(dtype, torch.float32)), target, reduction="none")
    (ref.double() * weight).sum().backward()

    leaf = base.clone().requires_grad_()
    logits = leaf * 1  # a temporary, as the model's head output
    kept = logits.detach().clone()
    got = _VocabParallelCE.apply(logits, target, 0, None, -100, owned)
    assert got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    assert (got[[3, 10, 11]] == 0).all()
    (got.double() * weight).sum().backward()
    bf16 = dtype == torch.bfloat16  # (the gradient is rounded to bf16 on the way back)
    torch.testing.assert_close(leaf.grad.double(), ref_in.grad.double(),
                               rtol=1e-2 if bf16 else tol, atol=1e-3 if bf16 else tol)
    assert leaf.grad.dtype == dtype
    if not owned or dtype == torch.bfloat16:  # (bf16 logits are converted: a float32 buffer either way)
        assert torch.equal(logits.detach(), kept)


def test_owned_ce_refuses_a_second_backward():
    leaf = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    loss = vocab_parallel_cross_entropy(leaf * 1, torch.tensor([1, 2, 3, 4]), owned=True).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@pytest.mark.parametrize("mtp", [0, 1])
def test_model_loss_and_grads_equal_the_plain_cross_entropy(mtp, monkeypatch):
    cfg = cfg_for(mtp_depth=mtp, mtp_lambda=0.3, seq_aux_alpha=0.01)
    model = make(cfg).double().train()
    seq = torch.randint(0, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(2))
    labels = seq[:, 1:].clone()
    labels[0, :4] = -100

    def run():
        model.zero_grad()
        out = model(seq[:, :-1], labels)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got_loss, got = run()
    import megads.parallel.tensor as tensor

    monkeypatch.setattr(tensor._VocabParallelCE, "apply", staticmethod(
        lambda logits, target, start, group, ignore_index, owned: F.cross_entropy(
            logits, target, ignore_index=ignore_index, reduction="none")))
    want_loss, want = run()
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=1e-12)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12, msg=n)


def _vocab_parallel_rank(rank, world, init, out, dtype=torch.float64):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        full = (torch.randn(23, 40, generator=g, dtype=torch.float64) * 3).to(dtype)
        target = torch.randint(0, 40, (23,), generator=g)
        target[[2, 7]] = -100
        weight = torch.rand(23, generator=g, dtype=torch.float64)
        V = 40 // world
        leaf = full[:, rank * V:(rank + 1) * V].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(leaf * 1, target, tp_group=dist.group.WORLD, vocab_start=rank * V,
                                            owned=rank == 0)  # both buffer kinds
        (loss * weight).sum().backward()
        torch.save({"loss": loss.detach(), "grad": leaf.grad}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_vocab_parallel_ce_two_ranks_equals_cross_entropy(tmp_path, dtype, tol):
    """Two gloo ranks, each with half the vocabulary: every rank's loss equals F.cross_entropy over
    the whole vocabulary, and the ranks' gradient shards make up its gradient (float64; float32,
    which on CPU takes megads::softmax_rows_: each shard's exps against its own row max, rescaled
    to the global one)."""
    import torch.multiprocessing as mp

    mp.spawn(_vocab_parallel_rank, args=(2, f"file://{tmp_path}/init", str(tmp_path), dtype), nprocs=2)
    g = torch.Generator().manual_seed(0)
    full = (torch.randn(23, 40, generator=g, dtype=torch.float64) * 3).to(dtype).double().requires_grad_()
    target = torch.randint(0, 40, (23,), generator=g)
    target[[2, 7]] = -100
    weight = torch.rand(23, generator=g, dtype=torch.float64)
    ref = F.cross_entropy(full, target, reduction="none")
    (ref * weight).sum().backward()
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for p in parts:
        torch.testing.assert_close(p["loss"].double(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts], dim=1).double(), full.grad, rtol=tol, atol=tol)
