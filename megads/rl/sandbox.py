"""Runs untrusted, model-generated Python programs for the GRPO `code` reward (Linux only).

`run(source, stdin, limits)` executes one program and returns a `Result`; `pass_fraction` runs it
against `[{"input": ..., "output": ...}, ...]` and returns the share of tests it passes;
`SandboxPool` runs several programs at once. `capabilities()` says which protection layers this
host provides: it is measured once, at first use, by a probe program run in the sandbox, and
cached. A run never claims a layer the probe did not see working; when a layer that the probe
found stops working, the run fails (`Result.error`) instead of running with less.

How one program runs. The host thread starts a small bootstrap (`sys.executable -I -S -c`, empty
environment, its own session; the code is `_BOOT` below) that is the trusted part. As root it:

* unshares new network, PID, mount, IPC, UTS and cgroup namespaces (without root: a user
  namespace first that maps the user to itself, where the kernel allows unprivileged ones; the
  program has no capabilities in it after its exec). The network namespace holds only a loopback
  interface that is down: no TCP/UDP/DNS, no abstract unix sockets of the host;
* forks the namespace's init (PID 1), which makes every mount private, remounts the whole tree
  read-only and nosuid (mount_setattr; on kernels before 5.12 one bind remount per mount), mounts a fresh size-limited tmpfs (`Limits.scratch_mb`) owned by the
  sandbox uid on /tmp (also bound on /var/tmp and /dev/shm) as the scratch directory and cwd,
  an empty read-only tmpfs on /run (sockets of host daemons), and a new /proc that shows only the
  sandbox's processes;
* forks the program: own session and process group, rlimits (CPU, address space, processes,
  file size, open files, no core dumps), supplementary groups dropped, a per-slot non-root uid/gid
  (`UID_BASE` + slot: RLIMIT_NPROC binds and concurrent runs don't share a process budget or see
  each other), no-new-privileges, a seccomp filter (ptrace, process_vm_*, namespace creation,
  mount API, keyrings, bpf, perf, userfaultfd, io_uring, modules, kexec, swap, reboot, kill(-1)
  are refused; x86_64/aarch64), every descriptor but 0-2 closed, and then execs the interpreter
  (`-I`: no PYTHON* variables, no user site) on `main.py` in the scratch directory. The
  interpreter is the first of `INTERPRETERS` (default: sys.executable, its real path, the base
  interpreter of a venv, /usr/bin/python3) that the probe saw running as the sandbox uid: a venv
  under a directory other users cannot enter (/root is 0700) is skipped for /usr/bin/python3,
  whose packages are then what the program can import (`capabilities()["python"]`). Its
  environment is PATH, LANG, HOME/TMPDIR and single-thread BLAS settings, nothing of the host's;
  stdin is a read-only in-memory file holding exactly the test input (then EOF);
* enforces the wall-clock limit: on expiry it SIGKILLs the namespace's init, which makes the
  kernel kill every process of the namespace, setsid/double-forked ones included, and returns
  only when they are all gone. When the program exits normally, init exits too, with the same
  effect. After `run()` returns no process of the program survives, and the scratch tmpfs (with
  the mount namespace) is gone. The host keeps a second deadline (wall + `HOST_GRACE_S`) in case
  the bootstrap itself hangs, and then kills it and every process of the sandbox uid.
Stdout and stderr are read by the host thread; at most `Limits.output_bytes` of each is kept,
the rest is read and dropped (`Result.truncated`). Overhead is a few tens of ms per program
(mostly the two interpreter starts; see the tests).

What it protects against: programs that read the host's environment or secrets of other
processes, use the network (including local listeners and DNS), write or delete host files (the
whole tree is read-only and the uid owns nothing; /tmp, /var/tmp, /dev/shm are private), fill the
disk (the scratch is a size-limited tmpfs, file size is limited), exhaust memory (address space
limit per process: a run holds at most about nproc x memory_mb + scratch_mb), fork or thread bombs (RLIMIT_NPROC per slot uid), spin or sleep forever (CPU and wall
limits), leave daemons behind (PID namespace), signal or ptrace host processes or each other
(PID namespace, distinct uids, seccomp), escalate through setuid binaries (no-new-privs, nosuid)
or raise their limits, close or flood stdout/stderr.

What it does not protect against: kernel exploits (seccomp narrows the attack surface but this is
not a VM: use gVisor/Firecracker for hostile adversaries rather than reward hacking), side
channels (timing, cache, Spectre-style), reading world-readable host files (/etc, /usr, the
repo, site-packages: the filesystem is hidden only where it is not world-readable, e.g. /root),
connecting to world-writable unix sockets outside /run and /tmp, host memory taken by the scratch
tmpfs (bounded by `scratch_mb`) or by kernel objects, CPU contention between programs and with
the host (no cgroup: a program may use up to `cpu_s` in each of up to `nproc` processes within
`wall_s`; each run is its own session, hence its own scheduler autogroup where the kernel has
autogroups on, which shares the CPU between runs rather than between processes). Core dumps are off (RLIMIT_CORE 0, or 1 where core_pattern is a pipe: the kernel's
"no dump" value for pipe handlers).

Degraded hosts (see `capabilities()`): without root there is no separate uid, so RLIMIT_NPROC
does not separate runs and the program can touch the invoking user's files unless a user+mount
namespace makes the tree read-only (the program runs as that user, without capabilities);
without a PID namespace, leftovers are found through a child
subreaper and, with a separate uid, by killing every process of that uid; without a mount
namespace the scratch directory is a fresh host directory under the system temp dir (deleted
afterwards), /tmp is shared and the tree is not read-only; without a network namespace the
program has the host's network. Without a PID namespace *and* a separate uid the program can
signal the host's processes: `capabilities()["signals_isolated"]` is False then, and such a host
must not run untrusted code.
"""
from __future__ import annotations

import ast
import fcntl
import json
import logging
import os
import platform
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger(__name__)

UID_BASE = 60000     # slot i runs as uid/gid UID_BASE + i; keep the range free of real users
MAX_SLOTS = 256      # concurrent runs per host (all processes together: slots are flock'ed)
HOST_GRACE_S = 2.0   # the host's own deadline is wall_s + this (the bootstrap enforces wall_s)
# Interpreters for the program, in order; the first one the sandbox uid can run is used.
INTERPRETERS: list[str] = []   # empty: sys.executable, its real path, the base one, /usr/bin/python3
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
       "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

_NS = {"user": 0x10000000, "net": 0x40000000, "pid": 0x20000000, "mount": 0x00020000,
       "ipc": 0x08000000, "uts": 0x04000000, "cgroup": 0x02000000}


@dataclass
class Limits:
    cpu_s: float = 2.0           # RLIMIT_CPU per process (SIGXCPU, then SIGKILL a second later)
    wall_s: float = 5.0          # wall clock; then every process of the sandbox is killed
    memory_mb: int = 512         # RLIMIT_AS per process
    nproc: int = 16              # RLIMIT_NPROC of the slot uid (processes and threads)
    fsize_mb: int = 8            # RLIMIT_FSIZE
    nofile: int = 64             # RLIMIT_NOFILE
    output_bytes: int = 1 << 20  # stdout / stderr kept at most, each (the rest is dropped)
    scratch_mb: int = 64         # size of the scratch tmpfs (/tmp, /var/tmp, /dev/shm together)


@dataclass
class Result:
    stdout: str
    stderr: str
    returncode: int | None       # exit status; None when killed by a signal or not started
    timed_out: bool              # killed at the wall-clock limit
    wall_s: float                # seconds run() took, sandbox setup and teardown included
    truncated: bool = False      # stdout or stderr was longer than output_bytes
    signal: int | None = None    # signal that ended the program (SIGKILL on a timeout)
    cpu_s: float = 0.0           # user + system CPU of the program's main process
    max_rss_mb: float = 0.0
    error: str | None = None     # the sandbox failed (not the program); nothing was judged

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.error is None


# ---------------------------------------------------------------------------------------------
# The bootstrap: run as `python -I -S -c _BOOT repr(cfg)` with fd 0 the program's stdin, 1/2 the
# output pipes, cfg["src_fd"] the source and cfg["status_fd"] a pipe for status lines (dict literals).

_KILL_UID = r'''
import os, time
def uid_pids(uid):
    """Living processes whose real, effective or saved uid is `uid` (from status, not the owner of
    /proc/PID, which is root for a non-dumpable process); zombies are dead already."""
    me, want, out = os.getpid(), str(uid).encode(), []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != me:
            try:
                with open("/proc/" + d + "/status", "rb") as f:
                    for line in f:
                        if line.startswith(b"State:") and line.split()[1] in (b"Z", b"X"):
                            break
                        if line.startswith(b"Uid:"):
                            if want in line.split()[1:4]:
                                out.append(int(d))
                            break
            except (OSError, IndexError):
                pass
    return out
def kill_uid(uid, gid, limit_s=5.0):
    """Fork, become `uid` and kill(-1) until no process of it is left: kill(-1) reaches exactly
    the processes this uid may signal, so no pid can be confused with another one."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([]); os.setresgid(gid, gid, gid); os.setresuid(uid, uid, uid)
            end = time.monotonic() + limit_s
            while uid_pids(uid) and time.monotonic() < end:
                try:
                    os.kill(-1, 9)
                except OSError:
                    pass
                time.sleep(0.001)
            os._exit(0 if not uid_pids(uid) else 1)
        except BaseException:
            os._exit(2)
    return os.waitpid(pid, 0)[1] == 0
'''

_BOOT = "#megads-sandbox-boot" + _KILL_UID + r'''
import _signal, ctypes, resource, select, sys
C = eval(sys.argv[1])   # a literal written by the host (json and signal would cost ~10 ms of imports)
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long
ST, LENIENT, NS = C["status_fd"], C["probe"], C["ns"]
got, why = {}, {}

def say(**kw):
    try:
        os.write(ST, (repr(kw) + "\n").encode())
    except OSError:
        pass

def check(rc, what):
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, what + ": " + os.strerror(e))

def layer(name, fn, *a):
    """Set up one layer: in the probe a failure is recorded, in a run it is fatal."""
    try:
        fn(*a)
        got[name] = True
    except OSError as e:
        if not LENIENT:
            raise
        got[name], why[name] = False, str(e)

def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    check(LIBC.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)), "mount " + dst)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)

def readonly():
    """Everything private (nothing propagates back to the host), read-only and nosuid."""
    attr = (ctypes.c_uint64 * 4)(1 | 2, 0, MS_PRIVATE, 0)   # MOUNT_ATTR_RDONLY|NOSUID, propagation
    if C["setattr"] and LIBC.syscall(442, -100, b"/", 0x8000, attr, 32) == 0:  # mount_setattr(AT_RECURSIVE)
        return
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    with open("/proc/self/mountinfo") as f:
        points = [l.split()[4] for l in f]
    for p in points:   # kernels before 5.12: one bind remount per mount point, keeping its flags
        for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
            p = p.replace(esc, ch)
        try:
            keep = os.statvfs(p).f_flag & (MS_NODEV | MS_NOEXEC | 1024 | 2048 | 4096)   # NOATIME, NODIRATIME, RELATIME
            mount(None, p, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | keep)
        except OSError:
            if p == "/":
                raise

def scratch_tmpfs():
    opts = "size=%dm,nr_inodes=%d,mode=0700,uid=%d,gid=%d" % (C["scratch_mb"], 4096, C["run_uid"], C["run_gid"])
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, opts)
    for p in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(p) and os.path.realpath(p) != "/tmp":
            mount("/tmp", p, None, MS_BIND)

def hide_run():
    if os.path.isdir("/run"):
        mount("tmpfs", "/run", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0755")

def children():
    try:
        with open("/proc/self/task/%d/children" % os.getpid()) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        me, out = str(os.getpid()), []
        for d in os.listdir("/proc"):
            try:
                with open("/proc/" + d + "/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
        return out

def reap_rest(pgid=None):
    """No PID namespace: kill what the program left (its group, its uid, then, as the child
    subreaper that every orphan of the program is reparented to, all our children)."""
    if pgid:
        try:
            os.killpg(pgid, 9)
        except OSError:
            pass
    if C["uid"] is not None:
        kill_uid(C["uid"], C["gid"])
    end = time.monotonic() + 5
    while time.monotonic() < end:
        for k in children():
            try:
                os.kill(k, 9)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        time.sleep(0.0005)

def seccomp():
    prog = bytes.fromhex(C["seccomp"])
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct_fprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    check(LIBC.prctl(22, 2, ctypes.byref(fprog), 0, 0), "seccomp")   # PR_SET_SECCOMP, FILTER

class struct_fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

def program():
    try:
        os.setsid()
        for res, soft, hard in C["rlimits"]:
            resource.setrlimit(res, (soft, hard))
        if C["uid"] is not None:
            os.setgroups([]); os.setresgid(C["gid"], C["gid"], C["gid"]); os.setresuid(C["uid"], C["uid"], C["uid"])
        os.chdir(C["scratch"])
        os.umask(0o077)
        for s in (_signal.SIGPIPE, _signal.SIGXFSZ):   # ignored by Python, and kept so by exec
            _signal.signal(s, _signal.SIG_DFL)
        check(LIBC.prctl(38, 1, 0, 0, 0), "no_new_privs")
        if C["seccomp"]:
            layer("seccomp", seccomp)
            say(layers=got, why=why)
        os.closerange(3, ST)
        os.closerange(ST + 1, 1 << 16)
        os.set_inheritable(ST, False)   # open for an exec error, closed by a successful exec
        os.execve(C["python"], [C["python"], "-I", "main.py"], C["env"])
    except BaseException as e:
        say(error="program setup: %s" % e)
    os._exit(127)

def init(pidns):
    LIBC.prctl(1, 9, 0, 0, 0)   # PR_SET_PDEATHSIG: dies with the bootstrap
    if pidns:
        say(init=int(os.readlink("/proc/self")))   # the host's pid of this init, for a last resort
    if "mount" in NS and got.get("mount", True):
        if C["readonly"]:
            layer("readonly", readonly)
        layer("tmp", scratch_tmpfs)
        layer("run", hide_run)
        if pidns:
            layer("proc", mount, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if "uts" in NS and got.get("uts", True):
        LIBC.sethostname(b"sandbox", 7)
    src = b""
    while True:
        b = os.read(C["src_fd"], 1 << 20)
        if not b:
            break
        src += b
    fd = os.open(os.path.join(C["scratch"], "main.py"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, src)
    os.close(fd)
    if not pidns:
        LIBC.prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
    if not C["seccomp"]:
        say(layers=got, why=why)
    prog = os.fork()
    if prog == 0:
        program()
    null = os.open("/dev/null", os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(null, i)
    while True:
        p, st, ru = os.wait4(-1, 0)
        if p == prog:
            break
    say(status=st, cpu=ru.ru_utime + ru.ru_stime, rss_kb=ru.ru_maxrss)
    if not pidns:
        reap_rest(prog)

def boot():
    LIBC.prctl(1, 9, 0, 0, 0)   # PR_SET_PDEATHSIG: dies with the host thread that started it
    if os.getppid() != C["host_pid"]:
        os._exit(125)
    base = NS.get("user", 0)
    if LENIENT:   # which namespaces may this process create? one child per kind
        for name, f in NS.items():
            pid = os.fork()
            if pid == 0:
                os._exit(0 if LIBC.unshare(f | base) == 0 else 1)
            got[name] = os.waitpid(pid, 0)[1] == 0
            if not got[name]:
                why[name] = "unshare refused"
        if base and not got["user"]:
            for name in NS:
                got[name] = False
    flags = 0
    for name, f in NS.items():
        if got.get(name, True):
            flags |= f
    if flags:
        check(LIBC.unshare(flags), "unshare")
    if flags & NS.get("user", 0):
        for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (os.getuid(), os.getuid())),
                           ("gid_map", "%d %d 1" % (os.getgid(), os.getgid()))):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
    pidns = bool(flags & 0x20000000)
    if not pidns:
        LIBC.prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
    pid = os.fork()
    if pid == 0:
        try:
            init(pidns)
        except BaseException as e:
            say(error="sandbox setup: %s" % e)
            os._exit(125)
        os._exit(0)
    null = os.open("/dev/null", os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(null, i)
    try:
        done = bool(select.select([os.pidfd_open(pid)], [], [], C["wall_s"])[0])
    except (AttributeError, OSError):   # no pidfd (Linux < 5.3): poll
        end = time.monotonic() + C["wall_s"]
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None and time.monotonic() < end:
            time.sleep(0.002)
        done = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    if not done:
        say(timeout=True)
        os.kill(pid, 9)   # init of a PID namespace: the kernel kills all of it before init is reaped
    os.waitpid(pid, 0)
    if not pidns:
        reap_rest()

try:
    boot()
except BaseException as e:
    say(error="sandbox setup: %s" % e)
    os._exit(125)
os._exit(0)
'''


# ---------------------------------------------------------------------------------------------
# seccomp: a classic BPF filter, built here and installed by the bootstrap just before exec.

_SYSCALLS = {  # machine: (AUDIT_ARCH, {name: nr}); names absent from a table are not filtered
    "x86_64": (0xC000003E, dict(
        ptrace=101, process_vm_readv=310, process_vm_writev=311, pidfd_getfd=438, kcmp=312,
        unshare=272, setns=308, mount=165, umount2=166, pivot_root=155, chroot=161,
        mount_setattr=442, open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432,
        fspick=433, keyctl=250, add_key=248, request_key=249, bpf=321, perf_event_open=298,
        userfaultfd=323, io_uring_setup=425, io_uring_enter=426, io_uring_register=427,
        kexec_load=246, kexec_file_load=320, init_module=175, finit_module=313, delete_module=176,
        swapon=167, swapoff=168, reboot=169, acct=163, syslog=103, quotactl=179,
        name_to_handle_at=303, open_by_handle_at=304, iopl=172, ioperm=173, vhangup=153,
        lookup_dcookie=212, clone=56, clone3=435, kill=62)),
    "aarch64": (0xC00000B7, dict(
        ptrace=117, process_vm_readv=270, process_vm_writev=271, pidfd_getfd=438, kcmp=272,
        unshare=97, setns=268, mount=40, umount2=39, pivot_root=41, chroot=51, mount_setattr=442,
        open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
        keyctl=219, add_key=217, request_key=218, bpf=280, perf_event_open=241, userfaultfd=282,
        io_uring_setup=425, io_uring_enter=426, io_uring_register=427, kexec_load=104,
        kexec_file_load=294, init_module=105, finit_module=273, delete_module=106, swapon=224,
        swapoff=225, reboot=142, acct=89, syslog=116, quotactl=60, name_to_handle_at=264,
        open_by_handle_at=265, vhangup=58, lookup_dcookie=18, clone=220, clone3=435, kill=129)),
}
_NS_CLONE_FLAGS = sum(_NS.values()) & 0xFFFFFFFF


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """The BPF program (struct sock_filter[]) or None where the architecture is not known.
    Refused with EPERM: everything in the table but clone/clone3/kill; clone with a namespace
    flag; kill(-1). clone3 gets ENOSYS (its flags are in memory, out of BPF's reach), which makes
    glibc fall back to clone. Another architecture's syscalls (x32 on x86_64 included) are refused."""
    arch, nrs = _SYSCALLS.get(machine or platform.machine(), (None, None))
    if arch is None:
        return None
    import errno
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill, eperm, enosys = 0x7FFF0000, 0x80000000, 0x50000 | errno.EPERM, 0x50000 | errno.ENOSYS
    ins: list[tuple[int, int, int, int]] = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    if arch == 0xC000003E:
        ins += [(jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]   # x32 syscall numbers
    for name, nr in nrs.items():
        if name not in ("clone", "clone3", "kill"):
            ins += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    ins += [(jeq, 0, 1, nrs["clone3"]), (ret, 0, 0, enosys)]
    ins += [(jeq, 0, 3, nrs["clone"]), (ld, 0, 0, 16), (jset, 0, 1, _NS_CLONE_FLAGS), (ret, 0, 0, eperm)]
    ins += [(ld, 0, 0, 0), (jeq, 0, 3, nrs["kill"]), (ld, 0, 0, 16), (jeq, 0, 1, 0xFFFFFFFF), (ret, 0, 0, eperm)]
    ins += [(ret, 0, 0, allow)]
    return b"".join(struct.pack("=HBBI", c, jt, jf, k) for c, jt, jf, k in ins)


# ---------------------------------------------------------------------------------------------
# Slots: one per concurrent run, each with its own uid; flock'ed so that several host processes
# (e.g. one per rank on a node) never share one.

class _Slots:
    def __init__(self, n: int = MAX_SLOTS):
        self.n, self.pid = n, os.getpid()
        self.busy: set[int] = set()
        self.cv = threading.Condition()
        self.fds: dict[int, int] = {}
        self.dir = os.path.join(tempfile.gettempdir(), f"megads-sandbox-{os.geteuid()}")

    def _flock(self, i: int) -> bool:
        if i not in self.fds:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            self.fds[i] = os.open(os.path.join(self.dir, f"slot-{i}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fds[i], fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def acquire(self) -> int:
        if self.pid != os.getpid():   # a forked host process: the inherited descriptors share the parent's locks
            self.__init__(self.n)
        with self.cv:
            while True:
                for i in range(self.n):
                    if i not in self.busy and self._flock(i):
                        self.busy.add(i)
                        return i
                self.cv.wait(0.05)

    def release(self, i: int) -> None:
        with self.cv:
            fcntl.flock(self.fds[i], fcntl.LOCK_UN)
            self.busy.discard(i)
            self.cv.notify()


_SLOTS = _Slots()
_CAPS: dict | None = None
_CAPS_LOCK = threading.Lock()
_DISABLED: set[str] = set()   # layers left out on purpose (tests of degraded hosts): see _reset


def _reset(disable: set[str] | frozenset[str] = frozenset()) -> None:
    """Forget the probed capabilities; the next use probes again without the layers in `disable`
    (namespace names of _NS, "uid", "seccomp", "readonly", "mount_setattr"). For tests of degraded hosts."""
    global _CAPS
    with _CAPS_LOCK:
        _CAPS = None
        _DISABLED.clear()
        _DISABLED.update(disable)


def _interpreters() -> list[str]:
    c = INTERPRETERS or [sys.executable, os.path.realpath(sys.executable),
                         getattr(sys, "_base_executable", ""), "/usr/bin/python3", shutil.which("python3") or ""]
    return list(dict.fromkeys(p for p in c if p and os.path.isfile(p)))


def _boot_python() -> str:
    """The bootstrap's interpreter: this one, unless this user may not exec it again (a venv whose
    base interpreter is in a directory this user cannot search)."""
    for p in _interpreters():
        if os.access(p, os.X_OK):
            return p
    return sys.executable


def _core_limit() -> int:
    """1 where core_pattern is a pipe (the kernel's "no dump" value for pipes), else 0."""
    try:
        with open("/proc/sys/kernel/core_pattern") as f:
            return 1 if f.read().startswith("|") else 0
    except OSError:
        return 0


_PROBE = r'''import json, os, socket, sys
def writable(p):
    try:
        open(os.path.join(p, ".megads-probe"), "w").close()
        os.unlink(os.path.join(p, ".megads-probe"))
        return True
    except OSError:
        return False
print(json.dumps({"uid": os.getuid(), "ifaces": [n for _, n in socket.if_nameindex()],
                  "python": sys.executable, "version": sys.version.split()[0], "pid": os.getpid(),
                  "etc_writable": writable("/etc"), "environ": sorted(os.environ)}))
'''


def _probe() -> dict:
    root = os.geteuid() == 0
    ns = {k: v for k, v in _NS.items() if k not in _DISABLED and (k != "user" or not root)}
    uid = None if not root or "uid" in _DISABLED else UID_BASE
    bpf = None if "seccomp" in _DISABLED else seccomp_filter()
    caps: dict = {"root": root, "uid": uid, "boot_python": _boot_python()}
    if uid is not None:
        try:
            with open("/etc/passwd") as f:
                taken = [u for u in (line.split(":")[2] for line in f if line.count(":") >= 3)
                         if u.isdigit() and UID_BASE <= int(u) < UID_BASE + MAX_SLOTS]
            if taken:
                log.warning("sandbox: uids %s of UID_BASE..UID_BASE+MAX_SLOTS are real users", taken)
        except OSError:
            pass
    errors = []
    for py in _interpreters():
        cfg = dict(ns=ns, uid=uid, python=py, seccomp=bpf.hex() if bpf else "", readonly="readonly" not in _DISABLED,
                   setattr="mount_setattr" not in _DISABLED, boot_python=caps["boot_python"])
        slot = _SLOTS.acquire()
        try:
            r, status = _execute(_PROBE, "", Limits(wall_s=10.0, cpu_s=5.0), slot, cfg, probe=True)
        finally:
            _SLOTS.release(slot)
        layers = status.get("layers", {})
        try:
            seen = json.loads(r.stdout)
        except ValueError:
            errors.append(f"{py}: {r.error or r.stderr.strip()[-300:] or r.returncode}")
            continue
        if uid is not None and seen["uid"] != uid + slot:
            errors.append(f"{py}: ran as uid {seen['uid']}, not {uid + slot}")
            continue
        netns = bool(layers.get("net")) and seen["ifaces"] == ["lo"]
        caps.update(
            netns=netns, pidns=bool(layers.get("pid")) and seen["pid"] == 2, mountns=bool(layers.get("mount")),
            ipcns=bool(layers.get("ipc")), utsns=bool(layers.get("uts")), cgroupns=bool(layers.get("cgroup")),
            userns=bool(layers.get("user")), readonly_root=bool(layers.get("readonly")) and not seen["etc_writable"],
            private_tmp=bool(layers.get("tmp")), private_proc=bool(layers.get("proc")), hidden_run=bool(layers.get("run")),
            seccomp=bool(layers.get("seccomp")), uid=uid,
            nproc=uid is not None, empty_env=set(seen["environ"]) <= set(ENV) | {"HOME", "TMPDIR"},
            python=py, python_version=seen["version"], why_not=status.get("why", {}))
        caps["signals_isolated"] = caps["pidns"] or caps["uid"] is not None
        caps["cleanup"] = "pidns" if caps["pidns"] else "uid+subreaper" if caps["uid"] is not None else "subreaper"
        caps["_cfg"] = dict(ns={k: v for k, v in ns.items() if layers.get(k)}, uid=uid, python=py,
                            seccomp=bpf.hex() if bpf and caps["seccomp"] else "",
                            readonly=caps["readonly_root"], setattr=cfg["setattr"], boot_python=caps["boot_python"])
        return caps
    raise RuntimeError("sandbox: no interpreter runs in the sandbox: " + "; ".join(errors))


def capabilities() -> dict:
    """The protection layers of this host, measured once by a probe program (cached): netns,
    pidns, mountns, ipcns, utsns, cgroupns, userns (rootless), readonly_root, private_tmp,
    private_proc, hidden_run, seccomp, uid (the first slot's uid, None without root), nproc,
    empty_env, signals_isolated, python (the interpreter used) and why_not (reasons for refusals)."""
    global _CAPS
    with _CAPS_LOCK:
        if _CAPS is None:
            _CAPS = _probe()
            bad = [k for k in ("netns", "pidns", "mountns", "readonly_root", "seccomp") if not _CAPS[k]]
            bad += [] if _CAPS["uid"] is not None else ["separate uid (not root)"]
            if bad:
                log.warning("sandbox: this host lacks these isolation layers: %s", ", ".join(bad))
        return {k: v for k, v in _CAPS.items() if not k.startswith("_")}


def _memfd(data: bytes, name: str) -> int:
    """A read-only descriptor of an in-memory file holding `data` (offset 0)."""
    fd = os.memfd_create(name)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)


def _rlimits(lim: Limits) -> list[tuple[int, int, int]]:
    import resource as r
    cpu = max(1, int(lim.cpu_s + 0.999))
    mb = 1 << 20
    return [(r.RLIMIT_CPU, cpu, cpu + 1), (r.RLIMIT_AS, lim.memory_mb * mb, lim.memory_mb * mb),
            (r.RLIMIT_NPROC, lim.nproc, lim.nproc), (r.RLIMIT_FSIZE, lim.fsize_mb * mb, lim.fsize_mb * mb),
            (r.RLIMIT_NOFILE, lim.nofile, lim.nofile), (r.RLIMIT_CORE, _core_limit(), _core_limit()),
            (r.RLIMIT_MSGQUEUE, 0, 0), (r.RLIMIT_MEMLOCK, 0, 0)]


def _hard_kill(p: subprocess.Popen, init_pid: int | None, run_id: str, uid: int | None) -> None:
    """Last resort when the bootstrap missed its own deadline: kill it and its namespace's init
    (the kernel then kills the namespace) and, with a slot uid, every process of that uid."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except OSError:
        pass
    if init_pid:
        try:   # through a pidfd, and only if that pid is still this run's init (not a reused pid)
            pidfd = os.pidfd_open(init_pid)
            try:
                with open(f"/proc/{init_pid}/cmdline", "rb") as f:
                    if f"'run_id': '{run_id}'".encode() in f.read():
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            finally:
                os.close(pidfd)
        except OSError:
            pass
    if uid is not None:
        subprocess.run([_boot_python(), "-I", "-S", "-c", _KILL_UID + f"\nos._exit(0 if kill_uid({uid}, {uid}) else 1)"],
                       env={}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)


def _execute(source: str, stdin: str, lim: Limits, slot: int, cfg: dict, probe: bool = False) -> tuple[Result, dict]:
    """One sandboxed run in `slot` with the layers of `cfg`; returns the result and the status lines."""
    t0 = time.monotonic()
    cfg = dict(cfg)
    uid = None if cfg["uid"] is None else cfg["uid"] + slot
    run_uid = os.geteuid() if uid is None else uid
    mountns = "mount" in cfg["ns"]
    scratch = "/tmp" if mountns else tempfile.mkdtemp(prefix="megads-sbx-")
    if not mountns:
        os.chown(scratch, run_uid, run_uid)
    bufs = {1: bytearray(), 2: bytearray()}
    status_buf = bytearray()
    truncated = killed = False
    p = None
    fds: dict[int, int] = {}
    try:
        src_fd, in_fd = _memfd(source.encode("utf-8", "surrogateescape"), "src"), _memfd(stdin.encode(), "stdin")
        st_r, st_w = os.pipe()
        fds[st_r] = 0
        cfg.update(uid=uid, gid=uid, run_uid=run_uid, run_gid=run_uid if uid is not None else os.getegid(),
                   scratch=scratch, env=dict(ENV, HOME=scratch, TMPDIR=scratch), rlimits=_rlimits(lim),
                   wall_s=lim.wall_s, scratch_mb=lim.scratch_mb, src_fd=src_fd, status_fd=st_w,
                   host_pid=os.getpid(), probe=probe, run_id=os.urandom(8).hex())
        try:
            p = subprocess.Popen([cfg["boot_python"], "-I", "-S", "-c", _BOOT, repr(cfg)], stdin=in_fd,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(src_fd, st_w), env={},
                                 start_new_session=True)
        finally:
            for fd in (src_fd, in_fd, st_w):
                os.close(fd)
        fds.update({p.stdout.fileno(): 1, p.stderr.fileno(): 2})
        poll = select.poll()
        for fd in fds:
            poll.register(fd, select.POLLIN)
        deadline = t0 + lim.wall_s + HOST_GRACE_S
        while fds:   # until the program, its descendants and the bootstrap are all gone
            left = deadline - time.monotonic()
            if left <= 0:
                if killed:
                    break
                killed = True
                _hard_kill(p, _status(status_buf).get("init"), cfg["run_id"], uid)
                deadline = time.monotonic() + 2.0
                continue
            for fd, _ in poll.poll(left * 1000):
                data = os.read(fd, 1 << 16)
                if not data:
                    poll.unregister(fd)
                    del fds[fd]
                elif fds[fd] == 0:
                    status_buf += data
                else:
                    buf = bufs[fds[fd]]
                    keep = max(0, lim.output_bytes - len(buf))
                    buf += data[:keep]
                    truncated |= len(data) > keep
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            killed = True
            _hard_kill(p, _status(status_buf).get("init"), cfg["run_id"], uid)
            p.wait()
    finally:
        if p is not None and p.poll() is None:   # an exception in this thread: leave nothing running
            _hard_kill(p, _status(status_buf).get("init"), cfg["run_id"], uid)
            p.wait()
        for fd in fds:
            if fds[fd] == 0:
                os.close(fd)
        if p is not None:
            p.stdout.close()
            p.stderr.close()
        if not mountns:
            shutil.rmtree(scratch, ignore_errors=True)
    status = _status(status_buf)
    st = status.get("status")
    rc = sig = None
    if st is not None:
        rc = os.waitstatus_to_exitcode(st)
        if rc < 0:
            rc, sig = None, -rc
    timed_out = bool(status.get("timeout")) or killed
    if timed_out and sig is None:
        sig = signal.SIGKILL
    error = status.get("error")
    if killed:
        error = error or "the sandbox bootstrap missed its deadline and was killed"
    elif st is None and not timed_out and error is None:
        error = f"the sandbox bootstrap ended without a status (exit {p.returncode})"
    res = Result(stdout=bufs[1].decode("utf-8", "replace"), stderr=bufs[2].decode("utf-8", "replace"),
                 returncode=rc, timed_out=timed_out, wall_s=time.monotonic() - t0, truncated=truncated,
                 signal=sig, cpu_s=float(status.get("cpu", 0.0)), max_rss_mb=status.get("rss_kb", 0) / 1024,
                 error=error)
    return res, status


def _status(buf: bytes) -> dict:
    out: dict = {}
    for line in bytes(buf).splitlines():
        try:
            out.update(ast.literal_eval(line.decode()))
        except (ValueError, SyntaxError, UnicodeDecodeError):
            pass
    return out


def _run_cfg() -> dict:
    capabilities()
    return dict(_CAPS["_cfg"])


def run(source: str, stdin: str = "", limits: Limits | None = None) -> Result:
    """Runs the Python program `source` in the sandbox with `stdin` as its standard input."""
    cfg = _run_cfg()
    slot = _SLOTS.acquire()
    try:
        return _execute(source, stdin, limits or Limits(), slot, cfg)[0]
    finally:
        _SLOTS.release(slot)


def normalize(out: str) -> str:
    """Output as compared: trailing whitespace of each line and trailing blank lines removed."""
    return "\n".join(line.rstrip() for line in out.splitlines()).rstrip("\n")


def passed(result: Result, expected: str) -> bool:
    """The program's stdout equals `expected` (see normalize). A run that timed out, had its
    output truncated or where the sandbox failed does not count, whatever it printed."""
    return (not result.timed_out and not result.truncated and result.error is None
            and normalize(result.stdout) == normalize(expected))


def pass_fraction(source: str, tests: list[dict], limits: Limits | None = None,
                  pool: SandboxPool | None = None) -> float:
    """Share of `tests` ([{"input": stdin, "output": expected stdout}]) the program passes; one
    sandboxed run per test, through `pool` when given (all tests at once), else one after another."""
    if not tests:
        return 0.0
    jobs = [(source, t.get("input", "")) for t in tests]
    results = pool.map(jobs, limits=limits) if pool is not None else [run(s, i, limits) for s, i in jobs]
    return sum(passed(r, t.get("output", "")) for r, t in zip(results, tests)) / len(tests)


class SandboxPool:
    """Runs up to `workers` programs at once, each in its own sandbox and slot (uid), from its own
    host thread: a program that spins, sleeps or floods its output occupies one worker for at most
    its wall limit and delays no other program's run (CPU is shared by the kernel scheduler)."""

    def __init__(self, workers: int = 2, limits: Limits | None = None):
        self.limits = limits or Limits()
        self._ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")
        capabilities()

    def map(self, jobs: list[tuple[str, str]], limits: Limits | None = None) -> list[Result]:
        """Runs (source, stdin) pairs; the results are in the order of `jobs`."""
        futures = [self._ex.submit(run, s, i, limits or self.limits) for s, i in jobs]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._ex.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
