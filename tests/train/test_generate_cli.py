"""`megads generate` on what a real run leaves (the 6-step reference run: checkpoints at steps 2, 4
and 6, final/): any step-N checkpoint, the run dir itself; a prompt longer than the model's
positions and sampling flags that cannot sample are one line, exit 2."""
from __future__ import annotations

import pytest

from megads.cli import main


def generate(capsys, *args) -> str:
    code = main(["generate", *args, "--prompt", "def alpha", "--prompt", "class", "--max-new-tokens", "6"])
    cap = capsys.readouterr()
    assert code == 0, cap.err[-3000:]
    return cap.out


def test_generate_from_any_step_checkpoint_and_the_run_dir(reference, capsys):
    out, _, _ = reference
    final = generate(capsys, "--checkpoint", str(out / "final"))
    # step-6 is the weights final/ was written from: the same greedy text, the tokenizer found via the run
    assert generate(capsys, "--checkpoint", str(out / "checkpoints" / "step-6")) == final
    assert generate(capsys, "--checkpoint", str(out)) == final  # a run dir means its final/
    early = generate(capsys, "--checkpoint", str(out / "checkpoints" / "step-4"))
    assert early.count("--- prompt") == 2  # an earlier step loads too (its own weights)


def test_a_prompt_longer_than_the_models_positions_is_refused(reference, capsys):
    out, _, _ = reference
    long = " ".join(["alpha beta gamma delta"] * 300)  # far more tokens than the 512 positions
    assert main(["generate", "--checkpoint", str(out / "final"), "--prompt", long]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--prompt 0" in err and "512 positions" in err, err
    assert main(["generate", "--checkpoint", str(out / "final"), "--prompt", "alpha", "--max-new-tokens", "600"]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens 600 exceed" in err and "use --max-new-tokens 5" in err


@pytest.mark.parametrize("flags, needle", [
    (["--temperature", "-0.5"], "--temperature: must be >= 0"),
    (["--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p: must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
])
def test_sampling_flags_that_cannot_sample_are_refused(flags, needle, capsys, tmp_path):
    # refused before any model is read: the checkpoint need not even exist
    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_a_dir_without_a_model_is_one_line(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "no model here" in capsys.readouterr().err


def test_generate_precision(reference, capsys):
    out, _, _ = reference
    final = generate(capsys, "--checkpoint", str(out / "final"))
    assert generate(capsys, "--checkpoint", str(out / "final"), "--precision", "fp32") == final  # auto is pinned to fp32 here
    bf16 = generate(capsys, "--checkpoint", str(out / "final"), "--precision", "bf16")  # bf16 weights and cache
    assert bf16.count("--- prompt") == 2


def test_generate_int8_weights(reference, capsys):
    out, _, _ = reference
    code = main(["generate", "--checkpoint", str(out / "final"), "--weights", "int8", "--prompt", "def alpha",
                 "--prompt", "class", "--max-new-tokens", "6"])
    cap = capsys.readouterr()
    assert code == 0, cap.err[-3000:]
    assert cap.out.count("--- prompt") == 2 and "weights int8 (weight-only;" in cap.err and "MiB saved" in cap.err


def test_generate_decode_modes(reference, capsys):
    """--decode static (the fixed-shape step) gives the default's greedy text."""
    out, _, _ = reference
    final = generate(capsys, "--checkpoint", str(out / "final"))
    assert generate(capsys, "--checkpoint", str(out / "final"), "--decode", "static") == final
