"""Pipeline bubble: measured idle fraction per schedule beside the theory, PP 2 and 4, m = 4, 8, 16.

Two measurements:

1. **Schedules alone** (`--synthetic`, the default table): torch's schedules (Schedule1F1B,
   ScheduleInterleaved1F1B with 2 virtual stages, ScheduleZBVZeroBubble, ScheduleDualPipeV) over
   stages whose compute is a fixed cost: forward F, input-gradient I and weight-gradient W (a
   sleep on the input path and one on the weight path, so the zero-bubble schedules can run W
   apart from I), real gloo sends between ranks. Costs are sleeps, so 4 ranks on 2 cores do not
   compete for the CPU and the figure is the schedule's own. Idle per rank = 1 - busy / wall,
   with busy from megads's timed PipelineStage (the trainer's own measurement).
   Theory, two ways: the closed forms (1F1B: (p-1)/(m+p-1); interleaved with v chunks:
   (p-1)/(v*m+p-1); both for equal stages), and a zero-latency replay of the schedule's own
   program (`schedule.pipeline_order`: each rank runs its actions in order, an action starts when
   its inputs are ready) with the stages' real costs: F, I, W everywhere but I = 0 on stage 0,
   whose input is data (as in a real model: the first stage computes no input gradient).
2. **The trainer** (`--real`): megads's Trainer at PP2 (tiny MoE model, 1 thread per rank), the
   logged `pp_idle/rank*` for each schedule and m.

    python bench/pipeline.py [--ranks 2 4] [--micro 4 8 16] [--cost-ms 10] [--real]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEDULES = ("1f1b", "interleaved", "zbv", "dualpipev")


# ------------------------------------------------------------------ theory
def closed_form(schedule: str, p: int, m: int, v: int) -> float | None:
    if schedule == "1f1b":
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved":
        return (p - 1) / (v * m + p - 1)
    return None


def order_1f1b(p: int, m: int) -> dict:
    """1F1B's program: rank r runs min(p-r-1, m) warm-up forwards, then one forward and one
    backward in turn, then the remaining backwards."""
    from torch.distributed.pipelining.schedules import BACKWARD_INPUT, FORWARD, _Action

    FULL = type(FORWARD)("B")
    out = {}
    for r in range(p):
        warm = min(p - r - 1, m)
        acts = [_Action(r, FORWARD, i) for i in range(warm)]
        f, b = warm, 0
        while b < m:
            if f < m:
                acts.append(_Action(r, FORWARD, f))
                f += 1
            acts.append(_Action(r, FULL, b))
            b += 1
        out[r] = acts
    assert BACKWARD_INPUT.value == "I"
    return out


def replay(order: dict, cost) -> list[float]:
    """Idle fraction of each rank when it runs its actions of `order` (rank -> [_Action | None])
    in order, each as soon as its inputs exist, with no communication time; cost(type, stage)
    is the seconds of one action ("F", "I", "W", "B")."""
    kinds = {"F", "I", "W", "B", "OVERLAP_F_B"}
    todo = {r: [a for a in acts if a is not None and a.computation_type.value in kinds] for r, acts in order.items()}
    done: dict = {}  # (type, stage, mb) -> finish time
    free = {r: 0.0 for r in todo}
    busy = {r: 0.0 for r in todo}
    last_stage = max(a.stage_index for acts in todo.values() for a in acts)

    def ready(a):
        t, s, mb = a.computation_type.value, a.stage_index, a.microbatch_index
        if t == "F":
            return 0.0 if s == 0 else done.get(("F", s - 1, mb))
        if t in ("I", "B"):
            need = [done.get(("F", s, mb))]
            if s < last_stage:
                need.append(done.get(("I", s + 1, mb)))
            return None if any(x is None for x in need) else max(need)
        if t == "W":
            return done.get(("I", s, mb))
        return None

    def finish(a, at):
        t, s, mb = a.computation_type.value, a.stage_index, a.microbatch_index
        done[(t, s, mb)] = at
        if t == "B":  # a full backward is its input and weight parts
            done[("I", s, mb)] = done[("W", s, mb)] = at

    while any(todo.values()):
        progressed = False
        for r, acts in todo.items():
            while acts:
                a = acts[0]
                parts = list(a.sub_actions) if a.computation_type.value == "OVERLAP_F_B" else [a]
                starts = [ready(x) for x in parts]
                if any(x is None for x in starts):
                    break
                at = max([free[r]] + starts)
                for x in parts:  # (no overlap on one device here: one after the other)
                    dt = cost(x.computation_type.value, x.stage_index)
                    at += dt
                    busy[r] += dt
                    finish(x, at)
                free[r] = at
                acts.pop(0)
                progressed = True
        if not progressed:
            raise RuntimeError("schedule replay deadlocked")
    span = max(free.values())
    return [1.0 - busy[r] / span for r in sorted(busy)]


# ------------------------------------------------------------------ worker (one rank)
def _sleep_stage(f_s: float, i_s: float, w_s: float, last: bool):
    import torch
    import torch.nn as nn

    class InputPath(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            time.sleep(f_s)
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            time.sleep(i_s)
            return g.contiguous()  # (the gradient of a sum is an expanded view; it is sent)

    class WeightPath(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            return w.clone()

        @staticmethod
        def backward(ctx, g):
            time.sleep(w_s)
            return g

    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            y = InputPath.apply(x) + WeightPath.apply(self.w) * 0.0
            return y.sum() if last else y  # (not a view: zero-bubble schedules detach_() outputs)

    return Stage()


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import schedules

    from megads.parallel.pipeline import SCHEDULES as NAMES, _timed_stage_class, rank_stages

    dist.init_process_group("gloo")
    rank, p = dist.get_rank(), dist.get_world_size()
    c = args.cost_ms / 1000.0
    TimedStage = _timed_stage_class()
    rows = []
    for sched in SCHEDULES:
        v = 1 if sched == "1f1b" else 2
        n = p * v
        for m in args.micro:
            mods = []
            for s in rank_stages(sched, p, v, rank):
                mods.append((s, _sleep_stage(c, c, c, s == n - 1)))
            x = torch.zeros(2, 4)
            act = torch.zeros(2, 4, requires_grad=True)  # an activation: its gradient goes back
            stages = [TimedStage(mod, s, n, torch.device("cpu"), input_args=(x if s == 0 else act,),
                                 output_args=(torch.zeros((), requires_grad=True) if s == n - 1 else act))
                      for s, mod in mods]
            cls = getattr(schedules, NAMES[sched])
            try:
                sch = cls(stages[0] if sched == "1f1b" else stages, n_microbatches=m,
                          loss_fn=lambda out, target: out, scale_grads=False)
            except ValueError as e:  # (DualPipeV needs at least as many micro-batches as stages)
                if rank == 0:
                    rows.append({"pp": p, "schedule": sched, "v": v, "m": m, "error": str(e)})
                continue
            idle = []  # per step: this rank's compute time, its wall time
            for it in range(args.steps + 1):
                for st in stages:
                    st.busy = 0.0
                dist.barrier()
                t0 = time.perf_counter()
                inp = (torch.zeros(2 * m, 4),) if 0 in [s for s, _ in mods] else ()
                sch.step(*inp, target=torch.zeros(m) if n - 1 in [s for s, _ in mods] else None,
                         return_outputs=False)
                wall = time.perf_counter() - t0
                if it:  # the first step is a warm-up
                    idle.append((sum(st.busy for st in stages), wall))
            got = [None] * p
            dist.all_gather_object(got, idle)
            # idle = 1 - a rank's compute / the step's wall time (the slowest rank's), as the trainer logs it
            walls = [max(got[r][k][1] for r in range(p)) for k in range(args.steps)]
            got = [statistics.mean(1.0 - got[r][k][0] / walls[k] for k in range(args.steps)) for r in range(p)]
            if rank == 0:
                # (torch 2.13's Schedule1F1B.pipeline_order is only a sketch for printing: its
                # rank 1 runs micro-batch 4 of 0..3; the 1F1B order is written out here instead)
                order = order_1f1b(p, m) if sched == "1f1b" else sch.pipeline_order
                # stage 0 computes no input gradient (its input is data): I = 0 there
                def cost(kind, stage):
                    return {"F": c, "I": c if stage else 0.0, "W": c, "B": 2 * c if stage else c}[kind]

                try:
                    sim = replay(order, cost)
                except RuntimeError as e:  # (kept in the table as "-", with the program for a look)
                    sim = None
                    print(f"replay of {sched} m={m}: {e}: {dict((r, [str(x) for x in o]) for r, o in order.items())}")
                rows.append({"pp": p, "schedule": sched, "v": v, "m": m, "measured": got,
                             "closed_form": closed_form(sched, p, m, v), "replay": sim})
    if rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(p: int, a) -> list[dict]:
    out = Path(f"/tmp/megads_bench_pipeline_{p}.json")
    port = _port()
    procs = []
    for r in range(p):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(p), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--out", str(out), "--cost-ms",
                                       str(a.cost_ms), "--steps", str(a.steps), "--micro", *map(str, a.micro)],
                                      env=env))
    assert [q.wait(timeout=1800) for q in procs] == [0] * p
    return json.loads(out.read_text())


def real(a) -> list[dict]:
    """The trainer's logged idle fraction at PP2 (tiny MoE, synthetic data, 1 thread per rank)."""
    sys.path.insert(0, str(ROOT / "tests" / "parallel"))
    import tempfile

    from test_equivalence import run_layout

    rows = []
    for sched in SCHEDULES:
        for m in a.micro:
            extra = ["parallel.pp=2", "model.num_layers=4", "model.hidden_size=256", "model.intermediate_size=512",
                     "model.moe_intermediate_size=128", "model.max_seq_len=128", "train.seq_len=128",
                     f"train.global_batch_size={2 * m}", "train.max_steps=4", f"parallel.pp_schedule={sched}"]
            if sched != "1f1b":
                extra.append("parallel.vpp=2")
            with tempfile.TemporaryDirectory() as tmp:
                got = run_layout(2, 1, 1, 0, Path(tmp), extra=extra)
            hist = got["history"][1:]  # step 1 builds the stages
            idle = [statistics.mean(h[f"pp_idle/rank{r}"] for h in hist) for r in range(2)]
            v = 1 if sched == "1f1b" else 2
            rows.append({"pp": 2, "schedule": sched, "v": v, "m": m, "measured": idle,
                         "closed_form": closed_form(sched, 2, m, v), "step_s": statistics.mean(h["step_time_s"] for h in hist)})
    return rows


def table(rows, title):
    print(f"\n{title}\n")
    print("| PP | schedule | m | measured idle per rank | mean | closed form | replay of torch's program |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['pp']} | {r['schedule']} | {r['m']} | not run: {r['error']} | | | |")
            continue
        meas = ", ".join(f"{x:.3f}" for x in r["measured"])
        cf = "-" if r.get("closed_form") is None else f"{r['closed_form']:.3f}"
        rp = r.get("replay")
        rp = "-" if rp is None else f"{statistics.mean(rp):.3f} ({', '.join(f'{x:.3f}' for x in rp)})"
        name = r["schedule"] + (f" (v={r['v']})" if r["v"] > 1 else "")
        print(f"| {r['pp']} | {name} | {r['m']} | {meas} | {statistics.mean(r['measured']):.3f} | {cf} | {rp} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="")
    ap.add_argument("--ranks", type=int, nargs="*", default=[2, 4], help="pipeline sizes of the synthetic table (none: skip it)")
    ap.add_argument("--micro", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--cost-ms", type=float, default=30.0, help="F = I = W cost of a stage per micro-batch")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--real", action="store_true", help="also the trainer at PP2 (tiny MoE model)")
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    for p in a.ranks:
        table(launch(p, a), f"Schedules alone, PP{p}, F = I = W = {a.cost_ms:g} ms per stage and micro-batch")
    if a.real:
        table(real(a), "The trainer at PP2 (small MoE: 4 blocks, hidden 256, 8 experts, seq 128, 2 sequences a "
                       "micro-batch, 1 thread per rank; steps 2-4)")


if __name__ == "__main__":
    main()
