"""Real post-training data built on this machine from the Python standard library (no download).

SFT: docstring -> function pairs. Every top-level function or method with a docstring in the
stdlib's own sources becomes a chat sample: the user asks for the function by its signature and
docstring, the assistant answers with the function's source (docstring removed).
"""
from __future__ import annotations

import ast
import json
import os
import sysconfig
from pathlib import Path


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "lib2to3", "site-packages", "ensurepip", "turtledemo")
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("_"))
        out += [Path(dirpath) / f for f in sorted(files) if f.endswith(".py")]
    return out


def _without_docstring(src: str, fn: ast.FunctionDef) -> str | None:
    lines = src.splitlines()
    doc = fn.body[0]
    body = lines[fn.lineno - 1:doc.lineno - 1] + lines[doc.end_lineno:fn.end_lineno]
    text = "\n".join(body)
    if len(fn.body) < 2:
        return None
    indent = len(body[0]) - len(body[0].lstrip())
    return "\n".join(x[indent:] for x in body) if text.strip() else None


def function_pairs(max_samples: int = 4000, max_chars: int = 1200):
    """Yield (module, signature line, docstring, source) for stdlib functions with docstrings."""
    n = 0
    for path in _stdlib_files():
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = path.stem
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 20 or node.name.startswith("__"):
                continue
            body = _without_docstring(src, node)
            if body is None or len(body) > max_chars:
                continue
            sig = body.splitlines()[0].strip()
            yield module, sig, doc.split("\n\n")[0].strip(), body
            n += 1
            if n >= max_samples:
                return


def _write_jsonl(out: str | os.PathLike, records) -> Path:
    """Write records (atomically) unless `out` already exists with content."""
    out = Path(out)
    if out.is_file() and out.stat().st_size > 0:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, out)
    return out


def _ask(module: str, sig: str, doc: str) -> dict:
    return {"role": "user", "content": f"Write `{sig.rstrip(':')}` for the Python module {module}: {doc}"}


def build_sft_jsonl(out: str | os.PathLike, max_samples: int = 4000) -> Path:
    """The docstring -> function chat samples, written to `out`."""
    return _write_jsonl(out, ({"messages": [_ask(m, s, d), {"role": "assistant", "content": b}]}
                              for m, s, d, b in function_pairs(max_samples)))


def corrupt(body: str, seed: int) -> str:
    """A plausible-looking wrong version of a function: its body lines in reversed order (the
    `def` line kept), or, for one-line bodies, the returned expression replaced by `None`."""
    lines = body.splitlines()
    head, rest = lines[:1], lines[1:]
    if len(rest) >= 2:
        return "\n".join(head + rest[::-1])
    return "\n".join(head + [ln.split("return")[0] + "return None" if "return" in ln else ln + "  # TODO"
                             for ln in rest])


def build_preference_jsonl(out: str | os.PathLike, max_samples: int = 4000) -> Path:
    """Preference pairs: the real stdlib function (chosen) against a corrupted one (rejected)."""
    def records():
        for i, (module, sig, doc, body) in enumerate(function_pairs(max_samples)):
            bad = corrupt(body, i)
            if bad != body:
                yield {"prompt": [_ask(module, sig, doc)], "chosen": [{"role": "assistant", "content": body}],
                       "rejected": [{"role": "assistant", "content": bad}]}

    return _write_jsonl(out, records())
