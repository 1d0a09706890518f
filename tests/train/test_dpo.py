"""DPO: the three losses against float64 formulas written here, and `megads train` with
`train.stage: dpo`: ln 2 and a zero margin at the first step (the reference is the policy), the
precomputed reference equal to the resident one, its cache reused on resume, data errors."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import megads, step_losses, train_args

from megads.train.objectives.dpo import dpo_loss


def _reference(pw, pl, rw, rl, beta, kind, lw, ll):
    out = []
    for a, b, c, d, x, y in zip(pw, pl, rw, rl, lw, ll):
        h = beta * ((a - c) - (b - d))
        if kind == "sigmoid":
            out.append(math.log(1 + math.exp(-h)))
        elif kind == "hinge":
            out.append(max(0.0, 1 - h))
        else:
            out.append(((a - c) / x - (b - d) / y - 1 / (2 * beta)) ** 2)
    return out


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
def test_dpo_losses_against_the_formulas(kind):
    g = torch.Generator().manual_seed(0)
    pw, pl, rw, rl = (-torch.rand(16, generator=g, dtype=torch.float64) * 40 for _ in range(4))
    lw, ll = (torch.randint(1, 30, (16,), generator=g).double() for _ in range(2))
    for beta in (0.1, 0.5):
        loss, cr, rr = dpo_loss(pw, pl, rw, rl, beta, kind, lw, ll)
        want = _reference(pw.tolist(), pl.tolist(), rw.tolist(), rl.tolist(), beta, kind, lw.tolist(), ll.tolist())
        assert loss.tolist() == pytest.approx(want, rel=1e-12)
        assert cr.tolist() == pytest.approx((beta * (pw - rw)).tolist(), rel=1e-12)
        assert rr.tolist() == pytest.approx((beta * (pl - rl)).tolist(), rel=1e-12)


def test_dpo_loss_gradient_direction():
    """Raising the chosen response's log-prob lowers the sigmoid loss."""
    pw = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
    loss, _, _ = dpo_loss(pw, torch.tensor([-10.0], dtype=torch.float64), torch.tensor([-10.0], dtype=torch.float64),
                          torch.tensor([-10.0], dtype=torch.float64), 0.1)
    loss.sum().backward()
    assert float(loss.detach()) == pytest.approx(math.log(2)) and float(pw.grad) == pytest.approx(-0.05)


def _pairs(path, n, seed=0):
    rng = np.random.RandomState(seed)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class"]
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(words, rng.randint(2, 8)))
            good = " ".join(sorted(rng.choice(words, rng.randint(2, 10))))
            bad = " ".join(rng.choice(words, rng.randint(2, 10)))
            f.write(json.dumps({"prompt": [{"role": "user", "content": q}],
                                "chosen": [{"role": "assistant", "content": good}],
                                "rejected": [{"role": "assistant", "content": bad}]}) + "\n")
    return path


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_megads_train_stage_dpo(corpus, tmp_path):
    data = _pairs(tmp_path / "pref.jsonl", 60)
    extra = ["train.stage=dpo", f"data.paths={data}", f"data.cache_dir={tmp_path / 'cache'}", "train.seq_len=48",
             "data.split=90,10", "train.lr=0.003", "dpo.beta=0.5"]
    out = tmp_path / "pre"
    r = megads(*train_args(corpus, out, steps=6, extra=extra))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "computed in a first pass" in r.stdout
    recs = _records(out)
    first = recs[0]
    assert first["dpo/loss"] == pytest.approx(math.log(2), rel=1e-6)  # reference == policy at step 1
    assert first["dpo/margin"] == pytest.approx(0.0, abs=1e-6)
    for k in ("dpo/accuracy", "dpo/chosen_reward", "dpo/rejected_reward"):
        assert k in first
    assert recs[-1]["dpo/margin"] > 0 and recs[-1]["dpo/loss"] < math.log(2)  # it learns the preference
    assert list((tmp_path / "cache").glob("dpo-ref-*.npy"))

    res = tmp_path / "res"  # the resident reference: the same losses
    r = megads(*train_args(corpus, res, steps=6, extra=[*extra, "dpo.reference=resident"]))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = step_losses(out), step_losses(res)
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), (s, a, b)

    r = megads(*train_args(corpus, out, steps=8, extra=extra))  # resume: the cached reference is reused
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reference log-probs from" in r.stdout and "resumed from" in r.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + '{"prompt": "x", "chosen": "y"}\n')
    r = megads(*train_args(corpus, tmp_path / "b", extra=[*extra[:1], f"data.paths={bad}", "data.on_error=fail",
                                                           f"data.cache_dir={tmp_path / 'cache'}"]))
    assert r.returncode == 2 and f"{bad}:61: " in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
