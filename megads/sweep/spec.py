"""A sweep file (`megads sweep SWEEP.yaml`): a base run config and the points to train.

    sweep:
      base: configs/tiny.yaml          # any run YAML or preset, as `megads train` takes
      output_dir: runs/sweeps/NAME     # each point trains in OUTPUT_DIR/points/<point name>
      set: {train.max_steps: 200}      # overrides of every point (a mapping or "key=value" items)
      grid:                            # the cartesian product of these values...
        model.hidden_size: [64, 128]
        sweep.tokens: [1.0e6, 2.0e6]
      points:                          # ...times these explicit points (each a mapping; `name` optional)
        - {name: small, model.num_layers: 2}
      seeds: [1, 2, 3]                 # train.seed of every point (the repeats the fits average)
      nproc: 1                         # ranks per point; launcher: python | torchrun | deepspeed | mpiexec
      fit: {params: active}            # what N means in the Chinchilla fit: active | total | non_embedding
      table: {baseline: {model.attention: mla}}  # summary rows also show the paired difference to it

A key is any `section.field` of the run config, or one of the sweep's own:
`sweep.tokens` (training tokens; sets train.max_steps from the batch and sequence length),
`sweep.flops` (training FLOPs from model-info, MTP modules included; sets train.max_steps),
`sweep.nproc` and `sweep.launcher` (the layout a point runs with). Every point's config is built
and validated before anything runs: a bad key or value is one line naming the point and the key.
Relative paths are relative to the current directory, like every other megads path.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any

import yaml

from megads.errors import ConfigError

SWEEP_KEYS = ("name", "base", "output_dir", "set", "grid", "points", "seeds", "nproc", "launcher", "fit", "table")
PSEUDO = ("sweep.tokens", "sweep.flops", "sweep.nproc", "sweep.launcher")
LAUNCHERS = ("python", "torchrun", "deepspeed", "mpiexec")


@dataclasses.dataclass
class Point:
    """One training run of a sweep."""

    index: int
    name: str  # directory name under points/: the varied values, then the seed
    group: str  # the name without the seed: the runs whose seeds are averaged
    seed: int | None
    varied: dict  # key -> value of what this point sets beyond `set` (results.csv columns)
    overrides: list  # `--set` items of `megads train` (train.output_dir excepted)
    nproc: int
    launcher: str
    out: Path  # train.output_dir


@dataclasses.dataclass
class Sweep:
    path: str
    name: str
    base: str
    output_dir: Path
    points: list
    fit: dict
    table: dict
    raw: dict  # the sweep section as loaded (with --set applied), for sweep.json

    def point(self, which: str) -> Point:
        """A point by index or by name (`--point`, a SLURM array task)."""
        for p in self.points:
            if which == str(p.index) or which == p.name:
                return p
        raise ConfigError(f"--point {which}: no such point (0..{len(self.points) - 1} or a name; see --list)")


def format_value(value: Any) -> str:
    """A value as the right-hand side of `--set key=value` that parses back to the same value."""
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same else json.dumps(value)
    return json.dumps(value)


def _items(body, where: str) -> dict:
    """`set` as a mapping or a list of "key=value" strings -> {key: value}."""
    if body is None:
        return {}
    if isinstance(body, dict):
        return dict(body)
    if isinstance(body, list) and all(isinstance(x, str) and "=" in x for x in body):
        out = {}
        for x in body:
            k, v = x.split("=", 1)
            out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
        return out
    raise ConfigError(f"{where}: expected a mapping of section.key: value (or a list of 'section.key=value')")


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def _short(key: str, keys: list[str]) -> str:
    """The field name of `key`, or the whole key where two varied keys share a field name."""
    last = key.split(".")[-1]
    return last if sum(k.split(".")[-1] == last for k in keys) == 1 else key.replace(".", "-")


def read_sweep(path: str, overrides: list[str] = ()) -> dict:
    """The `sweep:` section of a sweep file, with `--set sweep.KEY=VALUE` applied."""
    from megads.config import read_yaml

    data = read_yaml(Path(path))
    if not data:
        raise ConfigError(f"{path}: empty sweep file (expected a `sweep:` section)")
    unknown = [k for k in data if k != "sweep"]
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown section (a sweep file has one section, `sweep`)")
    body = data.get("sweep")
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: sweep: expected a mapping")
    body = dict(body)
    for item in overrides:
        lhs, sep, rhs = item.partition("=")
        if not sep or not lhs.startswith("sweep.") or lhs[6:] not in SWEEP_KEYS:
            raise ConfigError(f"--set {item}: sweep overrides are sweep.KEY=VALUE (keys: {', '.join(SWEEP_KEYS)})")
        body[lhs[6:]] = yaml.safe_load(rhs) if rhs.strip() else ""
    for k in body:
        if k not in SWEEP_KEYS:
            raise ConfigError(f"{path}: sweep.{k}: unknown key (keys: {', '.join(SWEEP_KEYS)})")
    return body


def _combinations(body: dict, path: str) -> list[dict]:
    """Every point's varied values (before seeds): explicit points x the grid's product."""
    grid = body.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: sweep.grid: expected a mapping of key: [values]")
    for k, vals in grid.items():
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"{path}: sweep.grid.{k}: expected a non-empty list of values, got {vals!r}")
    explicit = body.get("points") or [{}]
    if not isinstance(explicit, list) or not all(isinstance(x, dict) for x in explicit):
        raise ConfigError(f"{path}: sweep.points: expected a list of mappings (key: value, optional name)")
    keys = list(grid)
    out = []
    for pt in explicit:
        for combo in itertools.product(*(grid[k] for k in keys)):
            out.append({**pt, **dict(zip(keys, combo))})
    return out


def load_sweep(path: str, overrides: list[str] = ()) -> Sweep:
    """Read and validate a sweep file: every point's run config is built (ConfigError names the
    point and the key)."""
    body = read_sweep(path, overrides)
    if not body.get("base"):
        raise ConfigError(f"{path}: sweep.base: required (the run YAML or preset every point starts from)")
    base = str(body["base"])
    name = str(body.get("name") or Path(path).stem)
    out_dir = Path(str(body.get("output_dir") or f"runs/sweeps/{name}"))
    common = _items(body.get("set"), f"{path}: sweep.set")
    seeds = body.get("seeds") or [None]
    if not isinstance(seeds, list) or not all(s is None or (isinstance(s, int) and not isinstance(s, bool))
                                              for s in seeds):
        raise ConfigError(f"{path}: sweep.seeds: expected a list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: sweep.seeds: repeated seed in {seeds}")
    combos = _combinations(body, path)
    varied_keys = sorted({k for c in combos for k in c if k != "name"})
    points: list[Point] = []
    seen: dict[str, int] = {}
    for combo in combos:
        label = combo.get("name")
        varied = {k: v for k, v in combo.items() if k != "name"}
        group = str(label) if label else "_".join(f"{_short(k, varied_keys)}-{_slug(v)}" for k, v in varied.items())
        group = _slug(group) if group else "base"
        for seed in seeds:
            pname = group if seed is None else f"{group}_seed-{seed}"
            if pname in seen:
                raise ConfigError(f"{path}: two points are both named {pname!r} (points {seen[pname]} and "
                                  f"{len(points)}); give explicit points a `name`")
            seen[pname] = len(points)
            values = {**common, **varied, **({"train.seed": seed} if seed is not None else {})}
            pv = dict(varied, **({"train.seed": seed} if seed is not None else {}))
            points.append(_make_point(len(points), pname, group, seed, pv, values, body, base, out_dir, path))
    return Sweep(path=str(path), name=name, base=base, output_dir=out_dir, points=points,
                 fit=dict(body.get("fit") or {}), table=dict(body.get("table") or {}), raw=body)


def _make_point(index, pname, group, seed, varied, values, body, base, out_dir, path) -> Point:
    """Resolve a point's sweep.* keys and validate its run config."""
    from megads.config import load_config
    from megads.model.info import flops_per_token, mtp_flops_per_token

    where = f"{path}: point {index} ({pname})"
    for k in values:
        if k.startswith("sweep.") and k not in PSEUDO:
            raise ConfigError(f"{where}: {k}: unknown sweep key (per-point keys: {', '.join(PSEUDO)})")
        if k == "train.output_dir":
            raise ConfigError(f"{where}: train.output_dir: set by the sweep (OUTPUT_DIR/points/<name>); "
                              f"choose sweep.output_dir instead")
    nproc = values.get("sweep.nproc", body.get("nproc", 1))
    launcher = str(values.get("sweep.launcher", body.get("launcher", "python" if nproc == 1 else "torchrun")))
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ConfigError(f"{where}: sweep.nproc: must be a positive integer, got {nproc!r}")
    if launcher not in LAUNCHERS:
        raise ConfigError(f"{where}: sweep.launcher: must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if launcher == "python" and nproc > 1:
        raise ConfigError(f"{where}: sweep.launcher: python runs one process; nproc {nproc} needs torchrun, "
                          f"deepspeed or mpiexec")
    sets = [f"{k}={format_value(v)}" for k, v in values.items() if not k.startswith("sweep.")]
    out = out_dir / "points" / pname
    try:
        cfg = load_config(base, sets)
        budget = [k for k in ("sweep.tokens", "sweep.flops") if k in values]
        if len(budget) == 2:
            raise ConfigError("sweep.tokens and sweep.flops: give one budget, not both")
        if budget:
            if "train.max_steps" in values:
                raise ConfigError(f"train.max_steps: set by {budget[0]}; give one or the other")
            amount = values[budget[0]]
            if isinstance(amount, str):  # YAML 1.1 reads 2.2e13 (no dot in the mantissa) as a string
                try:
                    amount = float(amount)
                except ValueError:
                    pass
            if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount <= 0:
                raise ConfigError(f"{budget[0]}: must be a positive number, got {amount!r}")
            per_step = cfg.train.global_batch_size * cfg.train.seq_len  # tokens per optimizer step
            if budget[0] == "sweep.flops":
                per_step *= flops_per_token(cfg.model, cfg.train.seq_len) + mtp_flops_per_token(cfg.model, cfg.train.seq_len)
            sets.append(f"train.max_steps={max(1, round(float(amount) / per_step))}")
        sets.append(f"train.output_dir={out}")
        load_config(base, sets)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return Point(index=index, name=pname, group=group, seed=seed, varied=varied, overrides=sets[:-1],
                 nproc=nproc, launcher=launcher, out=out)
