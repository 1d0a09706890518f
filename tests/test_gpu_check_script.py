"""bench/gpu_check.sh's plan, checked here without a GPU: its steps run in order while the time
spent plus the next step's limit fits GPU_CHECK_BUDGET (the lent machine's command limit), the
rest are named with the command that runs them, an unknown step is refused, and with $OUT set
the output is also kept in $OUT/gpu_check.log."""
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["device", "wheels", "build", "ops-tests", "ops-bench", "static", "mfu", "nccl"]


def _run(*args, **env):
    return subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=ROOT, env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=60)


def _planned(out):
    return re.findall(r"^== ([\w-]+): .* \(limit (\d+) s; (\d+) s spent\)$", out, re.M)


def test_the_plan_fits_the_budget_and_names_the_rest(tmp_path):
    r = _run("--dry-run", OUT=str(tmp_path))
    assert r.returncode == 0, r.stderr
    planned = _planned(r.stdout)
    names = [p[0] for p in planned]
    rest = re.search(r"run them with: bash bench/gpu_check.sh (.*)$", r.stdout, re.M).group(1).split()
    assert names + rest == STEPS  # every step, in order, either planned or named for a second call
    for name, limit, spent in planned:  # a dry run counts each step at its whole limit
        assert int(spent) + int(limit) <= 540
    limits = {n: int(lim) for n, lim, _ in _planned(_run("--dry-run", GPU_CHECK_BUDGET="100000").stdout)}
    clock = int(planned[-1][2]) + int(planned[-1][1])
    assert all(clock + limits[n] > 540 for n in rest)  # none of the steps left would have fitted
    assert (tmp_path / "gpu_check.log").read_text() == r.stdout


def test_chosen_steps_and_a_larger_budget():
    r = _run("--dry-run", "mfu", "nccl", GPU_CHECK_BUDGET="2000")
    assert r.returncode == 0 and [p[0] for p in _planned(r.stdout)] == ["mfu", "nccl"]
    assert "not run" not in r.stdout
    r = _run("--dry-run", "all", GPU_CHECK_BUDGET="100000")
    assert [p[0] for p in _planned(r.stdout)] == STEPS


def test_an_unknown_step_is_refused():
    r = _run("--dry-run", "mfu", "benchmarks")
    assert r.returncode == 2
    assert r.stderr.strip() == f"gpu_check: unknown step 'benchmarks' (steps: {' '.join(STEPS)})"
