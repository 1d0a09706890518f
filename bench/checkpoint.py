"""What a verified, atomic checkpoint costs beside DeepSpeed's own save, on this machine.

One process, the `small` preset (48.6M parameters; fp32 weights + AdamW moments, ~0.6 GB a
checkpoint), one optimizer step so the optimizer state exists, then per repetition:

- DeepSpeed alone: `engine.save_checkpoint` into a fresh tag (the peer);
- megads: `megads.checkpoint.store.save_checkpoint` (the same DeepSpeed files, plus RNG/rank file,
  trainer state, a SHA-256 manifest of every file, fsync, rename, COMPLETE);
- verify: `megads checkpoint verify` logic (sizes + SHA-256 of every file);
- resume: manifest check + trainer state + engine and RNG load (`read_trainer_state` +
  `load_checkpoint`).

    python bench/checkpoint.py [--preset small] [--reps 3]
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
from megads.checkpoint import manifest, store  # noqa: E402
from megads.config import load_config  # noqa: E402
from megads.parallel import state as pstate  # noqa: E402
from megads.train.loop import Trainer  # noqa: E402


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29611")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        out = Path(tmp) / "run"
        sets = [f"model.preset={a.preset}", "train.max_steps=1", "train.seq_len=64", "train.micro_batch_size=2",
                "train.global_batch_size=2", "train.eval_interval=1000", "train.save_interval=1000",
                "train.samples_at_end=0", "train.progress=false", "train.tensorboard=false",
                f"train.output_dir={out}", "data.paths=[synthetic]"]
        cfg = load_config(ROOT / "configs" / "tiny.yaml", sets)
        pstate.init_distributed("gloo", 300)
        data = (Synthetic(8, 64, cfg.model.vocab_size, 1), None, None)
        tr = Trainer(cfg, resume="none", datasets=data)
        tr.train()  # one step (and its end-of-run save): optimizer moments exist
        times = {"DeepSpeed save_checkpoint": [], "megads save (manifest, atomic)": [],
                 "verify (sizes + SHA-256)": [], "resume load (verify + engine + RNG)": []}
        size = 0
        for r in range(a.reps):
            t0 = time.perf_counter()
            tr.engine.save_checkpoint(str(Path(tmp) / "plain"), tag=f"t{r}", save_latest=False)
            times["DeepSpeed save_checkpoint"].append(time.perf_counter() - t0)
            plain_bytes = dir_bytes(Path(tmp) / "plain" / f"t{r}")
            state = {"step": 10 + r, "run_id": tr.run_id, "config": cfg.to_dict(), "layout": dict(vars(tr.ps.layout))}
            t0 = time.perf_counter()
            path = store.save_checkpoint(tr.engine, str(out), 10 + r, state, keep_last=100)
            times["megads save (manifest, atomic)"].append(time.perf_counter() - t0)
            size = dir_bytes(path)
            t0 = time.perf_counter()
            manifest.verify(path)
            times["verify (sizes + SHA-256)"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            store.read_trainer_state(path)
            store.load_checkpoint(tr.engine, path)
            times["resume load (verify + engine + RNG)"].append(time.perf_counter() - t0)
        n_params = sum(p.numel() for p in tr.model.parameters())
        print(f"preset {a.preset}: {n_params / 1e6:.1f}M parameters; DeepSpeed's files {plain_bytes / 1e6:,.0f} MB, "
              f"megads checkpoint {size / 1e6:,.0f} MB; median of {a.reps}; {torch.get_num_threads()} threads\n")
        print("| operation | seconds | MB/s |")
        print("|---|---|---|")
        for k, v in times.items():
            m = statistics.median(v)
            print(f"| {k} | {m:.2f} | {size / 1e6 / m:,.0f} |")
        base = statistics.median(times["DeepSpeed save_checkpoint"])
        ours = statistics.median(times["megads save (manifest, atomic)"])
        print(f"\nmegads save / DeepSpeed save: {ours / base:.2f}x")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
