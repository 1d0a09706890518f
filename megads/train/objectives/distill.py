"""Logit distillation from a frozen teacher (the `distill` stage), on SFT-format data.

Per response token, with the teacher's p = softmax(t/T) and the student's q = softmax(s/T) over
the whole vocabulary:

- forward_kl: KL(p‖q) = Σ p (log p − log q)
- reverse_kl: KL(q‖p) = Σ q (log q − log p)
- jsd (generalised, weight β): β KL(p‖m) + (1−β) KL(q‖m), m = β p + (1−β) q

times T² (gradients keep their scale across temperatures), averaged over the global batch's
response tokens (prompt tokens masked, as the SFT labels). Under TP both models keep their
vocab shards: the log-softmax normalisers and the per-token sums are all-reduced over TP, no
rank ever holds full-vocabulary logits. The teacher (`distill.teacher`, a megads or HF DeepSeek
directory of any size with the student's vocabulary) runs in the same layout, frozen.

SFT on a teacher's generated traces (DeepSeek-R1's distilled models) is the `sft` stage on that
JSONL.
"""
from __future__ import annotations

import math

import torch

from megads.train.objectives.sft import SFTObjective


def _allreduce(x, group, op=None):
    import torch.distributed as dist

    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group)
    return x


def _log_softmax_tp(x: torch.Tensor, group) -> torch.Tensor:
    """log-softmax over a vocab sharded along the last dim (float32, no autograd)."""
    import torch.distributed as dist

    m = _allreduce(x.max(dim=-1, keepdim=True).values, group, dist.ReduceOp.MAX)
    z = _allreduce((x - m).exp().sum(-1, keepdim=True), group)
    return x - m - z.log()


class _VocabParallelKD(torch.autograd.Function):
    """Per-token distillation loss from vocab-sharded logits, with the analytic gradient w.r.t.
    the student's logits (autograd through the sharded normalisers would only see each rank's
    share of their gradient). With z = s/T, q = softmax(z), g_v = ∂L/∂q_v:
    ∂L/∂z_v = q_v (g_v − Σ_u q_u g_u); forward KL: q − p; reverse KL: g = log q − log p;
    JSD(β): g = (1−β) log(q/m). The loss carries T², so ∂/∂s = T ∂L/∂z."""

    @staticmethod
    def forward(ctx, s, t, kind, T, beta, group):
        lq = _log_softmax_tp(s.float() / T, group)
        lp = _log_softmax_tp(t.float() / T, group)
        q, p = lq.exp(), lp.exp()
        if kind == "forward_kl":
            local = p * (lp - lq)
            gv = None
        elif kind == "reverse_kl":
            local = q * (lq - lp)
            gv = lq - lp
        else:
            lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1.0 - beta))
            local = beta * p * (lp - lm) + (1.0 - beta) * q * (lq - lm)
            gv = (1.0 - beta) * (lq - lm)
        loss = _allreduce(local.sum(-1), group)
        ctx.save_for_backward(q, p, gv if gv is not None else q.new_zeros(()))
        ctx.kind, ctx.T, ctx.group, ctx.dtype = kind, T, group, s.dtype
        return loss * T * T

    @staticmethod
    def backward(ctx, grad):
        q, p, gv = ctx.saved_tensors
        if ctx.kind == "forward_kl":
            dz = q - p
        else:
            mean = _allreduce((q * gv).sum(-1, keepdim=True), ctx.group)
            dz = q * (gv - mean)
        ds = dz * (ctx.T * grad).unsqueeze(-1)
        return ds.to(ctx.dtype), None, None, None, None, None


def kd_token_losses(student_logits, teacher_logits, kind: str = "forward_kl", temperature: float = 1.0,
                    beta: float = 0.5, tp_group=None) -> torch.Tensor:
    """[...] per-token distillation loss from (vocab-sharded) logits [..., V/tp]; differentiable
    w.r.t. the student's logits only (the teacher is frozen)."""
    if kind not in ("forward_kl", "reverse_kl", "jsd"):
        raise ValueError(f"distill.loss: unknown {kind!r}")
    return _VocabParallelKD.apply(student_logits, teacher_logits.detach(), kind, float(temperature), float(beta),
                                  tp_group)


class DistillObjective(SFTObjective):
    name = "distill"
    averaged = ("loss", "distill/kd", "balance_loss")

    def prepare(self, loop):
        self.tp_group = loop.model.tp_group
        if loop.pp_plan is not None:
            from pathlib import Path

            from megads.errors import ConfigError
            from megads.train.init import is_training_checkpoint

            if is_training_checkpoint(Path(self.cfg.distill.teacher)):
                e = ConfigError(f"distill.teacher {self.cfg.distill.teacher}: a training checkpoint under "
                                f"parallel.pp > 1 (only the last stage loads the teacher); use its run's final/")
                e.every_rank = True
                raise e
        if loop.pp_plan is not None and not loop.pp_plan.last:
            self.teacher = None  # the loss is taken on the last pipeline stage: only its ranks hold the teacher
            return f"distill: teacher {self.cfg.distill.teacher} on the last pipeline stage, {self.cfg.distill.loss}"
        self.teacher = loop.build_frozen(self.cfg.distill.teacher)
        n = sum(p.numel() for p in self.teacher.parameters())
        return f"distill: teacher {self.cfg.distill.teacher} ({n / 1e6:.1f}M parameters on this rank), {self.cfg.distill.loss}"

    def count(self, batch):
        c = (batch["labels"] != -100).sum().double().reshape(1)
        return torch.cat([c, (batch["doc_ids"] >= 0).sum().reshape(1).double()])

    def model_call(self, batch, denom=None):
        return (batch["tokens"],), dict(positions=batch["positions"], doc_ids=batch["doc_ids"], local_logits=True)

    def _kd(self, engine, batch, out=None):
        d = self.cfg.distill
        args, kw = self.model_call(batch)
        if out is None:
            out = engine(*args, **kw)
        with torch.no_grad():
            t = self.teacher(batch["tokens"], **kw).logits
        per_tok = kd_token_losses(out.logits, t, d.loss, d.temperature, d.beta, self.tp_group)
        mask = batch["labels"] != -100
        return (per_tok * mask).sum(), mask.sum(), out

    def loss_of(self, out, batch, denom):
        kd_sum, _, out = self._kd(None, batch, out)
        kd = kd_sum / denom[0]
        total = kd + out.loss  # out.loss: the student's MoE balance term
        return total, {"loss": total.detach(), "distill/kd": kd.detach(), "balance_loss": out.aux_loss}

    def eval_of(self, out, batch) -> float:
        kd_sum, n, _ = self._kd(None, batch, out)
        return float(kd_sum / n.clamp_min(1))
