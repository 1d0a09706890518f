"""Next-token pre-training on Megatron-style indexed datasets (the `pretrain` stage)."""
from __future__ import annotations

import numpy as np
import torch

from megads.train.objectives.base import Objective


class LMObjective(Objective):
    """Shared by every next-token stage: the model's LM loss (+ MTP + balance loss), with the lm
    and MTP terms normalised over the global batch's counted tokens."""

    averaged = ("loss", "lm_loss", "mtp_loss", "balance_loss")

    def count(self, batch: dict) -> torch.Tensor:
        from megads.model.transformer import loss_token_counts

        return loss_token_counts(batch["labels"], self.cfg.model.mtp_depth, batch.get("doc_ids"))

    def _model_inputs(self, batch: dict) -> dict:
        return {k: batch[k] for k in ("positions", "doc_ids") if k in batch}

    def model_call(self, batch, denom):
        kw = self._model_inputs(batch)
        if denom is not None:
            kw["num_items"] = denom[:1 + self.cfg.model.mtp_depth]
        return (batch["tokens"], batch["labels"]), kw

    def loss_of(self, out, batch, denom):
        return out.loss, {"loss": out.loss.detach(), "lm_loss": out.lm_loss, "mtp_loss": out.mtp_loss,
                          "balance_loss": out.aux_loss}

    def eval_of(self, out, batch) -> float:
        return float(out.lm_loss)


class PretrainObjective(LMObjective):
    name = "pretrain"

    def datasets(self, loop):
        from megads.data import build_datasets, prepare_builtin
        from megads.errors import ConfigError

        cfg, t = self.cfg, self.cfg.train
        if cfg.data.builtin_corpus and not cfg.data.paths:
            if loop.rank == 0:
                prepare_builtin(cfg.data)
            loop._barrier()
        if not cfg.data.paths and not cfg.data.builtin_corpus:
            raise ConfigError("data.paths: no training data (give indexed-dataset prefixes or data.builtin_corpus: true)")
        evals = t.max_steps // t.eval_interval + 1
        return build_datasets(cfg.data, t.seq_len, t.seed, t.max_steps * t.global_batch_size,
                              max(1, t.eval_iters * t.global_batch_size * evals))  # (see Trainer.evaluate)

    def collate(self, rows, device):
        t = torch.from_numpy(np.stack([r["tokens"] for r in rows]).astype(np.int64)).to(device)
        return {"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()}
