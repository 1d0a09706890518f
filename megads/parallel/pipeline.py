"""Pipeline parallelism: the model cut into stages, run by torch.distributed.pipelining.

`parallel.pp` ranks (the outermost dimension of the layout, megads.parallel.state) each hold
`parallel.vpp` stages; the `pp * vpp` stages cut the decoder blocks evenly (earlier stages take
the remainder) or as `parallel.pp_layers` says. Stage 0 also holds the embedding; the last stage
the final norm, the output head and the MTP modules. Stage placement follows the schedule:
`1f1b` one stage per rank, `interleaved` stage s on rank s % pp (Megatron's virtual pipeline),
`zbv` and `dualpipev` two stages per rank in a V (rank r holds stages r and 2pp-1-r, so the first
rank holds both ends of the model).

What crosses a stage boundary is the hidden state and the running MoE balance loss (a [1] tensor):
the balance loss of every stage reaches the loss of the last one, and its gradient flows back
through the pipeline to the routers that made it. Everything else a stage needs (positions,
document masks, labels) it reads from the step's micro-batches, which every stage builds alike
(the data position is arithmetic); the schedule hands each stage the micro-batch index as a
keyword argument.

Where the last stage lives on another rank than the first and needs the embedding (MTP reads
Emb(t_{i+k}); a tied head is the embedding), it holds a copy, initialised equal, whose gradient is
summed with the first stage's before the update (Megatron's embedding group), so both stay equal;
the copy counts zero in the gradient norm.

The schedules are torch's (Schedule1F1B, ScheduleInterleaved1F1B, ScheduleZBVZeroBubble,
ScheduleDualPipeV); micro-batches are the train section's gradient accumulation. Each stage's
forward and backward compute is timed, so the trainer logs the measured idle (bubble) fraction.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from megads.errors import ConfigError

SCHEDULES = {"1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B",
             "zbv": "ScheduleZBVZeroBubble", "dualpipev": "ScheduleDualPipeV"}


def split_layers(num_layers: int, n_stages: int, pp_layers=()) -> list[list[int]]:
    """Block indices of each stage: `pp_layers` counts, or an even split (the first stages take
    one more where it does not divide: the last one also holds the head and MTP)."""
    if pp_layers:
        counts = list(pp_layers)
    else:
        base, extra = divmod(num_layers, n_stages)
        counts = [base + (1 if s < extra else 0) for s in range(n_stages)]
    if sum(counts) != num_layers or min(counts) < 1 or len(counts) != n_stages:
        raise ConfigError(f"parallel.pp_layers: {counts} does not give {n_stages} stages of >= 1 block summing to "
                          f"model.num_layers = {num_layers}")
    out, at = [], 0
    for n in counts:
        out.append(list(range(at, at + n)))
        at += n
    return out


def rank_stages(schedule: str, pp: int, vpp: int, pp_rank: int) -> list[int]:
    """The stage indices pipeline rank `pp_rank` holds, in the order the schedule takes them."""
    if schedule in ("zbv", "dualpipev"):
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(vpp)]


def stage_rank(schedule: str, pp: int, stage: int) -> int:
    n = 2 * pp if schedule in ("zbv", "dualpipev") else None
    if n is not None:
        return stage if stage < pp else n - 1 - stage
    return stage % pp


@dataclass
class StagePlan:
    """What one pipeline rank holds."""

    pp: int
    schedule: str
    n_stages: int
    stages: list[int]  # global stage indices on this rank
    layers: dict[int, list[int]] = field(default_factory=dict)  # stage -> block indices
    mtp_or_tied: bool = False

    @property
    def first(self) -> bool:
        return 0 in self.stages

    @property
    def last(self) -> bool:
        return self.n_stages - 1 in self.stages

    @property
    def layer_ids(self) -> list[int]:
        return sorted(i for s in self.stages for i in self.layers[s])

    @property
    def embed(self) -> bool:
        return self.first or (self.last and self.mtp_or_tied)

    @property
    def embed_copy(self) -> bool:
        """This rank holds the last stage's copy of the embedding (the first stage is elsewhere)."""
        return self.last and not self.first and self.mtp_or_tied

    @property
    def tied_across_ranks(self) -> bool:
        """The first and last stages are on different ranks and share the embedding."""
        return self.mtp_or_tied and stage_rank(self.schedule, self.pp, 0) != stage_rank(
            self.schedule, self.pp, self.n_stages - 1)


def plan(cfg, pp_rank: int) -> StagePlan:
    p = cfg.parallel
    n = p.pp * p.vpp
    split = split_layers(cfg.model.num_layers, n, p.pp_layers)
    stages = rank_stages(p.pp_schedule, p.pp, p.vpp, pp_rank)
    return StagePlan(p.pp, p.pp_schedule, n, stages, {s: split[s] for s in stages},
                     bool(cfg.model.mtp_depth or cfg.model.tie_embeddings))


class StageModule(nn.Module):
    """One stage of the rank's partial model (megads.model.Transformer built with `layers`,
    `embed`, `head`): it registers the modules the stage uses (torch's stage runs backward over
    them) and runs the model call the objective asked for, restricted to its blocks."""

    def __init__(self, model, runner: "Pipeline", stage: int, layers: list[int], first: bool, last: bool):
        super().__init__()
        self.stage, self.layer_ids, self.first, self.last = stage, list(layers), first, last
        if first or (last and model.embed is not None and (model.cfg.mtp_depth or model.cfg.tie_embeddings)):
            self.embed = model.embed
        self.blocks = nn.ModuleList(model.layers[i] for i in layers)
        if last:
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp
        self._ctx = (model, runner)  # a tuple: not registered as submodules twice

    def moe_blocks(self):
        blocks = list(self.blocks) + ([m.block for m in self.mtp] if self.last else [])
        return [b for b in blocks if b.is_moe]

    def forward(self, *inputs, mb):
        model, run = self._ctx
        i = int(mb.reshape(-1)[0])
        args, kw = run.calls[i]
        h, aux = (None, None) if self.first else inputs
        out = model(*args, **kw, stage={"h": h, "aux": aux, "layers": self.layer_ids, "last": self.last})
        if run.training:
            for b in self.moe_blocks():
                run.add_counts(b.layer_id, b.ffn.last_counts)
        if not self.last:
            h, aux = out
            return h, aux.reshape(1).clone()  # not a view: zero-bubble schedules detach_() stage outputs
        return run.finish(i, out)


def _timed_stage_class():
    from torch.distributed.pipelining import PipelineStage

    class TimedStage(PipelineStage):
        """PipelineStage that adds up its compute time (forward, input- and weight-backward);
        sends and receive waits are outside it, in the schedule."""

        busy = 0.0

        def _timed(self, fn, *a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.busy += time.perf_counter() - t0

        def forward_one_chunk(self, *a, **kw):
            return self._timed(super().forward_one_chunk, *a, **kw)

        def backward_one_chunk(self, *a, **kw):
            return self._timed(super().backward_one_chunk, *a, **kw)

        def backward_weight_one_chunk(self, *a, **kw):
            return self._timed(super().backward_weight_one_chunk, *a, **kw)

    return TimedStage


class Pipeline:
    """The rank's stages and the schedule; `run` drives one optimizer step's micro-batches.

    objective: the stage's objective (`model_call(batch, denom)` -> (args, kwargs) for the model,
    `loss_of(out, batch, denom)` -> (loss, metrics) on the last stage)."""

    def __init__(self, model, plan_: StagePlan, ps, device, n_micro: int, objective, keys):
        self.model, self.plan, self.ps, self.device = model, plan_, ps, device
        self.n_micro, self.objective, self.keys = n_micro, objective, tuple(keys)
        self.group = ps.group("pp")
        self.modules = [StageModule(model, self, s, plan_.layers[s], s == 0, s == plan_.n_stages - 1)
                        for s in plan_.stages]
        self.stages = self.schedule = None
        self.training = True
        self.calls: list = []
        self.last_busy = self.last_wall = float("nan")  # compute seconds and wall seconds of the last run

    def _build(self, batch: dict) -> None:
        """The stages and the schedule, with static shapes from the first micro-batch (torch's
        dynamic shape inference would run an extra forward and backward of it)."""
        from torch.distributed.pipelining import schedules

        (tokens, *_), _ = self.objective.model_call(batch, None)
        rows, seq = tokens.shape
        if self.model.sequence_parallel:
            seq //= self.ps.layout.tp
        dtype = next(self.model.parameters()).dtype
        meta = torch.device("meta")
        act = (torch.empty(rows, seq, self.model.cfg.hidden_size, dtype=dtype, device=meta, requires_grad=True),
               torch.empty(1, dtype=torch.float32, device=meta, requires_grad=True))
        loss = torch.empty((), dtype=torch.float32, device=meta, requires_grad=True)
        index = torch.empty(1, dtype=torch.long, device=meta)
        Stage = _timed_stage_class()
        self.stages = []
        for m in self.modules:
            self.stages.append(Stage(m, m.stage, self.plan.n_stages, self.device, group=self.group,
                                     input_args=(index,) if m.first else act,
                                     output_args=loss if m.last else act))
        cls = getattr(schedules, SCHEDULES[self.plan.schedule])
        n = self.n_micro
        try:
            self.schedule = cls(self.stages[0] if self.plan.schedule == "1f1b" else self.stages,
                                n_microbatches=n, loss_fn=lambda out, target: out / n, scale_grads=False)
        except (ValueError, AssertionError, RuntimeError) as e:
            raise ConfigError(f"parallel.pp_schedule: {self.plan.schedule} with pp {self.plan.pp}, "
                              f"{len(self.plan.stages)} stage(s) per rank and {n} micro-batches (gradient "
                              f"accumulation): {e}") from None
        self.tokens_shape = (rows, tokens.shape[1])
        self._act = ((rows, seq, self.model.cfg.hidden_size), dtype)

    # ------------------------------------------------------------------ per micro-batch
    def add_counts(self, layer_id: int, c):
        if c is None:
            return
        c = c.float()
        self._counts[layer_id] = self._counts[layer_id] + c if layer_id in self._counts else c.clone()

    def finish(self, i: int, out):
        """The last stage: the objective's loss of micro-batch i, its metrics kept for the step
        (validation: its figure)."""
        self._seen += 1
        if not self.training:
            self._results[i] = self._collect(out, self.batches[i])
            return torch.zeros((), device=self.device)
        loss, mets = self.objective.loss_of(out, self.batches[i], self.denom)
        self._sums += torch.stack([torch.as_tensor(mets[k], dtype=torch.float64).detach().to(self.device)
                                   for k in self.keys])
        return loss

    # ------------------------------------------------------------------ per step
    def run(self, batches: list[dict], denom, train: bool = True, collect=None):
        """Forward (and backward, when `train`) of the step's micro-batches through the schedule.
        Returns (sum over micro-batches of the objective's metrics, on every pipeline rank;
        expert counts of this rank's MoE layers [L, E] in `model.moe_layers()` order, or None).
        Forward only (`train` False, denom None): ([collect(output, batch) of each micro-batch],
        None) on every pipeline rank; collect defaults to the objective's validation figure
        (`eval_of`)."""
        if len(batches) != self.n_micro:
            raise ValueError(f"pipeline built for {self.n_micro} micro-batches, got {len(batches)}")
        if self.schedule is None:
            self._build(batches[0])
        self.batches, self.denom, self.training = batches, denom, train
        self.calls = [self.objective.model_call(b, denom) for b in batches]
        self._sums = torch.zeros(len(self.keys), dtype=torch.float64, device=self.device)  # read once per step
        self._results, self._collect = [None] * self.n_micro, collect or self.objective.eval_of
        self._seen, self._counts = 0, {}
        for s in self.stages:
            s.busy = 0.0
        mb = torch.arange(self.n_micro)
        args = (mb,) if self.plan.first else ()
        target = mb.float() if self.plan.last else None
        t0 = time.perf_counter()
        if train:
            self.schedule.step(*args, target=target, mb=mb, return_outputs=False)
        elif self.plan.schedule in ("zbv", "dualpipev"):
            with torch.no_grad():
                self._forward_only()
        else:
            with torch.no_grad():
                self.schedule.eval(*args, target=target, mb=mb, return_outputs=False)
        wall = time.perf_counter() - t0
        self.last_busy, self.last_wall = sum(s.busy for s in self.stages), wall
        if self.plan.last and self._seen != self.n_micro:
            raise RuntimeError(f"pipeline: the last stage saw {self._seen} of {self.n_micro} micro-batches")
        if not train:  # the last stage's results on every pipeline rank
            results = self._results
            if self.group is not None:
                box = [results]
                src = stage_rank(self.plan.schedule, self.plan.pp, self.plan.n_stages - 1)
                dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, src), group=self.group)
                results = box[0]
            self.batches, self.calls = [], []
            return results, None
        sums = self._sums.to(self.device)
        if self.group is not None:  # the last stage's figures on every stage
            dist.all_reduce(sums, group=self.group)
        counts = None
        if train:
            rows = [self._counts.get(b.layer_id) for b in self._moe_blocks()]
            if rows and all(r is not None for r in rows):
                counts = torch.stack(rows)
        self.batches, self.calls = [], []
        return sums.cpu(), counts

    def _forward_only(self) -> None:
        """Validation under the V-shaped schedules, whose eval() in torch 2.13 still runs the
        backward actions of their program: each micro-batch goes forward through the stages in
        model order (stage outputs sent to the next stage's rank, received before a stage runs)."""
        on = lambda s: stage_rank(self.plan.schedule, self.plan.pp, s)  # noqa: E731
        me, last = self.ps.pp_rank, self.plan.n_stages - 1
        peer = lambda k: dist.get_global_rank(self.group, k)  # noqa: E731
        mods = {m.stage: m for m in self.modules}
        (shape, dtype) = self._act
        for i in range(self.n_micro):
            idx = torch.tensor([i])
            h = aux = None
            for s in range(self.plan.n_stages):
                if on(s) != me:
                    continue
                if s > 0 and on(s - 1) != me:
                    h = torch.empty(shape, dtype=dtype, device=self.device)
                    aux = torch.empty(1, dtype=torch.float32, device=self.device)
                    dist.recv(h, peer(on(s - 1)), group=self.group)
                    dist.recv(aux, peer(on(s - 1)), group=self.group)
                out = mods[s](idx, mb=idx) if s == 0 else mods[s](h, aux, mb=idx)
                if s < last:
                    h, aux = out
                    if on(s + 1) != me:
                        dist.send(h.contiguous(), peer(on(s + 1)), group=self.group)
                        dist.send(aux.contiguous(), peer(on(s + 1)), group=self.group)

    def train_step(self, batches: list[dict], denom, engine):
        """One optimizer step: torch's schedule runs the micro-batches' forward and backward, the
        tied embedding's gradients are summed, then the DeepSpeed `engine` reduces over DP (ZeRO-1:
        its partitioned reduction, the path of its own pipeline engine) and steps. Returns (metric
        sums over micro-batches as an array, this rank's expert counts)."""
        sums, counts = self.run(batches, denom)
        self.reduce_tied_grads()
        engine.pipeline_parallelism = True  # backward ran outside DeepSpeed: ZeRO-1 makes its own buffers
        try:
            engine.allreduce_gradients()
        finally:
            engine.pipeline_parallelism = False
        engine.step()
        return sums.numpy(), counts

    def expert_view(self, counts):
        """Collective over the pipeline group: (counts [L, E] of every stage's MoE layers in model
        order, their router biases), for the logs."""
        mine = self.model.moe_layers()
        rows = [] if counts is None else [
            (i, counts[j].cpu(), None if m.gate.bias is None else m.gate.bias.detach().cpu())
            for j, (i, m) in enumerate(zip(self.model.moe_layer_ids(), mine))]
        allrows = sorted((r for part in self.gather_objects(rows) for r in part), key=lambda r: r[0])
        if not allrows:
            return None, []
        return torch.stack([r[1] for r in allrows]), [r[2] for r in allrows if r[2] is not None]

    def _moe_blocks(self):
        blocks = list(self.model.layers) + [m.block for m in self.model.mtp]
        return [b for b in blocks if b.is_moe]

    def reduce_tied_grads(self) -> None:
        """Sum the embedding's gradient over its first- and last-stage copies."""
        if not self.plan.tied_across_ranks or not self.plan.embed:
            return
        w = self.model.embed.weight
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        dist.all_reduce(w.grad, group=self.ps.group("embed"))

    def idle_fractions(self) -> list[float]:
        """Collective over the pipeline group: each pipeline rank's idle (bubble) fraction of the
        last training run, 1 - its compute time / the slowest rank's wall time (the step's)."""
        got = self.gather_objects((self.last_busy, self.last_wall))
        wall = max(w for _, w in got)
        return [max(0.0, 1.0 - b / max(wall, 1e-12)) for b, _ in got]

    def gather_objects(self, obj) -> list:
        """Collective over the pipeline group: every pipeline rank's `obj`, by pipeline rank."""
        if self.group is None:
            return [obj]
        out = [None] * self.plan.pp
        dist.all_gather_object(out, obj, group=self.group)
        return out
