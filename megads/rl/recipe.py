"""`megads recipe RECIPE.yaml`: the DeepSeek-R1 pipeline in miniature (REFERENCE.md §6), each
stage an ordinary `megads train` / `megads rejection-sample` run in its own directory under
`recipe.output_dir`, resumable stage by stage (a finished stage is skipped; an interrupted one
resumes from its last checkpoint).

    data            the task family's prompts (train / held-out), a tokenizer, the base corpus
    pretrain        a tiny base on the corpus (worked arithmetic in several plain styles; a small
                    share in the R1 tags, as web text has some)
    r1_zero         GRPO straight from the base, R1-Zero template, rule rewards only
    cold_start      SFT of the base on a few hundred demonstrations (`solution`), chat template
    r1_grpo         GRPO from cold_start: accuracy + format + language rewards
    control         the same GRPO with each group's rewards shuffled among its completions
    rejection       N samples per train prompt from r1_grpo, kept when verified, well-formed and
                    language-consistent, K per prompt
    r1_sft          SFT on the kept traces (from `stages.r1_sft.from`, default r1_grpo)
    student_base    a smaller model pre-trained on the same corpus
    student_distill the student SFT'd on the R1 traces (distillation by SFT, as R1's distilled models)
    student_grpo    GRPO run directly on the student base (R1-Zero style), the paper's comparison

Every stage's model is evaluated on the held-out prompts (greedy): accuracy and format rate.
`summary.json` holds {"stages": [{"name", "heldout_accuracy", "format_rate", "steps",
"seconds"}]}; the log gets a table; plots go to `heldout.png` and `grpo_steps.png`.
"""
from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

from megads.errors import ConfigError

STAGES = ("data", "pretrain", "r1_zero", "cold_start", "r1_grpo", "control", "rejection", "r1_sft",
          "student_base", "student_distill", "student_grpo")
GRPO_STAGES = ("r1_zero", "r1_grpo", "control", "student_grpo")
RECIPE_KEYS = {"output_dir": "runs/r1-tiny", "tasks": "arith", "n_train": 2000, "n_test": 200,
               "cold_start_examples": 300, "vocab_size": 512, "seed": 0, "eval_prompts": 200,
               "eval_max_new_tokens": 64, "nproc": 1, "corpus_passes": 6, "tagged_share": 0.05,
               "template_share": 0.2,
               "stages": list(STAGES)}


def load_recipe(path: str, overrides: list[str] = ()) -> dict:
    from megads.config import parse_override, read_yaml

    data = read_yaml(Path(path))
    unknown = set(data) - {"recipe", "model", "student", "stages"}
    if unknown:
        raise ConfigError(f"{path}: unknown section {sorted(unknown)[0]!r} (recipe, model, student, stages)")
    rec = dict(RECIPE_KEYS)
    for k, v in (data.get("recipe") or {}).items():
        if k not in RECIPE_KEYS:
            raise ConfigError(f"{path}: recipe.{k}: unknown key (known: {', '.join(RECIPE_KEYS)})")
        rec[k] = v
    for item in overrides:
        lhs, _, rhs = item.partition("=")
        if not lhs.startswith("recipe.") or lhs[7:] not in RECIPE_KEYS:
            raise ConfigError(f"--set {item}: recipe overrides are recipe.KEY=VALUE (keys: {', '.join(RECIPE_KEYS)})")
        rec[lhs[7:]] = yaml.safe_load(rhs)
    for s in rec["stages"]:
        if s not in STAGES:
            raise ConfigError(f"{path}: recipe.stages: unknown stage {s!r} (stages: {', '.join(STAGES)})")
    stages = data.get("stages") or {}
    for s in stages:
        if s not in STAGES:
            raise ConfigError(f"{path}: stages.{s}: unknown stage (stages: {', '.join(STAGES)})")
    return {"recipe": rec, "model": data.get("model") or {"preset": "tiny"},
            "student": data.get("student") or {"preset": "tiny", "num_layers": 2},
            "stages": stages, "path": str(path)}


# ---------------------------------------------------------------------------- data
def _plain_docs(rec: dict, rng: random.Random) -> str:
    """A train problem in one of the plain styles of the base corpus (no R1 tags)."""
    q, a = rec["prompt"], rec["answer"]
    steps = rec.get("solution", "")
    work = steps.split("<think>")[-1].split("</think>")[0].strip() if "<think>" in steps else ""
    style = rng.random()
    if style < 0.45 and work:
        return f"Question: {q} Solution: {work} Answer: {a}"
    if style < 0.7:
        return f"{q} {work} So the answer is {a}." if work else f"{q} The answer is {a}."
    return f"Q: {q}\nA: {a}"


def build_data(rec: dict, out: Path) -> dict:
    """Tasks (train/test), the base corpus JSONL, cold-start chats, tokenizer and indexed dataset."""
    from megads.data.preprocess import preprocess
    from megads.data.tokenizer import train_tokenizer
    from megads.rl.tasks import R1_ZERO_TEMPLATE, load_tasks

    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    spec = rec["tasks"]
    kw = {"n_train": rec["n_train"], "n_test": rec["n_test"]} if spec == "arith" else {}
    tasks = load_tasks(spec, seed=rec["seed"], **kw)
    train = [t for t in tasks if t.get("split", "train") == "train"]
    if not any(t.get("split") == "test" for t in tasks):
        raise ConfigError(f"recipe.tasks: {spec} has no held-out (split: test) prompts")
    rng = random.Random(rec["seed"])
    with open(d / "tasks.jsonl", "w") as f:
        for t in tasks:
            f.write(json.dumps(t) + "\n")
    docs = []
    for _ in range(rec["corpus_passes"]):
        for t in train:
            u = rng.random()
            if u < rec["tagged_share"] and t.get("solution"):  # the R1 template, answered in its tags
                docs.append(R1_ZERO_TEMPLATE.format(prompt=t["prompt"]) + " " + t["solution"])
            elif u < rec["template_share"]:  # the same template answered in plain text
                docs.append(R1_ZERO_TEMPLATE.format(prompt=t["prompt"]) + " " + _plain_docs(t, rng))
            else:
                docs.append(_plain_docs(t, rng))
    rng.shuffle(docs)
    with open(d / "corpus.jsonl", "w") as f:
        for x in docs:
            f.write(json.dumps({"text": x}) + "\n")
    demos = [t for t in train if t.get("solution")][: rec["cold_start_examples"]]
    with open(d / "cold_start.jsonl", "w") as f:
        for t in demos:
            f.write(json.dumps({"messages": [{"role": "user", "content": t["prompt"]},
                                             {"role": "assistant", "content": t["solution"]}]}) + "\n")
    # the tokenizer also sees the prompts' template text once
    with open(d / "tok_text.jsonl", "w") as f:
        for x in docs[:4000]:
            f.write(json.dumps({"text": x}) + "\n")
        for t in tasks[:200]:
            f.write(json.dumps({"text": R1_ZERO_TEMPLATE.format(prompt=t["prompt"])}) + "\n")
    train_tokenizer([str(d / "tok_text.jsonl")], rec["vocab_size"], d / "tok", split_digits=True)
    preprocess([str(d / "corpus.jsonl")], str(d / "tok"), str(d / "corpus"), workers=1)
    return {"tasks": len(tasks), "train": len(train), "docs": len(docs), "cold_start": len(demos)}


# ---------------------------------------------------------------------------- stages
def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def stage_config(r: dict, name: str, out: Path) -> dict:
    """The run YAML of a training stage: model (policy or student), data, the stage's section."""
    rec = r["recipe"]
    d = out / "data"
    student = name.startswith("student")
    model = dict(r["student"] if student else r["model"])
    model["vocab_size"] = rec["vocab_size"]
    cfg = {"model": model, "parallel": {"zero_stage": 0},
           "train": {"output_dir": str(out / name), "seed": rec["seed"], "samples_at_end": 0, "progress": False,
                     "tensorboard": True},
           "data": {"builtin_corpus": False, "tokenizer": str(d / "tok")}}
    if name in ("pretrain", "student_base"):
        cfg["train"].update(stage="pretrain")
        cfg["data"].update(paths=[str(d / "corpus")], split="99,1")
    elif name in ("cold_start", "r1_sft", "student_distill"):
        cfg["train"].update(stage="sft")
        src = d / "cold_start.jsonl" if name == "cold_start" else out / "rejection" / "traces.jsonl"
        cfg["data"].update(paths=[str(src)], split="100,0", cache_dir=str(out / "data" / "cache"))
        start = {"cold_start": "pretrain", "r1_sft": "r1_grpo", "student_distill": "student_base"}[name]
        cfg["train"]["init_from"] = start
    else:  # GRPO stages
        cfg["train"].update(stage="grpo")
        cfg["data"]["paths"] = [str(d / "tasks.jsonl")]
        start = {"r1_zero": "pretrain", "r1_grpo": "cold_start", "control": "cold_start",
                 "student_grpo": "student_base"}[name]
        cfg["train"]["init_from"] = start
        cfg["grpo"] = {"template": "r1-zero" if name in ("r1_zero", "student_grpo") else "chat",
                       "eval_prompts": rec["eval_prompts"]}
        if name == "control":
            cfg["grpo"]["shuffle_rewards"] = True
    stage = copy.deepcopy(r["stages"].get(name) or {})
    if name == "control":  # the control is r1_grpo's settings with shuffled rewards
        stage = _merge(copy.deepcopy(r["stages"].get("r1_grpo") or {}), stage)
    src = stage.pop("from", None)
    cfg = _merge(cfg, stage)
    if "init_from" in cfg["train"]:
        start = src or cfg["train"]["init_from"]
        cfg["train"]["init_from"] = str(out / start / "final") if start in STAGES else start
    return cfg


def _run(cmd: list[str], log_file: Path, nproc: int = 1) -> int:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # cores shared by the ranks
    with open(log_file, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def _megads(rec: dict, args: list[str]) -> list[str]:
    if rec["nproc"] > 1 and args[0] == "train":
        return [sys.executable, "-m", "megads", "launch", *args[1:], "--nproc", str(rec["nproc"]), "--launcher", "torchrun"]
    return [sys.executable, "-m", "megads", *args]


def heldout(model_dir: Path, out: Path, template: str, rec: dict) -> dict:
    """Greedy completions of the held-out prompts: accuracy and format rate (single process)."""
    import numpy as np
    import torch

    from megads.data.tokenizer import load_tokenizer
    from megads.model.io import load_model
    from megads.rl import rewards
    from megads.rl.rollout import sample_groups
    from megads.rl.tasks import load_tasks, render_prompt

    tok = load_tokenizer(out / "data" / "tok")
    model = load_model(model_dir).eval()
    tests = [t for t in load_tasks(str(out / "data" / "tasks.jsonl")) if t.get("split") == "test"][: rec["eval_prompts"]]
    acc, fmt, examples = [], [], []
    for i in range(0, len(tests), 64):
        chunk = tests[i:i + 64]
        ro = sample_groups(model, tok, [render_prompt(tok, t["prompt"], template) for t in chunk], 1,
                           max_new_tokens=rec["eval_max_new_tokens"], temperature=0.0, stops=["</answer>"], sync=False)
        _, per = rewards.score(ro.texts, chunk, {"accuracy": 1.0, "format": 1.0}, workers=2)
        acc += np.nan_to_num(per["accuracy"]).tolist()
        fmt += np.nan_to_num(per["format"]).tolist()
        examples += [{"prompt": t["prompt"], "answer": t.get("answer"), "completion": x} for t, x in zip(chunk, ro.texts)][:2]
    torch.set_grad_enabled(True)
    return {"heldout_accuracy": float(np.mean(acc)), "format_rate": float(np.mean(fmt)), "n": len(tests),
            "examples": examples[:4], "template": template}


def _template(name: str) -> str:
    return "chat" if name in ("cold_start", "r1_grpo", "control", "rejection", "r1_sft", "student_distill") else "r1-zero"


def run_recipe(path: str, overrides: list[str] = (), force: bool = False) -> int:
    r = load_recipe(path, overrides)
    rec = r["recipe"]
    out = Path(rec["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "recipe.log"
    state_path = out / "recipe_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() and not force else {"stages": {}}

    def save_state():
        tmp = state_path.with_name(state_path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, state_path)

    def say(msg: str):
        print(msg, flush=True)
        with open(log_file, "a") as f:
            f.write(msg + "\n")

    say(f"recipe {path} -> {out} (stages: {', '.join(rec['stages'])})")
    for name in rec["stages"]:
        done = state["stages"].get(name, {})
        if done.get("done"):
            say(f"[{name}] done before ({done.get('seconds', 0):.0f} s): skipped")
            continue
        t0 = time.perf_counter()
        info: dict = {}
        if name == "data":
            info = build_data(rec, out)
        elif name == "rejection":
            cfg = _merge({"model": dict(r["model"], vocab_size=rec["vocab_size"]),
                          "data": {"tokenizer": str(out / "data" / "tok"), "builtin_corpus": False},
                          "grpo": {"template": "chat"},
                          "rejection": {"checkpoint": str(out / "r1_grpo" / "final"),
                                        "tasks": str(out / "data" / "tasks.jsonl"),
                                        "output": str(out / "rejection" / "traces.jsonl"), "seed": rec["seed"]}},
                         r["stages"].get("rejection") or {})
            (out / "rejection").mkdir(exist_ok=True)
            cfg_path = out / "rejection" / "config.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            code = _run([sys.executable, "-m", "megads", "rejection-sample", str(cfg_path), "--force"], log_file)
            if code != 0:
                say(f"[{name}] failed (exit {code}); see {log_file}")
                return code
            info = json.loads((out / "rejection" / "traces.jsonl.stats.json").read_text())
            info = {k: info[k] for k in ("prompts", "samples", "kept", "pass_rate", "dropped", "pass_histogram")}
        else:
            cfg = stage_config(r, name, out)
            stage_dir = out / name
            stage_dir.mkdir(exist_ok=True)
            cfg_path = stage_dir / "config.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            code = _run(_megads(rec, ["train", str(cfg_path)]), log_file, rec["nproc"])
            if code != 0:
                say(f"[{name}] failed (exit {code}); see {log_file}")
                return code
            info = heldout(stage_dir / "final", out, _template(name), rec)
            info["steps"] = cfg["train"].get("max_steps")
        info["seconds"] = time.perf_counter() - t0 + done.get("seconds_before", 0.0)
        info["done"] = True
        state["stages"][name] = info
        save_state()
        line = f"[{name}] {info['seconds']:.0f} s"
        if "heldout_accuracy" in info:
            line += f": held-out accuracy {info['heldout_accuracy']:.3f}, format {info['format_rate']:.3f}"
        elif name == "rejection":
            line += f": kept {info['kept']} of {info['samples']} samples (pass rate {info['pass_rate']:.3f})"
        say(line)
    write_summary(out, state, rec, say)
    return 0


def write_summary(out: Path, state: dict, rec: dict, say=print) -> None:
    rows = []
    for name in rec["stages"]:
        s = state["stages"].get(name)
        if not s or "heldout_accuracy" not in s:
            continue
        rows.append({"name": name, "heldout_accuracy": s["heldout_accuracy"], "format_rate": s["format_rate"],
                     "steps": s.get("steps"), "seconds": s["seconds"]})
    summary = {"stages": rows, "rejection": {k: v for k, v in state["stages"].get("rejection", {}).items()
                                             if k != "done"},
               "total_seconds": sum(s.get("seconds", 0.0) for s in state["stages"].values())}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    say("| stage | held-out accuracy | format rate | steps | seconds |")
    say("|---|---|---|---|---|")
    for x in rows:
        say(f"| {x['name']} | {x['heldout_accuracy']:.3f} | {x['format_rate']:.3f} | {x['steps'] or ''} | {x['seconds']:.0f} |")
    say(f"total {summary['total_seconds']:.0f} s; summary: {out / 'summary.json'}")
    try:
        plot(out, rows)
        say(f"plots: {out / 'heldout.png'}, {out / 'grpo_steps.png'}")
    except Exception as e:  # plotting must not lose the results
        say(f"plots not written ({type(e).__name__}: {e})")


def plot(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 3.5))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["heldout_accuracy"] for r in rows], 0.4, label="held-out accuracy")
    ax.bar(x + 0.2, [r["format_rate"] for r in rows], 0.4, label="format rate")
    ax.set_xticks(x, [r["name"] for r in rows], rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "heldout.png", dpi=100)
    plt.close(fig)
    keys = [("reward/total", "reward"), ("grpo/kl", "KL"), ("rollout/length_mean", "length"),
            ("clip", "clip fraction")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for name in GRPO_STAGES:
        f = out / name / "metrics.jsonl"
        if not f.is_file():
            continue
        recs = [json.loads(line) for line in f.read_text().splitlines()]
        recs = [r for r in recs if "reward/total" in r or "grpo/clip_low" in r]
        steps = [r["step"] for r in recs]
        for ax, (k, label) in zip(axes, keys):
            if k == "clip":
                ys = [r.get("grpo/clip_low", 0) + r.get("grpo/clip_high", 0) for r in recs]
            else:
                ys = [r.get(k, float("nan")) for r in recs]
            ax.plot(steps, ys, label=name)
            ax.set_title(label)
            ax.set_xlabel("step")
    if axes[0].lines:
        axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "grpo_steps.png", dpi=100)
    plt.close(fig)
