"""Logit distillation: the three losses against a float64 computation over the full vocabulary
written here, and `megads train` with `train.stage: distill` from a teacher of another size."""
import json

import numpy as np
import pytest
import torch

from conftest import megads, train_args

from megads.train.objectives.distill import kd_token_losses


def _reference(s, t, kind, T, beta):
    p = torch.softmax(t.double() / T, -1)
    q = torch.softmax(s.double() / T, -1)
    if kind == "forward_kl":
        v = (p * (p.log() - q.log())).sum(-1)
    elif kind == "reverse_kl":
        v = (q * (q.log() - p.log())).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        v = beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)
    return v * T * T


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kd_losses_against_float64_full_vocabulary(kind, T):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 97, generator=g) * 3
    t = torch.randn(3, 5, 97, generator=g) * 3
    got = kd_token_losses(s, t, kind, T, beta=0.3)
    want = _reference(s, t, kind, T, 0.3)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    assert (got >= -1e-6).all()
    assert torch.allclose(kd_token_losses(t, t, kind, T, 0.3), torch.zeros(3, 5), atol=1e-5)  # same model: 0
    # the gradient w.r.t. the student's logits, against autograd through the float64 reference
    s1 = s.clone().requires_grad_(True)
    kd_token_losses(s1, t, kind, T, 0.3).sum().backward()
    s2 = s.double().clone().requires_grad_(True)
    _reference(s2, t, kind, T, 0.3).sum().backward()
    assert torch.allclose(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-6)


def test_megads_train_stage_distill(corpus, tmp_path):
    from megads.config import load_config
    from megads.model import Transformer
    from megads.model.io import save_model

    rng = np.random.RandomState(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class"]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(words, 4)), "completion": " ".join(
        rng.choice(words, rng.randint(3, 12)))}) + "\n" for _ in range(60)))
    # a teacher of another size (wider, one more layer), the student's vocabulary
    tcfg = load_config(None, ["model.vocab_size=320", "model.hidden_size=96", "model.intermediate_size=192",
                              "model.moe_intermediate_size=48", "model.num_layers=3", "model.kv_lora_rank=32",
                              "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16"]).model
    torch.manual_seed(3)
    teacher = save_model(Transformer(tcfg), tmp_path / "teacher")
    extra = ["train.stage=distill", f"distill.teacher={teacher}", f"data.paths={data}",
             f"data.cache_dir={tmp_path / 'cache'}", "train.seq_len=48", "data.split=90,10", "train.lr=0.01"]
    r = megads(*train_args(corpus, tmp_path / "run", steps=6, extra=extra))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "distill: teacher" in r.stdout
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert recs[-1]["distill/kd"] < recs[0]["distill/kd"]  # the student moves toward the teacher
    r = megads(*train_args(corpus, tmp_path / "run2", extra=[*extra[:1], "distill.teacher=/nonexistent",
                                                              *extra[2:]]))
    assert r.returncode == 2 and "/nonexistent" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
