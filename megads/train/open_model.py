"""A model (and its tokenizer) for inference in one process, from any directory a run leaves:
`megads generate --checkpoint DIR` takes

- a megads model dir (config.yaml + model.safetensors: a run's final/, a converted model),
- an HF DeepSeek-V2/V3 dir (config.json),
- a training checkpoint `checkpoints/step-N` written by any layout (verified against its
  manifest, read through megads.train.init like `train.init_from`),
- a run's output dir: its final/ when the run finished, else its newest complete checkpoint.

The tokenizer is the one beside the weights (final/ holds a copy), else the one the run's config
names (data.tokenizer, or the builtin corpus's), else `--tokenizer`.
"""
from __future__ import annotations

from pathlib import Path

from megads.errors import CheckpointError, MegadsError


def resolve(path: str) -> Path:
    """The directory whose weights `path` means (a run dir -> final/ or its newest checkpoint)."""
    from megads.checkpoint import store
    from megads.train.init import is_training_checkpoint

    p = Path(path)
    if not p.is_dir():
        raise MegadsError(f"--checkpoint {path}: not a directory")
    if (p / "config.yaml").is_file() or (p / "config.json").is_file() or is_training_checkpoint(p):
        return p
    if (p / "final" / "config.yaml").is_file():
        return p / "final"
    latest = store.latest_checkpoint(str(p.parent if p.name == "checkpoints" else p))
    if latest is not None:
        return latest
    raise CheckpointError(f"--checkpoint {path}: no model here (expected a megads model dir, an HF dir, a "
                          f"checkpoints/step-N dir, or a run dir holding final/ or a complete checkpoint)")


def open_model(path: str):
    """(model in eval mode, the directory the weights came from) for `path` (see the module doc)."""
    from megads.train.init import is_training_checkpoint

    d = resolve(path)
    if (d / "config.json").is_file() and not (d / "config.yaml").is_file():
        from megads import hf

        return hf.load(d), d
    if is_training_checkpoint(d):
        return _from_training_checkpoint(d), d
    from megads.model.io import load_model

    return load_model(d), d


def _from_training_checkpoint(d: Path):
    """A training checkpoint's weights in a one-process model, whatever layout wrote them."""
    from megads.config import Config
    from megads.parallel import state as pstate
    from megads.train import init

    import warnings

    mcfg = init.model_config_of(str(d))
    ps = pstate.initialize(1, 1, 1)
    with warnings.catch_warnings():  # one process reading sharded files is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return init.build_frozen(str(d), Config(model=mcfg), ps, "cpu", what="--checkpoint")


def tokenizer_dir(weights_dir: Path, given: str | None) -> str:
    """Where the tokenizer of `weights_dir` is (see the module doc)."""
    if given:
        return given
    if (weights_dir / "tokenizer.json").is_file():
        return str(weights_dir)
    from megads.train.init import is_training_checkpoint

    if is_training_checkpoint(weights_dir):
        import torch

        run = weights_dir.parent.parent
        if (run / "final" / "tokenizer.json").is_file():
            return str(run / "final")
        try:
            state = torch.load(weights_dir / "trainer_state.pt", weights_only=False)
        except Exception:
            state = {}
        data = (state.get("config") or {}).get("data") or {}
        if data.get("tokenizer"):
            return str(data["tokenizer"])
        if data.get("builtin_corpus"):
            from types import SimpleNamespace

            from megads.config import DataConfig
            from megads.data import builtin_paths

            return builtin_paths(SimpleNamespace(**{**DataConfig().__dict__, **data}))[1]
    raise MegadsError(f"--checkpoint {weights_dir}: no tokenizer beside it and none recorded in its run's config; "
                      f"pass --tokenizer DIR")
