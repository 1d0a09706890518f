"""`megads <command>` (and `python -m megads <command>`).

User errors (MegadsError: config, data, checkpoint, sizes) print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from megads.errors import ConfigError, MegadsError

log = logging.getLogger("megads")


def _report(e: MegadsError) -> int:
    """One line on stderr; an error every rank raised alike (a config error, a refused output dir,
    a damaged checkpoint) is said by rank 0 alone. Returns the exit code."""
    rank = os.environ.get("RANK", "0")
    if rank == "0" or not getattr(e, "every_rank", isinstance(e, ConfigError)):
        prefix = "" if rank == "0" else f"[rank {rank}] "
        print(f"{prefix}megads: error: {e}", file=sys.stderr, flush=True)
    return e.exit_code


def _cmd_model_info(args) -> int:
    from megads.config import load_config
    from megads.model.info import format_info, model_info

    if args.seq_len is not None and args.seq_len <= 0:
        raise ConfigError(f"--seq-len: must be > 0, got {args.seq_len}")
    cfg = load_config(args.config, args.set)
    info = model_info(cfg.model, seq_len=args.seq_len or _flops_seq_len(args.config, args.set, cfg))
    if args.json:
        print(json.dumps({"config": str(args.config), **info}, indent=2))
    else:
        print(format_info(str(args.config), info))
    return 0


def _flops_seq_len(config: str, overrides: list[str], cfg) -> int:
    """The sequence length model-info counts attention FLOPs at: a run's train.seq_len (a run YAML,
    or --set train.seq_len); 4096 for a bare model preset, which has no run."""
    from pathlib import Path

    from megads.config import PRESET_DIR, SECTIONS, read_yaml

    if any(o.split("=", 1)[0].strip() == "train.seq_len" for o in overrides):
        return cfg.train.seq_len
    p = Path(config)
    if not p.is_file() or p.parent.resolve() == PRESET_DIR.resolve():
        return 4096
    return cfg.train.seq_len if set(read_yaml(p)) & set(SECTIONS) else 4096


def _cmd_generate(args) -> int:
    import torch

    from megads.runtime.quiet import quiet_startup
    from megads.train.open_model import open_model, tokenizer_dir

    _check_sampling_args(args)
    quiet_startup()  # a training checkpoint's reader imports DeepSpeed
    model, weights = open_model(args.checkpoint)  # final/, HF, checkpoints/step-N (any layout) or a run dir
    from megads.runtime.precision import resolve_decode

    # auto: the dtype whose decode step, timed here at this many rows, is faster
    used, rates, model = resolve_decode(args.precision, model, len(args.prompt or [""]))
    if rates:
        print(f"precision {used} (measured decode: fp32 {rates['fp32']:,.0f}, bf16 {rates['bf16']:,.0f} tokens/s)",
              file=sys.stderr)
    if args.weights == "int8":
        from megads.model.quant import quantize_int8

        saved = quantize_int8(model)
        print(f"weights int8 (weight-only; {saved / 2**20:,.1f} MiB saved)", file=sys.stderr)
    if args.decode not in ("auto", "eager"):
        from megads.model.static import graph_support

        why = graph_support(model)
        if why:
            raise MegadsError(f"--decode {args.decode}: no fixed-shape decode step for this model: {why}")
    from megads.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir(weights, args.tokenizer))
    prompts = args.prompt or [""]
    if args.chat:  # each prompt is one user turn under the megads-chat-v1 template
        from megads.data.sft import render_chat

        ids = [render_chat(tok, [{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in prompts]
    else:
        ids = [([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(p) for p in prompts]
    _check_positions(ids, args.max_new_tokens, model.cfg.max_seq_len)
    S = max(len(x) for x in ids)
    pad = tok.pad_id if tok.pad_id is not None else 0
    batch = torch.full((len(ids), S), pad, dtype=torch.long)
    mask = torch.zeros(len(ids), S, dtype=torch.bool)
    for i, x in enumerate(ids):
        batch[i, S - len(x):] = torch.tensor(x)
        mask[i, S - len(x):] = True
    gen = torch.Generator().manual_seed(args.seed)
    out = model.generate(batch, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, stop_tokens=[tok.eos_id] if tok.eos_id is not None else [],
                         attention_mask=mask, pad_token_id=pad, generator=gen, decode=args.decode)
    for i, p in enumerate(prompts):
        new = [t for t in out[i, S:].tolist() if t != pad]
        print(f"--- prompt {i}: {p!r}\n{p}{tok.decode(new)}")
    return 0


def _check_sampling_args(args) -> None:
    """`megads generate` flags that cannot sample: one line naming the flag (exit 2)."""
    if args.temperature < 0:
        raise MegadsError(f"--temperature: must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise MegadsError(f"--top-p: must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        raise MegadsError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")


def _check_positions(ids: list[list[int]], max_new_tokens: int, max_seq_len: int) -> None:
    """Each prompt (its own positions start at 0) plus the new tokens must fit the model's
    positions (model.max_seq_len)."""
    for i, x in enumerate(ids):
        if len(x) > max_seq_len:
            raise MegadsError(f"--prompt {i}: {len(x)} tokens, longer than the model's {max_seq_len} positions "
                              f"(model.max_seq_len); shorten it")
        if len(x) + max_new_tokens > max_seq_len:
            raise MegadsError(f"--prompt {i}: {len(x)} tokens + --max-new-tokens {max_new_tokens} exceed the model's "
                              f"{max_seq_len} positions (model.max_seq_len); use --max-new-tokens "
                              f"{max_seq_len - len(x)} or less")


def _cmd_train(args) -> int:
    from megads.runtime.quiet import quiet_startup

    quiet_startup(args.verbose)  # DeepSpeed's start-up chatter, unless --verbose
    from megads.train.run import run_training

    try:
        code = run_training(args.config, args.set, resume=args.resume, force=args.force)
    except MegadsError as e:
        code = _report(e)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "PMI_SIZE" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ:
        # the process group is torn down; leave without C++ static destructors, where a helper
        # thread of gloo/DeepSpeed still joinable at exit can abort() a finished run
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _cmd_prepare(args) -> int:
    from megads.config import load_config
    from megads.data import prepare_builtin

    cfg = load_config(args.config, args.set)
    prefix, tok = prepare_builtin(cfg.data)
    print(f"dataset {prefix}\ntokenizer {tok}")
    return 0


def _cmd_checkpoint_verify(args) -> int:
    """Check checkpoints against their manifests: a step-N dir, a checkpoints/ dir or a run dir."""
    from pathlib import Path

    from megads.checkpoint import manifest, store

    d = Path(args.dir)
    if (d / manifest.COMPLETE).is_file() or (d / manifest.MANIFEST).is_file() or d.name.startswith(("step-", ".tmp-step-")):
        targets = [d]
    else:
        out = d.parent if d.name == "checkpoints" else d
        targets = [p for _, p, _ in store.step_dirs(str(out))]
        if not targets:
            raise MegadsError(f"{d}: no checkpoint here (expected a step-N dir, a checkpoints/ dir or a run dir)")
    bad = 0
    for t in targets:
        try:
            body = manifest.verify(t, checksums=not args.sizes_only)
        except MegadsError as e:
            print(f"BAD  {e}")
            bad += 1
            continue
        files = body["files"]
        size = sum(f["size"] for f in files.values())
        what = "sizes" if args.sizes_only else "sizes and SHA-256"
        print(f"OK   {t}: step {body.get('step')}, run {body.get('run_id')}, {len(files)} files, "
              f"{size / 1e6:.1f} MB ({what} match the manifest)")
    return 2 if bad else 0


def _cmd_checkpoint_inspect(args) -> int:
    """Print a training checkpoint's step, layout, tensors and sizes (megads.checkpoint.inspect)."""
    import json

    from megads.checkpoint import inspect

    s = inspect.summary(args.dir)
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        print("\n".join(inspect.render(s, args.prefix)))
    return 0


def _cmd_rejection(args) -> int:
    from megads.rl.rejection import run_rejection

    code = run_rejection(args.config, args.set, force=args.force)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    return code


def _cmd_recipe(args) -> int:
    from megads.rl.recipe import run_recipe

    return run_recipe(args.recipe, args.set, force=args.force)


def _cmd_launch(args) -> int:
    from megads.train.launch import launch_local

    return launch_local(args.config, args.set, nproc=args.nproc, launcher=args.launcher, resume=args.resume,
                        force=args.force, verbose=args.verbose)


LAUNCH_DESCRIPTION = """Start N local ranks of `megads train CONFIG` through a launcher:
  deepspeed  DeepSpeed's launcher (default): deepspeed --num_gpus N --no_local_rank --module megads train ...
  torchrun   torchrun --nproc_per_node N -m megads train ...
  mpiexec    mpiexec -n N python -m megads train ... (ranks from mpi4py)
  python     one plain process (--nproc 1)
The config, the layout (world = --nproc) and the batch sizes are checked before any rank starts;
the builtin corpus is prepared once. Several nodes, hostfiles and SLURM: the scripts in launch/."""


def _version() -> str:
    """megads's version, with the torch and DeepSpeed it runs on (read from their metadata: fast)."""
    from importlib import metadata

    from megads import __version__

    def ver(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"megads {__version__} (torch {ver('torch')}, deepspeed {ver('deepspeed')}, python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megads", description="DeepSeek-style LLM training")
    p.add_argument("--version", action="version", version=_version(), help="print megads's version (and torch's, "
                   "DeepSpeed's) and exit")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp, required=True):
        sp.add_argument("config", help="run YAML, model preset name (tiny, small, deepseek-v3, …) or preset YAML")
        sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config field (repeatable)")

    sp = sub.add_parser("model-info", help="parameters, FLOPs per token and KV-cache bytes of a config")
    with_config(sp)
    sp.add_argument("--json", action="store_true", help="print the figures as JSON (with the config's name)")
    sp.add_argument("--seq-len", type=int, default=None,
                    help="sequence length of the attention FLOPs (default: a run config's train.seq_len; 4096 for a "
                         "bare model preset)")
    sp.set_defaults(func=_cmd_model_info)

    sp = sub.add_parser("train", help="pre-train (single process, deepspeed, torchrun or mpiexec)")
    with_config(sp)
    sp.add_argument("--resume", default="auto",
                    help="checkpoint dir to resume from; 'auto' = latest in train.output_dir; 'none' = fresh")
    sp.add_argument("--force", action="store_true",
                    help="start fresh over a previous run in train.output_dir (removing its checkpoints, final/ "
                         "and metrics), or resume with changed training settings")
    sp.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    sp.add_argument("--verbose", action="store_true",
                    help="keep DeepSpeed's start-up chatter and warnings (hidden by default) and log megads at INFO")
    sp.set_defaults(func=_cmd_train)

    sp = sub.add_parser("launch", help="start N local ranks of `megads train` (launchers: deepspeed, torchrun, "
                        "mpiexec, python)", description=LAUNCH_DESCRIPTION,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    with_config(sp)
    sp.add_argument("--nproc", type=int, default=None, help="local ranks to start (default 2; 1 with --launcher python)")
    sp.add_argument("--launcher", default="deepspeed", choices=["deepspeed", "torchrun", "mpiexec", "python"],
                    help="deepspeed (default), torchrun, mpiexec or python (one plain process, --nproc 1)")
    sp.add_argument("--resume", default=None, help="passed to `megads train` (auto | none | DIR)")
    sp.add_argument("--force", action="store_true", help="passed to `megads train`")
    sp.add_argument("--verbose", action="store_true",
                    help="keep the launcher's and DeepSpeed's start-up chatter (hidden by default on CPU)")
    sp.set_defaults(func=_cmd_launch)

    sp = sub.add_parser("rejection-sample", help="sample N completions per prompt from a checkpoint, keep the "
                        "verified ones (rules), write chat JSONL for SFT + a stats file")
    with_config(sp)
    sp.add_argument("--force", action="store_true", help="replace an existing rejection.output")
    sp.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sp.set_defaults(func=_cmd_rejection)

    sp = sub.add_parser("recipe", help="the DeepSeek-R1 pipeline in miniature, stage by stage (resumable)")
    sp.add_argument("recipe", help="recipe YAML (configs/recipes/r1-tiny.yaml)")
    sp.add_argument("--set", action="append", default=[], metavar="recipe.KEY=VALUE", help="override a recipe key")
    sp.add_argument("--force", action="store_true", help="forget finished stages (rerun every stage)")
    sp.set_defaults(func=_cmd_recipe)

    sp = sub.add_parser("prepare-data", help="build the builtin corpus, tokenizer and dataset of a config")
    with_config(sp)
    sp.set_defaults(func=_cmd_prepare)

    sp = sub.add_parser("checkpoint", help="training checkpoint tools")
    csub = sp.add_subparsers(dest="checkpoint_command", required=True)
    v = csub.add_parser("verify", help="check every file of a checkpoint against its manifest (exit 2 if any is bad)")
    v.add_argument("dir", help="a checkpoints/step-N dir, or a run's output dir / checkpoints dir (all of them)")
    v.add_argument("--sizes-only", action="store_true", help="compare sizes only, skip the SHA-256 pass")
    v.set_defaults(func=_cmd_checkpoint_verify)
    i = csub.add_parser("inspect", help="print a checkpoint's step, the layout that wrote it, its tensors and sizes")
    i.add_argument("dir", help="a checkpoints/step-N dir, or a run's output dir / checkpoints dir (its newest)")
    i.add_argument("--prefix", default="", help="list only the entries whose key starts with this "
                                                "(model., optim.exp_avg., rank.)")
    i.add_argument("--json", action="store_true", help="the same as JSON")
    i.set_defaults(func=_cmd_checkpoint_inspect)

    sp = sub.add_parser("generate", help="sample from a megads or HF checkpoint")
    sp.add_argument("--checkpoint", required=True,
                    help="a megads model dir (a run's final/), an HF dir, a training checkpoint checkpoints/step-N "
                         "(any layout), or a run dir (its final/, else its newest checkpoint)")
    sp.add_argument("--tokenizer", default=None,
                    help="tokenizer dir (default: beside the weights, else the one the run's config names)")
    sp.add_argument("--prompt", action="append", help="prompt text (repeatable: a batch)")
    sp.add_argument("--max-new-tokens", type=int, default=64, help="tokens to sample after each prompt (default 64)")
    sp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    sp.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default 1: off)")
    sp.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    sp.add_argument("--chat", action="store_true",
                    help="wrap each prompt as a user turn of the megads-chat-v1 template (SFT/DPO models)")
    sp.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="weights and cache dtype; auto (default): the one whose decode step, timed here at start, "
                         "is faster")
    sp.add_argument("--weights", choices=("full", "int8"), default="full",
                    help="int8: weight-only int8 projections and experts (one scale per output row; faster "
                         "for a few prompts where the decode step is memory-bound; default full)")
    sp.add_argument("--decode", choices=("auto", "eager", "static", "compile"), default="auto",
                    help="how each decode step runs: eager (auto's choice on CPU); static (fixed shapes); compile "
                         "(fixed shapes through torch.compile: faster steps after tens of seconds of compiling, for "
                         "long generations)")
    sp.set_defaults(func=_cmd_generate)

    for mod in ("megads.hf", "megads.data.cli", "megads.sweep.cli"):
        try:
            __import__(mod, fromlist=["add_subcommands"]).add_subcommands(sub)
        except (ImportError, AttributeError) as e:  # optional pieces still being built
            log.debug("%s: %s", mod, e)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("MEGADS_LOG", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MegadsError as e:
        return _report(e)
    except KeyboardInterrupt:
        print("megads: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
