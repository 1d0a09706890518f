"""Rule rewards: math-verify equivalents, answer extraction, format, language consistency, code
extraction and the sandbox, the registry and `score`'s None / NaN semantics."""
import math
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from megads.rl import rewards as R


def wrap(ans: str) -> str:
    return f"<think>Let me work it out.</think> <answer>{ans}</answer>"


# ---------------------------------------------------------------------------------- accuracy
ACCURACY = [  # (predicted answer, gold, reward)
    ("0.5", "1/2", 1.0),
    ("1/2", "\\frac{1}{2}", 1.0),
    ("\\frac{1}{2}", "0.5", 1.0),
    ("\\dfrac{2}{4}", "0.5", 1.0),
    ("1,000", "1000", 1.0),
    ("1000", "1{,}000", 1.0),
    ("5 cm", "5", 1.0),
    ("5\\text{ cm}", "5", 1.0),
    (" 42 ", "42", 1.0),
    ("$42$", "42", 1.0),
    ("\\{2,1\\}", "\\{1,2\\}", 1.0),
    ("{1,2}", "\\{2,1\\}", 1.0),
    ("\\{1,3\\}", "\\{1,2\\}", 0.0),
    ("x=3", "3", 1.0),
    ("3", "x=3", 1.0),
    ("y=3", "x=3", 0.0),
    ("-3", "-3", 1.0),
    ("−3", "-3", 1.0),  # U+2212 minus
    ("3", "-3", 0.0),
    ("-\\frac{1}{2}", "-0.5", 1.0),
    ("7", "8", 0.0),
    ("0.333", "1/3", 0.0),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", 1.0),
    ("(x+1)^2", "x^2+2x+1", 1.0),
    ("\\boxed{12}", "12", 1.0),
    ("The answer is 12", "12", 1.0),
    # text answers: normalised string equality (math-verify would read 'Spari' = 'Paris' = p·a·r·i·s)
    ("paris.", "Paris", 1.0),
    ("\\text{Paris}", "Paris", 1.0),
    ("New   York", "new york", 1.0),
    ("Spari", "Paris", 0.0),
    ("London", "Paris", 0.0),
    # neither side parses as math: string equality
    ("\\frac{", "\\frac{", 1.0),
    # no answer / unjudgeable gold
    ("", "5", 0.0),
    ("5", "", None),
    ("5", "   ", None),
    ("5", "\\frac{", None),  # a broken gold cannot judge a math answer
]


@pytest.mark.parametrize("pred,gold,want", ACCURACY)
def test_accuracy_equivalents(pred, gold, want):
    assert R.accuracy(wrap(pred), gold) == want


@pytest.mark.parametrize("completion,want", [
    ("<think>maybe 4</think> <answer>5</answer>", 1.0),
    ("<think><answer>5</answer></think> <answer>4</answer>", 0.0),  # right answer hidden in the thought
    ("<think><answer>4</answer></think> <answer>5</answer>", 1.0),  # wrong answer hidden in the thought
    ("<think>\\boxed{5}</think> so \\boxed{4}", 0.0),
    ("<think>\\boxed{4}</think> so \\boxed{5}", 1.0),
    ("first \\boxed{4}, then \\boxed{5}", 1.0),  # the last box
    ("<think>so 5</think> <answer>\\boxed{5}</answer>", 1.0),  # a box inside the answer block
    ("<answer>5</answer> <answer>4</answer>", 0.0),  # hedging
    ("<answer>5</answer> <answer>5</answer>", 0.0),
    ("the answer is 5", 0.0),  # nothing to extract
    ("<think>the answer is \\boxed{5}", 0.0),  # unclosed thought: no answer outside it
    ("it is 5 </think> <answer>5</answer>", 1.0),  # think opened by the prompt template
    ("\\boxed{5", 0.0),  # unbalanced
])
def test_accuracy_extraction(completion, want):
    assert R.accuracy(completion, "5") == want


def test_boxed_balanced_braces():
    assert R.boxed(r"\boxed{\frac{1}{2}} and \boxed{\{1, 2\}}") == [r"\frac{1}{2}", r"\{1, 2\}"]
    assert R.accuracy(r"so \boxed{\frac{1}{2}}", "0.5") == 1.0
    assert R.extract_answer("<answer>a</answer><answer>b</answer>") is None


def test_accuracy_from_worker_threads_matches_main_thread():
    cases = [(wrap(p), g) for p, g, _ in ACCURACY]
    want = [w for _, _, w in ACCURACY]
    with ThreadPoolExecutor(2) as ex:
        got = list(ex.map(lambda cg: R.accuracy(*cg), cases))
    assert got == want


def test_pathological_answer_is_bounded_in_both_threads():
    bomb = wrap("10^{10^{10^{10}}}")
    t = time.monotonic()
    assert R.accuracy(bomb, "5", timeout=1) == 0.0  # main thread: math-verify's SIGALRM timeouts
    assert time.monotonic() - t < 10
    t = time.monotonic()
    with ThreadPoolExecutor(1) as ex:  # a worker thread: the judge subprocess
        assert ex.submit(R.accuracy, bomb, "5", 1).result(timeout=60) == 0.0
    assert time.monotonic() - t < 30


def test_judge_past_its_deadline_is_killed_and_replaced():
    pool = R._JudgePool(size=1)
    try:
        t = time.monotonic()
        # the judge's own timeout (30 s) is longer than the parent's hard deadline (1 s)
        assert pool.check("10^{10^{10^{10}}}", "5", timeout=30, deadline=1.0) == (True, False, False)
        assert time.monotonic() - t < 20 and pool._live == 0
        assert pool.check("1/2", "0.5", timeout=5, deadline=60) == (True, True, True)  # a fresh judge
        assert pool._live == 1
    finally:
        pool.close()


# ---------------------------------------------------------------------------------- format
@pytest.mark.parametrize("completion,want", [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("  \n<think> reasoning\n</think>\n <answer> 5 </answer>\n ", 1.0),
    ("<think>a</think>", 0.0),  # missing answer
    ("<answer>b</answer>", 0.0),  # missing think
    ("<think>a <answer>b</answer>", 0.0),  # unclosed think
    ("<think>a</think><think>b</think><answer>c</answer>", 0.0),  # two think blocks
    ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),  # two answers
    ("<think>a</think><answer>b</answer> trailing", 0.0),  # text after the answer
    ("preamble <think>a</think><answer>b</answer>", 0.0),  # text before think
    ("<think>a</think> so <answer>b</answer>", 0.0),  # text between
    ("<answer>b</answer><think>a</think>", 0.0),  # answer before think
    ("<think><think>a</think></think><answer>b</answer>", 0.0),  # nested
    ("<think>a<answer>x</answer></think><answer>b</answer>", 0.0),  # an answer tag inside the thought
])
def test_format(completion, want):
    assert R.format_reward(completion) == want
    assert R.get("format")(completion, {}) == want


# ---------------------------------------------------------------------------------- language
ZH = "我们先计算总和，然后除以二，得到最后的答案。"
ZH_TERM = "我们先计算 total 的值，然后除以二"
ZH_SWITCH = "我们先计算总和。Then we divide the total by two and check the final answer again."
EN_WORD = "We first compute the 总数 and then divide it by two."
RU = "Сначала найдём сумму, затем разделим её на два."
AR = "أولا نحسب المجموع ثم نقسمه على اثنين"
JA = "まず、合計を計算します。次に、それを二で割ります。"


@pytest.mark.parametrize("text,lang,lo,hi", [
    (ZH, "zh", 1.0, 1.0),
    (ZH, "en", 0.0, 0.0),
    (ZH_TERM, "zh", 0.88, 0.96),  # one English term among 12 Han characters: 12/13
    (ZH_SWITCH, "zh", 0.0, 0.45),  # whole English sentences
    (EN_WORD, "en", 0.8, 0.9),  # 10 English words, 2 Han characters
    (RU, "ru", 1.0, 1.0),
    (RU, "uk", 1.0, 1.0),  # script-based: Cyrillic counts for every Cyrillic language
    (RU, "en", 0.0, 0.0),
    (AR, "ar", 1.0, 1.0),
    (AR, "fa", 1.0, 1.0),
    (JA, "ja", 1.0, 1.0),
    (JA, "zh", 0.2, 0.45),  # only its Han characters count for Chinese
    ("먼저 합계를 계산한 다음 2로 나눕니다", "ko", 1.0, 1.0),
    ("हम पहले योग की गणना करते हैं", "hi", 1.0, 1.0),  # vowel signs (combining marks) stay in their words
    ("Πρώτα υπολογίζουμε το άθροισμα", "el", 1.0, 1.0),
    ("We compute the sum first.", "en-US", 1.0, 1.0),
    ("Calculons d'abord la somme, puis divisons-la.", "fr", 1.0, 1.0),
    # math, code and variables are neutral: only the Han characters count
    ("我们令 x_1 = 3，调用 np.array 和 myVar，$\\frac{a}{b}$ 与 \\sqrt{2}，设 x 为 5cm", "zh", 1.0, 1.0),
    ("我们写代码 ```python\nfor item in items:\n    print(item)\n``` 然后运行 `len(items)`", "zh", 1.0, 1.0),
])
def test_language_consistency(text, lang, lo, hi):
    r = R.language_consistency(text, lang)
    assert lo - 1e-9 <= r <= hi + 1e-9, r


def test_language_counting_units():
    assert R.words(ZH_TERM).count("Han") == 12 and R.words(ZH_TERM).count("Latin") == 1
    assert R.language_consistency(ZH_TERM, "zh") == pytest.approx(12 / 13)
    assert R.words("Then we divide") == ["Latin"] * 3


def test_language_chain_of_thought_only():
    assert R.language_consistency(f"<think>{ZH}</think> <answer>The answer is five</answer>", "zh") == 1.0
    assert R.language_consistency(f"{ZH} <answer>The answer is five</answer>", "zh") == 1.0
    assert R.language_consistency(f"<think>{RU}</think> {ZH}", "ru") == 1.0


def test_language_unjudgeable_and_unknown():
    assert R.language_consistency("<think>12 + 35 = 47, 47 / 2 = 23.5</think><answer>23.5</answer>", "en") is None
    assert R.language_consistency("", "zh") is None
    with pytest.raises(ValueError, match="'klingon'"):
        R.language_consistency(ZH, "klingon")


# ---------------------------------------------------------------------------------- code
PROG = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n"


@pytest.mark.parametrize("completion,want", [
    (f"```python\nprint(1)\n```\nbetter:\n```python\n{PROG}```", PROG),  # the last block
    (f"```py\n{PROG}```", PROG),
    (f"```Python3\n{PROG}```", PROG),
    (f"```\n{PROG}```", PROG),  # untagged
    (f"```python\n{PROG}```\nrun it with:\n```bash\npython main.py\n```", PROG),  # non-Python tags skipped
    (f"<think>```python\nprint(0)\n```</think><answer>```python\n{PROG}```</answer>", PROG),
    (f"<think>draft:\n```python\n{PROG}```</think><answer>see above</answer>", PROG),  # only in the thought
    ("no code here, just `inline` code", None),
    ("```python\n   \n```", None),  # empty block
    ("```python\nprint(1)", None),  # unclosed fence
])
def test_extract_code(completion, want):
    assert R.extract_code(completion) == want


def test_code_reward_calls_the_sandbox(monkeypatch):
    calls = []

    def fake(source, tests, limits=None, pool=None):
        calls.append((source, tests))
        return 0.75

    fake_mod = types.ModuleType("megads.rl.sandbox")
    fake_mod.pass_fraction = fake
    monkeypatch.setitem(sys.modules, "megads.rl.sandbox", fake_mod)
    tests = [{"input": "1 2\n", "output": "3\n"}]
    assert R.code(f"<answer>```python\n{PROG}```</answer>", tests) == 0.75
    assert calls == [(PROG, tests)]
    assert R.code("no code", tests) == 0.0
    assert R.code(f"```python\n{PROG}```", []) is None
    assert R.get("code")(f"```python\n{PROG}```", {"answer": "3"}) is None  # a sample without tests
    assert len(calls) == 1


def test_code_reward_end_to_end_in_the_sandbox():
    tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "2 2\n", "output": "4\n"},
             {"input": "2 3\n", "output": "6\n"}, {"input": "5 5\n", "output": "11\n"}]
    assert R.code(f"<think>add them</think><answer>```python\n{PROG}```</answer>", tests) == pytest.approx(0.5)
    assert R.code("```python\nraise SystemExit(1)\n```", tests) == 0.0


# ---------------------------------------------------------------------------------- registry, score
def test_registry_and_unknown_names():
    assert set(R.REWARDS) >= {"accuracy", "format", "language", "code"}
    assert R.format is R.format_reward
    with pytest.raises(ValueError, match=r"rewards: unknown reward 'nope'; known: .*accuracy"):
        R.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        R.register("format")(lambda c, s: 1.0)
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        R.score(["x"], [{}], {"nope": 1.0})
    with pytest.raises(ValueError, match="2 completions for 1 samples"):
        R.score(["x", "y"], [{}], {"format": 1.0})


def test_registry_wrappers_read_sample_fields():
    c = f"<think>{ZH}</think><answer>0.5</answer>"
    assert R.get("accuracy")(c, {"answer": "1/2"}) == 1.0
    assert R.get("accuracy")(c, {}) is None  # a sample without an answer cannot be judged
    assert R.get("language")(c, {"lang": "zh"}) == 1.0
    assert R.get("language")(c, {"lang": "en"}) == 0.0


def test_score_semantics():
    good = f"<think>{ZH}</think><answer>5</answer>"
    wrong = "<think>12 / 2 = 6</think><answer>6</answer>"  # no words in the thought: language is None
    bare = "5"
    samples = [{"answer": "5", "lang": "zh"}, {"answer": "5"}, {"answer": "5", "lang": "zh"}]
    total, per = R.score([good, wrong, bare], samples, {"accuracy": 1.0, "format": 0.5, "language": 0.25})
    np.testing.assert_array_equal(per["accuracy"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(per["format"], [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(per["language"], [1.0, np.nan, np.nan])
    np.testing.assert_allclose(total, [1.75, 0.5, 0.0])  # None excluded from the sum
    # all-None rows are NaN; zero-weight rewards are reported but do not count as judging
    total, per = R.score([wrong, good], [{}, {"answer": "5"}], {"accuracy": 2.0, "format": 0.0})
    assert math.isnan(total[0]) and total[1] == 2.0
    np.testing.assert_array_equal(per["format"], [1.0, 1.0])


def test_score_default_lang_and_custom_reward():
    @R.register("test_length", replace=True)
    def length(completion, sample):
        return None if sample.get("skip") else min(1.0, len(completion) / 10)

    try:
        comps = [f"<think>{ZH}</think><answer>5</answer>", "12345", "hello world, this is long"]
        samples = [{}, {"lang": "en"}, {"skip": True}]
        total, per = R.score(comps, samples, {"language": 1.0, "test_length": 2.0}, default_lang="zh")
        np.testing.assert_array_equal(per["language"], [1.0, np.nan, 0.0])  # no `lang`: default_lang (zh)
        np.testing.assert_array_equal(per["test_length"], [1.0, 0.5, np.nan])
        np.testing.assert_allclose(total, [1.0 + 2.0 * 1.0, 2.0 * 0.5, 0.0])
        with pytest.raises(ValueError, match="'xx'"):
            R.score(comps, samples, {"language": 1.0}, default_lang="xx")
    finally:
        R.REWARDS.pop("test_length")


def test_score_on_threads_matches_serial():
    comps = [wrap(p) for p, _, _ in ACCURACY]
    samples = [{"answer": g} for _, g, _ in ACCURACY]
    weights = {"accuracy": 1.0, "format": 0.5}
    t0, p0 = R.score(comps, samples, weights)
    seen = set()

    def tagged(completion, sample):
        seen.add(threading.current_thread() is threading.main_thread())
        return 1.0

    R.register("test_thread", replace=True)(tagged)
    try:
        with ThreadPoolExecutor(2) as ex:
            t1, p1 = R.score(comps, samples, {**weights, "test_thread": 0.0}, pool=ex)
        t2, p2 = R.score(comps, samples, weights, workers=3)
    finally:
        R.REWARDS.pop("test_thread")
    assert seen == {False}  # really scored off the main thread
    np.testing.assert_array_equal(t0, t1)
    np.testing.assert_array_equal(t0, t2)
    np.testing.assert_array_equal(p0["accuracy"], p2["accuracy"])
    np.testing.assert_array_equal(p0["accuracy"], [np.nan if w is None else w for _, _, w in ACCURACY])
