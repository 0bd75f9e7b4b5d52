"""Peak resident memory of a code region on CPU (Linux), for tests and benchmarks.

Resets the kernel's high-water mark (/proc/self/clear_refs, "5") on entry and reads VmHWM on
exit. For faithful numbers, start the process with MALLOC_MMAP_THRESHOLD_=65536 so that glibc
returns freed tensors to the kernel instead of keeping them in its heap.
"""
from __future__ import annotations

import os


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def faithful() -> bool:
    return "MALLOC_MMAP_THRESHOLD_" in os.environ


class PeakRSS:
    """with PeakRSS() as m: ...;  m.extra = peak resident bytes above the level at entry."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = _status("VmHWM")
        self.extra = max(0, self.peak - self.base)
        return False
