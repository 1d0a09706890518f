"""The training loop, one for every stage. The loop alone steps the optimizer; DeepSpeed owns data
parallelism, ZeRO, mixed precision and gradient accumulation; an objective (megads/train/
objectives/, chosen by `train.stage`) says how a batch is made and what its loss is.

Per optimizer step: the step's `gas` micro-batches are made, their loss tokens counted and summed
over the data-parallel ranks (one small all-reduce), so each loss is the mean over every counted
token of the global batch; then forward/backward through the DeepSpeed engine, the optimizer step
(skipped on every rank when any gradient is non-finite; clipped by the single-process gradient
norm), then the MoE auxiliary-loss-free bias update from the step's token counts reduced over
every rank that routed distinct tokens. Data position is arithmetic (step x global batch), so
resuming needs no loader state and reproduces the uninterrupted run's losses exactly (fp32, same
layout).
"""
from __future__ import annotations

import logging
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megads.checkpoint import compat
from megads.checkpoint import store as ckpt
from megads.config import Config
from megads.errors import ConfigError, MegadsError
from megads.model import Transformer
from megads.model.info import flops_per_token, mtp_flops_per_token
from megads.parallel import state as pstate
from megads.runtime import hardware, precision, rundir
from megads.runtime.signals import GracefulStop
from megads.train.dsconfig import deepspeed_config
from megads.train.metrics import Metrics
from megads.train.resume import plan_run
from megads.train.saving import Saver
from megads.train.optim import build_optimizer, lr_at

log = logging.getLogger(__name__)

EXIT_BAD_STEPS = 3


class Trainer:
    def __init__(self, cfg: Config, resume: str = "auto", datasets=None, force: bool = False,
                 stop: GracefulStop | None = None):
        """datasets: optional (train, valid, tokenizer) to use instead of cfg.data (tests).
        force: start fresh over a previous run in output_dir (removing it), or resume with changed
        training settings. stop: the signal handler asked at the end of every step."""
        import deepspeed

        pstate.without_shm_op()
        self.cfg = cfg
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        p = cfg.parallel
        self.ps = pstate.initialize(p.tp, p.pp, p.ep)
        self.dp = self.ps.layout.dp
        self.dp_rank = self.ps.dp_rank
        self.device, self.threads = hardware.place(cfg.train.threads)
        self.precision, self.peaks = precision.resolve(cfg.train.precision, self.device)  # collective
        self.ds_config = deepspeed_config(cfg, self.dp, self.precision)
        self.stop = stop
        # before anything is built or written: the output dir's lock, what to resume, and whether
        # the checkpoint fits this config (all collective: every rank gets the same answer)
        self.lock = None
        resume_path, self.run_id, notes = self._open_run_dir(resume, force)
        state = None
        self._same_layout = True
        if resume_path is not None:
            state = ckpt.read_trainer_state(resume_path, cfg.train.verify_on_resume)
            changes = compat.check(state.get("config", {}), cfg.to_dict(), state.get("layout"),
                                   dict(vars(self.ps.layout)), str(resume_path), force,
                                   reshard=ckpt.is_sharded(resume_path))
            notes += [f"resume: {k} changed {o!r} -> {n!r}" for k, o, n in changes]
            self._same_layout = state.get("layout") == dict(vars(self.ps.layout)) and all(
                state["config"]["parallel"].get(k) == getattr(p, k) for k in ("vpp", "pp_schedule", "pp_layers"))
            if not self._same_layout and state.get("has_extra"):
                e = ConfigError(f"{resume_path}: holds per-rank {cfg.train.stage} state (e.g. GRPO's rollout buffer "
                                f"mid-iteration) that does not reshard; resume it in the layout that wrote it "
                                f"{state.get('layout')}, or from a checkpoint at a rollout boundary")
                e.every_rank = True
                raise e
            self.run_id = state.get("run_id") or self.run_id
        if self.lock is not None:  # the run goes ahead: say who holds the output dir
            self.lock.announce(self.run_id)
        self.gas = self.ds_config["gradient_accumulation_steps"]
        self.pp_plan = None
        if p.pp > 1:
            from megads.parallel import pipeline

            self.pp_plan = pipeline.plan(cfg, self.ps.pp_rank)
            # the schedule runs the step's micro-batches; DeepSpeed sees one micro step per update
            self.ds_config["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size * self.gas
            self.ds_config["gradient_accumulation_steps"] = 1
        t = cfg.train

        from megads.train import objectives

        self.objective = objectives.build(cfg)
        if datasets is not None:
            self.train_ds, self.valid_ds, self.tokenizer = datasets
        else:
            self.train_ds, self.valid_ds, self.tokenizer = self.objective.datasets(self)
        self.objective.tokenizer = self.tokenizer
        if self.tokenizer is not None and self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary ({self.tokenizer.vocab_size})")

        self.model = self._build_model()
        self.model.activation_checkpointing = t.activation_checkpointing
        self.compiled = self.model.compile_blocks() if t.compile else 0
        group_fn = None
        if p.ep > 1 and cfg.model.n_routed_experts:
            from megads.parallel.expert import expert_param_groups, mark_expert_params

            name = mark_expert_params(self.model, self.ps)
            group_fn = lambda groups: expert_param_groups(groups, name)  # noqa: E731
        self.optimizer = build_optimizer(self.model, t, group_fn)
        self._setup_grad_norm()
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, config=self.ds_config,
            mpu=pstate.MPU(self.ps) if p.tp > 1 or p.pp > 1 else None, dist_init_required=False)
        if self._norm_kinds is not None and p.zero_stage > 0:
            from megads.parallel import gradnorm

            copy = self.model.embed.weight if self.pp_plan is not None and self.pp_plan.embed_copy else None
            gradnorm.patch_zero_norm(self.engine.optimizer, gradnorm.zero_weights(self._norm_kinds, self.ps.layout, copy))

        self.step = 0
        self.bad_total = 0
        self.history: list[dict] = []  # every step's record (all ranks), for tests and tools
        self.last_valid: float | None = None  # the last validation loss
        self.saver = Saver(self)
        if resume_path is not None:
            self.objective.restore_extra(self.saver.load(resume_path, self._same_layout))
            self.step, self.bad_total = state["step"], state.get("bad_steps_total", 0)
            self.engine.global_steps = self.step
            self.engine.global_samples = self.step * t.global_batch_size
        self.start_step = self.step
        self.resumed_from = resume_path
        self.pipeline = None
        if self.pp_plan is not None:
            from megads.parallel.pipeline import Pipeline

            self.pipeline = Pipeline(self.model, self.pp_plan, self.ps, self.device, self.gas, self.objective,
                                     self.objective.averaged)
        self.metrics = Metrics(t.output_dir, self.rank == 0, t.tensorboard, t.progress, t.max_steps, self.step,
                               run_id=self.run_id)
        for n in notes:
            self.metrics.write(n)
        note = self.objective.prepare(self)
        if note:
            self.metrics.write(note)
        if resume_path is not None:
            self.metrics.write(f"resumed from {resume_path} at step {self.step} (run {self.run_id} continues)")
        else:
            self.metrics.write(f"run {self.run_id}: fresh start in {t.output_dir}")
        self.metrics.write(precision.describe(t.precision, self.precision, self.peaks, self.threads))
        if self.device.type == "cpu":
            self.metrics.write(hardware.describe_malloc())
        # MFU counts every matmul of the step: the main model's and the MTP modules'
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len) + mtp_flops_per_token(cfg.model, t.seq_len)
        self.peak = self.peaks[self.precision]  # MFU: against the measured peak of the dtype in use

    # ------------------------------------------------------------------ setup helpers
    def _build_model(self) -> Transformer:
        """This rank's part of the model and nothing more: its pipeline stage(s), its TP slices,
        its routed experts, built on the meta device, then given storage and filled, either from
        `train.init_from` (read slice by slice) or by the layout-independent seeded init
        (megads.model.init), which equals the same slice of the single-process initialisation."""
        from megads.train.init import build_local

        torch.manual_seed(self.cfg.train.seed)
        np.random.seed(self.cfg.train.seed)
        return build_local(self.cfg, self.ps, self.pp_plan, self.device)

    def build_frozen(self, path: str) -> Transformer:
        """A frozen model from `path` in this run's layout (a distillation teacher)."""
        from megads.train import init

        return init.build_frozen(path, self.cfg, self.ps, self.device, what="distill.teacher")

    def _setup_grad_norm(self) -> None:
        """The gradient norm (and so clipping) of the single process in every layout (see
        megads.parallel.gradnorm): fp32 without ZeRO, the guarded optimizer clips by it; under
        ZeRO-1/2 DeepSpeed clips by it; bf16 without ZeRO keeps DeepSpeed's bf16 optimizer norm,
        which reads the tensor_model_parallel marks set here."""
        from megads.parallel import gradnorm
        from megads.parallel.shard import shard_specs

        p = self.cfg.parallel
        self._norm_kinds = gradnorm.classify(self.model, shard_specs(self.model), p.tp, p.ep)
        bf16 = bool(self.ds_config.get("bf16", {}).get("enabled"))
        copy = self.model.embed.weight if self.pp_plan is not None and self.pp_plan.embed_copy else None
        if p.zero_stage == 0 and not bf16:
            self.optimizer.norm_weights = gradnorm.zero0_weights(self._norm_kinds, self.ps.layout, copy)
            self.optimizer.max_norm = float(self.ds_config.get("gradient_clipping") or 0.0)
            self.ds_config["gradient_clipping"] = 0.0  # the optimizer clips
        elif bf16 and p.zero_stage == 0:
            self._norm_kinds = None

    def full_state(self) -> dict:
        """Collective: the full (unsharded) model state on every rank."""
        from megads.parallel.shard import gather_full_state

        full = gather_full_state(self.model, self.ps)
        if self.pipeline is not None:  # every stage's part (the embedding's copies are equal)
            merged = {}
            for part in self.pipeline.gather_objects(full):
                merged.update(part)
            full = merged
        return full

    def _barrier(self):
        if dist.is_initialized():
            dist.barrier()

    def _from_rank0(self, obj):
        """Collective: rank 0's object on every rank."""
        if not dist.is_initialized() or self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _open_run_dir(self, resume: str, force: bool) -> tuple[Path | None, str, list[str]]:
        """Collective. Rank 0 locks the output dir and decides what to resume (see `plan_run`);
        every rank gets (checkpoint or None, run id, notes to log) or raises the same error."""
        out = self.cfg.train.output_dir
        answer = None
        if self.rank == 0:
            run_id = rundir.new_run_id()
            try:
                self.lock = rundir.RunLock(out).acquire()
                path, notes = plan_run(out, resume, force)
                answer = (str(path) if path else None, run_id, notes, None)
            except MegadsError as e:
                if self.lock is not None:
                    self.lock.release(refused=True)
                    self.lock = None
                answer = (None, run_id, [], (type(e).__name__, str(e), e.exit_code))
        if dist.is_initialized() and self.world > 1:
            box = [answer]
            dist.broadcast_object_list(box, src=0)
            answer = box[0]
        path, run_id, notes, err = answer
        if err is not None:
            e = MegadsError(err[1])
            e.exit_code, e.every_rank = err[2], True
            raise e
        return (Path(path) if path else None), run_id, notes

    # ------------------------------------------------------------------ data
    def _batch(self, ds, step: int, micro: int, per_step: int) -> dict:
        """This rank's micro-batch: samples [step*per_step + (micro*dp + dp_rank)*mb, +mb)."""
        mb = self.cfg.train.micro_batch_size
        start = step * per_step + (micro * self.dp + self.dp_rank) * mb
        return self.objective.collate([ds[(start + j) % len(ds)] for j in range(mb)], self.device)

    def _global_token_counts(self, batches: list[dict]) -> torch.Tensor:
        """float64 [K]: each loss term's counted tokens over the step's micro-batches and DP ranks
        (TP ranks hold the same data; under SP the loss is taken over the gathered sequence)."""
        counts = sum(self.objective.count(b) for b in batches).to(self.device)
        if dist.is_initialized() and self.dp > 1:
            dist.all_reduce(counts, group=self.ps.group("dp"))
        return counts

    def _micro_loss(self, batch: dict, denom: torch.Tensor):
        """(loss, metrics) of one micro-batch: the objective's forward (tests wrap this)."""
        return self.objective.forward(self.engine, batch, denom)

    # ------------------------------------------------------------------ reductions
    def _mean_over_dp(self, values) -> list[float]:
        x = torch.as_tensor(values, dtype=torch.float64).to(self.device).clone()
        if dist.is_initialized() and self.dp > 1:
            dist.all_reduce(x, group=self.ps.group("dp"))
            x /= self.dp
        return x.tolist()

    def _global_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Sum the step's expert counts over every rank that routed distinct tokens."""
        if not dist.is_initialized():
            return counts
        if self.ps.group("router") is not None:
            dist.all_reduce(counts, group=self.ps.group("router"))
        if self.model.sequence_parallel:  # TP ranks routed different sequence chunks
            dist.all_reduce(counts, group=self.ps.group("tp"))
        return counts

    # ------------------------------------------------------------------ loop
    def train(self) -> int:
        t = self.cfg.train
        tokens_per_step = t.global_batch_size * t.seq_len
        consecutive_bad = 0
        last_saved = None
        self.engine.train()
        while self.step < t.max_steps:
            step = self.step
            lr = lr_at(step, t)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            keys = self.objective.averaged
            sums = torch.zeros(len(keys), dtype=torch.float64, device=self.device)
            counts = None
            batches = self.objective.attach(self, self.objective.step_batches(self, step))
            tokens = self._global_token_counts(batches)
            denom = (tokens / (self.dp * self.gas)).float()  # each micro-batch's share of the global mean
            if self.pipeline is not None:
                sums, counts = self.pipeline.train_step(batches, denom, self.engine)
            for batch in batches if self.pipeline is None else ():
                loss, mets = self._micro_loss(batch, denom)
                self.engine.backward(loss)
                c = self.model.expert_counts()
                if c is not None:
                    counts = c if counts is None else counts + c
                self.engine.step()
                # accumulated on the device: the step's metrics are read once, not per micro step
                sums = sums + torch.stack([torch.as_tensor(mets[k], dtype=torch.float64).to(self.device).detach()
                                           for k in keys])
            skipped = self.optimizer.last_step_skipped
            means = dict(zip(keys, self._mean_over_dp(sums / self.gas)))
            dt = time.perf_counter() - t0
            grad_norm = (self.optimizer.last_grad_norm if self.optimizer.norm_weights is not None
                         else self.engine.get_global_grad_norm())
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            rec = {"step": step + 1, **means, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt,
                   "mfu": self.flops_per_token * tokens_per_step / dt / (self.peak * self.world), "peak_flops": self.peak,
                   "step_time_s": dt, "skipped": int(skipped), "bad_steps_total": self.bad_total + int(skipped),
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            rec.update(self.objective.step_metrics(tokens.cpu(), tokens_per_step))  # (may override tokens_per_s)
            rec.update(self._dispatch_stats())
            if self.pipeline is not None:
                idle = self.pipeline.idle_fractions()
                rec["pp_idle"] = max(idle)
                rec.update({f"pp_idle/rank{r}": v for r, v in enumerate(idle)})
            if skipped:
                self.bad_total += 1
                consecutive_bad += 1
                self.metrics.write(f"step {step + 1}: non-finite loss/gradient, update skipped "
                                   f"({consecutive_bad} in a row, {self.bad_total} in all)")
            else:
                consecutive_bad = 0
                if counts is not None or self.pipeline is not None:
                    if counts is not None:
                        counts = self._global_counts(counts)
                        self.model.update_router_biases(counts)
                    if self.pipeline is not None:  # every stage's layers, for the logs
                        counts, biases = self.pipeline.expert_view(counts)
                    else:
                        biases = [m.gate.bias for m in self.model.moe_layers() if m.gate.bias is not None]
                    if counts is not None:
                        rec.update(self._expert_stats(counts, biases))
            self.step += 1
            if self.compiled and not self.history:
                self.metrics.write(hardware.compile_note(self.compiled))
            self.history.append(rec)
            self.metrics.log_step(rec)
            if consecutive_bad >= t.max_bad_steps:
                path = self._save(wait=True)
                self.metrics.write(f"stopping: {consecutive_bad} consecutive bad steps (train.max_bad_steps = "
                                   f"{t.max_bad_steps}); the last good state is saved in {path}")
                self.metrics.close()
                return EXIT_BAD_STEPS
            if counts is not None and (self.step % t.log_interval == 0 or self.step == t.max_steps):
                # the loads for `megads plot` every log step; the TensorBoard image at evaluations
                image = self.step % t.eval_interval == 0 or self.step == t.max_steps
                self.metrics.log_expert_heatmap(self.step, counts.cpu().numpy(), image=image)
            if (self.step % t.eval_interval == 0 or self.step == t.max_steps) and self.valid_ds is not None:
                if self.objective.evaluate is not None:
                    self.metrics.log_eval_metrics(self.step, self.objective.evaluate(self))
                else:
                    self.last_valid = self.evaluate()
                    self.metrics.log_eval(self.step, self.last_valid)
            if self.step % t.save_interval == 0 or self.step == t.max_steps:
                last_saved = self._save()
            if self._stop_requested():
                return self._stop_now(last_saved)
        if last_saved is None and self.step != self.start_step:
            self._save()
        self._finish_pending()
        self._finish()
        return 0

    def _stop_requested(self) -> bool:
        """Collective: did any rank get SIGTERM/SIGINT? One small all-reduce per step (a signal
        may reach a single rank: `kill` of one process, or a launcher forwarding to its first
        child first)."""
        if self.stop is None:
            return False
        flag = torch.tensor([float(self.stop.requested() or 0)], device=self.device)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        if signum and self.stop.requested() is None:
            self.stop.signum = signum  # another rank's signal: exit with its code
        return bool(signum)

    def _stop_now(self, last_saved: Path | None) -> int:
        """After a signal: save (unless this step was just saved), say where and how to resume."""
        self._finish_pending()
        path = last_saved if last_saved is not None and last_saved.name == f"step-{self.step}" else self._save(wait=True)
        self.stop.done = True
        self.metrics.write(f"megads: stopped by {self.stop.name()} after step {self.step}: checkpoint {path}; "
                           f"resume with the same command (--resume auto) or --resume {path}")
        self._barrier()
        self.metrics.close()
        return self.stop.exit_code()

    def _dispatch_stats(self) -> dict:
        """All-to-all bytes per token (crossing ranks, crossing nodes) of this step's MoE layers."""
        d = self.model.par.get("dispatcher")
        if d is None:
            return {}
        st = d.stats
        d.reset_stats()
        tokens = max(1, st["tokens"] // max(1, len(self.model.moe_layers())))
        return {"a2a_bytes_per_token": st["bytes_sent_remote"] / tokens,
                "a2a_internode_bytes_per_token": st["bytes_sent_internode"] / tokens,
                "a2a_internode_dedup_bytes_per_token": float(st["bytes_internode_dedup"]) / tokens}

    def _expert_stats(self, counts: torch.Tensor, biases) -> dict:
        c = counts.float()
        rel = c.max(dim=1).values / c.mean(dim=1).clamp_min(1e-9)  # per-layer max/mean load
        out = {"expert_load_max_over_mean": float(rel.max())}
        for i, v in enumerate(rel.tolist()):
            out[f"expert_load/layer{i}_max_over_mean"] = v
        if biases:
            out["router_bias_norm"] = float(torch.stack(biases).norm())
        return out

    @torch.no_grad()
    def evaluate(self) -> float:
        t = self.cfg.train
        if self.valid_ds is None or len(self.valid_ds) == 0:
            return float("nan")
        self.engine.eval()
        # eval_iters batches of global_batch_size samples (as Megatron): the same samples, in the
        # same micro-batches, in every layout; each DP rank takes its share of each batch
        per = t.eval_iters * t.global_batch_size
        total = 0.0
        slot = (self.step // t.eval_interval) % max(1, len(self.valid_ds) // max(1, per))
        for it in range(t.eval_iters):
            batches = self.objective.attach(self, [self._batch(self.valid_ds, slot, it * self.gas + m, per)
                                                   for m in range(self.gas)])
            if self.pipeline is not None:
                vals, _ = self.pipeline.run(batches, None, train=False)
                total += float(sum(vals))
            else:
                total += sum(self.objective.eval_loss(self.engine, b) for b in batches)
        self.engine.train()
        return self._mean_over_dp([total / max(1, t.eval_iters * self.gas)])[0]

    def _save(self, wait: bool = False) -> Path:
        return self.saver.save(wait)

    def _finish_pending(self) -> Path | None:
        return self.saver.finish()

    def _finish(self) -> None:
        """Write the final model in megads format and print a few generated samples (rank 0)."""
        t = self.cfg.train
        sharded = self.ps.layout.tp > 1 or self.ps.layout.ep > 1 or self.ps.layout.pp > 1
        full = self.full_state() if sharded else None
        if self.rank == 0:
            from megads.model.io import save_model

            model = self.model
            if sharded:
                model = Transformer(self.cfg.model)
                model.load_state_dict(full)
            final = Path(t.output_dir) / "final"
            save_model(model, final)
            tok_dir = getattr(self.tokenizer, "path", None)
            if tok_dir:
                for f in Path(tok_dir).glob("tokenizer*.json"):
                    shutil.copy(f, final / f.name)
            self.metrics.write(f"final model: {final}")
            if t.samples_at_end and self.tokenizer is not None:
                self._print_samples(model)
        self._barrier()
        self.metrics.close()

    def _print_samples(self, model) -> None:
        t = self.cfg.train
        tok = self.tokenizer
        prompts = ["def ", "import os\n", "class ", "    return ", "# "][: t.samples_at_end]
        ids = [tok.encode(p) for p in prompts]
        S = max(len(i) for i in ids)
        pad = tok.pad_id if tok.pad_id is not None else 0
        batch = torch.full((len(ids), S), pad, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(batch, dtype=torch.bool)
        for r, i in enumerate(ids):
            batch[r, S - len(i):] = torch.tensor(i)
            mask[r, S - len(i):] = True
        gen = torch.Generator(device=self.device).manual_seed(t.seed)
        out = model.generate(batch, max_new_tokens=t.sample_tokens, temperature=0.8, top_p=0.95,
                                  attention_mask=mask, pad_token_id=pad,
                                  stop_tokens=[tok.eos_id] if tok.eos_id is not None else [], generator=gen)
        self.metrics.write("samples:")
        for r, p in enumerate(prompts):
            text = tok.decode([x for x in out[r, S:].tolist() if x != pad])
            self.metrics.write(f"--- {p!r}\n{p}{text}")
