"""The training state as a layout-independent sharded state dict, for torch.distributed.checkpoint.

Every tensor is named as in the single-process model and described by its full shape: a rank's
TP shard or its routed experts go in as a DTensor over its TP / EP group (`Shard(dim)`), so DCP
records which slice of the full tensor each file holds; a replicated tensor goes in as it is (DCP
writes one copy of what several ranks hold alike: DP replicas, the last stage's embedding copy).
A run in any other layout asks for its own slices of the same full tensors and DCP reads the
overlapping pieces: that is the reshard (TP2 x EP2 -> PP2 -> one process ...).

Keys:
- `model.<name>`: parameters (the fp32 master where DeepSpeed keeps one: bf16 or ZeRO) and
  persistent buffers (router biases).
- `optim.exp_avg.<name>`, `optim.exp_avg_sq.<name>`: AdamW moments, per parameter, full-size
  (gathered over DP from DeepSpeed's ZeRO-1/2 or bf16 partitions); `optim.step.<name>`: AdamW's
  step count (0: the parameter has no state yet).
- `rank.<R>`: what belongs to one process: its RNG streams and its objective's extra state.

The step, data position, run id, config and layout are in `trainer_state.pt` (megads.checkpoint.store).
"""
from __future__ import annotations

import pickle

import torch
import torch.distributed as dist

MODEL, EXP_AVG, EXP_AVG_SQ, STEP = "model.", "optim.exp_avg.", "optim.exp_avg_sq.", "optim.step."
MOMENTS = ((EXP_AVG, "exp_avg"), (EXP_AVG_SQ, "exp_avg_sq"))


class Sharding:
    """Which tensors of this rank are slices of a full tensor, and the DTensor wrapping them."""

    def __init__(self, model, ps):
        from megads.parallel.shard import shard_specs

        self.specs = shard_specs(model)
        self.ps = ps
        self.n = {"tp": ps.layout.tp, "ep": ps.layout.ep}
        self._meshes: dict = {}

    def _mesh(self, kind: str, device):
        if kind not in self._meshes:
            from torch.distributed.device_mesh import DeviceMesh

            self._meshes[kind] = DeviceMesh.from_group(self.ps.group(kind), torch.device(device).type)
        return self._meshes[kind]

    def wrap(self, name: str, t: torch.Tensor):
        """t (this rank's local tensor of parameter/buffer `name`) as DCP should see it."""
        spec = self.specs.get(name)
        if spec is None or self.n[spec[0]] == 1:
            return t
        from torch.distributed.tensor import DTensor, Shard

        kind, dim = spec
        return DTensor.from_local(t, self._mesh(kind, t.device), [Shard(dim)], run_check=False)


def _named(model) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter and persistent buffer, a tied head once."""
    tied = getattr(model.cfg, "tie_embeddings", False)
    return [(n, t) for n, t in model.state_dict(keep_vars=True).items()
            if not n.startswith("_deepspeed") and not (tied and n == "head.weight")]


def _ds_managed(p) -> bool:
    """DeepSpeed keeps this parameter's fp32 master and moments in flat partitions (ZeRO, bf16)."""
    return hasattr(p, "_hp_mapping")


def _inner(optimizer):
    """The torch optimizer holding the state (DeepSpeed's wrappers keep it in `.optimizer`)."""
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _flat_partitions(ds_opt) -> list[torch.Tensor]:
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(ds_opt, attr):
            return list(getattr(ds_opt, attr))
    raise TypeError(f"unknown DeepSpeed optimizer {type(ds_opt).__name__}: cannot read its partitions")


def _ds_step(ds_opt) -> float:
    inner = _inner(ds_opt)
    for flat in _flat_partitions(ds_opt):
        st = inner.state.get(flat)
        if st and "step" in st:
            return float(st["step"])
    return 0.0


def _ds_has_state(ds_opt) -> bool:
    inner = _inner(ds_opt)
    return all(inner.state.get(f) for f in _flat_partitions(ds_opt))


def state_for_save(model, optimizer, ds_optimizer, ps, rank_blob) -> dict:
    """Collective where DeepSpeed partitions the state (each DeepSpeed-managed tensor is gathered
    over its data-parallel group): this rank's part of the training state, keyed as above."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    sh = Sharding(model, ps)
    out: dict = {}
    params = dict(model.named_parameters())
    ds_state = ds_optimizer is not None and _ds_has_state(ds_optimizer)
    ds_step = _ds_step(ds_optimizer) if ds_state else 0.0
    if ds_state:  # DeepSpeed links each parameter's fragment to the flat moments lazily, after the
        # first group's first step (so a later group's fragments can be empty): link them again
        ds_optimizer._hp_optimizer_states_linked = False
        ds_optimizer._lazy_init_hp_params_optimizer_state()
    for name, t in _named(model):
        p = params.get(name)
        if p is not None and _ds_managed(p):
            master = safe_get_full_fp32_param(p)
            out[MODEL + name] = sh.wrap(name, master)
            for prefix, key in MOMENTS:
                m = safe_get_full_optimizer_state(p, key) if ds_state else torch.zeros_like(master)
                out[prefix + name] = sh.wrap(name, m)
            out[STEP + name] = torch.tensor(ds_step)
            continue
        out[MODEL + name] = sh.wrap(name, t.detach())
        if p is None or not p.requires_grad:
            continue
        st = optimizer.state.get(p, {})
        for prefix, key in MOMENTS:
            m = st.get(key)
            out[prefix + name] = sh.wrap(name, m if m is not None else torch.zeros_like(p, dtype=torch.float32))
        out[STEP + name] = torch.tensor(float(st["step"]) if "step" in st else 0.0)
    rank = dist.get_rank() if dist.is_initialized() else 0
    out[f"rank.{rank}"] = pickle.dumps(rank_blob)  # one opaque entry (DCP would flatten a dict)
    return out


def load_into(path, model, optimizer, ds_optimizer, ps, own_rank_blob: bool, load_optimizer: bool = True):
    """Collective: fill this rank's model (and optimizer state) from the DCP checkpoint at `path`,
    whatever layout wrote it. Returns this rank's `rank.<R>` entry when `own_rank_blob` (the same
    layout wrote it), else None."""
    import torch.distributed.checkpoint as dcp
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    sh = Sharding(model, ps)
    params = dict(model.named_parameters())
    named = dict(_named(model))
    load_optimizer = load_optimizer and optimizer is not None
    want: dict = {}
    staged: dict = {}  # name -> {key: local fp32 tensor} copied in after the read
    for name, t in named.items():
        p = params.get(name)
        managed = p is not None and _ds_managed(p)
        train = p is not None and p.requires_grad and load_optimizer
        if managed or t.dtype != torch.float32 and t.is_floating_point():
            local = {"model": torch.empty(t.shape, dtype=torch.float32, device=t.device)}
        else:
            local = {"model": t.data}  # read straight into the parameter / buffer
        if train:
            if managed:
                for _, key in MOMENTS:
                    local[key] = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
            else:
                st = optimizer.state.setdefault(p, {})
                for _, key in MOMENTS:
                    st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    local[key] = st[key]
            local["step"] = torch.zeros(())
        staged[name] = local
        want[MODEL + name] = sh.wrap(name, local["model"])
        if train:
            for prefix, key in MOMENTS:
                want[prefix + name] = sh.wrap(name, local[key])
            want[STEP + name] = local["step"]
    rank = dist.get_rank() if dist.is_initialized() else 0
    if own_rank_blob:
        want[f"rank.{rank}"] = b""
    dcp.load(want, checkpoint_id=str(path))
    ds_ready = False
    with torch.no_grad():
        for name, local in staged.items():
            p = params.get(name)
            target = p if p is not None else named[name]
            if local["model"].data_ptr() != target.data.data_ptr():
                target.data.copy_(local["model"])
            if p is not None and _ds_managed(p):
                safe_set_full_fp32_param(p, local["model"])
                if "step" in local and local["step"] > 0:
                    if not ds_ready:
                        _ds_make_state(ds_optimizer, float(local["step"]))
                        ds_ready = True
                    for _, key in MOMENTS:
                        safe_set_full_optimizer_state(p, local[key], key)
            elif "step" in local:
                if local["step"] > 0:
                    optimizer.state[p]["step"] = local["step"].clone().float()
                else:  # no state in the checkpoint: as fresh as the single process's
                    optimizer.state.pop(p, None)
    return pickle.loads(want[f"rank.{rank}"]) if own_rank_blob else None


def _ds_make_state(ds_opt, step: float) -> None:
    """Create DeepSpeed's (lazily made) flat optimizer state and link each parameter's fragment
    to it, so the moments can be written before the first step."""
    inner = _inner(ds_opt)
    for flat in _flat_partitions(ds_opt):
        st = inner.state.setdefault(flat, {})
        st.setdefault("exp_avg", torch.zeros_like(flat))
        st.setdefault("exp_avg_sq", torch.zeros_like(flat))
        st["step"] = torch.tensor(step)
    ds_opt._hp_optimizer_states_linked = False
    ds_opt._lazy_init_hp_params_optimizer_state()


def describe(path) -> list[tuple[str, str, tuple, int]]:
    """(key, kind, full shape, number of stored pieces) of every entry of a DCP checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(path)).read_metadata()
    out = []
    for key, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            out.append((key, str(m.properties.dtype).replace("torch.", ""), tuple(m.size), len(m.chunks)))
        else:
            out.append((key, "object", (), 1))
    return sorted(out)
