"""Direct Preference Optimisation (the `dpo` stage), on the same parallel model.

With Δ_w = log π(y_w|x) − log π_ref(y_w|x) and Δ_l the same for the rejected response (sums over
the response tokens):

- sigmoid (DPO):  −log σ(β (Δ_w − Δ_l))
- hinge (SLiC):   max(0, 1 − β (Δ_w − Δ_l))
- ipo (IPO):      (Δ_w/|y_w| − Δ_l/|y_l| − 1/(2β))²   (length-normalised log ratios)

Chosen and rejected go through one forward (the batch holds both). The reference is either the
initial policy's log-probs, computed once in a first pass over the whole dataset in the training
layout and cached beside the tokenised data (`dpo.reference: precomputed`, one resident model), or
a frozen copy of the initial model in the same layout, without optimizer state
(`dpo.reference: resident`). The loss is the mean over the global batch's pairs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from megads.train.objectives.base import Objective

log = logging.getLogger(__name__)


def dpo_loss(pi_w, pi_l, ref_w, ref_l, beta: float, loss_type: str = "sigmoid", len_w=None, len_l=None):
    """Per-pair DPO losses [P] and β-scaled rewards (chosen, rejected) [P] from sequence log-probs."""
    dw, dl = pi_w - ref_w, pi_l - ref_l
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * (dw - dl))
    elif loss_type == "hinge":
        loss = torch.relu(1.0 - beta * (dw - dl))
    elif loss_type == "ipo":
        loss = (dw / len_w - dl / len_l - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss_type: unknown {loss_type!r}")
    return loss, beta * dw.detach(), beta * dl.detach()


class DPOObjective(Objective):
    name = "dpo"
    averaged = ("loss", "dpo/loss", "dpo/margin", "dpo/accuracy", "dpo/chosen_reward", "dpo/rejected_reward",
                "balance_loss")

    # ------------------------------------------------------------------ data
    def datasets(self, loop):
        from megads.data.examples import build_preference_jsonl
        from megads.data.indexed import IndexedDataset
        from megads.data.sft import PairDataset, split_rows, tokenize_pairs
        from megads.train.objectives.base import jsonl_inputs, on_rank0

        cfg = self.cfg
        paths = jsonl_inputs(self, loop, "dpo_stdlib_functions.jsonl", build_preference_jsonl)
        names = on_rank0(loop, lambda: [tokenize_pairs(p, self.tokenizer, cfg.data.cache_dir, cfg.data.on_error)
                                        for p in paths])
        self.cache_key = hashlib.sha256(json.dumps(names).encode()).hexdigest()[:12]
        self.pairs = PairDataset([[IndexedDataset(n) for n in part] for part in names], cfg.train.seq_len,
                                 pad_id=self.tokenizer.pad_id or 0)
        train, valid = split_rows(self.pairs, cfg.data.split, cfg.train.seed)
        return train, valid, self.tokenizer

    def collate(self, rows, device):
        tokens = np.concatenate([np.stack([r["tokens"][0] for r in rows]), np.stack([r["tokens"][1] for r in rows])])
        labels = np.concatenate([np.stack([r["labels"][0] for r in rows]), np.stack([r["labels"][1] for r in rows])])
        out = {"tokens": torch.from_numpy(tokens).to(device), "labels": torch.from_numpy(labels).to(device),
               "index": torch.tensor([r["index"] for r in rows])}
        if "ref" in rows[0]:
            out["ref"] = torch.from_numpy(np.stack([r["ref"] for r in rows])).to(device)
        return out

    def count(self, batch):
        return torch.tensor([batch["tokens"].shape[0] // 2], dtype=torch.float64)

    # ------------------------------------------------------------------ the reference
    def prepare(self, loop) -> str | None:
        """Precomputed: load the cached reference log-probs, or compute them now (fresh start only:
        they are the initial policy's). Resident: build the frozen copy of the initial model."""
        self.ref_model = self.ref_pipeline = None
        if self.cfg.dpo.reference == "resident":
            self.ref_model = loop._build_model().to(loop.device).eval()
            self.ref_model.requires_grad_(False)
            if loop.pipeline is not None:  # this rank's stages of the reference, run by a pipeline of their own
                from megads.parallel.pipeline import Pipeline

                self.ref_pipeline = Pipeline(self.ref_model, loop.pp_plan, loop.ps, loop.device, loop.gas, self, ())
            return "dpo: resident reference model (the initial weights, frozen, same layout)"
        from megads.errors import DataError

        if not hasattr(self, "pairs"):  # datasets handed in (tests): reference kept in memory only
            for ds in (loop.train_ds, loop.valid_ds):
                if ds is not None:
                    ds.ref = self._compute_reference(loop, ds)
            return "dpo: reference log-probs computed in a first pass (in memory)"
        path = Path(self.cfg.data.cache_dir) / f"dpo-ref-{self.cache_key}-{self._init_key()}.npy"
        if path.is_file():
            self.pairs.ref = np.load(path)
            return f"dpo: reference log-probs from {path}"
        if loop.step > 0:
            e = DataError(f"{path}: the precomputed reference log-probs are missing; they are the initial "
                          f"model's, so a resumed run cannot recompute them (restore the file, or use "
                          f"dpo.reference: resident)")
            e.every_rank = True
            raise e
        t0 = time.perf_counter()
        self.pairs.ref = self._compute_reference(loop, self.pairs)
        seconds = time.perf_counter() - t0
        if loop.rank == 0:
            tmp = path.with_name(path.name + ".tmp.npy")
            np.save(tmp, self.pairs.ref)
            tmp.replace(path)
        loop._barrier()
        return (f"dpo: reference log-probs computed in a first pass over {len(self.pairs)} pairs in {seconds:.1f} s, "
                f"cached in {path}")

    def _init_key(self) -> str:
        c = self.cfg
        return hashlib.sha256(json.dumps([c.model.__dict__, c.train.seed, getattr(c.train, "init_from", ""), c.train.seq_len],
                                         sort_keys=True, default=str).encode()).hexdigest()[:12]

    @torch.no_grad()
    def _compute_reference(self, loop, pairs) -> np.ndarray:
        """[N, 2] log π_init(y|x) for every pair (chosen, rejected): DP ranks take every dp-th pair
        (all ranks run the same number of forwards, for the MoE all-to-all), then share them."""
        import torch.distributed as dist

        n, mb = len(pairs), self.cfg.train.micro_batch_size
        mine = list(range(loop.dp_rank, n, loop.dp))
        steps = -(-((n + loop.dp - 1) // loop.dp) // mb)
        if loop.pipeline is not None:  # whole pipeline schedules of gas micro-batches
            steps = -(-steps // loop.gas) * loop.gas
        loop.engine.eval()
        got = {}
        idxs, batches = [], []
        for s in range(steps):
            idx = mine[s * mb:(s + 1) * mb] or mine[-1:]
            idx = idx + [idx[-1]] * (mb - len(idx))
            idxs.append(idx)
            batches.append(self.collate([pairs[i] for i in idx], loop.device))
            if loop.pipeline is None:
                outs = [self._seq_logps(loop.engine, batches[-1])]
            elif len(batches) == loop.gas:
                outs, _ = loop.pipeline.run(batches, None, train=False, collect=self._logps_of)
            else:
                continue
            for idx_, (lw, ll) in zip(idxs, outs):
                for i, a, c in zip(idx_, lw.tolist(), ll.tolist()):
                    got[i] = (a, c)
            idxs, batches = [], []
        loop.engine.train()
        parts = [got]
        if dist.is_initialized() and loop.dp > 1:
            parts = [None] * loop.dp
            dist.all_gather_object(parts, got, group=loop.ps.group("dp"))
        ref = np.zeros((n, 2), dtype=np.float64)
        for part in parts:
            for i, (a, c) in part.items():
                ref[i] = (a, c)
        return ref

    # ------------------------------------------------------------------ the loss
    def _seq_logps(self, model, batch, out=None):
        if out is None:
            args, kw = self.model_call(batch)
            out = model(*args, **kw)
        lp = -out.token_losses.sum(-1)  # [2P] sequence log-probs of the responses
        P = lp.shape[0] // 2
        self._aux = (out.loss, out.aux_loss)  # the balance term (with gradient), its value
        return lp[:P], lp[P:]

    def _logps_of(self, out, batch):
        """(chosen, rejected) sequence log-probs from one forward's output (a pipeline's last stage)."""
        lw, ll = self._seq_logps(None, batch, out)
        return lw.detach().cpu(), ll.detach().cpu()

    def model_call(self, batch, denom=None):
        return (batch["tokens"], batch["labels"]), {"token_losses": True}

    def attach(self, loop, batches):
        """Under pipeline parallelism the resident reference runs as a pipeline of its own, before
        the policy's: its log-probs ride in each micro-batch as `ref`, like precomputed ones."""
        if self.ref_pipeline is None:
            return batches
        with torch.no_grad():
            refs, _ = self.ref_pipeline.run(batches, None, train=False, collect=self._logps_of)
        return [{**b, "ref": torch.stack([w, l], dim=1).to(loop.device)} for b, (w, l) in zip(batches, refs)]

    def _pair_losses(self, engine, batch, out=None):
        d = self.cfg.dpo
        pi_w, pi_l = self._seq_logps(engine, batch, out)
        aux = self._aux
        if "ref" in batch:  # precomputed, or the resident reference's pipeline (attach)
            ref_w, ref_l = batch["ref"][:, 0].to(pi_w.dtype), batch["ref"][:, 1].to(pi_w.dtype)
        else:
            with torch.no_grad():
                ref_w, ref_l = self._seq_logps(self.ref_model, batch)
        P = pi_w.shape[0]
        lengths = (batch["labels"] != -100).sum(-1).to(pi_w.dtype)
        loss, rw, rl = dpo_loss(pi_w, pi_l, ref_w, ref_l, d.beta, d.loss_type, lengths[:P], lengths[P:])
        return loss, rw, rl, aux

    def loss_of(self, out, batch, denom):
        loss, rw, rl, (aux, aux_value) = self._pair_losses(None, batch, out)
        n = denom[0]
        total = loss.sum() / n + aux
        margin = rw - rl
        return total, {"loss": total.detach(), "dpo/loss": loss.detach().sum() / n, "dpo/margin": margin.sum() / n,
                       "dpo/accuracy": (margin > 0).float().sum() / n, "dpo/chosen_reward": rw.sum() / n,
                       "dpo/rejected_reward": rl.sum() / n, "balance_loss": aux_value}

    def eval_of(self, out, batch) -> float:
        loss, _, _, _ = self._pair_losses(None, batch, out)
        return float(loss.mean())
