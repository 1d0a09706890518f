"""Process groups: the one place that knows the rank layout.

Megatron's order: tensor-parallel ranks adjacent, then data-parallel, then pipeline:
    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank
Experts are folded over the tp*dp ranks of a pipeline stage: within a stage, expert-parallel
ranks are adjacent and the expert-data-parallel (EDP) group joins ranks holding the same
experts, so attention/dense layers run TP x DP and routed experts run EP x EDP with
EDP = TP * DP / EP. Dense gradients reduce over DP, expert gradients over EDP.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field

import torch.distributed as dist

from megads.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Layout:
    """Pure arithmetic of the rank layout (testable without processes)."""

    world: int
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self):
        if self.world % (self.tp * self.pp):
            raise ConfigError(f"parallel: world size {self.world} is not divisible by tp*pp = {self.tp}*{self.pp}")
        self.dp = self.world // (self.tp * self.pp)
        stage = self.tp * self.dp
        if stage % self.ep:
            raise ConfigError(f"parallel.ep: {self.ep} must divide tp*dp = {stage} (ranks of a pipeline stage)")
        self.edp = stage // self.ep

    def coords(self, rank: int) -> dict:
        stage = self.tp * self.dp
        pp_rank, r = divmod(rank, stage)
        dp_rank, tp_rank = divmod(r, self.tp)
        edp_rank, ep_rank = divmod(r, self.ep)
        return dict(tp=tp_rank, dp=dp_rank, pp=pp_rank, ep=ep_rank, edp=edp_rank)

    def groups(self) -> dict[str, list[list[int]]]:
        """Every group of each kind, as lists of global ranks."""
        stage = self.tp * self.dp
        out: dict[str, list[list[int]]] = {k: [] for k in ("tp", "dp", "pp", "ep", "edp", "mp", "embed")}
        for p in range(self.pp):
            base = p * stage
            for d in range(self.dp):
                out["tp"].append([base + d * self.tp + t for t in range(self.tp)])
            for t in range(self.tp):
                out["dp"].append([base + d * self.tp + t for d in range(self.dp)])
            for e in range(self.edp):
                out["ep"].append([base + e * self.ep + i for i in range(self.ep)])
            for i in range(self.ep):
                out["edp"].append([base + e * self.ep + i for e in range(self.edp)])
        for r in range(stage):
            out["pp"].append([p * stage + r for p in range(self.pp)])
            if self.pp > 1:  # first and last pipeline rank: the embedding's two copies (Megatron)
                out["embed"].append([r, (self.pp - 1) * stage + r])
        # model-parallel group (tp x pp) for DeepSpeed's mpu
        for d in range(self.dp):
            out["mp"].append(sorted(p * stage + d * self.tp + t for p in range(self.pp) for t in range(self.tp)))
        return out


@dataclass
class ParallelState:
    layout: Layout
    rank: int
    groups: dict = field(default_factory=dict)  # kind -> this rank's ProcessGroup (None if size 1 / no dist)

    def __getattr__(self, name):
        if name.endswith("_rank") and name[:-5] in ("tp", "dp", "pp", "ep", "edp"):
            return self.layout.coords(self.rank)[name[:-5]]
        raise AttributeError(name)

    def group(self, kind: str):
        """ProcessGroup of this rank. 'router': the ranks whose expert counts are summed for the
        bias update (those that route distinct tokens: the data-parallel group)."""
        if kind == "router":
            kind = "dp"
        return self.groups.get(kind)


_STATE: ParallelState | None = None


def initialize(tp: int = 1, pp: int = 1, ep: int = 1) -> ParallelState:
    """Build every group from the initialised default process group (or a 1-process layout)."""
    global _STATE
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    layout = Layout(world, tp, pp, ep)
    groups = {}
    if dist.is_initialized():
        for kind, lists in layout.groups().items():
            for ranks in lists:  # every rank must create every group, in the same order
                g = dist.new_group(ranks)
                if rank in ranks:
                    groups[kind] = g
    _STATE = ParallelState(layout, rank, groups)
    return _STATE


def get() -> ParallelState:
    if _STATE is None:
        return initialize()
    return _STATE


def destroy() -> None:
    global _STATE
    _STATE = None


class MPU:
    """The `mpu` object DeepSpeed asks for: model-parallel and data-parallel groups."""

    def __init__(self, state: ParallelState):
        self.s = state

    def get_model_parallel_rank(self):
        return dist.get_rank(self.s.group("mp")) if self.s.group("mp") is not None else 0

    def get_model_parallel_world_size(self):
        return self.s.layout.tp * self.s.layout.pp

    def get_model_parallel_group(self):
        return self.s.group("mp")

    def get_data_parallel_rank(self):
        return self.s.dp_rank

    def get_data_parallel_world_size(self):
        return self.s.layout.dp

    def get_data_parallel_group(self):
        return self.s.group("dp")

    # DeepSpeed also probes these names
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


def without_shm_op() -> None:
    """DeepSpeed's CPU back end JIT-builds a shared-memory all-reduce op whenever it sets up its
    communication (~35 s the first time, in ~/.cache/torch_extensions) and maps 69 MB per rank in
    /dev/shm that it never unlinks: every run leaks that RAM, and a start killed mid-build leaves a
    lock on which every later start waits forever. The op serves only `inference_all_reduce`,
    which megads never calls, so it is switched off (DeepSpeed then uses torch.distributed's
    all-reduce). Called before anything that may set up DeepSpeed's communication."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(backend: str = "auto", timeout_s: float = 600.0) -> tuple[int, int]:
    """Start torch.distributed from whatever launched us: the DeepSpeed launcher, torchrun,
    mpiexec (mpi4py discovery) or a plain `python` (a world of one, no process group).
    Returns (rank, world_size)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    mpi = "WORLD_SIZE" not in os.environ and any(
        k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"))
    if "WORLD_SIZE" not in os.environ and not mpi:
        # plain `python`: a world of one on a free local port
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    import deepspeed

    without_shm_op()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=mpi,
                               distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
                               timeout=datetime.timedelta(seconds=timeout_s), verbose=False)
    return dist.get_rank(), dist.get_world_size()
