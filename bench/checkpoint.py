"""What a sharded (DCP), verified, atomic checkpoint costs against its size, sync vs async,
beside DeepSpeed's own save, on this machine.

One process per model size (`--presets`: fp32 weights + AdamW moments), one optimizer step so
the optimizer state exists, then per repetition:

- DeepSpeed alone: `engine.save_checkpoint` into a fresh tag (the peer: per-layout files);
- megads sync: the trainer's save (torch.distributed.checkpoint files, trainer state, a SHA-256
  manifest of every file, fsync, rename, COMPLETE): the time training waits;
- megads async (`train.async_save`): the time training waits (gathering the state, DCP's
  staging copy, starting the background write), then the total until the checkpoint is
  complete (background write + hashing + manifest);
- resume load: manifest check (sizes + SHA-256) + trainer state + DCP read into the model and
  optimizer (`read_trainer_state` + `load_checkpoint`).

    python bench/checkpoint.py [--presets tiny small medium] [--reps 3]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "parallel"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from equiv_worker import Synthetic  # noqa: E402
from megads.checkpoint import store  # noqa: E402
from megads.config import load_config  # noqa: E402
from megads.parallel import state as pstate  # noqa: E402
from megads.train.loop import Trainer  # noqa: E402


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


PRESETS = {  # name -> model overrides (a config of ~200M parameters for the largest point)
    "tiny": ["model.preset=tiny"],
    "small": ["model.preset=small"],
    "medium": ["model.preset=small", "model.hidden_size=1024", "model.num_layers=8", "model.num_heads=8",
               "model.intermediate_size=2816", "model.moe_intermediate_size=512"],
}


def one(preset: str, reps: int, tmp: Path) -> dict:
    out = tmp / f"run-{preset}"
    sets = PRESETS[preset] + ["train.max_steps=1", "train.seq_len=64", "train.micro_batch_size=2",
                              "train.global_batch_size=2", "train.eval_interval=1000", "train.save_interval=1000",
                              "train.samples_at_end=0", "train.progress=false", "train.tensorboard=false",
                              f"train.output_dir={out}", "data.paths=[synthetic]", "train.keep_last=2"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", sets)
    data = (Synthetic(8, 64, cfg.model.vocab_size, 1), None, None)
    tr = Trainer(cfg, resume="none", datasets=data)
    tr.train()  # one step (and its end-of-run save): optimizer moments exist
    tr.saver.group = torch.distributed.new_group(backend="gloo")  # as train.async_save sets up
    times = {k: [] for k in ("DeepSpeed save_checkpoint", "megads save, sync", "megads async: training waits",
                             "megads async: until complete", "resume load (verify + DCP read)")}
    for r in range(reps):
        t0 = time.perf_counter()
        tr.engine.save_checkpoint(str(tmp / "plain"), tag=f"{preset}{r}", save_latest=False)
        times["DeepSpeed save_checkpoint"].append(time.perf_counter() - t0)
        plain = dir_bytes(tmp / "plain" / f"{preset}{r}")
        tr.step = 10 + 2 * r
        t0 = time.perf_counter()
        path = tr._save(wait=True)
        times["megads save, sync"].append(time.perf_counter() - t0)
        size = dir_bytes(path)
        tr.step += 1
        t0 = time.perf_counter()
        tr._save()
        times["megads async: training waits"].append(time.perf_counter() - t0)
        apath = tr._finish_pending()
        times["megads async: until complete"].append(time.perf_counter() - t0)
        assert apath is not None and (apath / "COMPLETE").is_file()
        t0 = time.perf_counter()
        store.read_trainer_state(path)
        store.load_checkpoint(path, tr.model, tr.optimizer, tr.saver.ds_optimizer(), tr.ps, same_layout=True)
        times["resume load (verify + DCP read)"].append(time.perf_counter() - t0)
    n = sum(p.numel() for p in tr.model.parameters())
    return {"preset": preset, "params": n, "bytes": size, "plain_bytes": plain,
            "times": {k: statistics.median(v) for k, v in times.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "medium"], choices=list(PRESETS))
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29611")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    pstate.init_distributed("gloo", 600)
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        for preset in a.presets:
            rows.append(one(preset, a.reps, Path(tmp)))
    keys = list(rows[0]["times"])
    print(f"one process, fp32 weights + AdamW moments, median of {a.reps}, {torch.get_num_threads()} threads\n")
    print("| model | params | megads checkpoint | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for r in rows:
        mb = r["bytes"] / 1e6
        cells = [f"{r['times'][k]:.2f} s ({mb / r['times'][k]:,.0f} MB/s)" for k in keys]
        print(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {mb:,.0f} MB (DeepSpeed's: {r['plain_bytes'] / 1e6:,.0f} MB) | "
              + " | ".join(cells) + " |")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
