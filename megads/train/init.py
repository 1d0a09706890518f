"""`train.init_from` and `distill.teacher`: a model in the training layout, from files.

A megads model directory (config.yaml + model.safetensors: a run's `final/`, or a `megads convert
hf-to-megads` result) is read shard by shard: each rank reads only its TP/EP slices. An HF
DeepSeek-V2/V3 directory (config.json) is converted on the fly, tensor by tensor (megads.hf
fill_sharded): each rank reads one HF tensor at a time, converts it and keeps its slice (its
routed experts only), so no rank holds the full model. A training checkpoint
(`checkpoints/step-N`, verified against its manifest) loads in any layout: each rank reads its own
slices of the sharded (DCP) files.
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
    if is_training_checkpoint(p):
        from megads.checkpoint import store
        from megads.config import model_config_from_dict

        state = store.read_trainer_state(p)  # collective: verified against its manifest first
        return model_config_from_dict(dict(state["config"]["model"]))
    raise CheckpointError(f"{path}: not a megads model dir (config.yaml + model.safetensors) or an HF dir (config.json)")


def is_training_checkpoint(p: Path) -> bool:
    return (p / "trainer_state.pt").is_file() or (p / "COMPLETE").is_file()


def load_training_checkpoint(model, path: Path, ps) -> None:
    """The weights of a training checkpoint (`checkpoints/step-N`, verified against its manifest)
    in this run's layout, whatever layout wrote it: each rank reads its own slices (DCP)."""
    from megads.checkpoint import store

    store.read_trainer_state(path)
    store.load_checkpoint(path, model, None, None, ps, same_layout=False, load_optimizer=False)


def load_into(model, path: str, ps) -> None:
    """Fill `model` (built in this rank's layout) with the weights of `path`."""
    p = Path(path)
    if is_training_checkpoint(p):
        load_training_checkpoint(model, p, ps)
        return
    if (p / "model.safetensors").is_file() and (p / "config.yaml").is_file():
        from megads.parallel.shard import load_shards_from_safetensors

        load_shards_from_safetensors(model, p / "model.safetensors", ps)
        return
    from megads import hf

    hf.fill_sharded(model, p, slicer(model, ps))


def slicer(model, ps):
    """(megads name, full tensor, expert index) -> this rank's slice and local expert index, or
    (None, None) for an expert another EP rank holds (see megads.parallel.shard.shard_specs)."""
    from megads.parallel.shard import shard_specs

    specs = shard_specs(model)
    local = {n: t.shape for n, t in model.state_dict().items()}
    tp, ep = ps.layout.tp, ps.layout.ep

    def cut(name, t, expert):
        kind, dim = specs.get(name, (None, 0))
        if kind == "ep" and ep > 1:
            n_local = local[name][0]
            lo = ps.ep_rank * n_local
            if expert is None:
                return t[lo:lo + n_local], None
            return (t, expert - lo) if lo <= expert < lo + n_local else (None, None)
        if kind == "tp" and tp > 1:
            return t.chunk(tp, dim)[ps.tp_rank], expert
        return t, expert

    return cut


# model.* fields that shape training, not the weights: a stage started with init_from may change them
# (DeepSeek-V3 set the bias update speed to 0 for its last 500B tokens)
TRAINING_ONLY = ("init_std", "bias_update_speed", "seq_aux_alpha", "aux_loss_alpha", "mtp_lambda", "cache_dtype")


def check_same_shapes(cfg_model, loaded, path: str) -> None:
    """init_from: the run's model.* must be the checkpoint's (names of the differing keys)."""
    import dataclasses

    a, b = dataclasses.asdict(cfg_model), dataclasses.asdict(loaded)
    diff = [f"model.{k} {b[k]!r} (checkpoint) vs {a[k]!r}" for k in sorted(a) if k in b and a[k] != b[k]
            and k not in TRAINING_ONLY]
    if diff:
        raise CheckpointError(f"train.init_from {path}: another model: {', '.join(diff[:6])}; set the run's "
                              f"model section to the checkpoint's")


def build_local(cfg, ps, plan=None, device="cpu"):
    """This rank's part of the model of `cfg` in the layout `ps`: the blocks of its pipeline
    stage(s) (`plan`, megads.parallel.pipeline.StagePlan; None = all), its TP slices and its
    routed experts, and nothing more. Built on the meta device, given storage on `device`, then
    filled from `cfg.train.init_from` (read slice by slice) or by the seeded init, which equals
    the same slice of the single-process initialisation of `cfg.train.seed` in every layout."""
    import torch

    from megads.model import Transformer
    from megads.model.init import materialize, seeded_init_
    from megads.parallel import build_model_par
    from megads.parallel.shard import shard_slices

    part = dict(layers=plan.layer_ids, embed=plan.embed, head=plan.last) if plan is not None else {}
    par = build_model_par(cfg, ps) if ps.layout.tp > 1 or ps.layout.ep > 1 else None
    with torch.device("meta"):
        model = Transformer(cfg.model, par=par, **part)
    materialize(model, device)
    src = cfg.train.init_from
    if src:
        check_same_shapes(cfg.model, model_config_of(src), src)
        load_into(model, src, ps)
    else:
        seeded_init_(model, cfg.train.seed, shard_slices(model, ps))
    return model


def build_frozen(path: str, cfg, ps, device, what: str = "model"):
    """A frozen (eval, no gradients) model from `path` (megads dir, HF dir, or a training
    checkpoint of this layout) in the layout `ps`, with the vocabulary of `cfg.model`: a
    distillation teacher, or the policy rejection sampling draws from."""
    from megads.config import Config
    from megads.errors import ConfigError
    from megads.model import Transformer
    from megads.parallel import build_model_par

    mcfg = model_config_of(path)
    if mcfg.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"{what} {path}: vocab_size {mcfg.vocab_size} differs from this run's "
                          f"{cfg.model.vocab_size} (the same tokenizer is needed)")
    if mcfg.num_heads % ps.layout.tp or (mcfg.n_routed_experts and mcfg.n_routed_experts % ps.layout.ep):
        raise ConfigError(f"{what} {path}: its heads ({mcfg.num_heads}) / experts "
                          f"({mcfg.n_routed_experts}) do not divide over tp={ps.layout.tp}, ep={ps.layout.ep}")
    tcfg = Config(model=mcfg, parallel=cfg.parallel)
    par = build_model_par(tcfg, ps) if (ps.layout.tp > 1 or ps.layout.ep > 1) else None
    from megads.model.init import materialize

    import torch

    with torch.device("meta"):  # no random init: the files fill every tensor
        model = Transformer(mcfg, par=par)
    materialize(model, device)
    load_into(model, path, ps)
    model.eval().requires_grad_(False)
    return model
