"""A training step reads nothing back to the host that it does not need: the model's forward and
backward none, the optimizer's step one value (the finiteness flag, or the gradient norm that is
also the finiteness check), however many parameters there are. Counted at the dispatcher:
every .item(), bool(), float() or int() of a tensor is one aten._local_scalar_dense call."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megads.config import load_config, preset_path
from megads.model import Transformer
from megads.train.optim import build_optimizer


class CountReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n[func] += 1
        return func(*args, **(kwargs or {}))

    @property
    def reads(self) -> int:
        return self.n[torch.ops.aten._local_scalar_dense.default]


@pytest.mark.parametrize("layers", [2, 4])
def test_step_reads_once_whatever_the_model_size(layers):
    cfg = load_config(preset_path("tiny"), [f"model.num_layers={layers}"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.train)
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert n_params > 20
    x = torch.randint(0, cfg.model.vocab_size, (2, 65))
    with CountReads() as fwd:
        out = model(x[:, :-1], labels=x[:, 1:])
    with CountReads() as bwd:
        out.loss.backward()
    with CountReads() as step:
        opt.step()
    assert fwd.n and bwd.n and step.n  # the mode saw the ops
    assert (fwd.reads, bwd.reads, step.reads) == (0, 0, 1)
    assert not opt.last_step_skipped


def test_a_non_finite_gradient_is_still_caught_with_one_read():
    cfg = load_config(preset_path("tiny"))
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.train)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    last = list(model.parameters())[-1]
    last.grad.view(-1)[0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with CountReads() as step:
        opt.step()
    assert step.reads == 1 and opt.last_step_skipped
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # nothing updated
