"""Rule rewards for GRPO (DeepSeek-R1 §2.2.2, §2.3.2): accuracy, format, language consistency, code.

Every reward maps a completion to a float in [0, 1], or None for "cannot judge" (left out of the
total and of the advantage, like TRL's None rewards). `<think>…</think>` is the chain of thought
(CoT); "outside the think block" is the completion with its think blocks removed (a stray
`</think>` with no opening tag, as when the template opens the block in the prompt, drops
everything before it; an unclosed `<think>` drops everything after it).

- accuracy(completion, answer): the final answer is the content of the `<answer>…</answer>` block
  (the last `\\boxed{…}` inside it if it has one), else the last `\\boxed{…}` (balanced braces),
  both looked for outside the think block only. Two or more answer blocks (hedging) score 0; no
  answer scores 0. Both sides go to HF math-verify (`parse` / `verify`), wrapped in `$…$` unless
  they already carry math delimiters; it decides integers, decimals, fractions, LaTeX, sets,
  equations (`x=3` ~ `3`) and units (`5 cm` ~ `5`). A textual gold (no digits, LaTeX or operators,
  a word of ≥ 2 letters) and a pair that neither parses are compared as normalised strings
  (casefold, `\\text{}` unwrapped, whitespace collapsed, trailing period dropped). An empty gold,
  or a gold that does not parse against a prediction that does, is None.
- format(completion): 1 iff the completion is exactly `<think>…</think>` then `<answer>…</answer>`
  with only whitespace around them and each tag once, else 0.
- language(completion, lang): the share of the CoT's words written in a script of `lang`
  (LANG_SCRIPTS). The CoT is the think blocks' content, else the completion minus its answer
  blocks. Words are runs of letters of one script; Han and kana count one word a character.
  Numbers, punctuation, math (`$…$`, `\\(…\\)`, `\\[…\\]`, LaTeX commands), code (fences, inline
  code, Latin words touching a digit, `_`, `\\` or an operator, dotted or camelCase), URLs and
  single Latin, Greek or Cyrillic letters (variables) are neutral. No countable word: None.
- code(completion, tests): the last fenced block tagged python/py/python3 or untagged, outside the
  think block if there is one there, else anywhere, run by megads.rl.sandbox.pass_fraction (the
  fraction of tests passed). No block: 0; no tests: None.

`score` sums the weighted rewards of each completion: total = Σ_k w_k·r_k over the rewards k that
judged it (TRL's nansum), NaN when none with a non-zero weight did.

math-verify bounds its work with SIGALRM, which only the main thread may use. In the main thread
accuracy calls it directly with its timeouts; from any other thread (a scoring pool) the check
runs in a small pool of judge subprocesses that call math-verify in their own main thread with
those timeouts, and a judge past a hard wall-clock deadline is killed and replaced (the answer
scores 0), so no input can hang a worker.
"""
from __future__ import annotations

import atexit
import functools
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import unicodedata
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Callable

import numpy as np

Reward = Callable[[str, dict], "float | None"]

# ---------------------------------------------------------------------------------- structure
_THINK = re.compile(r"<think>.*?</think>", re.S)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FORMAT = re.compile(r"\s*<think>.*</think>\s*<answer>.*</answer>\s*", re.S)


def outside_think(text: str) -> str:
    """The completion without its think blocks (see the module docstring for unpaired tags)."""
    text = _THINK.sub(" ", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text.split("<think>", 1)[0]


def chain_of_thought(text: str) -> str:
    """The think blocks' content (an unclosed one runs to the end; text before a stray
    `</think>` is thought), else the whole completion minus its answer blocks."""
    if "<think>" in text:
        return " ".join(re.findall(r"<think>(.*?)(?:</think>|$)", text, re.S))
    if "</think>" in text:
        return text.split("</think>", 1)[0]
    return re.sub(r"<answer>.*?(?:</answer>|$)", " ", text, flags=re.S)


def boxed(text: str) -> list[str]:
    """The contents of every complete `\\boxed{…}` in text, in order (braces balanced; `\\{` and
    `\\}` are literal)."""
    out = []
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "\\":
                i += 2
                continue
            depth += (c == "{") - (c == "}")
            i += 1
        if depth == 0:
            out.append(text[m.end():i - 1])
    return out


def extract_answer(completion: str) -> str | None:
    """The final answer (module docstring); None when there is none or it is hedged."""
    out = outside_think(completion)
    answers = _ANSWER.findall(out)
    if len(answers) > 1:
        return None
    if answers:
        inner = boxed(answers[0])
        return inner[-1] if inner else answers[0]
    found = boxed(out)
    return found[-1] if found else None


def format_reward(completion: str) -> float:
    """1.0 iff `<think>…</think>` then `<answer>…</answer>`, each tag once, only whitespace outside."""
    if any(completion.count(t) != 1 for t in _TAGS):
        return 0.0
    return 1.0 if _FORMAT.fullmatch(completion) else 0.0


format = format_reward  # noqa: A001  (the registry's name; the builtin is shadowed only here)

# ---------------------------------------------------------------------------------- accuracy
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_MATH_DELIM = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed")
_NOT_TEXT = set("\\=+*/^_<>{}[]|%")


def _norm_text(s: str) -> str:
    s = _TEXT_WRAP.sub(r"\1", s).replace("$", "")
    s = " ".join(s.casefold().split())
    return s[:-1].rstrip() if s.endswith(".") else s


def _is_text(s: str) -> bool:
    """Prose rather than math: math-verify would read 'Paris' as the product p·a·r·i·s."""
    s = _TEXT_WRAP.sub(r"\1", s)
    return (not any(c.isdigit() or c in _NOT_TEXT for c in s)) and re.search(r"[^\W\d_]{2,}", s) is not None


def _as_latex(s: str) -> str:
    return s if _MATH_DELIM.search(s) else f"${s}$"


def _math_check(pred: str, gold: str, timeout: int) -> tuple[bool, bool, bool]:
    """(gold parsed, pred parsed, equivalent) by math-verify, with its SIGALRM timeouts (main
    thread only)."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        # no_fallback: [] unless sympy parsed it (the default appends the raw string, so
        # everything would "parse"); the string comparison is ours
        g = parse(_as_latex(gold), fallback_mode="no_fallback", parsing_timeout=timeout)
        p = parse(_as_latex(pred), fallback_mode="no_fallback", parsing_timeout=timeout)
        ok = bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=timeout))
    except (Exception, TimeoutException):  # TimeoutException is a BaseException
        return False, False, False
    return bool(g), bool(p), ok


def accuracy(completion: str, answer: str, timeout: float = 5.0) -> float | None:
    """1.0 if the completion's final answer equals the gold `answer` (module docstring), else 0.0;
    None for an empty or unparseable gold. `timeout`: seconds for each math-verify step."""
    gold = (answer or "").strip()
    if not _norm_text(gold):
        return None
    pred = extract_answer(completion)
    if pred is None or not pred.strip():
        return 0.0
    if _is_text(gold):
        return float(_norm_text(pred) == _norm_text(gold))
    t = max(1, math.ceil(timeout))
    if threading.current_thread() is threading.main_thread():
        g_ok, p_ok, equal = _math_check(pred, gold, t)
    else:
        g_ok, p_ok, equal = _JUDGES.check(pred, gold, t, deadline=3 * t + 5)
    if g_ok:
        return float(equal)
    return None if p_ok else float(_norm_text(pred) == _norm_text(gold))


class _Judge:
    """One judge subprocess: JSON lines {pred, gold, timeout} in, [g_ok, p_ok, equal] out. It loads
    this file alone (not the megads.rl package, which imports torch)."""

    BOOT = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('_megads_judge', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m); "
            "m._judge_main()")

    def __init__(self, boot_deadline: float = 120.0):
        self.proc = subprocess.Popen([sys.executable, "-c", self.BOOT, os.path.abspath(__file__)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        if self._read(boot_deadline) != "ready":
            self.kill()
            raise RuntimeError("rewards: the math-verify judge subprocess did not start")

    def _read(self, deadline: float):
        poll = select.poll()  # not select.select: a training process may hold fds past FD_SETSIZE
        poll.register(self.proc.stdout, select.POLLIN)
        line = self.proc.stdout.readline() if poll.poll(deadline * 1000) else ""
        return json.loads(line) if line else None

    def check(self, pred: str, gold: str, timeout: int, deadline: float):
        """[g_ok, p_ok, equal], or None when the judge died or ran past the deadline."""
        try:
            self.proc.stdin.write(json.dumps({"pred": pred, "gold": gold, "timeout": timeout}) + "\n")
            self.proc.stdin.flush()
            return self._read(deadline)
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _judge_main() -> None:
    """A judge subprocess's loop (stdout is the protocol; stray prints go to stderr)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C; EOF on stdin ends us
    out, sys.stdout = sys.stdout, sys.stderr
    import math_verify  # noqa: F401  (import before "ready": the first check pays no import)

    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        out.write(json.dumps(list(_math_check(req["pred"], req["gold"], req["timeout"]))) + "\n")
        out.flush()


class _JudgePool:
    """Up to `size` judges, started on demand and reused; a judge that dies or times out is killed
    and its check reads as (gold parsed, pred not parsed): the prediction scores 0."""

    def __init__(self, size: int):
        self.size, self._idle, self._live = size, [], 0
        self._cv = threading.Condition()
        atexit.register(self.close)

    def check(self, pred: str, gold: str, timeout: int, deadline: float) -> tuple[bool, bool, bool]:
        with self._cv:
            while not self._idle and self._live >= self.size:
                self._cv.wait()
            judge = self._idle.pop() if self._idle else None
            if judge is None:
                self._live += 1
        res = None
        try:
            judge = judge or _Judge()
            res = judge.check(pred, gold, timeout, deadline)
        finally:
            with self._cv:
                if res is None:
                    self._live -= 1
                    if judge is not None:
                        judge.kill()
                else:
                    self._idle.append(judge)
                self._cv.notify()
        return (True, False, False) if res is None else tuple(bool(x) for x in res)

    def close(self) -> None:
        with self._cv:
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        for j in idle:
            j.proc.stdin.close()  # the judge sees EOF and exits
            j.kill()


_JUDGES = _JudgePool(size=max(1, min(4, os.cpu_count() or 1)))

# ---------------------------------------------------------------------------------- language
_LATIN = ("en fr de es it pt nl sv da no nb nn fi is pl cs sk sl hr bs ro hu tr az uz vi id ms tl sw ca eu gl "
          "et lv lt af ga cy sq mt eo la")
LANG_SCRIPTS: dict[str, frozenset[str]] = {
    **{c: frozenset({"Latin"}) for c in _LATIN.split()},
    "zh": frozenset({"Han", "Bopomofo"}),
    "ja": frozenset({"Han", "Hiragana", "Katakana"}),
    "ko": frozenset({"Hangul", "Han"}),
    **{c: frozenset({"Cyrillic"}) for c in "ru uk be bg mk kk ky mn tg".split()},
    "sr": frozenset({"Cyrillic", "Latin"}),
    **{c: frozenset({"Arabic"}) for c in "ar fa ur ps ug".split()},
    **{c: frozenset({"Hebrew"}) for c in "he yi".split()},
    **{c: frozenset({"Devanagari"}) for c in "hi mr ne sa".split()},
    **{c: frozenset({"Bengali"}) for c in "bn as".split()},
    "pa": frozenset({"Gurmukhi"}), "gu": frozenset({"Gujarati"}), "or": frozenset({"Oriya"}),
    "ta": frozenset({"Tamil"}), "te": frozenset({"Telugu"}), "kn": frozenset({"Kannada"}),
    "ml": frozenset({"Malayalam"}), "si": frozenset({"Sinhala"}), "el": frozenset({"Greek"}),
    "th": frozenset({"Thai"}), "lo": frozenset({"Lao"}), "km": frozenset({"Khmer"}), "my": frozenset({"Myanmar"}),
    "ka": frozenset({"Georgian"}), "hy": frozenset({"Armenian"}), "am": frozenset({"Ethiopic"}),
    "bo": frozenset({"Tibetan"}),
}
_KNOWN_SCRIPTS = frozenset().union(*LANG_SCRIPTS.values())
_PER_CHAR = frozenset({"Han", "Hiragana", "Katakana", "Bopomofo"})  # written without spaces: a word a character
_VARIABLE_SCRIPTS = frozenset({"Latin", "Greek", "Cyrillic"})  # whose single letters are math variables
_SCRIPT_ALIAS = {"Cjk": "Han", "Ideographic": "Han", "Katakana-Hiragana": "Katakana"}
_CODE_NEIGHBOURS = set("_\\/=^*+<>{}[]|#@~`$%&")
_NEUTRAL_SPANS = re.compile(r"```.*?(?:```|$)|`[^`\n]*`|\$\$.*?\$\$|\\\[.*?\\\]|\\\(.*?\\\)|(?<!\\)\$[^$\n]*(?<!\\)\$"
                            r"|https?://\S+", re.S)


def lang_scripts(lang: str) -> frozenset[str]:
    """The scripts that count as `lang` (a code like 'zh', 'zh-CN', 'pt_BR'); ValueError if unknown."""
    code = str(lang).strip().casefold().replace("_", "-")
    scripts = LANG_SCRIPTS.get(code) or LANG_SCRIPTS.get(code.split("-")[0])
    if scripts is None:
        raise ValueError(f"rewards: unknown language code {lang!r}; known: {', '.join(sorted(LANG_SCRIPTS))}")
    return scripts


@functools.lru_cache(maxsize=65536)
def _script(ch: str) -> str | None:
    """The script of a letter ('Latin', 'Han', …), '' for a combining mark, None if neutral."""
    cat = unicodedata.category(ch)
    name = unicodedata.name(ch, "")
    if cat[0] == "M":
        return ""
    script = name.split(" ", 1)[0].title()
    script = _SCRIPT_ALIAS.get(script, script)
    return script if script in _KNOWN_SCRIPTS else None


@functools.lru_cache(maxsize=1)
def _letter_runs() -> re.Pattern:
    """Runs of letters and combining marks (Python's \\w splits Devanagari words at vowel signs)."""
    marks, start = [], None
    for cp in range(0x10000 + 1):
        is_mark = cp < 0x10000 and unicodedata.category(chr(cp))[0] == "M"
        if is_mark and start is None:
            start = cp
        elif not is_mark and start is not None:
            marks.append(f"{re.escape(chr(start))}-{re.escape(chr(cp - 1))}")
            start = None
    return re.compile(r"(?:[^\W\d_]|[" + "".join(marks) + r"])+")


def _code_like(text: str, a: int, b: int) -> bool:
    """Whether the Latin word text[a:b] reads as code or math: touching a digit, `_` or an operator,
    dotted (`np.array`, `self.x`) or camelCase."""
    before = text[a - 1] if a else " "
    after = text[b] if b < len(text) else " "
    return (before.isdigit() or after.isdigit() or before in _CODE_NEIGHBOURS or after in _CODE_NEIGHBOURS
            or re.search(r"[a-z][A-Z]", text[a:b]) is not None
            or (before == "." and a >= 2 and text[a - 2].isalnum())
            or (after == "." and b + 1 < len(text) and text[b + 1].isalpha()))


def words(text: str) -> list[str]:
    """The script of each countable word of text (module docstring), in order."""
    text = _NEUTRAL_SPANS.sub(" ", unicodedata.normalize("NFKC", text))
    out: list[str] = []
    for m in _letter_runs().finditer(text):
        run, base = m.group(), m.start()
        pieces: list[list] = []  # [script, start, end, letters] of one script each (marks join the piece)
        for i, ch in enumerate(run):
            s = _script(ch)
            if s == "" and pieces:
                pieces[-1][2] = i + 1
            elif pieces and s == pieces[-1][0]:
                pieces[-1][2], pieces[-1][3] = i + 1, pieces[-1][3] + 1
            else:
                pieces.append([s, i, i + 1, 1])
        for s, a, b, n in pieces:
            if not s:
                continue
            if s in _PER_CHAR:
                out.extend([s] * n)
                continue
            if s in _VARIABLE_SCRIPTS and (n == 1 or (s == "Latin" and _code_like(text, base + a, base + b))):
                continue  # a variable, an identifier, a unit glued to a number: math or code
            out.append(s)
    return out


def language_consistency(completion: str, lang: str) -> float | None:
    """The share of the CoT's words written in `lang`'s scripts; None when it has no word."""
    scripts = lang_scripts(lang)
    found = words(chain_of_thought(completion))
    return sum(s in scripts for s in found) / len(found) if found else None


# ---------------------------------------------------------------------------------- code
_FENCE = re.compile(r"```([^\n`]*)\n(.*?)```", re.S)
_PY_TAGS = frozenset({"", "python", "py", "python3", "py3"})


def extract_code(completion: str) -> str | None:
    """The last python-tagged or untagged fenced block outside the think block, else anywhere."""
    for text in (outside_think(completion), completion):
        blocks = [body for tag, body in _FENCE.findall(text)
                  if (tag.strip().split() or [""])[0].casefold() in _PY_TAGS and body.strip()]
        if blocks:
            return blocks[-1]
    return None


def code(completion: str, tests: list[dict], limits=None, pool=None) -> float | None:
    """The fraction of `tests` ({"input", "output"}) the completion's program passes in the sandbox
    (`limits`: a sandbox.Limits; `pool`: a sandbox.SandboxPool that runs the tests at once)."""
    if not tests:
        return None
    source = extract_code(completion)
    if source is None:
        return 0.0
    from megads.rl.sandbox import pass_fraction

    return float(pass_fraction(source, list(tests), limits=limits, pool=pool))


# ---------------------------------------------------------------------------------- registry
REWARDS: dict[str, Reward] = {}


def register(name: str, *, replace: bool = False) -> Callable[[Reward], Reward]:
    """Decorator: register `fn(completion, sample) -> float | None` as the reward `name`."""
    def deco(fn: Reward) -> Reward:
        if name in REWARDS and not replace and REWARDS[name] is not fn:
            raise ValueError(f"rewards: {name!r} is already registered (pass replace=True)")
        REWARDS[name] = fn
        return fn
    return deco


def get(name: str) -> Reward:
    """The registered reward `name`; ValueError naming the known ones otherwise."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"rewards: unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}") from None


register("accuracy")(lambda c, s: accuracy(c, s["answer"]) if s.get("answer") is not None else None)
register("format")(lambda c, s: format_reward(c))
register("language")(lambda c, s: language_consistency(c, s.get("lang") or "en"))
register("code")(lambda c, s: code(c, s.get("tests") or []))


def score(completions: list[str], samples: list[dict], weights: dict[str, float], default_lang: str = "en",
          pool: Executor | None = None, workers: int = 1) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(total [N], {name: reward [N]}) for completions[i] of samples[i]; NaN = not judged.

    total = Σ_k weights[k]·r_k over the rewards that judged the completion, NaN when no reward of
    non-zero weight did (zero-weight rewards are reported, not counted). A sample without `lang`
    gets `default_lang`. Completions are scored on `pool`, or on `workers` threads if > 1.
    """
    if len(completions) != len(samples):
        raise ValueError(f"rewards: {len(completions)} completions for {len(samples)} samples")
    fns = {k: get(k) for k in weights}
    if "language" in fns:
        lang_scripts(default_lang)

    def one(i: int) -> list[float]:
        s = samples[i] if samples[i].get("lang") else {**samples[i], "lang": default_lang}
        out = []
        for fn in fns.values():
            r = fn(completions[i], s)
            out.append(math.nan if r is None else float(r))
        return out

    n = len(completions)
    if pool is None and workers > 1 and n > 1:
        with ThreadPoolExecutor(min(workers, n)) as ex:
            rows = list(ex.map(one, range(n)))
    else:
        rows = list(pool.map(one, range(n))) if pool is not None else [one(i) for i in range(n)]
    table = np.array(rows, dtype=np.float64).reshape(n, len(fns))
    per = {k: table[:, j].copy() for j, k in enumerate(fns)}
    w = np.array([float(weights[k]) for k in fns], dtype=np.float64)
    counted = ~np.isnan(table) & (w != 0)
    total = np.where(counted, table * w, 0.0).sum(axis=1)
    total[~counted.any(axis=1)] = np.nan
    return total, per
