"""train.precision: auto picks the dtype by measuring both matmul rates; MFU uses the peak of the
dtype in use; threads follow the user's choice; glibc keeps freed memory (MEGADS_MALLOC)."""
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import megads, train_args
from megads.runtime import hardware, precision


@pytest.mark.parametrize("peaks,want", [({"fp32": 100e9, "bf16": 600e9}, "bf16"),  # AMX-like
                                        ({"fp32": 100e9, "bf16": 110e9}, "fp32"),  # a near tie stays fp32
                                        ({"fp32": 100e9, "bf16": 1.4e9}, "fp32")])  # no bf16 units
def test_auto_follows_the_measured_rates(monkeypatch, peaks, want):
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setattr(precision, "matmul_peaks", lambda device="cpu", n_max=None: dict(peaks))
    assert precision.resolve("auto") == (want, peaks)
    assert precision.resolve("fp32")[0] == "fp32" and precision.resolve("bf16")[0] == "bf16"  # explicit wins
    monkeypatch.setenv(precision.ENV, "bf16" if want == "fp32" else "fp32")  # the pin wins over the measurement
    assert precision.resolve("auto")[0] != want


def test_bad_pin_is_one_line(monkeypatch):
    from megads.errors import ConfigError

    monkeypatch.setenv(precision.ENV, "fp16")
    with pytest.raises(ConfigError, match="MEGADS_PRECISION_AUTO: must be fp32 or bf16, got 'fp16'"):
        precision.resolve("auto")


def test_measurement_is_real_and_bounded():
    import time

    t = time.perf_counter()
    peaks = precision.matmul_peaks()
    assert time.perf_counter() - t < 10  # a slow dtype stays at a small n
    # the fp32 figure is a real matmul rate: a product of its size takes about what it says
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t = time.perf_counter()
    torch.mm(a, b)
    rate = 2 * n ** 3 / (time.perf_counter() - t)
    assert 0.1 * rate < peaks["fp32"] < 20 * rate
    assert peaks["bf16"] > 0


def test_train_auto_logs_both_peaks_and_mfu_uses_the_chosen_one(corpus, tmp_path):
    env = {precision.ENV: ""}  # measure, as a user's run does
    r = megads(*train_args(corpus, tmp_path, steps=2, extra=["train.samples_at_end=0"]), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"precision (fp32|bf16) \(measured; matmul peaks fp32 ([\d,]+), bf16 ([\d,]+) GFLOP/s; "
                  r"1 threads\)", r.stdout)
    assert m, r.stdout[-2000:]
    used, p32, p16 = m.group(1), float(m.group(2).replace(",", "")), float(m.group(3).replace(",", ""))
    if abs(p16 / max(p32, 1e-9) - precision.BF16_MARGIN) > 0.05:  # not a rounding-level tie
        assert used == precision.choose({"fp32": p32, "bf16": p16})
    recs = [json.loads(x) for x in Path(tmp_path, "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "mfu" in x]
    assert steps
    peak = steps[0]["peak_flops"] / 1e9
    assert peak == pytest.approx(p32 if used == "fp32" else p16, abs=1.0)
    from megads.config import load_config
    from megads.model.info import flops_per_token, mtp_flops_per_token

    args = train_args(corpus, tmp_path, steps=2)
    cfg = load_config(str(Path(__file__).parents[2] / args[1]), [a for a in args[2:] if a != "--set"])
    fpt = flops_per_token(cfg.model, cfg.train.seq_len) + mtp_flops_per_token(cfg.model, cfg.train.seq_len)
    for x in steps:  # one process: MFU = model FLOPs/token x tokens/s / the chosen dtype's peak
        assert x["mfu"] == pytest.approx(fpt * x["tokens_per_s"] / x["peak_flops"], rel=1e-9)
        assert 0 < x["mfu"] < 1
    assert "CPU memory: glibc keeps freed blocks for reuse" in r.stdout, r.stdout[-2000:]


def test_threads_follow_the_user(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the user's own choice, one process
        assert hardware.place(0)[1] == 1
        assert hardware.place(2)[1] == 2  # train.threads
        torch.set_num_threads(1)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # ranks sharing a node without OMP_NUM_THREADS
        import os

        assert hardware.place(0)[1] == max(1, (os.cpu_count() or 1) // 2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # set: left alone
        torch.set_num_threads(1)
        assert hardware.place(0)[1] == 1
    finally:
        torch.set_num_threads(before)


def test_generation_times_its_own_decode_step(monkeypatch):
    from megads.config import load_config, preset_path
    from megads.model import Transformer

    monkeypatch.delenv(precision.ENV, raising=False)
    # as on a chip where bf16 matmul is within DECODE_FLOOR of fp32 (this one's is not): time both
    monkeypatch.setattr(precision, "matmul_peaks", lambda device="cpu", n_max=None: {"fp32": 1.0, "bf16": 0.5})
    cfg = load_config(preset_path("tiny"), ["model.num_layers=2"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    x = torch.randint(0, cfg.model.vocab_size, (2, 8))
    want = model.generate(x, max_new_tokens=4)
    used, rates, picked = precision.resolve_decode("auto", model, rows=2)
    assert set(rates) == {"fp32", "bf16"} and all(r > 0 for r in rates.values())
    assert used == max(rates, key=rates.get)
    assert next(picked.parameters()).dtype == precision.DTYPES[used]
    if used == "fp32":  # the fp32 model is the original, untouched: the same greedy tokens
        assert picked is model and torch.equal(picked.generate(x, max_new_tokens=4), want)
    assert precision.resolve_decode("fp32", model, 2)[:2] == ("fp32", {})  # explicit: nothing measured


def test_generation_skips_timing_bf16_where_it_is_hopeless(monkeypatch):
    from megads.config import load_config, preset_path
    from megads.model import Transformer

    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setattr(precision, "matmul_peaks", lambda device="cpu", n_max=None: {"fp32": 100.0, "bf16": 1.0})
    monkeypatch.setattr(precision, "decode_rates", lambda *a, **k: pytest.fail("timed bf16 decode"))
    model = Transformer(load_config(preset_path("tiny"), ["model.num_layers=1"]).model)
    used, rates, picked = precision.resolve_decode("auto", model, rows=2)
    assert (used, rates, picked) == ("fp32", {}, model)


_CHURN = """
import random, resource, sys, torch
from megads.runtime import hardware
print(hardware.keep_freed_memory())
rng = random.Random(0)
faults = []
for _ in range(8):  # a step's worth of large temporaries of mixed sizes, allocated, written and freed
    sizes = [rng.choice([1, 2, 3, 5, 8, 13, 21, 30]) for _ in range(12)]  # MiB
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ts = [torch.empty(m << 18).fill_(1.0) for m in sizes]
    del ts
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(" ".join(map(str, faults)))
"""


def _churn(mode):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["MEGADS_MALLOC"] = mode
    r = subprocess.run([sys.executable, "-c", _CHURN], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    state, faults = r.stdout.split("\n")[:2]
    return state, [int(x) for x in faults.split()]


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_freed_memory_is_reused_without_page_faults():
    """Eight rounds of allocating and freeing ~100 MiB in blocks of 1-30 MiB. With
    MEGADS_MALLOC=keep (the default) the second round reuses the first's memory (~0 faults; a
    later round faults only where it needs more than any before) and rounds 4-8 fault nothing.
    With system, glibc unmaps what is freed, so the second round faults its pages in again
    (~27,000). (glibc's own dynamic mmap threshold then makes system reuse memory in some later
    rounds of so simple a pattern; a training step's mix did not: ~60,000 faults per step,
    bench/RESULTS.md. So the comparison is round 2, and keep's steady state is checked alone.)"""
    kept_state, kept = _churn("keep")
    system_state, system = _churn("system")
    assert kept_state == "kept" and system_state.startswith("system")
    assert sum(kept[3:]) < 1000, kept  # steady state: reused
    assert system[1] > 10000 and 10 * kept[1] < system[1], (kept, system)


def test_malloc_setting_is_checked_and_a_users_own_wins(monkeypatch):
    from megads.errors import ConfigError

    for key, value, want in [("MEGADS_MALLOC", "jemalloc", None), ("MEGADS_MALLOC", "system", "system (MEGADS_MALLOC=system)"),
                             ("MALLOC_TRIM_THRESHOLD_", "1000", "system (set by MALLOC_TRIM_THRESHOLD_)")]:
        monkeypatch.setattr(hardware, "_malloc_state", None)
        with monkeypatch.context() as m:
            m.setenv(key, value)
            if want is None:
                with pytest.raises(ConfigError, match="MEGADS_MALLOC: must be keep or system, got 'jemalloc'"):
                    hardware.keep_freed_memory()
            else:
                assert hardware.keep_freed_memory() == want
                assert hardware.describe_malloc() == f"CPU memory: malloc {want}"


def test_bench_malloc_flag_sets_the_process_and_its_children(monkeypatch):
    """The benches' --malloc: keep by default (what megads train sets on CPU); the choice lands in
    MEGADS_MALLOC, so a `megads train` the bench starts (bench/grpo.py) runs with the same one."""
    import argparse
    import os

    p = argparse.ArgumentParser()
    hardware.add_malloc_argument(p)
    assert p.parse_args([]).malloc == "keep"
    with pytest.raises(SystemExit):
        p.parse_args(["--malloc", "jemalloc"])
    monkeypatch.setattr(hardware, "_malloc_state", None)
    monkeypatch.setenv("MEGADS_MALLOC", "keep")
    assert hardware.bench_malloc(p.parse_args(["--malloc", "system"]).malloc) == \
        "CPU memory: malloc system (MEGADS_MALLOC=system)"
    assert os.environ["MEGADS_MALLOC"] == "system"
