"""The shipped post-training configs run as a chain (SFT -> DPO from the SFT model -> distillation
from it), in miniature: their own data builders (stdlib docstring -> function chats, real vs
corrupted function pairs), the test corpus's small tokenizer, a few steps each."""
import json

from conftest import megads, step_losses

from megads.data.examples import build_preference_jsonl, build_sft_jsonl


def _sets(corpus, out, data, *extra):
    sets = [f"data.paths=[{data}]", f"data.tokenizer={corpus / 'tok'}", "data.builtin_corpus=false",
            "model.vocab_size=320", "train.max_steps=3", "train.seq_len=128", "train.micro_batch_size=2",
            "train.global_batch_size=2", "parallel.zero_stage=0", "train.progress=false", "train.tensorboard=false",
            f"train.output_dir={out}", f"data.cache_dir={out.parent / 'cache'}", "data.split=95,5", *extra]
    return [a for s in sets for a in ("--set", s)]


def test_sft_dpo_distill_chain(corpus, tmp_path):
    sft_data = build_sft_jsonl(tmp_path / "sft.jsonl", max_samples=60)
    rec = json.loads(sft_data.read_text().splitlines()[0])
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant"] and "def " in rec["messages"][1]["content"]
    pref = build_preference_jsonl(tmp_path / "pref.jsonl", max_samples=60)
    p = json.loads(pref.read_text().splitlines()[0])
    assert p["chosen"][0]["content"] != p["rejected"][0]["content"]

    r = megads("train", "configs/sft/tiny.yaml", *_sets(corpus, tmp_path / "sft", sft_data))
    assert r.returncode == 0, r.stderr[-3000:]
    sft_final = tmp_path / "sft" / "final"
    r = megads("train", "configs/dpo/tiny.yaml", *_sets(corpus, tmp_path / "dpo", pref, f"train.init_from={sft_final}"))
    assert r.returncode == 0, r.stderr[-3000:]
    first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["dpo/loss"] - 0.6931471805599453) < 1e-5  # the reference is the SFT model itself
    r = megads("train", "configs/distill/tiny.yaml",
               *_sets(corpus, tmp_path / "kd", sft_data, f"distill.teacher={sft_final}"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(step_losses(tmp_path / "kd")) == [1, 2, 3]
