"""Rank-0 observability: progress bar, TensorBoard scalars and images, metrics.jsonl.

Every figure logged per step goes to `<output_dir>/metrics.jsonl` (one JSON object a line, at
least step, loss, lr, grad_norm, tokens_per_s) and to TensorBoard under the same names.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def measure_peak_flops(n: int = 2048, reps: int = 5) -> float:
    """This machine's fp32 matmul rate (FLOP/s), the MFU denominator on CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def heatmap_image(load: np.ndarray) -> np.ndarray:
    """[L, E] expert loads -> an RGB image [3, H, W] (each row normalised by its mean; blue = under
    the mean, red = over), scaled up so small models stay visible."""
    rel = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-9)  # 1.0 = balanced
    t = np.clip(rel / 2.0, 0.0, 1.0)  # 0 .. 2x mean -> 0 .. 1
    img = np.stack([t, 1.0 - np.abs(t - 0.5) * 2, 1.0 - t])  # red, green, blue
    scale = max(1, 256 // max(load.shape))
    img = img.repeat(scale, axis=1).repeat(scale, axis=2)
    return img.astype(np.float32)


class Metrics:
    """Writes on rank 0 only; other ranks get a no-op object."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool, progress: bool, total_steps: int,
                 start_step: int, run_id: str = ""):
        self.enabled = enabled
        self.run_id = run_id
        self._write_failed = False
        self.writer = None
        self.bar = None
        self.file = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "metrics.jsonl", "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except Exception as e:  # tensorboard missing: keep training, say so
                log.warning("TensorBoard disabled: %s", e)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            unit="step", mininterval=0.5)

    def log_step(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append(record)
        step = record["step"]
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                 lr=f"{record['lr']:.2e}", refresh=False)

    def log_eval(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "valid_loss": loss, "valid_ppl": float(np.exp(min(loss, 50.0)))}
        self._append(rec)
        if self.writer is not None:
            self.writer.add_scalar("valid/loss", loss, step)
            self.writer.add_scalar("valid/ppl", rec["valid_ppl"], step)
        self.write(f"step {step}: valid loss {loss:.4f}, ppl {rec['valid_ppl']:.2f}")

    def log_eval_metrics(self, step: int, values: dict) -> None:
        """Held-out figures other than a loss (e.g. GRPO's accuracy and format rate): valid_<name>."""
        if not self.enabled:
            return
        self._append({"step": step, **{f"valid_{k}": v for k, v in values.items()}})
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"valid/{k}", v, step)
        self.write(f"step {step}: valid " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))

    def _append(self, record: dict) -> None:
        """One JSON line carrying the run id; a failed write (disk full) is reported once, not fatal:
        the checkpoint save is what must not fail silently."""
        try:
            self.file.write(json.dumps({**record, "run_id": self.run_id}) + "\n")
            self.file.flush()
        except OSError as e:
            if not self._write_failed:
                log.warning("metrics.jsonl: write failed (%s); metrics of this run may be incomplete", e.strerror)
            self._write_failed = True

    def log_expert_heatmap(self, step: int, load: np.ndarray) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image("experts/load", heatmap_image(load), step)

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        try:
            self.file.close()
        except OSError:
            pass
