"""AdamW with a non-finite-gradient guard, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megads.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; no decay for norms, biases and other 1-D tensors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips the whole update when any gradient on any rank is NaN/inf.

    DeepSpeed (ZeRO 0-2) calls step() on every rank at the same boundary with the reduced
    gradients, so the finiteness flag is agreed by an all-reduce. `last_step_skipped` tells the
    trainer to count the bad step and leave the schedule and MoE biases alone.

    Without ZeRO the trainer sets `norm_weights` (megads.parallel.gradnorm.zero0_weights) and
    `max_norm`: step() then computes the single-process gradient norm (one all-reduce, which is
    also the finiteness check), clips by it, and keeps it in `last_grad_norm`. Under ZeRO-1/2 the
    gradients here are flat partitions; DeepSpeed clips (with megads's norm, see gradnorm).
    """

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.last_step_skipped = False
        self.last_grad_norm: float | None = None
        self.group = None  # set by the trainer: the ranks to agree with (None = world)
        self.norm_weights: dict | None = None
        self.max_norm = 0.0

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        if self.norm_weights is not None:
            from megads.parallel.gradnorm import global_norm

            params = self._params()
            norm = global_norm(((p.grad, p) for p in params), self.norm_weights, params[0].device)
            value = float(norm)  # the one host sync of the step
            self.last_grad_norm = value
            self.last_step_skipped = not math.isfinite(value)
            if self.last_step_skipped:
                return None
            if self.max_norm > 0 and value + 1e-6 > self.max_norm:  # DeepSpeed's ZeRO formula
                coef = 1.0 / ((value + 1e-6) / self.max_norm)
                torch._foreach_mul_([p.grad for p in params if p.grad is not None], coef)
            return super().step(closure)
        grads = [p.grad for p in self._params() if p.grad is not None]
        device = next(iter(self.param_groups[0]["params"])).device
        # one flag for all gradients, read once (not one host sync per parameter)
        bad = non_finite_flag(grads, device)
        if dist.is_initialized():
            bad = bad.to(device)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.group)
        self.last_step_skipped = bool(bad.item() > 0)  # the one host sync of the step
        if self.last_step_skipped:
            return None
        return super().step(closure)


def non_finite_flag(grads: list, device) -> torch.Tensor:
    """[1] float tensor on `device`: 1 where any element of any gradient is NaN or inf, else 0.
    torch's AMP check (what GradScaler runs: one pass per gradient, nothing allocated, the
    gradients multiplied by 1, which leaves every value as it is); 8x faster than isfinite + any
    on the small preset's 48.6M gradients on CPU."""
    flag = torch.zeros(1, device=device)
    groups: dict = {}  # by device and dtype, as GradScaler calls it
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (dev, _), gs in groups.items():
        found, one = torch.zeros(1, device=dev), torch.ones(1, device=dev)
        torch._amp_foreach_non_finite_check_and_unscale_(gs, found, one)
        flag = torch.maximum(flag, found.to(device))
    return flag


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, group_fn=None) -> torch.optim.Optimizer:
    """group_fn: optional transform of the param groups (expert groups for ZeRO under EP)."""
    groups = param_groups(model, cfg.weight_decay)
    if group_fn is not None:
        groups = group_fn(groups)
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    # torch's fused AdamW (CPU and CUDA): one kernel per tensor and no host read of each
    # parameter's step count (the for-loop implementation reads it, one sync per parameter);
    # 2.2x faster on the small preset's 55M parameters here
    if all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16)
           for p in model.parameters() if p.requires_grad):
        kw["fused"] = True
    return GuardedAdamW(groups, **kw)
