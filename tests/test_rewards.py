"""Verifiers: math (math-verify), logic (reasoning-gym), code in a bubblewrap sandbox, hostile code."""
import os
import socket
import subprocess
import threading
import time

import pytest

from megatron_hapo.rewards import (
    CodeVerifier,
    MathVerifier,
    ReasoningGymVerifier,
    RewardResult,
    SandboxLimits,
    Verifier,
    run_python,
    sandbox_status,
    score_batch,
)


@pytest.mark.parametrize(
    "response, truth, correct",
    [
        ("The result is\nAnswer: 1/2", "0.5", True),
        ("so \\boxed{\\frac{1}{2}}", "\\frac12", True),
        ("Answer: \\boxed{\\dfrac{3}{4}}", "0.75", True),
        ("Answer: 2\\sqrt{2}", "\\sqrt{8}", True),
        ("Answer: (1, 3]", "(1,3]", True),
        ("Answer: [1, 3]", "(1,3]", False),  # an interval with the wrong bracket
        ("Answer: 10\\%", "0.1", True),
        ("Answer: 0.333", "\\frac13", False),  # close is not equal
        ("Answer: 4", "5", False),
        ("I think it's 5", "5", False),  # no extractable answer
        ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ],
)
def test_math(response, truth, correct):
    r = MathVerifier().score(response, truth)
    assert r.correct == correct, r
    assert r.score == (1.0 if correct else -1.0)
    assert MathVerifier(reward_wrong=0.0).score(response, truth).score == (1.0 if correct else 0.0)


def test_logic_with_reasoning_gym_checkers():
    import reasoning_gym

    v = ReasoningGymVerifier()
    for name in ("knights_knaves", "basic_arithmetic", "countdown"):
        entry = reasoning_gym.create_dataset(name, size=1, seed=3)[0]
        assert v.score(f"thinking...\n<answer>{entry['answer']}</answer>", entry).correct, name
        wrong = v.score("<answer>certainly not this</answer>", entry)
        assert not wrong.correct and wrong.score < 0.05, (name, wrong)  # countdown gives 0.01 for a malformed answer
    assert v.score("Answer:  The Cat.", "the cat").correct
    assert not v.score("no answer here", "x").correct


class Boom(Verifier):
    def _score(self, response, truth):
        if response == "hang":
            time.sleep(60)
        raise RuntimeError("bug in a reward function")


def test_verifiers_never_raise_and_batches_contain_hangs():
    assert Boom().score("x", 1) == RewardResult(0.0, "verifier error: RuntimeError: bug in a reward function", status="error")
    out = score_batch(Boom(), ["x", "hang"], [1, 2], workers=2, timeout_s=3)
    assert out[0].score == 0.0 and "RuntimeError" in out[0].reason
    assert out[1].score == 0.0 and "timed out" in out[1].reason
    math = score_batch(MathVerifier(), ["Answer: 2", "Answer: 3"], ["2", "2"], workers=2)
    assert [r.correct for r in math] == [True, False]


class Slow(Verifier):
    def _score(self, response, truth):
        if response == "hang":
            time.sleep(60)
        if response == "spin":
            while True:
                pass
        return RewardResult(1.0, "ok", True)


def test_reward_pool_times_out_only_the_hanging_responses_and_survives():
    from megatron_hapo.rewards import RewardPool

    pool = RewardPool(Slow(), workers=2, timeout_s=2)
    try:
        out = pool.score(["a", "hang", "b", "spin", "c", "d"], [0] * 6)
        assert [r.status for r in out] == ["ok", "timeout", "ok", "timeout", "ok", "ok"]
        assert out[1].score == 0.0 and "timed out after 2s" in out[1].reason
        workers = set((pool._pool._processes or {}).keys())
        again = pool.score(["e", "f"], [0, 0])  # the same processes serve the next step
        assert [r.status for r in again] == ["ok", "ok"] and set(pool._pool._processes.keys()) == workers
        assert [r.status for r in pool.score(["Boom"], [0])] == ["ok"]
        boom = RewardPool(Boom(), workers=1, timeout_s=2).score(["x"], [0])
        assert boom[0].status == "error" and "bug in a reward function" in boom[0].reason
    finally:
        pool.close()
    inline = RewardPool(Boom(), workers=0).score(["x"], [1])  # in-process: exceptions still contained
    assert inline[0].status == "error"


@pytest.mark.parametrize("kind, response, truth, correct", [
    ("math", "so\nAnswer: 1/2", "\\frac{1}{2}", True), ("exact", " 46 ", "46", True), ("exact", "47", "46", False),
    ("reasoning_gym", "<answer>the cat</answer>", "The cat.", True)])
def test_verifiers_by_name(kind, response, truth, correct):
    from megatron_hapo.rewards import build_verifier

    assert build_verifier(kind).score(response, truth).correct is correct


def test_custom_verifier_by_import_path_and_bad_names():
    from megatron_hapo.rewards import build_verifier

    assert isinstance(build_verifier("tests.test_rewards:Slow"), Slow)
    with pytest.raises(ValueError, match="reward.type: 'tests.test_rewards:Slow': .*argument"):
        build_verifier("tests.test_rewards:Slow", reward_correct=2.0)
    with pytest.raises(ValueError, match="reward.type: unknown verifier 'regex'"):
        build_verifier("regex")
    with pytest.raises(ValueError, match="cannot load 'tests.nowhere:X'"):
        build_verifier("tests.nowhere:X")
    with pytest.raises(ValueError, match="is not a megatron_hapo.rewards.Verifier subclass"):
        build_verifier("collections:OrderedDict")


pytestmark_sandbox = pytest.mark.skipif(not sandbox_status()[0], reason=f"sandbox unavailable: {sandbox_status()[1]}")


def code(src):
    return f"Here you go:\n```python\n{src}\n```"


@pytestmark_sandbox
def test_code_stdin_and_function_styles():
    v = CodeVerifier()
    assert v.score(code("a, b = map(int, input().split())\nprint(a + b)"), {"inputs": ["1 2", "5 7"], "outputs": ["3", "12"]}).correct
    assert not v.score(code("print(0)"), {"inputs": ["1 2"], "outputs": ["3"]}).correct
    fn = {"fn_name": "twoSum", "inputs": [[[2, 7, 11], 9]], "outputs": [[0, 1]]}
    cls = "class Solution:\n    def twoSum(self, nums, target):\n        return [0, 1]"
    assert v.score(code(cls), fn).correct
    assert v.score(code("def twoSum(nums, target):\n    return [0, 1]"), fn).correct
    assert "no ```python" in v.score("no code", fn).reason


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "trainer_file.txt"
    path.write_text("precious")
    return path


HOSTILE = {
    "infinite_loop": ("while True:\n    pass", "timeout"),
    "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", "timeout"),
    "memory_bomb": ("x = bytearray(8 * 1024**3)\nprint(len(x))", "memory"),
    "huge_output": ("while True:\n    print('x' * 10000)", "output_limit"),
    "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\nprint('survived')", None),
    "non_utf8": ("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe\\xfd')", None),
}


@pytestmark_sandbox
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_code_gets_zero_and_a_reason(name, canary):
    src, status = HOSTILE[name]
    limits = SandboxLimits(wall_s=3.0, cpu_s=2, memory_mb=512)
    before = set(os.listdir(canary.parent))
    r = CodeVerifier(limits).score(code(src), {"inputs": [""], "outputs": ["expected"]})
    assert r.score == 0.0 and not r.correct and r.reason, r
    if status:
        assert status in r.reason, r
    assert canary.read_text() == "precious" and set(os.listdir(canary.parent)) == before
    # nothing of the sandbox survives it (uid 65534 owns no process once the kernel has reaped the
    # killed PID namespace, which takes a moment after a fork bomb)
    for _ in range(50):
        left = subprocess.run(["ps", "-u", "65534", "-o", "pid="], capture_output=True, text=True).stdout.split()
        if not left:
            break
        time.sleep(0.1)
    assert left == [], left


@pytestmark_sandbox
def test_sandbox_sees_no_trainer_files_env_or_network(canary, monkeypatch):
    monkeypatch.setenv("HAPO_SECRET_TOKEN", "s3cret-value")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(4)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(_accept(server)), daemon=True).start()
    src = f"""
import os, socket, shutil
out = []
out.append('env:' + repr(os.environ.get('HAPO_SECRET_TOKEN')))
try:
    open({str(canary)!r}).read(); out.append('read:yes')
except OSError: out.append('read:no')
for path in ({str(canary)!r}, '/work', '/root', '/etc/passwd'):
    try:
        if os.path.isdir(path): shutil.rmtree(path)
        else: os.remove(path)
        out.append('delete:' + path)
    except OSError: pass
try:
    open('/tmp/escaped.txt', 'w').write('x'); out.append('tmpwrite:yes')
except OSError: out.append('tmpwrite:no')
try:
    socket.create_connection(('127.0.0.1', {port}), timeout=1); out.append('net:yes')
except OSError: out.append('net:no')
try:
    out.append('parent_env:' + str(b's3cret' in open('/proc/1/environ', 'rb').read()))
except OSError: out.append('parent_env:no')
open('/sandbox/mine.txt', 'w').write('ok'); out.append('sandbox_write:yes')
print(' '.join(out))
"""
    res = run_python(src, "", SandboxLimits(wall_s=5))
    assert res.ok, res
    words = res.stdout.split()
    assert "env:None" in words and "read:no" in words and "net:no" in words and "sandbox_write:yes" in words, words
    assert not any(w.startswith("delete:") for w in words), words
    assert "parent_env:True" not in words
    assert canary.read_text() == "precious" and not os.path.exists("/tmp/escaped.txt")
    time.sleep(0.5)
    assert accepted in ([None], []), "the sandbox reached the host's network"
    server.close()


def _accept(server):
    try:
        conn, _ = server.accept()
        conn.close()
        return "connected"
    except OSError:
        return None


# ---- what a program can write is bounded: disk, tmpfs, inodes, System V shared memory ----------

BOUNDED = SandboxLimits(wall_s=5.0, cpu_s=4, memory_mb=512, disk_mb=4, max_files=64)

FILL = """
import os, sys, time
where, chunk, total, files, t0 = {where!r}, b"x" * (256 * 1024), 0, 0, time.time()
try:
    os.makedirs(where, exist_ok=True)
    while time.time() - t0 < 3 and total < (1 << 30):
        with open(os.path.join(where, "f%d" % files), "wb") as f:
            f.write(chunk)  # 256 KiB a file: under the per-file cap, so only the total can stop it
        files, total = files + 1, total + len(chunk)
finally:
    print(total, files, flush=True)
"""

INODES = """
n = 0
try:
    while n < 10**6:
        open("/sandbox/e%d" % n, "w").close()
        n += 1
finally:
    print(n, flush=True)
"""

SYSV_SHM = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmget.argtypes, libc.shmat.restype = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int], ctypes.c_void_p
libc.shmat.argtypes, libc.shmdt.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int], [ctypes.c_void_p]
held, seg = 0, 64 << 20
while held < (1 << 30):
    sid = libc.shmget(0, seg, 0o1600)  # a segment outlives shmdt: only its IPC namespace frees it
    if sid < 0:
        break
    addr = libc.shmat(sid, None, 0)
    ctypes.memset(addr, 1, seg)
    libc.shmdt(ctypes.c_void_p(addr))
    held += seg
print(held, flush=True)
"""


def _written(res):
    assert res.stdout.split(), res
    return int(res.stdout.split()[0])


@pytestmark_sandbox
@pytest.mark.parametrize("where", ["/sandbox", "/tmp", "/sandbox/deep/er"])
def test_disk_bomb_stops_at_the_cap(where):
    res = run_python(FILL.format(where=where), "", BOUNDED)
    assert res.status == "disk_limit" and "No space left on device" in res.stderr, res
    assert 0 < _written(res) <= BOUNDED.disk_mb * 2**20, res.stdout  # measured: what the program managed to write


@pytestmark_sandbox
@pytest.mark.parametrize("where", ["/dev/shm", "/dev", "/", "/usr/lib"])
def test_nothing_else_is_writable(where):
    res = run_python(FILL.format(where=where), "", BOUNDED)
    assert res.status == "exit_code" and ("Read-only file system" in res.stderr or "Permission denied" in res.stderr), res
    assert _written(res) == 0


@pytestmark_sandbox
def test_inode_bomb_stops_at_max_files():
    res = run_python(INODES, "", BOUNDED)
    assert res.status == "disk_limit", res
    assert 0 < _written(res) <= BOUNDED.max_files, res.stdout


@pytestmark_sandbox
def test_no_system_v_shared_memory():
    res = run_python(SYSV_SHM, "", BOUNDED)
    assert res.ok and _written(res) == 0, res


def test_sandbox_footprint_is_reported_at_start(capsys):
    from megatron_hapo.rewards.base import RewardPool

    limits = SandboxLimits(memory_mb=512, disk_mb=16, max_files=256)
    assert limits.footprint_mb == 512 + 16 + 1
    pool = RewardPool(CodeVerifier(limits, allow_unsandboxed=True), workers=3, timeout_s=5)
    assert pool.footprint() == "reward: 3 workers × 529 MiB a sandbox (512 MiB address space + 16 MiB /sandbox) " \
                               "= 1587 MiB at most at once"
