"""Group Relative Policy Optimisation with rule rewards (the `grpo` stage; DeepSeekMath,
DeepSeek-R1; REFERENCE.md §6), on the same parallel model and loop.

Every `grpo.iterations` (μ) optimizer steps the policy samples a rollout batch in its own layout:
global_batch_size / G prompts, G completions each (megads.rl.rollout); the completions are
scored by the weighted rule rewards (megads.rl.rewards), turned into group advantages
(megads.rl.group_advantages) and split into the step's micro-batches. Each of the μ steps then
trains on that batch with the clipped surrogate (+ β·k3 KL to a frozen reference in the same
layout, built only when β > 0) of megads.rl.grpo_loss, normalised over the global batch. The
"old" log-probs are the policy's own at the first of the μ steps (ρ = 1 there exactly); the
sampler's log-probs are kept and their largest difference to the trainer's is logged
(rollout/logp_max_diff), the check that sampler and trainer agree.

The rollout buffer is saved with every checkpoint, so a run resumed in the middle of μ steps
trains on the same batch it would have.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.distributed as dist

from megads.rl.pack import pack_rows, shared_runs, unpack_segments
from megads.train.objectives.base import Objective

log = logging.getLogger(__name__)


def check_rewards(g) -> None:
    """Import grpo.reward_modules (they register rewards), then check every named reward and the
    language code: one line naming the key."""
    import importlib

    from megads.errors import ConfigError
    from megads.rl import rewards

    for mod in g.reward_modules:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise ConfigError(f"grpo.reward_modules: cannot import {mod!r} ({e})") from None
    for name in g.rewards:
        try:
            rewards.get(name)
        except ValueError as e:
            raise ConfigError(f"grpo.rewards: {e}") from None
    if "language" in g.rewards:
        try:
            rewards.lang_scripts(g.lang)
        except ValueError as e:
            raise ConfigError(f"grpo.lang: {e}") from None


class GRPOObjective(Objective):
    name = "grpo"
    averaged = ("loss", "balance_loss")

    def __init__(self, cfg, tokenizer=None):
        super().__init__(cfg, tokenizer)
        self.buffer = None  # (cycle, [micro-batch dicts])
        self._stats = None
        self._rollout_metrics = {}
        self._prompt_cache: dict[int, list[int]] = {}
        self.ref_model = None
        self.sampler = None  # RolloutCopy where rollouts decode in another dtype than training's

    # ------------------------------------------------------------------ data
    def datasets(self, loop):
        from megads.data.tokenizer import load_tokenizer
        from megads.errors import ConfigError
        from megads.rl.tasks import load_tasks

        cfg = self.cfg
        spec = cfg.data.paths[0] if cfg.data.paths else cfg.grpo.tasks
        if not spec:
            raise ConfigError("grpo.tasks: train.stage grpo needs prompts: a builtin task family "
                              "(grpo.tasks: arith) or a JSONL of {prompt, answer} in data.paths")
        records = load_tasks(spec, seed=cfg.train.seed)
        if self.tokenizer is None:
            tok_dir = cfg.data.tokenizer
            if not tok_dir and cfg.data.builtin_corpus:
                from megads.data import builtin_paths, prepare_builtin

                if loop.rank == 0:
                    prepare_builtin(cfg.data)
                loop._barrier()
                tok_dir = builtin_paths(cfg.data)[1]
            if not tok_dir:
                raise ConfigError("data.tokenizer: train.stage grpo needs a tokenizer directory")
            self.tokenizer = load_tokenizer(tok_dir)
        train = [r for r in records if r.get("split", "train") == "train"]
        test = [r for r in records if r.get("split") == "test"] or None
        return train, test, self.tokenizer

    def prepare(self, loop) -> str | None:
        from megads.errors import ConfigError

        g, t = self.cfg.grpo, self.cfg.train
        check_rewards(g)
        prompts = t.global_batch_size // g.group_size
        if prompts % loop.dp:
            raise ConfigError(f"train.global_batch_size: {prompts} prompts per step (global_batch_size / "
                              f"grpo.group_size) must divide over the {loop.dp} data-parallel ranks, so that "
                              f"each prompt's group stays on one rank")
        if loop.model.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel: GRPO's rollouts decode with a KV cache, which "
                              "sequence parallelism does not support; set it false for train.stage grpo")
        self._loop = loop
        rng = np.random.default_rng(t.seed)
        self.order = rng.permutation(len(loop.train_ds))
        notes = [f"grpo: {prompts} prompts x G={g.group_size} per rollout, mu={g.iterations}, "
                 f"rewards {g.rewards}, beta={g.beta}"]
        notes.append(self._setup_sampler(loop, (prompts // loop.dp) * g.group_size))
        if g.beta > 0:
            self.ref_model = loop._build_model().to(loop.device).eval()
            self.ref_model.requires_grad_(False)
            notes.append("reference model: the initial weights, frozen, same layout")
        return "; ".join(notes)

    def _setup_sampler(self, loop, rows: int) -> str:
        """grpo.rollout_precision: the dtype rollouts and held-out sampling decode in. Another
        dtype than the policy's own keeps a copy of this rank's weights in it (RolloutCopy), filled
        from the policy before each use. auto times the decode step of both at the rollout's rows
        (every rank together: TP/EP forwards hold collectives; rank 0's choice is broadcast)."""
        from megads.rl.rollout import RolloutCopy
        from megads.runtime import precision

        trained = next(loop.model.parameters()).dtype
        own = "bf16" if trained == torch.bfloat16 else "fp32"
        setting = self.cfg.grpo.rollout_precision
        self.sampler = None
        if setting == "train":
            return f"rollouts in {own} (the policy as trained)"
        other = "fp32" if own == "bf16" else "bf16"
        copies = {}

        def build():
            if other not in copies:
                with torch.random.fork_rng(devices=[]):  # building reseeds: keep the run's RNG streams
                    state = np.random.get_state()
                    m = precision.cast_params(loop._build_model(), precision.DTYPES[other])
                    np.random.set_state(state)
                copies[other] = RolloutCopy(loop.model, m)
            return copies[other]

        def time_both():
            rates = {own: precision.decode_step_rate(loop.model, rows),
                     other: precision.decode_step_rate(build().synced(), rows)}
            return rates

        used, why = precision.choose_decode(setting, loop.peaks, time_both)
        if used != own:
            self.sampler = build()
        return f"rollouts in {used} ({why}{'; a copy of the weights in ' + used if used != own else ''})"

    def _sampling_model(self, loop):
        """The model rollouts and evaluation decode with: the policy, or its synced copy."""
        return self.sampler.synced() if self.sampler is not None else loop.model

    def _prompt_ids(self, ds, i: int) -> list[int]:
        from megads.rl.tasks import render_prompt

        key = (id(ds), i)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = render_prompt(self.tokenizer, ds[i]["prompt"], self.cfg.grpo.template)
        return self._prompt_cache[key]

    def collate(self, rows, device):
        # GRPO's batches are sampled rollouts (step_batches), never collated from dataset rows
        raise RuntimeError("grpo: batches come from rollouts (step_batches), not from collate")

    # ------------------------------------------------------------------ rollouts
    def step_batches(self, loop, step: int) -> list[dict]:
        mu = self.cfg.grpo.iterations
        cycle = step // mu
        if self.buffer is None or self.buffer[0] != cycle:
            self.buffer = (cycle, self._rollout_batches(loop, cycle))
        else:
            self._rollout_metrics = {}
            self.buffer = (cycle, [{k: (v.to(loop.device) if torch.is_tensor(v) else v) for k, v in b.items()}
                                   for b in self.buffer[1]])
        self._stats = torch.zeros(6, dtype=torch.float64)
        self._t_update = time.perf_counter()
        return self.buffer[1]

    def _rollout_batches(self, loop, cycle: int) -> list[dict]:
        from megads.rl import rewards
        from megads.rl.rollout import row_generators, sample_groups

        g, t = self.cfg.grpo, self.cfg.train
        G = g.group_size
        P = t.global_batch_size // G
        P_local = P // loop.dp
        first = cycle * P + loop.dp_rank * P_local
        idx = [int(self.order[(first + j) % len(self.order)]) for j in range(P_local)]
        samples = [loop.train_ds[i] for i in idx]
        prompts = [self._prompt_ids(loop.train_ds, i) for i in idx]
        if max(len(p) for p in prompts) + g.max_new_tokens > self.cfg.model.max_seq_len:
            from megads.errors import DataError

            raise DataError(f"grpo: a prompt of {max(len(p) for p in prompts)} tokens plus max_new_tokens "
                            f"{g.max_new_tokens} exceeds model.max_seq_len {self.cfg.model.max_seq_len}")
        width = torch.tensor([max(len(p) for p in prompts)], device=loop.device)
        if dist.is_initialized() and loop.world > 1:
            dist.all_reduce(width, op=dist.ReduceOp.MAX)  # the same padded rows in every layout
        gens = row_generators(t.seed, cycle, [(first + j, k) for j in range(P_local) for k in range(G)])
        model = self._sampling_model(loop)
        ro = sample_groups(model, self.tokenizer, prompts, G, max_new_tokens=g.max_new_tokens,
                           temperature=g.temperature, top_p=g.top_p, stops=list(g.stop), generators=gens,
                           sync=True, device=loop.device, pad_to=int(width.item()), decode=g.rollout_decode)
        t1 = time.perf_counter()
        rows = [s for s in samples for _ in range(G)]
        total, per = rewards.score(ro.texts, rows, dict(g.rewards), default_lang=g.lang, workers=g.reward_workers)
        total = torch.tensor(total, dtype=torch.float64)
        if g.shuffle_rewards:  # the control: each group's rewards permuted among its completions
            for j in range(P_local):
                perm = torch.randperm(G, generator=torch.Generator().manual_seed(t.seed * 7919 + first + j + cycle))
                total[j * G:(j + 1) * G] = total[j * G:(j + 1) * G][perm]
        reward_s = time.perf_counter() - t1
        adv, zero_std = self._advantages(loop, total, G)
        keep = torch.ones(len(rows), dtype=torch.bool)
        if g.drop_zero_std:
            keep &= ~zero_std.repeat_interleave(G)
        if g.mask_truncated:
            keep &= ~ro.truncated.cpu()
        batches = self._micro_batches(loop, ro, adv, keep)
        t2 = time.perf_counter()
        if self.ref_model is not None:
            for b in batches:
                b["ref_logp"] = self._logps(self.ref_model, b).detach()
        logprob_s = time.perf_counter() - t2
        self._rollout_metrics = self._summarise(loop, ro, total, per, zero_std, ro.seconds, reward_s, logprob_s)
        # this rank's rows whose log-prob forward shares its prompt with the run's other rows
        packed = sum(b["tokens"].shape[0] for b in batches if b.get("pack_group", 1) > 1)
        self._rollout_metrics["rollout/packed_rows"] = packed / max(sum(b["tokens"].shape[0] for b in batches), 1)
        return batches

    def _advantages(self, loop, total: torch.Tensor, G: int):
        from megads.rl import group_advantages

        scale = self.cfg.grpo.scale
        if scale != "batch" or loop.dp == 1 or not dist.is_initialized():
            return group_advantages(total, G, scale)
        # the batch std over every data-parallel rank's completions
        adv, zero_std = group_advantages(total, G, "none")
        judged = ~torch.isnan(total)
        r = total[judged]
        s = torch.tensor([r.numel(), r.sum(), (r ** 2).sum()], dtype=torch.float64, device=loop.device)
        dist.all_reduce(s, group=loop.ps.group("dp"))
        n, s1, s2 = s.tolist()
        var = (s2 - s1 * s1 / max(n, 1)) / max(n - 1, 1)
        return adv / (max(var, 0.0) ** 0.5 + 1e-4), zero_std

    def _micro_batches(self, loop, ro, adv, keep) -> list[dict]:
        mb = self.cfg.train.micro_batch_size
        S = ro.prompt_len
        x = ro.tokens
        N, L = x.shape
        attn = torch.cat([ro.prompt_mask, ro.completion_mask], dim=1)
        positions = (attn.long().cumsum(-1) - 1).clamp_min(0)
        labels = x[:, 1:].clone()
        label_ok = torch.zeros_like(labels, dtype=torch.bool)
        label_ok[:, S - 1:] = ro.completion_mask
        labels[~label_ok] = -100
        loss_mask = ro.completion_mask & keep.to(x.device).unsqueeze(1)
        out = []
        for m in range(0, N, mb):
            sl = slice(m, m + mb)
            group = 1  # rows of one prompt packed into one row of the log-prob forward (megads.rl.pack)
            if self.cfg.grpo.share_prompts:
                group = shared_runs(x[sl, :S - 1], attn[sl, :S - 1], S - 1)
            out.append({"tokens": x[sl, :-1].contiguous(), "labels": labels[sl].contiguous(),
                        "positions": positions[sl, :-1].contiguous(), "attention_mask": attn[sl, :-1].contiguous(),
                        "mask": loss_mask[sl], "advantages": adv[sl].float().to(x.device),
                        "sampler_logp": ro.logps[sl], "cmask": ro.completion_mask[sl], "prompt_len": S,
                        "old_logp": None, "pack_group": group})
        return out

    def _logps(self, model, batch) -> torch.Tensor:
        """[mb, T] the completion tokens' log-probs under `model` (temperature-scaled), with gradient.
        With pack_group g > 1, each run of g rows of one prompt is one packed row (megads.rl.pack):
        the prompt is computed once for its g completions."""
        # (a rollout buffer saved before packing existed has no pack_group: rows one by one)
        temperature, prefix = self.cfg.grpo.temperature or 1.0, batch["prompt_len"] - 1
        group = batch.get("pack_group", 1)
        if group == 1:
            out = model(batch["tokens"], batch["labels"], positions=batch["positions"],
                        attention_mask=batch["attention_mask"], token_losses=True, temperature=temperature,
                        loss_from=prefix)
            self._aux = out.loss
            return -out.token_losses
        tokens, labels, positions, mask = pack_rows(prefix, group, batch["tokens"], batch["labels"],
                                                    batch["positions"], batch["attention_mask"])
        out = model(tokens, labels, positions=positions, attention_mask=mask, token_losses=True,
                    temperature=temperature, loss_from=prefix, shared_prefix=(prefix, group))
        self._aux = out.loss
        return -unpack_segments(out.token_losses, group)

    # ------------------------------------------------------------------ the loss
    def count(self, batch):
        m = batch["mask"]
        return torch.tensor([float(m.any(-1).sum()), float(m.sum())], dtype=torch.float64)

    def forward(self, engine, batch, denom):
        from megads.rl import grpo_loss

        g = self.cfg.grpo
        logp = self._logps(engine, batch)
        aux = self._aux
        first = batch["old_logp"] is None
        if first:  # the policy that sampled: ratio 1 (the sampler's own log-probs are compared below)
            batch["old_logp"] = logp.detach()
            diff = (logp.detach() - batch["sampler_logp"]).abs().masked_fill(~batch["cmask"], 0.0)
            self._logp_diff = max(getattr(self, "_logp_diff", 0.0), float(diff.max()) if diff.numel() else 0.0)
        loss, st = grpo_loss(logp, batch["old_logp"], batch.get("ref_logp"), batch["advantages"], batch["mask"],
                             eps_low=g.eps_low, eps_high=g.eps_high, beta=g.beta, aggregation=g.aggregation,
                             num_sequences=denom[0].clamp_min(1e-9), num_tokens=denom[1].clamp_min(1e-9),
                             max_tokens=g.max_new_tokens)
        self._stats[:5] += st["sums"].cpu()
        total = loss + aux
        return total, {"loss": total.detach(), "balance_loss": aux.detach()}

    def eval_loss(self, engine, batch) -> float:
        # held-out figures come from greedy sampling (evaluate), not from a loss on dataset rows
        raise RuntimeError("grpo: held-out evaluation is by sampling (evaluate), not eval_loss")

    # ------------------------------------------------------------------ metrics
    def _summarise(self, loop, ro, total, per, zero_std, gen_s, reward_s, logprob_s) -> dict:
        """Global (all data-parallel ranks) figures of this rollout batch."""
        names = sorted(per)
        vals = []
        for n in names:
            a = torch.tensor(per[n], dtype=torch.float64)
            j = ~torch.isnan(a)
            vals += [float(a[j].sum()), float(j.sum())]
        tj = ~torch.isnan(total)
        lengths = ro.completion_mask.sum(-1).double().cpu()
        ent = (ro.entropy.double() * ro.completion_mask).sum().cpu()
        vals += [float(total[tj].sum()), float(tj.sum()), float(zero_std.sum()), float(zero_std.numel()),
                 float(lengths.sum()), float(lengths.numel()), float(ro.truncated.sum()), float(ent), gen_s]
        v = torch.tensor(vals, dtype=torch.float64, device=loop.device)
        mx = torch.tensor([float(lengths.max())], dtype=torch.float64, device=loop.device)
        if dist.is_initialized() and loop.dp > 1:
            dist.all_reduce(v, group=loop.ps.group("dp"))
            dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=loop.ps.group("dp"))
        v = v.tolist()
        out = {}
        for i, n in enumerate(names):
            out[f"reward/{n}"] = v[2 * i] / v[2 * i + 1] if v[2 * i + 1] else float("nan")
        k = 2 * len(names)
        tsum, tn, zs, zn, lsum, ln, trunc, esum, gen_total = v[k:k + 9]
        out.update({"reward/total": tsum / tn if tn else float("nan"), "rollout/zero_std_groups": zs / zn,
                    "rollout/length_mean": lsum / ln, "rollout/length_max": mx.item(),
                    "rollout/truncated": trunc / ln, "rollout/entropy": esum / max(lsum, 1.0),
                    # every data-parallel rank samples at once: tokens over the slowest rank's time
                    "rollout/tokens_per_s": lsum / max(gen_s, 1e-9) if loop.dp == 1 else lsum / max(gen_total / loop.dp, 1e-9),
                    "time/generate_s": gen_s, "time/reward_s": reward_s, "time/logprob_s": logprob_s})
        return out

    def step_metrics(self, counts, world_tokens):
        loop = self._loop
        out = dict(self._rollout_metrics)
        st = self._stats.to(loop.device)
        diff = torch.tensor([getattr(self, "_logp_diff", 0.0)], dtype=torch.float64, device=loop.device)
        self._logp_diff = 0.0
        if dist.is_initialized() and loop.dp > 1:
            dist.all_reduce(st, group=loop.ps.group("dp"))
        if dist.is_initialized() and loop.world > 1:
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        st = st.tolist()
        n = max(st[0], 1.0)
        out.update({"grpo/clip_low": st[1] / n, "grpo/clip_high": st[2] / n, "grpo/kl": st[3] / n,
                    "grpo/ratio": st[4] / n, "num_loss_tokens": int(counts[1]), "num_sequences": int(counts[0])})
        if "reward/total" in out:  # a fresh rollout: the sampler-vs-trainer check of its first step
            out["rollout/logp_max_diff"] = float(diff.item())
        out["time/update_s"] = time.perf_counter() - self._t_update
        return out

    # ------------------------------------------------------------------ held-out evaluation
    @torch.no_grad()
    def evaluate(self, loop) -> dict:
        """Greedy completions of the held-out prompts (DP ranks take every dp-th; all ranks decode
        the same number of batches in lockstep): accuracy, format and total reward rates."""
        from megads.rl import rewards
        from megads.rl.rollout import sample_groups

        g = self.cfg.grpo
        ds = loop.valid_ds
        n = min(len(ds), g.eval_prompts)
        mine = list(range(loop.dp_rank, n, loop.dp))
        per = max(1, self.cfg.train.micro_batch_size * 8)
        rounds = -(-((n + loop.dp - 1) // loop.dp) // per)
        sums = {}
        model = self._sampling_model(loop)
        for r in range(rounds):
            idx = mine[r * per:(r + 1) * per]
            real = len(idx)
            idx = (idx or [0]) + [(idx or [0])[-1]] * (per - len(idx or [0]))
            ro = sample_groups(model, self.tokenizer, [self._prompt_ids(ds, i) for i in idx], 1,
                               max_new_tokens=g.max_new_tokens, temperature=0.0, stops=list(g.stop), sync=True,
                               device=loop.device, decode=g.rollout_decode)
            names = {"accuracy": 1.0, "format": 1.0}
            names.update({k: 1.0 for k in g.rewards})
            _, per_r = rewards.score(ro.texts[:real], [ds[i] for i in idx[:real]], names, default_lang=g.lang,
                                     workers=g.reward_workers)
            for k, a in per_r.items():
                a = np.asarray(a, dtype=np.float64)
                j = ~np.isnan(a)
                s0, c0 = sums.get(k, (0.0, 0.0))
                sums[k] = (s0 + float(a[j].sum()), c0 + float(j.sum()))
        keys = sorted(sums) or ["accuracy", "format"]
        v = torch.tensor([x for k in keys for x in sums.get(k, (0.0, 0.0))], dtype=torch.float64, device=loop.device)
        if dist.is_initialized() and loop.dp > 1:
            dist.all_reduce(v, group=loop.ps.group("dp"))
        v = v.tolist()
        return {k: (v[2 * i] / v[2 * i + 1] if v[2 * i + 1] else float("nan")) for i, k in enumerate(keys)}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_extra(self):
        if self.buffer is None:
            return None
        cycle, batches = self.buffer
        keep = [{k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in b.items()} for b in batches]
        return {"grpo_buffer": (cycle, keep), "rollout_metrics": self._rollout_metrics}

    def restore_extra(self, extra) -> None:
        if extra and "grpo_buffer" in extra:
            cycle, batches = extra["grpo_buffer"]
            self.buffer = (cycle, batches)  # (moved to the device when used)
