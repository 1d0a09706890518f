"""First-hour frictions of the command line, each as a new user meets it: help text on every flag,
`--version`, `launch --help` naming its launchers, model-info's sequence length and JSON name,
empty or misspelled YAML, `--set` errors naming the override, `launch` checking before any rank
starts, and a quiet start-up with a progress bar that is not redrawn between log lines."""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megads import __version__
from megads.cli import build_parser, main
from megads.config import load_config
from megads.model.info import flops_per_token

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(capsys, *needles) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- help and version

def _walk(parser: argparse.ArgumentParser, name: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, sp in action.choices.items():
                yield from _walk(sp, f"{name} {sub}")
        else:
            yield name, action


def test_every_flag_and_argument_has_help():
    missing = [f"{name} {a.option_strings or a.dest}" for name, a in _walk(build_parser(), "megads")
               if a.help != argparse.SUPPRESS and not (a.help or "").strip()]
    assert not missing, missing


def test_version_in_a_real_process():
    r = subprocess.run([sys.executable, "-m", "megads", "--version"], capture_output=True, text=True, cwd=str(ROOT),
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert r.returncode == 0 and r.stdout.startswith(f"megads {__version__} (torch ")


def test_launch_help_names_all_its_launchers(capsys):
    with pytest.raises(SystemExit) as e:
        main(["launch", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for launcher in ("deepspeed", "torchrun", "mpiexec", "python"):
        assert text.count(launcher) >= 2, launcher  # in the choices and described
    assert "launch/" in text and "SLURM" in text


# ----------------------------------------------------------------------------- model-info

def test_model_info_counts_flops_at_the_runs_seq_len(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("model: tiny\ntrain:\n  seq_len: 256\n")
    assert main(["model-info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = load_config(run).model
    assert info["config"] == str(run) and info["flops_seq_len"] == 256
    assert info["flops_per_token"] == flops_per_token(cfg, 256)
    # a bare preset has no run: 4096; --set train.seq_len and --seq-len win
    for args, seq in ((["tiny"], 4096), (["tiny", "--set", "train.seq_len=64"], 64), ([str(run), "--seq-len", "100"], 100)):
        assert main(["model-info", *args, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["flops_seq_len"] == seq and out["config"] == args[0]
    assert main(["model-info", str(run)]) == 0
    assert "training FLOPs/token (seq 256)" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "-5"])
def test_model_info_refuses_a_non_positive_seq_len(value, capsys):
    assert main(["model-info", "tiny", "--seq-len", value]) == 2
    one_error_line(capsys, "--seq-len", "must be > 0")


# ----------------------------------------------------------------------------- bad YAML

@pytest.mark.parametrize("text, needles", [
    ("", ["empty config"]),
    ("# nothing but a comment\n", ["empty config"]),
    ("trian:\n  lr: 0.1\n", ["trian: unknown section", "did you mean train?"]),
    ("modle:\n  hidden_size: 64\n", ["modle: unknown section", "did you mean model?"]),
])
def test_empty_or_misspelled_yaml_is_refused(tmp_path, capsys, text, needles):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    assert main(["model-info", str(p)]) == 2
    line = one_error_line(capsys, str(p), *needles)
    assert "model.trian" not in line and "model.modle" not in line


def test_a_bare_preset_file_still_loads(tmp_path):
    p = tmp_path / "preset.yaml"
    p.write_text("hidden_size: 64\nnum_layers: 2\n")
    cfg = load_config(p)
    assert cfg.model.hidden_size == 64 and cfg.model.num_layers == 2


@pytest.mark.parametrize("args, blamed", [
    (["tiny", "--set", "model.topk_group=4"], "--set model.topk_group=4: model.topk_group"),
    (["tiny", "--set", "model.n_group=3"], "--set model.n_group=3: model.n_routed_experts"),  # the rule names n_group
    (["configs/tiny.yaml", "--set", "parallel.tp=3"], "--set parallel.tp=3: parallel.tp"),
])
def test_set_errors_name_the_override_not_the_preset(args, blamed, capsys):
    assert main(["model-info", *args]) == 2
    line = one_error_line(capsys, blamed)
    assert "configs/model/tiny.yaml" not in line


def test_a_files_own_error_still_names_the_file(tmp_path, capsys):
    p = tmp_path / "run.yaml"
    p.write_text("model:\n  preset: tiny\n  topk_group: 5\n")
    assert main(["model-info", str(p), "--set", "train.lr=0.01"]) == 2
    one_error_line(capsys, f"{p}: model.topk_group", "(with --set train.lr=0.01)")


# ----------------------------------------------------------------------------- launch checks first

@pytest.mark.parametrize("args, needles", [
    (["--nproc", "3"], ["--nproc 3", "train.global_batch_size", "8 x 3"]),
    (["--nproc", "2", "--set", "parallel.tp=4"], ["--nproc 2", "not divisible by tp*pp"]),
    (["--nproc", "2", "--set", "parallel.tp=2", "--set", "model.vocab_size=4097"], ["model.vocab_size", "parallel.tp"]),
    (["--nproc", "2", "--set", "data.builtin_corpus=false", "--set", "data.paths=[no/such/prefix]"],
     ["data.paths", "no/such/prefix.idx not found"]),
    (["--nproc", "2", "--set", "train.init_from=no/such/dir"], ["train.init_from", "no/such/dir"]),
    (["--nproc", "2", "--launcher", "python"], ["--launcher python", "--nproc 2"]),
])
def test_launch_checks_before_starting_any_rank(args, needles, capsys, monkeypatch, tmp_path):
    import megads.train.launch as launch

    def no_ranks(*a, **k):
        raise AssertionError("a launcher was started")

    monkeypatch.setattr(launch, "run_forwarding_signals", no_ranks)
    monkeypatch.setattr("megads.data.prepare_builtin", no_ranks)
    assert main(["launch", "configs/tiny.yaml", *args, "--set", f"train.output_dir={tmp_path / 'run'}"]) == 2
    one_error_line(capsys, *needles)
    assert not (tmp_path / "run").exists()


def test_launch_passes_resume_force_and_verbose(monkeypatch, tmp_path):
    import megads.train.launch as launch

    seen = {}
    monkeypatch.setattr(launch, "run_forwarding_signals", lambda cmd, env=None: seen.update(cmd=cmd, env=env) or 0)
    monkeypatch.setattr("megads.data.prepare_builtin", lambda cfg: ("p", "t"))
    assert main(["launch", "configs/tiny.yaml", "--nproc", "2", "--resume", "none", "--force", "--verbose"]) == 0
    cmd = seen["cmd"]
    assert cmd[cmd.index("train"):][-4:] == ["--resume", "none", "--force", "--verbose"]
    assert "--log_level" not in cmd and seen["env"]["MEGADS_VERBOSE"] == "1"
    assert main(["launch", "configs/tiny.yaml", "--nproc", "2"]) == 0
    if not __import__("torch").cuda.is_available():  # quiet by default on a CPU machine
        assert seen["cmd"][1:3] == ["--log_level", "error"] and seen["env"]["DS_ACCELERATOR"] == "cpu"


# ----------------------------------------------------------------------------- start-up noise, progress bar

def test_deepspeed_noise_filter_keeps_real_warnings():
    from megads.runtime.quiet import _DeepSpeedFilter, _LineFilter

    f = _DeepSpeedFilter()

    def rec(level, msg):
        return logging.LogRecord("DeepSpeed", level, __file__, 1, msg, None, None)

    assert not f.filter(rec(logging.INFO, "Setting CUDA_VISIBLE_DEVICES=0,1"))
    assert not f.filter(rec(logging.WARNING, "Setting accelerator to CPU. If you have GPU ..."))
    assert not f.filter(rec(logging.WARNING, "**** You are using ZeRO with an untested optimizer, proceed with caution *****"))
    assert f.filter(rec(logging.WARNING, "gradient overflow, reducing loss scale"))
    assert f.filter(rec(logging.ERROR, "something failed"))
    import io

    buf = io.StringIO()
    out = _LineFilter(buf)
    print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", file=out)
    print("step 1: valid loss 3.2", file=out)
    out.write("train:  50%|#####     |\r")
    assert buf.getvalue() == "step 1: valid loss 3.2\ntrain:  50%|#####     |\r"


def test_progress_bar_appears_with_the_first_step_and_closes_with_the_last(tmp_path, capsys):
    from megads.train.metrics import Metrics

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)  # what `megads` sets up (logging.basicConfig)
    root.addHandler(console)
    try:
        _bar_run(tmp_path, capsys, Metrics)
    finally:
        root.removeHandler(console)
    assert all(type(h).__name__ != "_BarLogHandler" for h in root.handlers)  # restored when the bar closed


def _bar_run(tmp_path, capsys, Metrics):
    m = Metrics(str(tmp_path), True, False, True, total_steps=3, start_step=0)
    m.write("run x: fresh start")
    assert m.bar is None  # start-up lines print before any bar
    for step in (1, 2):
        m.log_step({"step": step, "loss": 1.0, "tokens_per_s": 10.0, "lr": 0.1})
        assert m.bar is not None
    logging.getLogger("megads.test").warning("a log line while the bar is shown")
    m.log_step({"step": 3, "loss": 1.0, "tokens_per_s": 10.0, "lr": 0.1})
    assert m.bar is None  # closed at the last step
    m.write("final model: x")
    m.close()
    cap = capsys.readouterr()
    assert cap.out.splitlines()[0] == "run x: fresh start" and cap.out.splitlines()[-1] == "final model: x"
    err = cap.err
    msg = "a log line while the bar is shown"
    at = err.index(msg)  # printed above the bar (tqdm.write: the bar is cleared, the line printed, the bar redrawn)
    assert err[at + len(msg)] == "\n" and "train:" in err[:at] and "3/3" in err[at:]
    assert "3/3" in err.rstrip("\n").split("\n")[-1]  # the bar's final draw is the last thing on stderr
    assert "final model" not in err  # written plainly to stdout after the bar closed, not redrawn under it
