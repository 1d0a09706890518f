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

    cfg = load_config(args.config, args.set)
    info = model_info(cfg.model, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_info(str(args.config), info))
    return 0


def _cmd_generate(args) -> int:
    import torch

    from megads.model.io import load_model

    if not os.path.isdir(args.checkpoint):
        raise MegadsError(f"--checkpoint {args.checkpoint}: not a directory")
    if os.path.exists(os.path.join(args.checkpoint, "config.json")):
        from megads import hf

        model = hf.load(args.checkpoint)
    else:
        model = load_model(args.checkpoint)
    from megads.data.tokenizer import load_tokenizer

    tok_path = args.tokenizer or args.checkpoint
    tok = load_tokenizer(tok_path)
    prompts = args.prompt or [""]
    if args.chat:  # each prompt is one user turn under the megads-chat-v1 template
        from megads.data.sft import render_chat

        ids = [render_chat(tok, [{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in prompts]
    else:
        ids = [([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(p) for p in prompts]
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
                         attention_mask=mask, pad_token_id=pad, generator=gen)
    for i, p in enumerate(prompts):
        new = [t for t in out[i, S:].tolist() if t != pad]
        print(f"--- prompt {i}: {p!r}\n{p}{tok.decode(new)}")
    return 0


def _cmd_train(args) -> int:
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

    return launch_local(args.config, args.set, nproc=args.nproc, launcher=args.launcher)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megads", description="DeepSeek-style LLM training")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp, required=True):
        sp.add_argument("config", help="run YAML, model preset name (tiny, small, deepseek-v3, …) or preset YAML")
        sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config field (repeatable)")

    sp = sub.add_parser("model-info", help="parameters, FLOPs per token and KV-cache bytes of a config")
    with_config(sp)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--seq-len", type=int, default=4096, help="sequence length for the attention FLOPs")
    sp.set_defaults(func=_cmd_model_info)

    sp = sub.add_parser("train", help="pre-train (single process, deepspeed, torchrun or mpiexec)")
    with_config(sp)
    sp.add_argument("--resume", default="auto",
                    help="checkpoint dir to resume from; 'auto' = latest in train.output_dir; 'none' = fresh")
    sp.add_argument("--force", action="store_true",
                    help="start fresh over a previous run in train.output_dir (removing its checkpoints, final/ "
                         "and metrics), or resume with changed training settings")
    sp.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    sp.set_defaults(func=_cmd_train)

    sp = sub.add_parser("launch", help="start N local ranks of `megads train` with the DeepSpeed launcher")
    with_config(sp)
    sp.add_argument("--nproc", type=int, default=2)
    sp.add_argument("--launcher", default="deepspeed", choices=["deepspeed", "torchrun", "mpiexec", "python"])
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

    sp = sub.add_parser("generate", help="sample from a megads or HF checkpoint")
    sp.add_argument("--checkpoint", required=True, help="megads model dir (config.yaml + model.safetensors) or HF dir")
    sp.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the checkpoint dir)")
    sp.add_argument("--prompt", action="append", help="prompt text (repeatable: a batch)")
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument("--temperature", type=float, default=0.0)
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--chat", action="store_true",
                    help="wrap each prompt as a user turn of the megads-chat-v1 template (SFT/DPO models)")
    sp.set_defaults(func=_cmd_generate)

    for mod in ("megads.hf", "megads.data.cli"):
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
