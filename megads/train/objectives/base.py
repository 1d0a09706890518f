"""What a training stage adds to the one loop: how a batch is made and what its loss is.

The loop (megads/train/loop.py) owns the engine, micro-batches, the bad-step guard, the router-bias
update, eval, checkpoints, signals and metrics. An objective

- builds its datasets (`datasets`),
- turns rows of a dataset into a micro-batch of tensors (`collate`),
- counts, per loss term, the tokens a micro-batch contributes (`count`): the loop sums them over
  the step's micro-batches and the data-parallel ranks, so every loss is the mean over all
  counted tokens of the global batch, not a mean of per-rank means;
- runs the forward and returns (loss to backpropagate, metrics) given the step's per-micro-batch
  denominators (`forward`);
- reports step-level figures from the global counts (`step_metrics`).
"""
from __future__ import annotations

import abc

import torch


class Objective(abc.ABC):
    name = "base"
    # metrics averaged over micro-batches and data-parallel ranks (the rest come from step_metrics)
    averaged = ("loss",)

    def __init__(self, cfg, tokenizer=None):
        self.cfg = cfg
        self.tokenizer = tokenizer

    @abc.abstractmethod
    def datasets(self, loop):
        """(train, valid or None, tokenizer) for this stage."""
        ...

    def prepare(self, loop) -> str | None:
        """After the model is built (and resumed): stage set-up such as a reference model; returns
        a line for the log, or None."""
        return None

    @abc.abstractmethod
    def collate(self, rows: list[dict], device) -> dict:
        ...

    @abc.abstractmethod
    def count(self, batch: dict) -> torch.Tensor:
        """float64 [K] tokens counted by each loss term of this micro-batch."""
        ...

    def forward(self, engine, batch: dict, denom: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(loss, {name: detached scalar}) with loss term k = sum over tokens / denom[k]: the one
        model call `model_call` names, then `loss_of` its output."""
        args, kw = self.model_call(batch, denom)
        return self.loss_of(engine(*args, **kw), batch, denom)

    def model_call(self, batch: dict, denom: torch.Tensor) -> tuple[tuple, dict]:
        """(args, kwargs) of the policy model's one call for this micro-batch (denom None: a
        validation call, each micro-batch its own mean). Under pipeline
        parallelism every stage runs its blocks of this call and the last stage hands the output
        to `loss_of`."""
        raise NotImplementedError(f"train.stage {self.name} does not split its model call into stages")

    def loss_of(self, out, batch: dict, denom: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def eval_loss(self, engine, batch: dict) -> float:
        """A validation figure for one micro-batch (the main loss, per-micro mean)."""
        args, kw = self.model_call(batch, None)
        return self.eval_of(engine(*args, **kw), batch)

    def eval_of(self, out, batch: dict) -> float:
        """The validation figure from the output of `model_call(batch, None)`."""
        raise NotImplementedError

    def step_metrics(self, counts: torch.Tensor, world_tokens: int) -> dict:
        return {}

    def step_batches(self, loop, step: int) -> list[dict]:
        """This rank's `gas` micro-batches of optimizer step `step` (GRPO makes them by sampling)."""
        return [loop._batch(loop.train_ds, step, m, self.cfg.train.global_batch_size) for m in range(loop.gas)]

    def attach(self, loop, batches: list[dict]) -> list[dict]:
        """The micro-batches of a step (or a validation batch) with what the stage computes for
        all of them before the policy's pass (DPO under pipeline parallelism: the resident
        reference's log-probs, from its own pipeline)."""
        return batches

    # evaluate(loop) -> dict, where a stage's held-out figure is not a loss (GRPO: accuracy)
    evaluate = None

    def checkpoint_extra(self):
        """Per-rank state of the stage saved with each checkpoint (GRPO: the rollout buffer)."""
        return None

    def restore_extra(self, extra) -> None:
        pass


def jsonl_inputs(objective, loop, builtin_name: str, build_builtin) -> list[str]:
    """The stage's JSONL files (data.paths), or with data.builtin_corpus the builtin example file
    `builtin_name` (made by `build_builtin(path)` on rank 0) and the builtin tokenizer; sets
    `objective.tokenizer`. ConfigError when there is no data or no tokenizer."""
    from megads.data.tokenizer import load_tokenizer
    from megads.errors import ConfigError

    cfg = objective.cfg
    paths, tok_dir = list(cfg.data.paths), cfg.data.tokenizer
    if not paths and cfg.data.builtin_corpus:
        from megads.data import builtin_paths, prepare_builtin

        jsonl = f"{cfg.data.data_dir}/{builtin_name}"
        if loop.rank == 0:
            prepare_builtin(cfg.data)
            build_builtin(jsonl)
        loop._barrier()
        paths, tok_dir = [jsonl], builtin_paths(cfg.data)[1]
    if not paths:
        raise ConfigError(f"data.paths: train.stage {cfg.train.stage} needs JSONL files, or data.builtin_corpus: true")
    if objective.tokenizer is None:
        if not tok_dir:
            raise ConfigError(f"data.tokenizer: train.stage {cfg.train.stage} needs a tokenizer directory")
        objective.tokenizer = load_tokenizer(tok_dir)
    return paths


def on_rank0(loop, fn):
    """Collective: fn() on rank 0 (e.g. tokenising into the shared cache), its result on every
    rank; a user error there is raised on every rank alike."""
    from megads.errors import DataError, MegadsError

    result, err = None, None
    if loop.rank == 0:
        try:
            result = fn()
        except MegadsError as e:
            err = str(e)
    result, err = loop._from_rank0((result, err))
    if err is not None:
        e = DataError(err)
        e.every_rank = True
        raise e
    return result
