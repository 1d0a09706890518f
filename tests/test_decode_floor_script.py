"""bench/decode_floor.py runs (the tiny preset, a small batch): megads's step agrees with
transformers' (asserted inside), every product of the recorded step is accounted for (their
FLOPs, counted from each call's arguments, equal megads.model.info.decode_flops_per_token x rows,
itself checked against torch's FlopCounterMode in tests/model/test_decode_flops.py), and the
step, floor and budget rows print."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_decode_floor_bench_tiny():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "bench/decode_floor.py", "--preset", "tiny", "--batch", "8", "--prompt", "16",
                        "--reps", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    flops = re.search(r"^products' FLOPs in the step: ([\d,]+); .* x rows: ([\d,]+)$", out, re.M)
    assert flops, out
    counted, formula = (int(g.replace(",", "")) for g in flops.groups())
    assert counted == formula > 0, out
    for name in ("expert_swiglu_rows", "latent_attention_rows", "linear_rows"):  # the native kernels were recorded
        assert re.search(rf"^\| {name} \| \d+ \|", out, re.M), out
    for row in ("transformers' step", "megads's step as it runs", "its products alone, warm (the floor)",
                "the target's budget (8x)"):
        assert re.search(rf"^\| {re.escape(row)} \| [\d.]+ \| [\d,]+ \| [\d.]+x \|$", out, re.M), out
