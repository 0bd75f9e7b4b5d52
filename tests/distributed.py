"""Multi-rank test helpers: `run_ranks` (megatron_hapo.spawn, shared with the bench scripts) and
`error_text` for workers whose results travel back as plain values."""
from megatron_hapo.spawn import RanksFailed, free_port, run_ranks

__all__ = ["RanksFailed", "error_text", "free_port", "run_ranks"]


def error_text(expected, fn, *args, **kwargs):
    """str() of the `expected` exception fn raised, or None when it returned: for workers, whose
    results travel back to the test as plain values."""
    try:
        fn(*args, **kwargs)
    except expected as exc:
        return str(exc)
    return None
