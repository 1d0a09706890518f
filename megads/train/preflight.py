"""What `megads launch` checks in one process before it starts any rank: a mistake found by N ranks
after DeepSpeed and the process group are up is N tracebacks (or a hang) instead of one line.

- the layout: --nproc ranks split into tp x pp x dp, ep dividing tp x dp (parallel.state.Layout);
- the batch: global_batch_size a multiple of micro_batch_size x dp (the DeepSpeed JSON, as the
  ranks will build it);
- the shapes tensor parallelism cuts: vocabulary and MLP widths divisible by tp, the sequence by tp
  under sequence parallelism, a micro-batch's tokens by tp where TP ranks split them for EP;
- the inputs: data.paths (indexed-dataset prefixes for pre-training, files for the JSONL stages),
  data.tokenizer, train.init_from and distill.teacher exist.
"""
from __future__ import annotations

import copy
from pathlib import Path

from megads.errors import ConfigError, DataError


def check_launch(cfg, nproc: int, launcher: str) -> None:
    """ConfigError / DataError (one line naming the key or file) for a run that cannot start."""
    from megads.parallel.state import Layout
    from megads.train.dsconfig import deepspeed_config

    if nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1, got {nproc}")
    if launcher == "python" and nproc != 1:
        raise ConfigError(f"--launcher python starts one process; --nproc {nproc} needs deepspeed, torchrun or mpiexec")
    p, t, m = cfg.parallel, cfg.train, cfg.model
    try:
        layout = Layout(nproc, p.tp, p.pp, p.ep)
        deepspeed_config(copy.deepcopy(cfg), layout.dp)
    except ConfigError as e:
        raise ConfigError(f"--nproc {nproc}: {e}") from None
    if p.tp > 1:
        for key, size in (("vocab_size", m.vocab_size), ("intermediate_size", m.intermediate_size),
                          ("moe_intermediate_size", m.moe_intermediate_size * max(1, m.n_shared_experts))):
            if size % p.tp:
                raise ConfigError(f"model.{key}: {size} must be divisible by parallel.tp ({p.tp}) "
                                  f"(tensor parallelism splits it)")
        if p.sequence_parallel and t.seq_len % p.tp:
            raise ConfigError(f"train.seq_len: {t.seq_len} must be divisible by parallel.tp ({p.tp}) with "
                              f"parallel.sequence_parallel")
        if p.ep > 1 and not p.sequence_parallel and (t.micro_batch_size * t.seq_len) % p.tp:
            raise ConfigError(f"train.micro_batch_size x seq_len ({t.micro_batch_size} x {t.seq_len}) must be divisible "
                              f"by parallel.tp ({p.tp}): the TP ranks split a micro-batch's tokens for expert parallelism")
    check_inputs(cfg)


def check_inputs(cfg) -> None:
    """The files a run reads exist (DataError / ConfigError naming the key and the path)."""
    from megads.data import parse_paths

    t, d = cfg.train, cfg.data
    for key, path in (("train.init_from", t.init_from),
                      ("distill.teacher", cfg.distill.teacher if t.stage == "distill" else "")):
        if path and not Path(path).is_dir():
            raise ConfigError(f"{key}: {path}: not a directory (a run's final/, an HF dir or checkpoints/step-N)")
    if d.tokenizer and not (Path(d.tokenizer).is_file() or (Path(d.tokenizer) / "tokenizer.json").is_file()):
        raise DataError(f"data.tokenizer: {d.tokenizer}: no tokenizer.json there (train one with `megads tokenizer train`)")
    for _, prefix in parse_paths(d.paths):
        if t.stage == "pretrain":
            for suffix in (".idx", ".bin"):
                if not Path(prefix + suffix).is_file():
                    raise DataError(f"data.paths: {prefix}{suffix} not found (an indexed dataset made with "
                                    f"`megads preprocess --output-prefix {prefix}`)")
        elif t.stage != "grpo" or not cfg.grpo.tasks:
            if not Path(prefix).exists():
                raise DataError(f"data.paths: {prefix}: file not found")
