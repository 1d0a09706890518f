"""The decode step with fixed shapes: the same tensors and host values at every step.

`generate`'s plain step grows with the context (it attends over the filled cache positions,
sliced by a host integer), so it can be neither captured as a CUDA graph nor compiled without
recompiling. `StaticDecode` runs the step on buffers allocated once: the token and position of
every row, the cache position to write (a device tensor: an index_put_ into the cache, which
torch.compile keeps in place) and the generation's key mask [B, max_len]; attention runs over
the whole cache, unfilled positions masked out. Its modes:

- "static": those fixed shapes, eager ops (a reference: it equals the plain step);
- "compile": the step through torch.compile, traced once for the whole generation;
- "graph": on CUDA, the step captured once as a CUDA graph (after warm-up runs on a side stream)
  and replayed at every step: one launch per token instead of hundreds of kernels, and no
  allocation. Used by `generate` by default on CUDA where the model allows it (`graph_support`).

The step returns the last position's logits [B, V] float32 in a buffer the next call overwrites.
"""
from __future__ import annotations

import torch

MODES = ("static", "compile", "graph")


def graph_support(model, cache=None, device=None) -> str | None:
    """Why the fixed-shape step cannot run for this model (None where it can): the MHA baseline's
    cache, a naive cache, int8 weights (their grouped product reads the expert offsets on the host),
    a model split over tensor- or expert-parallel ranks (expert all-to-all sizes are host values;
    collectives are not captured here) or a pipeline stage; with `device` (the "graph" mode), also
    a device that is not CUDA, or MoE ops that would take the torch path there (its bincount reads
    the host). Data-parallel replicas, each with the whole model, can use it."""
    cfg = model.cfg
    if cfg.attention == "mha":
        return "the MHA baseline's cache has no fixed-shape step"
    if cache is not None and getattr(cache, "naive", False):
        return "a naive cache expands the latents at every step"
    if any(name.endswith("_int8") for name, _ in model.named_buffers()):
        return "int8 weights read the expert offsets on the host"
    from megads.model.moe import LocalDispatcher
    from megads.parallel.tensor import group_size

    if group_size(getattr(model, "tp_group", None)) > 1:
        return "a model split over tensor-parallel ranks (its collectives are not captured here)"
    if any(not isinstance(m.dispatcher, LocalDispatcher) for m in model.moe_layers()):
        return "experts split over ranks (the all-to-all sizes are host values)"
    if not getattr(model, "is_full", True):
        return "a pipeline stage holds part of the model"
    if device is not None and torch.device(device).type != "cuda":
        return "CUDA graphs need a CUDA device"
    if device is not None and model.moe_layers():
        from megads import ops
        from megads.ops import native

        if ops.backend() != "native" or not native.has_kernels(device):
            # the torch routing path sizes its counts with bincount, a host read on CUDA
            return "the MoE ops run the torch path here (build megads._C with its CUDA kernels)"
    return None


def _step(model, cache, tokens, positions, index, mask):
    return model(tokens, positions=positions, cache=cache, attention_mask=mask, cache_index=index)[:, -1]


_COMPILED = None


def _compiled_step():
    """One torch.compile'd step for the process: a later generation of the same model and shapes
    (the next GRPO rollout batch) reuses its graph instead of compiling again."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_step)
    return _COMPILED


class StaticDecode:
    """One decode step of `model` over `cache` with key mask `mask` [B, max_len] (bool, on the
    device, updated in place by the caller before each step), in one of MODES."""

    def __init__(self, model, cache, mask: torch.Tensor, mode: str = "static"):
        if mode not in MODES:
            raise ValueError(f"decode mode must be one of {MODES}, got {mode!r}")
        if mode == "graph" and mask.device.type != "cuda":
            raise ValueError("decode mode 'graph' needs a CUDA device")
        why = graph_support(model, cache, mask.device if mode == "graph" else None)
        if why is not None:
            raise ValueError(f"no fixed-shape decode step: {why}")
        if mask.shape[1] != cache.max_len:
            raise ValueError(f"mask covers {mask.shape[1]} positions, the cache {cache.max_len}")
        B, device = mask.shape[0], mask.device
        self.model, self.cache, self.mask, self.mode = model, cache, mask, mode
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self._fn = _compiled_step() if mode == "compile" else _step
        self._graph = None
        self._out = None

    def _run(self):
        return self._fn(self.model, self.cache, self.tokens, self.positions, self.index, self.mask)

    def _capture(self) -> None:
        # warm-up runs on a side stream (lazy initialisation, allocator), then the capture. Each
        # writes this step's latents at the same cache position: the same values, so harmless.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._out = self._run()

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, index: int) -> torch.Tensor:
        """tokens, positions [B] (or [B, 1]) of the new token; index: its cache position (an int:
        written to the device buffer without a host read). Returns logits [B, V] float32, valid
        until the next call."""
        self.tokens.copy_(tokens.view(-1, 1))
        self.positions.copy_(positions.view(-1, 1))
        self.index.fill_(index)
        if self.mode != "graph":
            out = self._run()
        else:
            if self._graph is None:
                try:
                    self._capture()
                except RuntimeError as e:  # an op that reads the host or allocates outside the pool
                    import warnings

                    warnings.warn(f"decode step not captured as a CUDA graph, running it eagerly: {e}")
                    self.mode, self._graph = "static", None
                    torch.cuda.synchronize()
            if self._graph is not None:
                self._graph.replay()
                out = self._out
            else:
                out = self._run()
        self.cache.length = index + 1
        return out
