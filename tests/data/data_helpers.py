"""Helpers shared by the data tests (a module with a unique name, unlike conftest)."""
from __future__ import annotations

import json
import random

WORDS = ["the", "data", "token", "model", "def", "return", "class", "import", "self", "value",
         "über", "naïve", "café", "日本語", "中文", "テスト", "한국어", "привет", "мир", "🙂", "🚀",
         "x", "y", "=", "(", ")", ":", "+", "1", "42", "\t", "    "]


def make_docs(n: int, seed: int = 0, max_words: int = 60) -> list[str]:
    """`n` deterministic pseudo-documents mixing ASCII, accents, CJK, Cyrillic, emoji and whitespace."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        k = rng.randint(3, max_words)
        parts = []
        for _ in range(k):
            parts.append(rng.choice(WORDS))
            parts.append(rng.choice([" ", " ", " ", "\n", "  ", "\n\n", ""]))
        docs.append("".join(parts).strip() or "x")
    return docs


def write_jsonl(path, docs, key: str = "text") -> str:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d}, ensure_ascii=False) + "\n")
    return str(path)
