"""One rank of the parallel == single-process check (run by test_equivalence.py).

Trains a small model for 3 optimizer steps (gradient clipping on, at the default config's 1.0)
through the real Trainer (DeepSpeed engine, ZeRO,
TP/EP layers, all-to-all dispatch) on fixed synthetic data, then writes the per-step losses and
the gathered full weights (rank 0) to OUT.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megads.config import load_config  # noqa: E402
from megads.parallel import state as pstate  # noqa: E402
from megads.train.loop import Trainer  # noqa: E402


class Synthetic:
    """Deterministic token sequences with learnable structure (next = f(prev))."""

    def __init__(self, n, seq, vocab, seed):
        rng = np.random.RandomState(seed)
        x = np.zeros((n, seq + 1), dtype=np.int64)
        x[:, 0] = rng.randint(0, vocab, n)
        for j in range(1, seq + 1):
            noise = rng.randint(0, vocab, n)
            x[:, j] = np.where(rng.rand(n) < 0.7, (x[:, j - 1] * 3 + 1) % vocab, noise)
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"tokens": self.x[i]}


class SyntheticSFT:
    """Packed SFT rows with uneven masks: 1-3 samples a row, each with a prompt (no loss) and a
    completion, positions restarting per sample, a padded tail of random length. Different ranks
    get different numbers of loss tokens, so only a global-token mean matches one process."""

    def __init__(self, n, seq, vocab, seed):
        rng = np.random.RandomState(seed)
        self.rows = []
        for _ in range(n):
            tokens = rng.randint(0, vocab, seq)
            labels = np.full(seq, -100)
            doc = np.full(seq, -1)
            pos = np.zeros(seq, dtype=np.int64)
            at, j = 0, 0
            while at < seq - 2 and j < 3:
                n_doc = int(rng.randint(2, seq - at + 1))
                if j > 0 and rng.rand() < 0.3:
                    break  # leave a padded tail
                prompt = int(rng.randint(0, n_doc))
                span = slice(at, at + n_doc)
                doc[span], pos[span] = j, np.arange(n_doc)
                nxt = (tokens[span] * 3 + 1) % vocab
                lab = nxt.copy()
                lab[:prompt] = -100
                labels[span] = lab
                at += n_doc
                j += 1
            tokens[doc < 0] = 0
            self.rows.append({"tokens": tokens.astype(np.int64), "labels": labels.astype(np.int64),
                              "doc_ids": doc.astype(np.int64), "positions": pos})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class SyntheticPairs:
    """Preference pairs [2, S] (chosen, rejected) sharing a prompt, responses of uneven lengths."""

    def __init__(self, n, seq, vocab, seed):
        rng = np.random.RandomState(seed)
        self.rows, self.ref = [], None
        for i in range(n):
            prompt = int(rng.randint(1, seq // 2))
            tok = np.zeros((2, seq), dtype=np.int64)
            lab = np.full((2, seq), -100, dtype=np.int64)
            tok[:, :prompt] = rng.randint(0, vocab, prompt)
            for j in range(2):
                end = int(rng.randint(prompt + 1, seq + 1))
                tok[j, prompt:end] = rng.randint(0, vocab, end - prompt)
                nxt = (tok[j] * 3 + 1 + j) % vocab
                lab[j, prompt - 1:end - 1] = nxt[prompt - 1:end - 1]
            self.rows.append({"tokens": tok, "labels": lab, "index": i})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        return r if self.ref is None else {**r, "ref": self.ref[i]}


def grpo_data(cfg):
    """Arithmetic prompts and a reward that varies across random completions (a random-init
    policy never gets the accuracy reward), so every group has non-zero advantages."""
    from megads.data.tokenizer import load_tokenizer
    from megads.rl import rewards
    from megads.rl.tasks import arith

    @rewards.register("toy", replace=True)
    def toy(completion, sample):
        return (sum(map(ord, completion)) % 11) / 10

    recs = arith(64, 8, seed=3)
    return ([r for r in recs if r["split"] == "train"], [r for r in recs if r["split"] == "test"],
            load_tokenizer(cfg.data.tokenizer))


def overrides(tp, ep, zero, out):
    return [f"parallel.tp={tp}", f"parallel.ep={ep}", f"parallel.zero_stage={zero}",
            "model.vocab_size=128", "model.hidden_size=64", "model.intermediate_size=128",
            "model.moe_intermediate_size=32", "model.num_layers=3", "model.first_k_dense=1",
            "model.num_heads=4", "model.kv_lora_rank=32", "model.q_lora_rank=24",
            "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
            "model.n_routed_experts=8", "model.num_experts_per_tok=2", "model.n_group=2", "model.topk_group=1",
            "model.n_shared_experts=1", "model.seq_aux_alpha=0.001", "model.max_seq_len=64",
            "train.max_steps=3", "train.seq_len=16", "train.micro_batch_size=2", "train.global_batch_size=8",
            "train.lr=0.01", "train.min_lr=0.001", "train.warmup_steps=0", "train.grad_clip=1.0",
            "train.eval_interval=1000", "train.save_interval=1000", "train.samples_at_end=0",
            "train.progress=false", "train.tensorboard=false", f"train.output_dir={out}/run",
            "train.seed=7", "data.paths=[synthetic]"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], help="extra overrides (benchmarks)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="resume the latest checkpoint of the run dir")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(None, overrides(a.tp, a.ep, a.zero, a.out) + a.set)
    pstate.init_distributed(os.environ.get("MEGADS_EQUIV_BACKEND", "gloo"), 120)
    t = cfg.train
    n = max(64, t.max_steps * t.global_batch_size)
    if t.stage == "grpo":
        data = grpo_data(cfg)
    else:
        kind = {"sft": SyntheticSFT, "distill": SyntheticSFT, "dpo": SyntheticPairs}.get(t.stage, Synthetic)
        data = (kind(n, t.seq_len, cfg.model.vocab_size, 1), kind(16, t.seq_len, cfg.model.vocab_size, 2), None)
    tr = Trainer(cfg, resume="auto" if a.resume else "none", datasets=data)
    loaded = tr.full_state() if a.resume else None  # what the checkpoint gave this layout
    tr.train()
    valid = tr.last_valid  # (the trainer evaluates at its last step)
    full = tr.full_state()
    if tr.rank == 0:
        torch.save({"losses": [r["loss"] for r in tr.history], "state": full, "valid": valid, "loaded": loaded,
                    "steps": [r["step"] for r in tr.history], "history": tr.history,
                    "grad_norm": [r["grad_norm"] for r in tr.history], "grad_clip": cfg.train.grad_clip,
                    "a2a": [r.get("a2a_bytes_per_token", 0.0) for r in tr.history],
                    "step_time": [r["step_time_s"] for r in tr.history],
                    "tokens_per_s": [r["tokens_per_s"] for r in tr.history]}, os.path.join(a.out, "result.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # leave without running C++ static destructors: a gloo/DeepSpeed helper thread still joinable
    # at interpreter exit can abort() ("terminate called without an active exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
