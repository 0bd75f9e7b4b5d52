"""Runs untrusted Python in a sandbox: bubblewrap namespaces + an unprivileged uid + rlimits.

Per run: a new user, PID, network, IPC, UTS and mount namespace (`bwrap --unshare-all`); the only
filesystem is /usr (read-only, for the interpreter), /proc and /dev of the sandbox, and a private
temporary directory mounted at /sandbox (the only writable place); no environment variables;
uid/gid 65534 (nobody) with limits on CPU seconds, address space, file size (caps the output),
processes (fork bombs) and open files; a wall-clock limit after which the whole process group is
killed (the PID namespace dies with it). The trainer's files, environment and network are not
visible from inside.

When bubblewrap is missing or cannot create namespaces, `sandbox_status()` says why and the code
verifier refuses to run (or, if explicitly allowed, runs with rlimits only and says so in every
reason): never a silent fallback.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Optional, Tuple

NOBODY = 65534
PYTHON = "/usr/bin/python3"


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 5.0
    cpu_s: int = 4
    memory_mb: int = 512
    max_output_bytes: int = 1 << 20
    max_processes: int = 64
    max_open_files: int = 64


@dataclasses.dataclass
class RunResult:
    status: str  # ok | exit_code | timeout | output_limit | killed | memory | unavailable
    returncode: Optional[int]
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _bwrap_cmd(workdir: str, argv) -> list:
    cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session",
           "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
           "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev", "--bind", workdir, "/sandbox",
           "--chdir", "/sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/sandbox",
           "--setenv", "PYTHONIOENCODING", "utf-8", "--"]
    return cmd + list(argv)


def _limit(limits: SandboxLimits, drop_privileges: bool):
    def preexec():
        os.setsid()
        if drop_privileges:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        mem = limits.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_output_bytes, limits.max_output_bytes))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return preexec


@functools.lru_cache(maxsize=1)
def sandbox_status() -> Tuple[bool, str]:
    """(usable, reason): runs a trivial program in the sandbox once per process."""
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


def _run_once(python_args, stdin: str, limits: SandboxLimits, use_bwrap: bool, files: Optional[dict] = None) -> RunResult:
    workdir = tempfile.mkdtemp(prefix="hapo-sbx-")
    outdir = tempfile.mkdtemp(prefix="hapo-sbx-io-")  # host side, never visible inside
    try:
        os.chmod(workdir, 0o777)
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
            proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, preexec_fn=_limit(limits, drop),
                                    close_fds=True, env={"PATH": "/usr/bin:/bin"},
                                    cwd=workdir if not use_bwrap else "/")
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
        if timed_out or rc == -signal.SIGXCPU:
            status = "timeout"
        elif rc == -signal.SIGXFSZ or os.path.getsize(paths["out"]) >= cap:
            status = "output_limit"
        elif rc == 0:
            status = "ok"
        elif "MemoryError" in err:
            status = "memory"
        elif rc is not None and rc < 0:
            status = "killed"
        else:
            status = "exit_code"
        return RunResult(status, rc, out, err)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(outdir, ignore_errors=True)


def run_python(source: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(), allow_unsandboxed: bool = False) -> RunResult:
    """Runs `source` as /sandbox/main.py with `stdin`; see the module docstring for the isolation."""
    usable, why = sandbox_status()
    if not usable and not allow_unsandboxed:
        return RunResult("unavailable", None, "", f"sandbox unavailable: {why}")
    return _run(["/sandbox/main.py" if usable else "main.py"], stdin, limits, use_bwrap=usable, files={"main.py": source})
