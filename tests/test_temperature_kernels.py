"""The temperature processor's two paths (fused torch.compile'd kernels, eager) against float64,
directly on a processor instance: all rows and a subset, two groups of settings, −inf logits."""
import math

import pytest
import torch

from megatron_hapo import algorithms as A
from megatron_hapo.rollout import temperature_processor as tp


def reference(logits, rows, settings):
    """float64: T, H, log Z_1, log Z_T of the chosen rows."""
    x = logits.double()[rows]
    lp = torch.log_softmax(x, -1)
    h = -(lp.exp() * torch.where(torch.isfinite(lp), lp, torch.zeros_like(lp))).sum(-1)
    t = torch.stack([A.adaptive_temperature(h[i:i + 1], *settings[r])[0] for i, r in enumerate(rows)])
    y = x / t[:, None]
    return t, h, torch.logsumexp(x, -1), torch.logsumexp(y, -1)


@pytest.fixture(params=["fused", "eager"])
def path(request):
    saved = dict(tp._FUSED)
    tp.use_fused(request.param == "fused")
    yield request.param
    tp._FUSED.update(saved)


@pytest.mark.parametrize("subset", [False, True])
def test_processor_paths_match_float64(path, subset):
    stats = A.EntropyStats(q=math.log(3.0), sigma=0.7, z_pos=2.0, z_neg=-2.5)
    g = torch.Generator().manual_seed(3)
    batch, vocab = 7, 4099  # an odd vocabulary: no vector width divides it
    logits = torch.randn(batch, vocab, generator=g) * torch.linspace(0.5, 8, batch)[:, None]
    logits[2, ::3] = float("-inf")  # masked tokens in one row
    logits[4, :-1] = float("-inf")  # a row with one allowed token: H = 0
    rows = [0, 2, 3, 4, 6] if subset else list(range(batch))
    # four kinds of rows: signed and released modes, two bases and τs, one row without statistics yet
    settings = {r: (None if r == 3 else stats, 1.0 if r % 2 else 0.7, 0.2 if r % 2 else 0.1,
                    "released" if r == 6 else "signed") for r in rows}
    proc = tp.HapoTemperatureProcessor(None, torch.device("cpu"), False)
    for r in rows:
        s, base, tau, mode = settings[r]
        proc.requests[r] = tp._Request(f"k-{path}-{r}", s, base, tau, mode, [0] * r)
    proc._rebuild()
    out = proc.apply(logits.clone())
    rec = tp.RECORDER.pop({f"k-{path}-{r}" for r in rows})
    t, h, lz1, lzt = reference(logits, rows, settings)
    got = torch.tensor([rec[f"k-{path}-{r}"][r] for r in rows], dtype=torch.float64)
    for col, name, want in ((0, "T", t), (1, "H", h), (2, "log Z_1", lz1), (3, "log Z_T", lzt)):
        err = (got[:, col] - want).abs().max().item()
        assert err < 2e-5 * max(1.0, want.abs().max().item()), f"{path}: {name} off by {err:.1e}"
    assert got[rows.index(4), 1].abs().item() < 1e-6
    y = logits.double()[rows] / got[:, :1]  # the logits at the recorded T (T's own accuracy: above)
    fin = torch.isfinite(y)
    assert torch.equal(torch.isfinite(out[rows]), fin)
    assert (out[rows].double()[fin] - y[fin]).abs().max().item() < 3e-7 * y[fin].abs().max().item()  # fp32 rounding
    others = [r for r in range(batch) if r not in rows]
    assert torch.equal(out[others], logits[others]), "rows without HAPO arguments must stay untouched"
    if path == "fused":
        assert tp.fused_failure() is None, tp.fused_failure()
        assert "cpu" in tp._FUSED["proven"], "the fused kernel did not run"


def test_fused_build_failure_falls_back_once(capsys, monkeypatch):
    saved = dict(tp._FUSED)
    try:
        tp._FUSED.update(wanted=True, kernel=None, failed=None, proven=set())

        def broken(fn, **kw):
            def run(*a):
                raise RuntimeError("InductorError: no working C++ compiler found\nmore")
            return run
        monkeypatch.setattr(torch, "compile", broken)
        x, params = torch.randn(3, 50), torch.ones(3, 6)
        assert tp._fused(x, params) is None and tp._fused(x, params) is None
        said = capsys.readouterr().out
        assert said.count("could not be built on cpu (RuntimeError: InductorError: no working C++ compiler found)") == 1
        assert tp.fused_failure().startswith("RuntimeError")
    finally:
        tp._FUSED.clear()
        tp._FUSED.update(saved)


def test_fused_recompile_failure_after_a_success_falls_back(capsys, monkeypatch):
    """A kernel that built for one shape and fails to recompile for another (a single row, say) must
    hand over to the eager path, not raise mid-generation."""
    saved = dict(tp._FUSED)
    try:
        tp._FUSED.update(wanted=True, kernel=None, failed=None, proven=set())

        def first_shape_only(fn, **kw):
            def run(x, params):
                if x.shape[0] == 1:
                    raise RuntimeError("InductorError: recompile failed")
                return fn(x, params)
            return run
        monkeypatch.setattr(torch, "compile", first_shape_only)
        params = torch.tensor([[1.0, 0.5, 2.0, 3.0, 1.0, 0.1]])
        assert tp._fused(torch.randn(3, 50), params.expand(3, 6).contiguous()) is not None
        assert "cpu" in tp._FUSED["proven"]
        x = torch.randn(1, 50)
        before = x.clone()
        assert tp._fused(x, params) is None  # the eager path takes over
        assert torch.equal(x, before), "a failed recompile wrote into the logits"
        assert "recompile failed" in capsys.readouterr().out and "recompile failed" in tp.fused_failure()
    finally:
        tp._FUSED.clear()
        tp._FUSED.update(saved)
