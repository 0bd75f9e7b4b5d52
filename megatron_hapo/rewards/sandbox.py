"""Runs untrusted Python in a sandbox: bubblewrap namespaces + an unprivileged uid + rlimits.

Per run: a new user, PID, network, IPC, UTS and mount namespace (`bwrap --unshare-all`); the only
filesystem is /usr (read-only, for the interpreter), /proc and a read-only /dev of the sandbox
(device nodes only: /dev/shm is a read-only folder), a read-only root, and /sandbox (also /tmp): a
tmpfs of its own capped at `disk_mb` bytes and `max_files` inodes, the only writable place; no
environment variables; uid/gid 65534 (nobody) with limits on CPU seconds, address space, file size
(caps the output), processes (fork bombs) and open files; a wall-clock limit after which the whole
process group is killed (the PID namespace dies with it, and so does /sandbox's tmpfs: its mount
namespace). The trainer's files, environment and network are not visible from inside.

What one sandbox can hold at once is bounded: `memory_mb` of address space plus `disk_mb` of tmpfs
pages plus `max_files` inodes; `SandboxLimits.footprint_mb` is that bound (the reward pool reports
workers × it at start-up). bwrap 0.8 cannot cap a tmpfs's inodes, so /sandbox is mounted before
bwrap starts, in a user + mount namespace of the sandbox's own (`_private_tmpfs`).

When bubblewrap is missing or cannot create namespaces, `sandbox_status()` says why and the code
verifier refuses to run (or, if explicitly allowed, runs with rlimits only and says so in every
reason): never a silent fallback.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Optional, Tuple

from ..procs import die_with_parent, libc

NOBODY = 65534
SETUP_FAILED = "sandbox set-up failed: "
_DISK_FULL = "No space left on device"  # ENOSPC: /sandbox's bytes or inodes are used up
PYTHON = "/usr/bin/python3"


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 5.0
    cpu_s: int = 4
    memory_mb: int = 512
    max_output_bytes: int = 1 << 20
    max_processes: int = 64
    max_open_files: int = 64
    disk_mb: int = 16  # everything the program writes (/sandbox's tmpfs pages: RAM)
    max_files: int = 256  # inodes in /sandbox (files, folders, links)

    @property
    def footprint_mb(self) -> int:
        """The most memory one running sandbox can hold: address space + its tmpfs (inodes ≈ 1 KiB each)."""
        return self.memory_mb + self.disk_mb + -(-self.max_files // 1024)


@dataclasses.dataclass
class RunResult:
    status: str  # ok | exit_code | timeout | output_limit | disk_limit | killed | memory | unavailable
    returncode: Optional[int]
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _bwrap_cmd(workdir: str, argv) -> list:
    # --unshare-all without --unshare-ipc: the IPC namespace is _private_tmpfs's, with its limits
    cmd = ["bwrap", "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
           "--uid", str(NOBODY), "--gid", str(NOBODY), "--cap-drop", "ALL", "--die-with-parent", "--new-session",
           "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
           "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
           "--bind", workdir, "/sandbox", "--symlink", "sandbox", "/tmp", "--remount-ro", "/",
           "--chdir", "/sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/sandbox",
           "--setenv", "TMPDIR", "/sandbox", "--setenv", "PYTHONIOENCODING", "utf-8", "--"]
    return cmd + list(argv)


_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWIPC = 0x00020000, 0x10000000, 0x08000000
_MS_NOSUID, _MS_NODEV = 2, 4
_PR_SET_DUMPABLE = 4
IPC_LIMITS = ("shmmni", "shmall", "msgmni")  # set to 0 in the sandbox's IPC namespace


def _private_tmpfs(path: str, size_bytes: int, inodes: int, files: dict) -> None:
    """In the forked child: a user + mount namespace of its own, a tmpfs of `size_bytes` pages and
    `inodes` inodes over `path` (seen only by this child and what it starts: bwrap binds it at
    /sandbox), and the program's files written into it. The host's folder stays empty; the tmpfs
    is freed when the last process of the sandbox exits."""
    c, uid, gid = libc(), os.getuid(), os.getgid()
    c.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)  # a uid change left /proc/self root's: it must be ours to write the maps
    if c.unshare(_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWIPC) != 0:
        raise OSError(ctypes.get_errno(), "unshare(user, mount, ipc) for the sandbox")
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    # System V shared memory and message queues live outside every rlimit (a segment stays allocated
    # after shmdt until its IPC namespace dies: 2.7 GB in 3 s measured): none in the sandbox.
    for name in IPC_LIMITS:
        with open(f"/proc/sys/kernel/{name}", "w") as f:
            f.write("0")
    opts = f"size={size_bytes},nr_inodes={inodes},mode=1777".encode()
    if c.mount(b"hapo-sandbox", path.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, opts) != 0:
        raise OSError(ctypes.get_errno(), f"mount tmpfs on {path}")
    for name, text in files.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)


def _limit(limits: SandboxLimits, drop_privileges: bool, workdir: Optional[str] = None, files: Optional[dict] = None,
           per_call: bool = True):
    """The sandbox process's set-up, run between fork and exec. per_call=False (a pooled sandbox's fork
    server, sandbox_pool.py): without the per-program limits (CPU seconds, address space, file size,
    open files), which the server sets in each call's child; processes stay capped for the sandbox."""
    def preexec():
        try:
            setup()
        except BaseException as exc:  # subprocess only says "Exception occurred in preexec_fn": say what
            os.write(2, f"{SETUP_FAILED}{type(exc).__name__}: {exc}".encode())
            raise

    def setup():
        os.setsid()
        if drop_privileges:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        if workdir is not None:
            _private_tmpfs(workdir, limits.disk_mb * 2**20, limits.max_files, files or {})
        # never outlive the scoring process (set after the uid change, which clears it; bwrap's
        # --die-with-parent then covers what it starts)
        die_with_parent()
        if per_call:
            mem = limits.memory_mb * 2**20
            resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
            resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_output_bytes, limits.max_output_bytes))
            resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_MSGQUEUE, (0, 0))  # POSIX message queues: none
    return preexec


DIR_PREFIX = "hapo-sbx-"  # + "io-" for the host-side files; then the creating process's pid, "-", a random part
_DIR_NAME = re.compile(r"^hapo-sbx-(?:io-)?(?:(\d+)-)?[a-z0-9_]+$")
LEGACY_AGE_S = 3600.0  # folders named without a pid (earlier versions): removed when untouched this long


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_dirs(tmp: Optional[str] = None) -> int:
    """Removes the sandbox folders that processes killed with SIGKILL left in the temp directory (a
    killed scorer or tool call cannot clean up after itself): those whose creating process is gone,
    and unnamed ones of earlier versions older than LEGACY_AGE_S. Returns how many it removed."""
    tmp = tmp or tempfile.gettempdir()
    removed = 0
    try:
        names = os.listdir(tmp)
    except OSError:
        return 0
    now = time.time()
    for name in names:
        m = _DIR_NAME.match(name)
        if not m:
            continue
        path = os.path.join(tmp, name)
        try:
            if m.group(1) is not None:
                stale = int(m.group(1)) != os.getpid() and not _alive(int(m.group(1)))
            else:
                stale = now - os.stat(path).st_mtime > LEGACY_AGE_S
        except OSError:
            continue
        if stale and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed += not os.path.exists(path)
    return removed


@functools.lru_cache(maxsize=1)
def sandbox_status() -> Tuple[bool, str]:
    """(usable, reason): runs a trivial program in the sandbox once per process (first cleaning what
    killed processes left, `clean_stale_dirs`)."""
    clean_stale_dirs()
    if shutil.which("bwrap") is None:
        return False, "bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
    if not os.path.exists(PYTHON):
        return False, f"{PYTHON} is missing: the sandbox runs the system interpreter"
    res = _run(["-c", "print('ok')"], "", SandboxLimits(), use_bwrap=True)
    if res.status != "ok" or res.stdout.strip() != "ok":
        return False, f"bubblewrap cannot create namespaces here: {res.stderr.strip()[:300]}"
    return True, "bubblewrap namespaces + uid 65534 + rlimits"


def _run(python_args, stdin: str, limits: SandboxLimits, use_bwrap: bool, files: Optional[dict] = None) -> RunResult:
    # Namespaces of sandboxes that just ended are torn down asynchronously; a new one can then fail
    # with EAGAIN before the program even starts. That is the machine's hiccup, not the program's.
    for attempt in range(6):
        res = _run_once(python_args, stdin, limits, use_bwrap, files)
        if not (use_bwrap and res.returncode == 1 and res.stderr.startswith("bwrap:")
                and "Resource temporarily unavailable" in res.stderr):
            return res
        time.sleep(0.05 * (attempt + 1))
    return res


def classify(timed_out: bool, rc: Optional[int], out_bytes: int, cap: int, err: str) -> str:
    """A finished program's status from how it ended (rc < 0: killed by that signal)."""
    if timed_out or rc == -signal.SIGXCPU:
        return "timeout"
    if out_bytes >= cap:
        return "output_limit"
    if rc == -signal.SIGXFSZ or (rc != 0 and _DISK_FULL in err):  # a file over the cap, or /sandbox full
        return "disk_limit"
    if rc == 0:
        return "ok"
    if "MemoryError" in err:
        return "memory"
    if rc is not None and rc < 0:
        return "killed"
    return "exit_code"


def _run_once(python_args, stdin: str, limits: SandboxLimits, use_bwrap: bool, files: Optional[dict] = None) -> RunResult:
    workdir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
    outdir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}io-{os.getpid()}-")  # host side, never visible inside
    try:
        os.chmod(workdir, 0o777)
        if not use_bwrap:  # rlimits only: the files go into the host's folder (no namespaces here)
            for name, text in (files or {}).items():
                with open(os.path.join(workdir, name), "w") as f:
                    f.write(text)
        drop = os.geteuid() == 0
        argv = [PYTHON, "-I", *python_args]
        cmd = _bwrap_cmd(workdir, argv) if use_bwrap else argv
        paths = {k: os.path.join(outdir, k) for k in ("in", "out", "err")}
        with open(paths["in"], "w", encoding="utf-8", errors="replace") as f:
            f.write(stdin)
        with open(paths["in"], "rb") as fin, open(paths["out"], "wb") as fout, open(paths["err"], "wb") as ferr:
            preexec = _limit(limits, drop, workdir if use_bwrap else None, files)
            try:
                proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, preexec_fn=preexec,
                                        close_fds=True, env={"PATH": "/usr/bin:/bin"},
                                        cwd=workdir if not use_bwrap else "/")
            except subprocess.SubprocessError:
                ferr.flush()
                return RunResult("unavailable", None, "", open(paths["err"], errors="replace").read()[-2000:])
            try:
                rc = proc.wait(timeout=limits.wall_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                rc = None
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        if rc is not None and rc > 128 and use_bwrap:  # bwrap reports a child killed by signal S as 128 + S
            rc = -(rc - 128)
        cap = limits.max_output_bytes
        out = open(paths["out"], "rb").read(cap + 1).decode("utf-8", errors="replace")
        err = open(paths["err"], "rb").read(64 * 1024).decode("utf-8", errors="replace")
        return RunResult(classify(timed_out, rc, os.path.getsize(paths["out"]), cap, err), rc, out, err)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(outdir, ignore_errors=True)


def run_python(source: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(), allow_unsandboxed: bool = False) -> RunResult:
    """Runs `source` as /sandbox/main.py with `stdin`; see the module docstring for the isolation."""
    usable, why = sandbox_status()
    if not usable and not allow_unsandboxed:
        return RunResult("unavailable", None, "", f"sandbox unavailable: {why}")
    return _run(["/sandbox/main.py" if usable else "main.py"], stdin, limits, use_bwrap=usable, files={"main.py": source})
