"""bench/decode_floor.py and bench/train_floor.py run (the tiny preset, small shapes). Each asserts
inside that megads's model agrees with transformers'; here: every product of the recorded step is
accounted for (their FLOPs, counted from each call's arguments, equal the analytic count of
megads.model.info that benches and the trainer divide by: decode_flops_per_token x rows, itself
checked against torch's FlopCounterMode in tests/model/test_decode_flops.py, and flops_per_token x
tokens for a training step, forward and backward), each kind of product was recorded, and the
step, floor and budget rows print."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, f"bench/{script}", "--preset", "tiny", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def counted_and_formula(out: str, per: str) -> tuple[int, int]:
    flops = re.search(rf"^products' FLOPs in the step: ([\d,]+); .* x {per}: ([\d,]+)$", out, re.M)
    assert flops, out
    return tuple(int(g.replace(",", "")) for g in flops.groups())


def test_decode_floor_bench_tiny():
    out = run_bench("decode_floor.py", "--batch", "8", "--prompt", "16", "--reps", "2")
    counted, formula = counted_and_formula(out, "rows")
    assert counted == formula > 0, out
    for name in ("expert_swiglu_rows", "latent_attention_rows", "linear_rows"):  # the native kernels were recorded
        assert re.search(rf"^\| {name} \| \d+ \|", out, re.M), out
    for row in ("transformers' step", "megads's step as it runs", "its products alone, warm (the floor)",
                "the target's budget (8x)"):
        assert re.search(rf"^\| {re.escape(row)} \| [\d.]+ \| [\d,]+ \| [\d.]+x \|$", out, re.M), out


def test_train_floor_bench_tiny():
    # (with RMSNorm weights counted as products, as flops_per_token did before, this fails)
    out = run_bench("train_floor.py", "--batch", "2", "--seq", "64", "--reps", "1")
    counted, formula = counted_and_formula(out, "tokens")
    assert counted == formula > 0, out
    for name in (r"causal_attention \(megads::\)", r"causal_attention_backward \(megads::\)",
                 r"_grouped_mm \(routed experts\) .*", r"mm \(output head\) .*"):
        assert re.search(rf"^\| {name} \| \d+ \|", out, re.M), (name, out)
    for row in ("transformers' step", "megads's step as it runs", "its products alone, warm (the floor)",
                "the budget of 75% MFU", "the budget of 3x transformers"):
        assert re.search(rf"^\| {re.escape(row)} \| [\d,.]+ \| [\d,]+ \| [\d.]+% \| [\d.]+x \|$", out, re.M), (row, out)
