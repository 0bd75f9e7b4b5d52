"""Sandboxed Python at interpreter speed: long-lived sandboxes, one fresh child per call.

`run_python` (sandbox.py) starts a new bubblewrap sandbox and a new interpreter for every program:
about 55 ms before the program's first line. A `SandboxPool` keeps `workers` sandboxes alive, each
the same bubblewrap set-up (`sandbox._bwrap_cmd`: user/PID/net/UTS/IPC namespaces, uid 65534, no
capabilities, read-only /usr, a private tmpfs at /sandbox with its byte and inode caps, no SysV IPC,
die-with-parent) holding a small fork server (`SERVER`, an interpreter that never runs a program
itself). A call:

1. the server forks a child; the child starts a session of its own, sets the call's rlimits (CPU
   seconds, address space, file size = the output cap, open files; processes are capped for the
   whole sandbox), clears the environment to the sandbox's, takes stdin/stdout/stderr from memory
   files, and runs the program, written to `/sandbox/main.py`, under `__name__ == "__main__"` in the
   interpreter it was forked from (no interpreter start-up);
2. the server waits for it at most `wall_s`, then kills every other process of the sandbox's PID
   namespace (background processes, a setsid'd daemon, a fork bomb's children: all of them, every
   call), and empties /sandbox (the call's private scratch, also /tmp): the next call starts from the
   same empty folder, the same environment, the same pristine interpreter;
3. the result comes back with the status `sandbox.classify` gives a one-shot run.

What a reused sandbox invites, and where it ends: files (emptied), processes (killed), interpreter
state, environment, working directory, rlimits, signal handlers (the child's own, gone with it). The
program shares the server's uid: it can kill the server; the pool then reports the call `killed` and
starts a new sandbox. A server that does not answer within wall_s + a grace is killed the same way.
The server is not dumpable, so a program cannot ptrace it or read its memory.
"""
from __future__ import annotations

import json
import os
import queue
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
from typing import Dict, Optional

from .sandbox import DIR_PREFIX, PYTHON, RunResult, SandboxLimits, _bwrap_cmd, _limit, classify, sandbox_status

GRACE_S = 5.0  # past wall_s: a server this late is killed (its own wall clock failed)

# The fork server, run inside the sandbox as `python3 -I -c SERVER IN OUT`. Requests and answers are
# length-prefixed JSON on the inherited pipe fds IN and OUT; fds 0-2 are /dev/null for the server itself.
SERVER = r'''
import builtins, ctypes, gc, json, os, resource, select, shutil, signal, struct, sys, time, traceback
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no ptrace, no /proc/<pid>/mem for the programs
IN, OUT, ME = int(sys.argv[1]), int(sys.argv[2]), os.getpid()
ENV = dict(os.environ)
CLEAN = {k: getattr(signal, k) for k in dir(signal) if k.startswith("SIG") and not k.startswith("SIG_")}

def read_exact(n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(IN, n - len(buf))
        if not chunk:
            sys.exit(0)
        buf += chunk
    return buf

def memfd(name, data=b""):
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    os.lseek(fd, 0, 0)
    return fd

def child(req, fds):
    os.setsid()
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
    os.closerange(3, 1 << 16)
    cpu = int(req["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (req["memory"], req["memory"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (req["cap"], req["cap"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (req["files"], req["files"]))
    os.environ.clear()
    os.environ.update(ENV)
    os.chdir("/sandbox")
    sys.stdin = open(0, "r", encoding="utf-8", errors="replace", closefd=False)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.argv = ["/sandbox/main.py"]
    gc.enable()
    code = 0
    try:
        g = {"__name__": "__main__", "__file__": "/sandbox/main.py", "__builtins__": builtins}
        exec(compile(req["source"], "/sandbox/main.py", "exec"), g)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException as e:
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != "/sandbox/main.py":
            tb = tb.tb_next
        traceback.print_exception(type(e), e, tb)
        code = 1
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except BaseException:
            code = code or 120
    os._exit(code & 0xFF)

def others():
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in (1, ME):
            out.append(int(name))
    return out

def clean():
    for _ in range(200):  # a fork bomb refills between scans: until none is left
        pids = others()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.001)
    for name in os.listdir("/sandbox"):
        path = os.path.join("/sandbox", name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass

for fd in (0, 1, 2):
    os.dup2(os.open("/dev/null", os.O_RDWR), fd)
gc.disable()
while True:
    req = json.loads(read_exact(struct.unpack("<I", read_exact(4))[0]))
    with open("/sandbox/main.py", "w", encoding="utf-8", errors="surrogatepass") as f:  # as a one-shot run has it
        f.write(req["source"])
    fds = [memfd("in", req["stdin"].encode("utf-8", "replace")), memfd("out"), memfd("err")]
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child(req, fds)
    os.close(fds[0])
    pidfd = os.pidfd_open(pid)
    timed_out = not select.select([pidfd], [], [], req["wall_s"])[0]
    os.close(pidfd)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    status = os.waitpid(pid, 0)[1]
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    seconds = time.monotonic() - started
    clean()
    res = {"rc": rc, "timed_out": timed_out, "seconds": seconds}
    for key, fd, limit in (("out", fds[1], req["cap"] + 1), ("err", fds[2], 65536)):
        res[key + "_bytes"] = os.fstat(fd).st_size
        os.lseek(fd, 0, 0)
        res[key] = os.read(fd, limit).decode("utf-8", "replace")
        os.close(fd)
    data = json.dumps(res).encode()
    os.write(OUT, struct.pack("<I", len(data)) + data)
'''


class _Worker:
    """One sandbox with its fork server."""

    def __init__(self, limits: SandboxLimits):
        self.limits = limits
        self.workdir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
        os.chmod(self.workdir, 0o777)
        req_r, self.req_w = os.pipe()
        self.ans_r, ans_w = os.pipe()
        cmd = _bwrap_cmd(self.workdir, [PYTHON, "-I", "-c", SERVER, str(req_r), str(ans_w)])
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         preexec_fn=_limit(limits, os.geteuid() == 0, self.workdir, {}, per_call=False),
                                         pass_fds=(req_r, ans_w), env={"PATH": "/usr/bin:/bin"}, cwd="/")
        finally:
            os.close(req_r)
            os.close(ans_w)

    def call(self, source: str, stdin: str, wall_s: float) -> Optional[dict]:
        """The server's answer, or None when it died or missed its deadline (then it is stopped)."""
        lim = self.limits
        req = json.dumps({"source": source, "stdin": stdin, "wall_s": wall_s, "cpu_s": lim.cpu_s,
                          "memory": lim.memory_mb * 2**20, "cap": lim.max_output_bytes, "files": lim.max_open_files}).encode()
        try:
            os.write(self.req_w, struct.pack("<I", len(req)) + req)
            head = self._read(4, wall_s + GRACE_S)
            return json.loads(self._read(struct.unpack("<I", head)[0], GRACE_S))
        except (OSError, TimeoutError, EOFError, ValueError):
            self.close()
            return None

    def _read(self, n: int, timeout: float) -> bytes:
        buf = b""
        while len(buf) < n:
            if not select.select([self.ans_r], [], [], timeout)[0]:
                raise TimeoutError
            chunk = os.read(self.ans_r, n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.kill()
        self.proc.wait()
        for fd in (self.req_w, self.ans_r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)


class SandboxPool:
    """`workers` pooled sandboxes; `run` is `sandbox.run_python` with one of them (started on first
    use, replaced when it died). Thread-safe: each call holds one worker."""

    def __init__(self, limits: SandboxLimits = SandboxLimits(), workers: int = 4):
        usable, why = sandbox_status()
        if not usable:
            raise RuntimeError(f"the code sandbox is unavailable ({why})")
        self.limits, self.size = limits, workers
        self._idle: "queue.LifoQueue[Optional[_Worker]]" = queue.LifoQueue()
        for _ in range(workers):
            self._idle.put(None)  # a slot: its sandbox starts when a call first needs it
        self._all: Dict[int, _Worker] = {}
        self._lock = threading.Lock()
        self.started = 0  # sandboxes started (restarts included)
        self._closed = False

    def run(self, source: str, stdin: str = "", wall_s: Optional[float] = None) -> RunResult:
        """`source` as /sandbox/main.py with `stdin`, within wall_s (None: the pool's limits.wall_s)."""
        worker = self._idle.get()
        try:
            if worker is None or not worker.alive():
                worker = self._start(worker)
            res = worker.call(source, stdin, self.limits.wall_s if wall_s is None else wall_s)
            if res is None:  # the server died (the program killed it) or missed its deadline
                self._forget(worker)
                worker = None
                return RunResult("killed", None, "", "the sandbox's fork server died during the call")
            rc, err = res["rc"], res["err"]
            status = classify(res["timed_out"], rc, res["out_bytes"], self.limits.max_output_bytes, err)
            return RunResult(status, rc, res["out"], err)
        finally:
            self._idle.put(worker)

    def _start(self, old: Optional[_Worker]) -> _Worker:
        if old is not None:
            self._forget(old)
        with self._lock:
            if self._closed:
                raise RuntimeError("the sandbox pool is closed")
            worker = _Worker(self.limits)
            self._all[id(worker)] = worker
            self.started += 1
        return worker

    def _forget(self, worker: _Worker) -> None:
        worker.close()
        with self._lock:
            self._all.pop(id(worker), None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all = list(self._all.values()), {}
        for w in workers:
            w.close()
