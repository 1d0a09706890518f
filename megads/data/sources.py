"""Reading raw documents from JSONL and plain-text files, one record at a time.

Two input kinds, chosen by the file name (a trailing `.gz` is read through gzip):

- `*.jsonl` / `*.json`: one JSON object per line; the document is the string field `json_key`.
  Blank lines are ignored.
- anything else is plain text: one document per block of lines separated by one or more blank
  (whitespace-only) lines. Blocks keep their inner newlines; the block's last newline is dropped.
  Per-block (not per-file) documents keep reading streaming for arbitrarily large files.

Reading is split in two so that the expensive half can run in worker processes:
`iter_records` (parent, cheap: splits the byte stream into records with their line numbers) and
`parse_record` (worker: UTF-8 decoding, JSON parsing, field checks). A malformed record yields a
reason string instead of a text; callers report it as `file:line: reason`.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from typing import BinaryIO, Iterator

from megads.errors import DataError

JSON_SUFFIXES = (".jsonl", ".json")


def is_json_lines(path: str) -> bool:
    """True for `.jsonl`/`.json` (optionally `.gz`) files, which hold one JSON object per line."""
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith(JSON_SUFFIXES)


def open_binary(path: str) -> BinaryIO:
    """Open a file for streaming binary reads (gzip when it ends with `.gz`); DataError if missing."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: input file not found")
    if path.endswith(".gz"):
        return io.BufferedReader(gzip.open(path, "rb"))
    return open(path, "rb", buffering=1 << 20)


def check_inputs(files: list[str]) -> list[str]:
    """Validate a list of input files up front (so a typo fails before any work starts)."""
    if not files:
        raise DataError("no input files given")
    for f in files:
        if not os.path.isfile(f):
            raise DataError(f"{f}: input file not found")
    return [str(f) for f in files]


def iter_records(path: str) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, raw bytes) records of one file, streaming.

    JSONL: one record per non-blank line. Text: one record per blank-line-separated block, numbered
    by its first line.
    """
    json_lines = is_json_lines(path)
    with open_binary(path) as f:
        if json_lines:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, line
            return
        block: list[bytes] = []
        start = 0
        for n, line in enumerate(f, 1):
            if line.strip():
                if not block:
                    start = n
                block.append(line)
            elif block:
                yield start, _join_block(block)
                block = []
        if block:
            yield start, _join_block(block)


def _join_block(lines: list[bytes]) -> bytes:
    text = b"".join(lines)
    if text.endswith(b"\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith(b"\n") else text


def parse_record(raw: bytes, json_lines: bool, json_key: str) -> tuple[str | None, str | None]:
    """Decode one record. Returns (text, None) or (None, reason) for a malformed record."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 at byte {e.start}"
    if not json_lines:
        return text, None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    if json_key not in obj:
        return None, f"missing field {json_key!r}"
    value = obj[json_key]
    if not isinstance(value, str):
        return None, f"field {json_key!r} is {type(value).__name__}, expected a string"
    return value, None


def iter_texts(files: list[str], json_key: str = "text", on_error: str = "skip",
               skipped: list[str] | None = None) -> Iterator[str]:
    """Yield every document's text of `files` in order (used by tokenizer training).

    Malformed records raise DataError (on_error="fail") or are appended as `file:line: reason`
    to `skipped` (on_error="skip").
    """
    for path in check_inputs(files):
        json_lines = is_json_lines(path)
        for line, raw in iter_records(path):
            text, reason = parse_record(raw, json_lines, json_key)
            if reason is not None:
                msg = f"{path}:{line}: {reason}"
                if on_error == "fail":
                    raise DataError(msg)
                if skipped is not None:
                    skipped.append(msg)
                continue
            yield text
