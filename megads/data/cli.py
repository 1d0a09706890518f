"""CLI commands of the data pipeline: `megads tokenizer train …` and `megads preprocess …`.

`add_subcommands(subparsers)` registers them on the main parser; each sets `func(args) -> int`.
DataError propagates to the main CLI, which prints its message and exits with code 2.
"""
from __future__ import annotations

import argparse
import os
import time


def _cmd_tokenizer_train(args) -> int:
    from megads.data.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    tok = train_tokenizer(args.input, args.vocab_size, args.output, json_key=args.json_key,
                          min_frequency=args.min_frequency)
    specials = ", ".join(f"{t}={i}" for t, i in tok.special_ids.items())
    print(f"tokenizer {tok.path}: vocab {tok.vocab_size} ({specials}); {time.perf_counter() - t0:.1f} s")
    if tok.vocab_size < args.vocab_size:
        print(f"note: --vocab-size {args.vocab_size} asked for, {tok.vocab_size} made: the data has no more pairs seen "
              f"at least --min-frequency {args.min_frequency} times (give more text, lower --min-frequency, or "
              f"set model.vocab_size >= {tok.vocab_size})")
    return 0


def _cmd_preprocess(args) -> int:
    from megads.data.preprocess import preprocess

    _refuse_overwrite(args.output_prefix, args.force)
    stats = preprocess(args.input, args.tokenizer, args.output_prefix, json_key=args.json_key,
                       workers=args.workers, on_error=args.on_error, append_eos=not args.no_eos)
    print(f"{stats['output_prefix']}: {stats['documents']} documents, {stats['tokens']} tokens "
          f"({stats['dtype']}), {stats['skipped']} skipped lines, {stats['seconds']:.1f} s")
    for msg in stats["errors"]:
        print(f"  skipped {msg}")
    if stats["skipped"] > len(stats["errors"]):
        print(f"  … and {stats['skipped'] - len(stats['errors'])} more")
    return 0


def _refuse_overwrite(prefix: str, force: bool) -> None:
    """An existing dataset at PREFIX is kept unless --force (a typo must not destroy a day's tokenising)."""
    from megads.data.preprocess import meta_file
    from megads.errors import DataError

    there = [f for f in (f"{prefix}.bin", f"{prefix}.idx", meta_file(prefix)) if os.path.exists(f)]
    if there and not force:
        raise DataError(f"--output-prefix {prefix}: {there[0]} exists; pass --force to replace the dataset")


def add_subcommands(subparsers) -> None:
    """Add `tokenizer` (with `train`) and `preprocess` to the main CLI's subparsers."""
    sp = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tsub = sp.add_subparsers(dest="tokenizer_command", required=True)
    tp = tsub.add_parser("train", help="train a byte-level BPE on JSONL/text files",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tp.add_argument("--input", nargs="+", required=True, metavar="FILE",
                    help="JSONL (.jsonl/.json) or text files (one document per blank-line-separated block)")
    tp.add_argument("--vocab-size", type=int, required=True, help="vocabulary size incl. the special tokens")
    tp.add_argument("--output", required=True, metavar="DIR", help="directory for tokenizer.json")
    tp.add_argument("--json-key", default="text", help="JSONL field holding the text")
    tp.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge")
    tp.set_defaults(func=_cmd_tokenizer_train)

    pp = subparsers.add_parser("preprocess", help="tokenise JSONL/text files into an indexed dataset",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pp.add_argument("--input", nargs="+", required=True, metavar="FILE",
                    help="JSONL (.jsonl/.json, optionally .gz) or text files")
    pp.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory (or tokenizer.json)")
    pp.add_argument("--output-prefix", required=True, metavar="PREFIX",
                    help="writes PREFIX.bin, PREFIX.idx and PREFIX.meta.json")
    pp.add_argument("--json-key", default="text", help="JSONL field holding the text")
    pp.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenising processes")
    pp.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                    help="malformed lines: skip and count them, or stop at the first")
    pp.add_argument("--no-eos", action="store_true", help="do not append <|eos|> to each document")
    pp.add_argument("--force", action="store_true", help="replace an existing dataset at --output-prefix")
    pp.set_defaults(func=_cmd_preprocess)
