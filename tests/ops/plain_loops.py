"""The native kernels' plain loops (CPUs without AVX2+FMA, non-x86 or BLAS-less builds), chosen
with MEGADS_CPU_PLAIN=1 in a fresh process."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def run_plain_loops(test_file: str, select: str, min_passed: int) -> None:
    """Run test_file's tests matching `-k select` again with MEGADS_CPU_PLAIN=1 and require at
    least min_passed passes and no failure."""
    env = dict(os.environ, MEGADS_CPU_PLAIN="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file,
                        "-k", select], cwd=Path(__file__).resolve().parents[2], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= min_passed and "failed" not in r.stdout, r.stdout[-3000:]
