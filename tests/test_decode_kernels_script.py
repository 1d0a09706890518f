"""bench/decode_kernels.py runs (its smoke size): every table prints, the four expert paths agree,
the two decode-attention paths agree, and the decode step with each change turned on in turn gives
the same logits."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_decode_kernels_bench_quick():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "bench/decode_kernels.py", "--quick"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "megads::linear_rows" in out and "| 4 | 512 x 16384 |" in out  # table 1 (head included)
    experts = re.search(r"^\| 4 \| uniform \| 16 \| \d+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| ([\d.e+-]+) \|$",
                        out, re.M)
    assert experts and float(experts.group(1)) < 1e-5, out  # grouped, padded, kernel, the dispatch: same outputs
    attention = re.search(r"^\| 4 \| 64 \| [\d.]+ \(\d+\) \| [\d.]+ \(\d+\) \| [\d.]+x \| ([\d.e+-]+) \|$", out, re.M)
    assert attention and float(attention.group(1)) < 1e-5, out  # torch products and the kernel agree
    step = re.search(r"^\| 4, 64 \|.* \| ([\d.]+)x \| ([\d.e+-]+) \|$", out, re.M)
    assert step and float(step.group(2)) < 1e-4, out  # every setting gives the same logits
