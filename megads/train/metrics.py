"""Rank-0 observability: progress bar, TensorBoard scalars and images, metrics.jsonl.

Every figure logged per step goes to `<output_dir>/metrics.jsonl` (one JSON object a line, at
least step, loss, lr, grad_norm, tokens_per_s) and to TensorBoard under the same names.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


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
        # the bar appears with the first step and closes with the last, so the start-up and closing
        # messages print as plain lines instead of redrawing it between them (_ProgressBar)
        self.progress = _ProgressBar(total_steps, start_step) if progress else None

    def log_step(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append(record)
        step = record["step"]
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, step)
        if self.progress is not None:
            self.bar = self.progress.update(step, record)

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

    def log_expert_heatmap(self, step: int, load: np.ndarray, image: bool = True) -> None:
        """The step's tokens per expert [L_moe, E]: a metrics.jsonl record {"step", "expert_load"}
        that `megads plot` draws its per-layer heatmaps from, and (`image`) a TensorBoard image."""
        if not self.enabled:
            return
        self._append({"step": step, "expert_load": np.asarray(load).round(3).tolist()})
        if self.writer is not None and image:
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
        if self.progress is not None:
            self.progress.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
        try:
            self.file.close()
        except OSError:
            pass


class _BarLogHandler(logging.Handler):
    """Log records (and captured warnings) printed through tqdm.write while the bar is shown, so a
    log line is printed above the bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class _ProgressBar:
    """The training progress bar of rank 0: created at the first logged step, closed at the last
    one (so the closing evaluation, final-model and sample lines follow it once instead of
    redrawing it after each), with logging and warnings routed above it while it is shown."""

    def __init__(self, total: int, start: int):
        self.total, self.start = total, start
        self.bar = None
        self.done = False
        self._swapped: list = []
        self._captured = False

    def update(self, step: int, record: dict):
        """Advance to `step`; returns the bar while it is shown (None once closed)."""
        if self.done:
            return None
        if self.bar is None:
            from tqdm import tqdm

            # into a file or pipe (a log, a sweep point) every redraw is a new line: one every 30 s there
            tty = getattr(sys.stderr, "isatty", lambda: False)()
            self.bar = tqdm(total=self.total, initial=self.start, desc="train", dynamic_ncols=True, unit="step",
                            mininterval=0.5 if tty else 30.0)
            self._route_logging()
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                             lr=f"{record['lr']:.2e}", refresh=False)
        if step >= self.total:
            self.close()
            return None
        return self.bar

    def _route_logging(self) -> None:
        root = logging.getLogger()
        for h in list(root.handlers):
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stderr, sys.stdout):
                bar_h = _BarLogHandler(h.level)
                bar_h.setFormatter(h.formatter)
                root.removeHandler(h)
                root.addHandler(bar_h)
                self._swapped.append((h, bar_h))
        logging.captureWarnings(True)
        self._captured = True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()
            self.bar.close()
            self.bar = None
        self.done = True
        if self._captured:
            logging.captureWarnings(False)
            self._captured = False
        root = logging.getLogger()
        for h, bar_h in self._swapped:
            root.removeHandler(bar_h)
            root.addHandler(h)
        self._swapped = []
