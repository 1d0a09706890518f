"""Supervised fine-tuning (the `sft` stage): chat or prompt/completion JSONL, loss on the
assistant/completion tokens (`sft.loss_on`), samples packed into rows with per-document attention
(no token attends across a sample boundary; positions restart), best-fit packed so that little
but a row's tail is padding.

Distillation by SFT on teacher traces (DeepSeek-R1's recipe for its distilled models) is this
stage on the teacher's JSONL: no separate code.
"""
from __future__ import annotations

import numpy as np
import torch

from megads.train.objectives.pretrain import LMObjective


class SFTObjective(LMObjective):
    name = "sft"

    def datasets(self, loop):
        from megads.data.examples import build_sft_jsonl
        from megads.data.indexed import IndexedDataset
        from megads.data.sft import PackedSFTDataset, split_rows, tokenize_sft
        from megads.train.objectives.base import jsonl_inputs, on_rank0

        cfg = self.cfg
        paths = jsonl_inputs(self, loop, "sft_stdlib_functions.jsonl", build_sft_jsonl)
        prefixes = on_rank0(loop, lambda: [tokenize_sft(p, self.tokenizer, cfg.data.cache_dir, cfg.data.on_error)
                                           for p in paths])
        pairs = [(IndexedDataset(t), IndexedDataset(m)) for t, m in prefixes]
        full = PackedSFTDataset(pairs, cfg.train.seq_len, cfg.train.seed, pack=cfg.sft.packing,
                                loss_on=cfg.sft.loss_on, pad_id=self.tokenizer.pad_id or 0)
        train, valid = split_rows(full, cfg.data.split, cfg.train.seed)
        return train, valid, self.tokenizer

    def collate(self, rows, device):
        return {k: torch.from_numpy(np.stack([r[k] for r in rows])).to(device)
                for k in ("tokens", "labels", "doc_ids", "positions")}

    def step_metrics(self, counts, world_tokens):
        # counts: [lm, mtp..., non-padding tokens]
        return {"num_loss_tokens": int(counts[0]), "packing_efficiency": float(counts[-1]) / max(1, world_tokens)}

    def count(self, batch):
        c = super().count(batch)
        return torch.cat([c, (batch["doc_ids"] >= 0).sum().reshape(1).to(c.dtype)])
