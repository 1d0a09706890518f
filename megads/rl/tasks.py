"""Checkable task families for GRPO, rejection sampling and the R1 recipe: prompts with
verifiable answers and train / held-out splits.

A task record is `{"prompt": str, "answer": str, "solution"?: str, "split": "train"|"test",
"lang"?: str, "tests"?: [{"input", "output"}]}`; `solution` is a worked demonstration in the R1
format (`<think>…</think> <answer>…</answer>`), used only for cold-start SFT. `load_tasks` takes
a builtin generator's name (TASKS) or a JSONL file of such records.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from megads.errors import DataError

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt} Assistant:")


def _add_steps(a: int, b: int) -> str:
    """Column addition, units first: '7+8=15, carry 1. 3+4+1=8.'"""
    steps, carry, i = [], 0, 0
    while a or b or carry:
        da, db = a % 10, b % 10
        s = da + db + carry
        term = f"{da}+{db}" + (f"+{carry}" if carry else "")
        carry = s // 10
        steps.append(f"{term}={s}" + (", carry 1." if carry else "."))
        a, b, i = a // 10, b // 10, i + 1
    return " ".join(steps)


def _sub_steps(a: int, b: int) -> str:
    """Column subtraction (a >= b), units first, with borrows."""
    steps, borrow = [], 0
    while a or b:
        da, db = a % 10 - borrow, b % 10
        borrow = 1 if da < db else 0
        top = da + 10 * borrow
        steps.append(f"{top}-{db}={top - db}" + (", borrow 1." if borrow else "."))
        a, b = a // 10, b // 10
    return " ".join(steps)


def arith(n_train: int = 2000, n_test: int = 200, seed: int = 0, digits: int = 2) -> list[dict]:
    """Addition and subtraction of two `digits`-digit numbers, with a worked column solution;
    test problems are disjoint from train ones."""
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    seen, out = set(), []
    total = n_train + n_test
    if total > (hi - lo + 1) ** 2:
        raise ValueError(f"arith: {total} problems asked, only {(hi - lo + 1) ** 2} distinct ones per operation")
    while len(out) < total:
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice("+-")
        if op == "-" and a < b:
            a, b = b, a
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        value = a + b if op == "+" else a - b
        steps = _add_steps(a, b) if op == "+" else _sub_steps(a, b)
        word = "sum" if op == "+" else "difference"
        out.append({"prompt": f"What is {a} {op} {b}?", "answer": str(value),
                    "solution": f"<think> {steps} The {word} is {value}. </think> <answer> {value} </answer>",
                    "split": "train" if len(out) < n_train else "test", "lang": "en"})
    return out


TASKS = {"arith": arith}


def load_tasks(spec: str, seed: int = 0, **kw) -> list[dict]:
    """A builtin generator's name or a JSONL path -> task records (DataError naming file:line)."""
    if spec in TASKS:
        return TASKS[spec](seed=seed, **kw)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"tasks: {spec!r} is neither a builtin task family ({', '.join(TASKS)}) nor a JSONL file")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise DataError(f"{path}:{i}: a task needs a string 'prompt'")
            if "answer" not in rec and "tests" not in rec:
                raise DataError(f"{path}:{i}: a task needs an 'answer' (or code 'tests')")
            if rec.get("split", "train") not in ("train", "test"):
                raise DataError(f"{path}:{i}: split must be train or test, got {rec['split']!r}")
            rec.setdefault("split", "train")
            if "answer" in rec:
                rec["answer"] = str(rec["answer"])
            out.append(rec)
    if not out:
        raise DataError(f"{path}: no tasks")
    return out


def render_prompt(tok, prompt, template: str) -> list[int]:
    """Token ids of a prompt under a template: r1-zero (plain text, REFERENCE.md §6), chat
    (megads-chat-v1 with the generation prompt) or none (the text as is). A BOS comes first
    where the tokenizer has one."""
    if template == "chat":
        from megads.data.sft import render_chat

        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        ids, _ = render_chat(tok, messages, add_generation_prompt=True)
        return ids
    text = R1_ZERO_TEMPLATE.format(prompt=prompt) if template == "r1-zero" else prompt
    bos = [tok.bos_id] if getattr(tok, "bos_id", None) is not None else []
    return bos + tok.encode(text)
