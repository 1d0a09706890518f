"""The megads model checkpoint: a directory with `config.yaml` and `model.safetensors`.

`config.yaml` holds every ModelConfig field; `model.safetensors` the model's state_dict under
megads names (experts stacked as [E, out, in], the router bias as a float32 buffer). A tied
output head is stored once, as `embed.weight`.

Loading streams: the model is built on the meta device (no memory, no init), given empty storage
of the target dtype, then filled tensor by tensor from the memory-mapped file, so a load never
holds a second full copy of the weights. `empty_model` is shared with the HF importer.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import yaml

from megads.config import ModelConfig, model_config_from_dict, read_yaml
from megads.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"


def keeps_fp32(name: str) -> bool:
    """State entries stored in float32 whatever the model dtype: the router's balancing bias."""
    return name.endswith("ffn.gate.bias")


def unwrap(model):
    """The Transformer inside a DeepSpeed engine / DDP wrapper (or the model itself)."""
    while not hasattr(model, "cfg") and hasattr(model, "module"):
        model = model.module
    return model


def empty_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu"):
    """A single-device Transformer of `cfg` with uninitialised storage of `dtype` on `device`.

    Built on the meta device, so neither memory nor random init is spent on weights that are
    about to be overwritten; the rope tables (non-persistent buffers) are recomputed for real.
    """
    from megads.model.init import materialize
    from megads.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    if dtype != torch.float32:
        for p in model.parameters():
            p.data = p.data.to(dtype)  # meta tensors: free
    return materialize(model, device).eval()


def state_for_save(model) -> dict[str, torch.Tensor]:
    """The state_dict as written to disk: detached, contiguous, CPU; a tied head stored once."""
    model = unwrap(model)
    tied = model.cfg.tie_embeddings
    out = {}
    for name, t in model.state_dict().items():
        if tied and name == "head.weight":
            continue
        out[name] = t.detach().to("cpu").contiguous()
    return out


def read_config(path: str | os.PathLike) -> ModelConfig:
    """ModelConfig of a megads checkpoint directory."""
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: not found (a megads checkpoint has config.yaml and model.safetensors)")
    try:
        data = read_yaml(cfg_path)  # config.py's reader: YAML errors name file and line
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    data = data.get("model", data) if isinstance(data.get("model"), dict) else data
    try:
        return model_config_from_dict(data)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


def write_config(cfg: ModelConfig, path: str | os.PathLike) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)
    _atomic_write_text(Path(path) / CONFIG_FILE,
                       yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, default_flow_style=False))


def save_model(model, path: str | os.PathLike) -> Path:
    """Write `model` (a Transformer, or an engine wrapping one) as a megads checkpoint directory.

    Each file is written under a temporary name and renamed into place, so an interrupted save
    never leaves a half-written file under the final name. Files get the mode a plain open() would
    give them (0644 under umask 022), not safetensors's private 0600.
    """
    from safetensors.torch import save_file

    model = unwrap(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (WEIGHTS_FILE + ".tmp")
    save_file(state_for_save(model), str(tmp), metadata={"format": "pt", "producer": "megads"})
    set_default_mode(tmp)
    os.replace(tmp, path / WEIGHTS_FILE)
    write_config(model.cfg, path)
    return path


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
    """A Transformer from a megads checkpoint directory, streamed tensor by tensor."""
    cfg = read_config(path)
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: not found")
    model = empty_model(cfg, dtype, device)
    fill_from_safetensors(model, weights)
    return model


def fill_from_safetensors(model, file: str | os.PathLike) -> None:
    """Copy every tensor of `file` into the same-named entry of model.state_dict(); every entry
    must be present (a tied head excepted) with the same shape."""
    from safetensors import safe_open

    targets = model.state_dict(keep_vars=True)
    tied = model.cfg.tie_embeddings
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # corrupt header, not a safetensors file
        raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None
    with handle as f:
        keys = list(f.keys())
        unexpected = [k for k in keys if k not in targets]
        if unexpected:
            raise CheckpointError(f"{file}: unexpected tensor {unexpected[0]!r} (not in the model of config.yaml)")
        present = set(keys)
        for name in targets:
            if name not in present and not (tied and name == "head.weight"):
                raise CheckpointError(f"{file}: missing tensor {name!r}")
        with torch.no_grad():
            for name in keys:
                dst = targets[name]
                src = f.get_tensor(name)
                if tuple(src.shape) != tuple(dst.shape):
                    raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(src.shape)}, "
                                          f"the model expects {tuple(dst.shape)}")
                dst.copy_(src)
                del src


def current_umask() -> int:
    """The process umask, read from /proc where it can be (os.umask can only read it by setting it,
    which would briefly change it for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_mode(path: str | os.PathLike) -> None:
    """Give `path` the mode open() gives a new file (0o666 less the umask: 0644 under umask 022).

    safetensors's save_file creates its file with mode 0600, which would keep a checkpoint from
    other users of a shared machine and from serving containers running as another user.
    """
    os.chmod(path, 0o666 & ~current_umask())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
