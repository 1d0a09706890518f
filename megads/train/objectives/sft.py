"""Supervised fine-tuning (the `sft` stage): chat or prompt/completion JSONL, loss on the
assistant/completion tokens (`sft.loss_on`), samples packed into rows with per-document attention
(no token attends across a sample boundary; positions restart), padding-free by default.

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
        from megads.data.indexed import IndexedDataset
        from megads.data.sft import PackedSFTDataset, split_rows, tokenize_sft
        from megads.errors import ConfigError, DataError, MegadsError

        from megads.data.tokenizer import load_tokenizer

        cfg = self.cfg
        paths, tok_dir = list(cfg.data.paths), cfg.data.tokenizer
        if not paths and cfg.data.builtin_corpus:
            # docstring -> function chats from the stdlib, with the builtin corpus's tokenizer
            from megads.data import builtin_paths, prepare_builtin
            from megads.data.examples import build_sft_jsonl

            jsonl = f"{cfg.data.data_dir}/sft_stdlib_functions.jsonl"
            if loop.rank == 0:
                prepare_builtin(cfg.data)
                build_sft_jsonl(jsonl)
            loop._barrier()
            paths, tok_dir = [jsonl], builtin_paths(cfg.data)[1]
        if not paths:
            raise ConfigError("data.paths: sft needs JSONL files (chat or prompt/completion records), "
                              "or data.builtin_corpus: true")
        if self.tokenizer is None:
            if not tok_dir:
                raise ConfigError("data.tokenizer: sft needs a tokenizer directory")
            self.tokenizer = load_tokenizer(tok_dir)
        prefixes, err = [], None
        if loop.rank == 0:  # one process tokenises (cached), the others wait and read the cache
            try:
                prefixes = [tokenize_sft(p, self.tokenizer, cfg.data.cache_dir, cfg.data.on_error) for p in paths]
            except MegadsError as e:
                err = str(e)
        prefixes, err = loop._from_rank0((prefixes, err))
        if err is not None:
            e = DataError(err)
            e.every_rank = True
            raise e
        prefixes = loop._from_rank0(prefixes)
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
