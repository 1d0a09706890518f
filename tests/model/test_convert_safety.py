"""`megads convert` safety: non-finite tensors are refused (naming the tensor), a failed conversion
leaves nothing behind (and never touches the user's other files), the HF export carries a tokenizer
that transformers' AutoTokenizer loads, and every written file has the default mode (0644).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megads import hf
from megads.config import ModelConfig
from megads.model import Transformer
from megads.model.io import WEIGHTS_FILE, load_model, save_model

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = "def alpha(beta):\n    return <think>gamma</think> delta é"


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=300, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_layers=2,
                first_k_dense=1, num_heads=2, q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                n_group=1, topk_group=1, score_func="sigmoid", router_bias=True, mtp_depth=0, max_seq_len=64,
                rope_scaling="none")
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def tiny_model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_cfg(**kw)).eval()


def megads_cli(*args, umask=0o022):
    """`python -m megads ARGS` in a subprocess with the given umask."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megads", *args], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=300, preexec_fn=lambda: os.umask(umask))


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def poison(file: Path, name: str, value: float, count: int) -> None:
    """Rewrite safetensors `file` with `count` entries of tensor `name` set to `value`."""
    with safe_open(str(file), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sd[name].view(-1)[:count] = value
    save_file(sd, str(file), metadata={"format": "pt"})


def file_modes(d: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()}


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megads: error:"), r.stderr
    for n in needles:
        assert n in lines[0], r.stderr


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A megads tokenizer trained with the CLI on a small JSONL corpus."""
    d = tmp_path_factory.mktemp("tok")
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "import", "self", "value"]
    docs = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(30)) for i in range(100)]
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    r = megads_cli("tokenizer", "train", "--input", str(d / "train.jsonl"), "--vocab-size", "300",
                   "--output", str(d / "tok"))
    assert r.returncode == 0, r.stderr
    return d / "tok"


# ----------------------------------------------------------------------------------- non-finite

def test_megads_to_hf_refuses_inf_and_removes_dst(tmp_path):
    save_model(tiny_model(), tmp_path / "md")
    poison(tmp_path / "md" / WEIGHTS_FILE, "norm.weight", float("inf"), 3)  # a late tensor: shards precede
    dst = tmp_path / "new" / "hf"
    r = megads_cli("convert", "megads-to-hf", str(tmp_path / "md"), str(dst), "--shard-size", "20KB")
    assert_one_line_error(r, "'norm.weight'", "model.norm.weight", "3 non-finite values")
    assert not (tmp_path / "new").exists()  # the whole tree the conversion created is gone


def test_hf_to_megads_refuses_nan_and_removes_dst(tmp_path):
    src = hf.megads_to_hf(tiny_model(), tmp_path / "hf")
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    poison(src / hf.SINGLE_FILE, name, float("nan"), 1)
    dst = tmp_path / "md"
    r = megads_cli("convert", "hf-to-megads", str(src), str(dst))
    assert_one_line_error(r, repr(name), "1 non-finite value")
    assert not dst.exists()


def test_cast_overflow_is_named(tmp_path):
    """A float32 value beyond float16's range is finite at the source but not once written."""
    model = tiny_model()
    with torch.no_grad():
        model.layers[0].attn.wo.weight[0, 0] = 1e6
    with pytest.raises(hf.CheckpointError, match=r"'layers\.0\.attn\.wo\.weight'.*after the cast to float16"):
        hf.megads_to_hf(model, tmp_path / "hf", dtype=torch.float16)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("direction", ["megads-to-hf", "hf-to-megads"])
def test_failed_convert_keeps_users_files(tmp_path, direction):
    from megads.cli import main

    if direction == "megads-to-hf":
        src = save_model(tiny_model(), tmp_path / "src")
        poison(src / WEIGHTS_FILE, "norm.weight", float("nan"), 2)
    else:
        src = hf.megads_to_hf(tiny_model(), tmp_path / "src")
        poison(src / hf.SINGLE_FILE, "model.norm.weight", float("nan"), 2)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine\n")
    (dst / "sub").mkdir()
    extra = ["--shard-size", "20KB"] if direction == "megads-to-hf" else []  # a shard is written first
    assert main(["convert", direction, str(src), str(dst), *extra]) == 2
    assert sorted(p.name for p in dst.iterdir()) == ["notes.txt", "sub"]
    assert (dst / "notes.txt").read_text() == "mine\n"


def test_bad_source_removes_created_dst(tmp_path):
    from megads.cli import main

    assert main(["convert", "hf-to-megads", str(tmp_path / "nowhere"), str(tmp_path / "md")]) == 2
    assert main(["convert", "megads-to-hf", str(tmp_path / "nowhere"), str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "md").exists() and not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------------- tokenizer + modes

@pytest.mark.parametrize("files", ["megads", "bare"], ids=["with-config", "tokenizer-json-only"])
def test_export_tokenizer_loads_in_transformers(tmp_path, tokenizer_dir, files):
    transformers = pytest.importorskip("transformers")
    from megads.cli import main
    from megads.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    ck = save_model(tiny_model(vocab_size=tok.vocab_size), tmp_path / "final")
    names = ["tokenizer.json", "tokenizer_config.json"] if files == "megads" else ["tokenizer.json"]
    for n in names:
        shutil.copy(tokenizer_dir / n, ck / n)
        os.chmod(ck / n, 0o600)  # a private source file: the copy still gets the default mode
    with umask(0o022):
        assert main(["convert", "megads-to-hf", str(ck), str(tmp_path / "hf")]) == 0
        assert main(["convert", "hf-to-megads", str(tmp_path / "hf"), str(tmp_path / "md")]) == 0

    hf_dir = tmp_path / "hf"
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert theirs.is_fast
    assert theirs(SAMPLE)["input_ids"] == tok.encode(SAMPLE)
    assert theirs.encode(SAMPLE, add_special_tokens=False) == tok.encode(SAMPLE)
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert theirs.decode(tok.encode(SAMPLE)) == SAMPLE
    d = json.loads((hf_dir / "config.json").read_text())
    assert (d["bos_token_id"], d["eos_token_id"]) == (tok.bos_id, tok.eos_id)

    back = load_tokenizer(tmp_path / "md")  # what `megads generate --checkpoint md` loads
    assert back.hash == tok.hash
    assert load_model(tmp_path / "md").cfg == load_model(ck).cfg

    for d_ in (hf_dir, tmp_path / "md"):
        modes = file_modes(d_)
        assert not [n for n in modes if n.endswith(".tmp")], modes
        assert set(modes.values()) == {0o644}, {n: oct(m) for n, m in modes.items()}


def test_modes_follow_umask(tmp_path):
    """Written files get 0666 less the umask, in a fresh CLI process as well."""
    save_model(tiny_model(), tmp_path / "md")
    r = megads_cli("convert", "megads-to-hf", str(tmp_path / "md"), str(tmp_path / "hf"), "--shard-size", "20KB",
                   umask=0o027)
    assert r.returncode == 0, r.stderr
    modes = file_modes(tmp_path / "hf")
    assert hf.INDEX_FILE in modes and set(modes.values()) == {0o640}, modes
    with umask(0o022):
        save_model(tiny_model(), tmp_path / "md2")
    assert set(file_modes(tmp_path / "md2").values()) == {0o644}


def test_convert_refuses_to_write_into_its_source(tmp_path):
    import torch

    from megads.config import ModelConfig
    from megads.errors import CheckpointError
    from megads.hf import hf_to_megads, megads_to_hf
    from megads.model import Transformer
    from megads.model.io import save_model

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_layers=1,
                      num_heads=2, kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=4,
                      v_head_dim=8, n_routed_experts=0, n_shared_experts=0, first_k_dense=1, mtp_depth=0)
    torch.manual_seed(0)
    src = save_model(Transformer(cfg), tmp_path / "m")
    before = sorted((p.name, p.stat().st_size) for p in src.iterdir())
    for fn in (megads_to_hf, hf_to_megads):
        with pytest.raises(CheckpointError, match="destination is the source"):
            fn(src, src, overwrite=True)
    assert sorted((p.name, p.stat().st_size) for p in src.iterdir()) == before
