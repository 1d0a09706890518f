"""Real two-node runs: two network namespaces joined by a veth pair (10.231.0.1 and 10.231.0.2,
the project's own test hosts), the tiny preset trained over TCP (gloo) between them:

* one DeepSpeed launcher per "node" (`--no_ssh --node_rank R`, launch/deepspeed_no_ssh.sh);
* one DeepSpeed launcher for both, with a hostfile naming the two nodes
  (launch/deepspeed_hostfile.sh); its pdsh is a stand-in that runs each node's command in that
  node's namespace instead of over ssh.

`TwoNodes` is also used by test_faults.py to cut the link mid-training."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 3
QUICK = ["train.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_interval=1000",
         "train.save_interval=1000", "train.samples_at_end=0", "train.progress=false", "train.tensorboard=false"]
ADDRS = ("10.231.0.1", "10.231.0.2")
IFACE = "megads0"  # the veth end's name inside each namespace (the same on both, like eth0)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


class TwoNodes:
    """Two network namespaces ("nodes") with a veth pair between them; lo up in both."""

    _count = 0

    def __init__(self):
        TwoNodes._count += 1
        tag = f"{os.getpid() % 100000}{TwoNodes._count}"
        self.ns = (f"mds{tag}a", f"mds{tag}b")
        self.dev = (f"mv{tag}a"[:15], f"mv{tag}b"[:15])  # names while in the root namespace
        self.addr = ADDRS
        self.iface = IFACE

    @staticmethod
    def unavailable() -> str | None:
        """Why namespaces cannot be made here (None when they can)."""
        if not shutil.which("ip"):
            return "the `ip` tool (iproute2) is not installed"
        if os.geteuid() != 0:
            return "creating network namespaces needs root"
        probe = f"mdsprobe{os.getpid()}"
        r = _ip("netns", "add", probe, check=False)
        if r.returncode:
            return f"`ip netns add` failed: {r.stderr.strip()}"
        _ip("netns", "del", probe, check=False)
        return None

    def __enter__(self) -> "TwoNodes":
        try:
            for ns in self.ns:
                _ip("netns", "add", ns)
            _ip("link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
            for ns, dev, addr in zip(self.ns, self.dev, self.addr):
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "link", "set", dev, "name", self.iface)
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", self.iface)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", self.iface, "up")
        except Exception:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in self.ns:  # deleting a namespace deletes its end of the veth pair, and so the pair
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.dev[0], check=False)  # if it never moved into a namespace

    def cut(self, node: int) -> None:
        """Pull the cable: take node's end of the veth pair down."""
        _ip("-n", self.ns[node], "link", "set", self.iface, "down")

    def popen(self, node: int, cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
        f = open(log, "w")
        return subprocess.Popen(["ip", "netns", "exec", self.ns[node], *cmd], cwd=str(ROOT), env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def env(self, **kw) -> dict:
        # DEEPSPEED by path, PATH untouched (see test_launch.env: PATH picks DeepSpeed's JIT ninja)
        return dict(os.environ, DEEPSPEED=str(BIN / "deepspeed"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                    PYTHONUNBUFFERED="1", MASTER_ADDR=self.addr[0], GLOO_SOCKET_IFNAME=self.iface,
                    **{k: str(v) for k, v in kw.items()})

    def launch(self, node: int, overrides: list[str], log: Path, port: int, nproc: int = 1) -> subprocess.Popen:
        """One DeepSpeed launcher on `node` (launch/deepspeed_no_ssh.sh), gloo over the veth."""
        env = self.env(NNODES=2, NODE_RANK=node, NPROC=nproc, MASTER_PORT=port)
        return self.popen(node, [str(ROOT / "launch" / "deepspeed_no_ssh.sh"), "configs/tiny.yaml",
                                 *[a for s in overrides for a in ("--set", s)]], env, log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # a port free here is as good as any inside a fresh namespace


def train_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append("timeout")
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return codes


def prepare_builtin_data() -> None:
    r = subprocess.run([sys.executable, "-m", "megads", "prepare-data", "configs/tiny.yaml"], cwd=str(ROOT),
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def two_nodes_ok():
    why = TwoNodes.unavailable()
    if why:
        pytest.skip(f"two-node test needs network namespaces: {why}")
    prepare_builtin_data()


def test_two_nodes_train_over_tcp(two_nodes_ok, tmp_path):
    out = tmp_path / "run"
    t0 = time.monotonic()
    with TwoNodes() as nodes:
        port = free_port()
        overrides = [*QUICK, f"train.max_steps={STEPS}", f"train.output_dir={out}", "parallel.timeout_s=120"]
        procs = [nodes.launch(n, overrides, tmp_path / f"node{n}.log", port) for n in (0, 1)]
        codes = wait_all(procs, timeout=300)
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    print(f"two nodes: exit codes {codes} in {time.monotonic() - t0:.1f} s")
    assert codes == [0, 0], f"exit codes {codes}\n--- node 0\n{logs[0][-3000:]}\n--- node 1\n{logs[1][-3000:]}"
    assert train_steps(out) == list(range(1, STEPS + 1)), logs[0][-3000:]
    # node 1's rank really ran in the other namespace and joined over the veth
    assert "node_rank=1" in logs[1] and "dist_world_size=2" in logs[1], logs[1][:3000]


FAKE_PDSH = """#!/usr/bin/env bash
# pdsh stand-in: `pdsh -S -f N -w host0,host1 CMD...` runs CMD (with %n = the host's index) in the
# network namespace named like the host, instead of over ssh. It never runs DeepSpeed's pkill.
set -u
hosts=
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in
        -w) hosts=$2; shift 2 ;;
        -f) shift 2 ;;
        *) shift ;;
    esac
done
cmd="$*"
[[ $cmd == pkill* ]] && exit 0
IFS=, read -r -a names <<<"$hosts"
pids=()
for i in "${!names[@]}"; do
    ip netns exec "${names[$i]}" bash -c "${cmd//%n/$i}" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def test_two_nodes_hostfile_launcher(two_nodes_ok, tmp_path):
    """launch/deepspeed_hostfile.sh: one launcher, a hostfile of the two nodes, pdsh starting
    each node's ranks (here: the stand-in above, entering the namespaces)."""
    out = tmp_path / "run"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "pdsh").write_text(FAKE_PDSH)
    (fake / "pdsh").chmod(0o755)
    t0 = time.monotonic()
    with TwoNodes() as nodes:
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("".join(f"{ns} slots=1\n" for ns in nodes.ns))
        overrides = [*QUICK, f"train.max_steps={STEPS}", f"train.output_dir={out}", "parallel.timeout_s=120"]
        env = nodes.env(HOSTFILE=hostfile, NNODES=2, NPROC=1, MASTER_PORT=free_port(), DS_ARGS="--no_ssh_check",
                        PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")  # adds pdsh only
        log = tmp_path / "launcher.log"
        p = subprocess.Popen([str(ROOT / "launch" / "deepspeed_hostfile.sh"), "configs/tiny.yaml",
                              *[a for s in overrides for a in ("--set", s)]], cwd=str(ROOT), env=env,
                             stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        codes = wait_all([p], timeout=300)
    text = log.read_text()
    print(f"hostfile + pdsh: exit codes {codes} in {time.monotonic() - t0:.1f} s")
    assert codes == [0], text[-4000:]
    assert train_steps(out) == list(range(1, STEPS + 1)), text[-3000:]
    assert "node_rank=0" in text and "node_rank=1" in text, text[:3000]
