"""`train.init_from` and `distill.teacher`: a model in the training layout, from files.

A megads model directory (config.yaml + model.safetensors: a run's `final/`, or a `megads convert
hf-to-megads` result) is read shard by shard: each rank reads only its TP/EP slices. An HF
DeepSeek-V2/V3 directory (config.json) is converted on the fly by megads.hf (each rank reads the
full checkpoint, then keeps its shards: convert it once with `megads convert hf-to-megads` to get
the sliced reads). A training checkpoint (`checkpoints/step-N`) is refused with a hint: its
weights are in the layout that wrote it; its run's `final/` is layout-free.
"""
from __future__ import annotations

from pathlib import Path

from megads.errors import CheckpointError


def model_config_of(path: str):
    """The ModelConfig stored with a megads or HF model directory."""
    p = Path(path)
    if (p / "config.yaml").is_file():
        from megads.model.io import read_config

        return read_config(p)
    if (p / "config.json").is_file():
        from megads.hf import config_from_hf, read_hf_config

        return config_from_hf(read_hf_config(p))
    if (p / "trainer_state.pt").is_file() or (p / "COMPLETE").is_file():
        raise CheckpointError(f"{path}: a training checkpoint holds weights in the layout that wrote it; "
                              f"start from its run's final/ directory instead")
    raise CheckpointError(f"{path}: not a megads model dir (config.yaml + model.safetensors) or an HF dir (config.json)")


def load_into(model, path: str, ps) -> None:
    """Fill `model` (built in this rank's layout) with the weights of `path`."""
    p = Path(path)
    if (p / "model.safetensors").is_file() and (p / "config.yaml").is_file():
        from megads.parallel.shard import load_shards_from_safetensors

        load_shards_from_safetensors(model, p / "model.safetensors", ps)
        return
    from megads import hf
    from megads.parallel.shard import load_full_state

    full = hf.load(p)
    load_full_state(model, full.state_dict(), ps)
    del full


def check_same_shapes(cfg_model, loaded, path: str) -> None:
    """init_from: the run's model.* must be the checkpoint's (names of the differing keys)."""
    import dataclasses

    a, b = dataclasses.asdict(cfg_model), dataclasses.asdict(loaded)
    diff = [f"model.{k} {b[k]!r} (checkpoint) vs {a[k]!r}" for k in sorted(a) if k in b and a[k] != b[k]
            and k not in ("init_std",)]
    if diff:
        raise CheckpointError(f"train.init_from {path}: another model: {', '.join(diff[:6])}; set the run's "
                              f"model section to the checkpoint's")
