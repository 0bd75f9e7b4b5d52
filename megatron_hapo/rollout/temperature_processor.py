"""HAPO component A inside vLLM: a per-token temperature from each row's own entropy.

vLLM V1 class-based logits processor (`LLM(logits_processors=[HapoTemperatureProcessor])`). A
request opts in through `SamplingParams.extra_args["hapo"]`:

    {"tag": str, "stats": {"q":…, "sigma":…, "z_pos":…, "z_neg":…} or None,
     "base_temperature": float, "tau": float, "sign_mode": "signed" | "released"}

and must leave vLLM's own temperature at 1.0 (this processor applies all of T_b). Every decoding
step, for every HAPO row: H = entropy of softmax(raw logits), T = T_base·(1 + τ·h̃(H)) via
`megatron_hapo.algorithms.adaptive_temperature`, logits ← logits / T. It records per generated
token (T, H, log Z at T = 1, log Z at T) under the request's tag; with the raw (T = 1) log-prob
of the sampled token that vLLM returns, the log-prob under the distribution actually sampled is
exact: log p_T(y) = (log p_1(y) + log Z_1) / T − log Z_T.

Requests without "hapo" are untouched. Not argmax-invariant, so vLLM hands it the raw logits
before its own temperature. This is the V1 interface: on GPU select the V1 model runner
(VLLM_USE_V2_MODEL_RUNNER=0, which `megatron_hapo.rollout.engine` enforces).
"""
from __future__ import annotations

import math
import threading
from typing import Dict, List, Optional

import torch

from ..algorithms import EntropyStats, adaptive_temperature
from ..algorithms.entropy import SIGN_MODES, h_tilde, log_entropy

try:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates
except ImportError:  # pragma: no cover - vLLM absent: the module still imports for docs/tools
    LogitsProcessor = object  # type: ignore
    BatchUpdate = None  # type: ignore
    process_dict_updates = None  # type: ignore


class _Recorder:
    """Per-step records of every HAPO row, resolved per request tag on demand (no per-token Python).
    A step's record stays a device tensor [rows, 4] until `pop` (after generation): decoding never
    waits for a device-to-host copy."""

    def __init__(self):
        self.lock = threading.Lock()
        self.steps: List[tuple] = []

    def add(self, tags, positions, values: torch.Tensor):
        with self.lock:
            self.steps.append((tags, positions, values))

    def pop(self, wanted: set) -> Dict[str, Dict[int, tuple]]:
        """{tag: {position: (T, H, log Z_1, log Z_T)}} for the wanted tags; forgets them."""
        out: Dict[str, Dict[int, tuple]] = {t: {} for t in wanted}
        keep = []
        with self.lock:
            for tags, positions, values in self.steps:
                rows = [i for i, t in enumerate(tags) if t in wanted]
                if rows:
                    vals = values.tolist()  # the one device-to-host copy of this step's record
                    for i in rows:
                        out[tags[i]][positions[i]] = tuple(vals[i])  # a recomputed step overwrites
                if len(rows) < len(tags):
                    keep.append((tags, positions, values))
            self.steps = keep
        return out


RECORDER = _Recorder()


class _Request:
    __slots__ = ("tag", "stats", "base", "tau", "sign_mode", "output_ids")

    def __init__(self, tag, stats, base, tau, sign_mode, output_ids):
        self.tag, self.stats, self.base, self.tau, self.sign_mode, self.output_ids = tag, stats, base, tau, sign_mode, output_ids


def parse_hapo_args(args: dict) -> tuple:
    """Validates extra_args["hapo"]; errors name the field."""
    if not isinstance(args, dict):
        raise ValueError(f"extra_args['hapo']: expected a dict, got {type(args).__name__}")
    tag = args.get("tag")
    if not isinstance(tag, str) or not tag:
        raise ValueError("extra_args['hapo'].tag: a non-empty string is required to collect the record")
    stats = args.get("stats")
    if stats is not None:
        stats = stats if isinstance(stats, EntropyStats) else EntropyStats.from_dict(stats)
    base = float(args.get("base_temperature", 1.0))
    if not (base > 0 and math.isfinite(base)):
        raise ValueError(f"extra_args['hapo'].base_temperature: must be positive, got {base}")
    tau = float(args.get("tau", 0.05))
    if not 0 <= tau < 1:
        raise ValueError(f"extra_args['hapo'].tau: must lie in [0, 1), got {tau}")
    sign_mode = args.get("sign_mode", "signed")
    if sign_mode not in SIGN_MODES:
        raise ValueError(f"extra_args['hapo'].sign_mode: unknown value {sign_mode!r}")
    return tag, stats, base, tau, sign_mode


class HapoTemperatureProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params):
        extra = sampling_params.extra_args or {}
        if "hapo" in extra:
            parse_hapo_args(extra["hapo"])
            if sampling_params.temperature != 1.0:
                raise ValueError("SamplingParams.temperature: must be 1.0 for HAPO requests; "
                                 "put the base temperature in extra_args['hapo'].base_temperature")

    def __init__(self, vllm_config, device, is_pin_memory: bool):
        self.requests: Dict[int, _Request] = {}
        self.device = device
        self._buffers = None
        self._rows: Optional[torch.Tensor] = None
        self._groups: list = []

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: Optional["BatchUpdate"]) -> None:
        def new_state(params, prompt_ids, output_ids):
            extra = params.extra_args or {}
            if "hapo" not in extra:
                return None
            return _Request(*parse_hapo_args(extra["hapo"]), output_ids)

        if process_dict_updates(self.requests, batch_update, new_state) or self._rows is None:
            self._rebuild()

    def _rebuild(self):
        # Host → device copies of the row indices: here, when the batch's requests change, not per step.
        idx = sorted(self.requests)
        self._row_list = idx
        self._rows = torch.tensor(idx, dtype=torch.long).to(self.device)
        # rows sharing (stats, T_base, τ, sign mode) are handled by one vectorised call
        groups: Dict[tuple, list] = {}
        for pos, i in enumerate(idx):
            r = self.requests[i]
            groups.setdefault((r.stats, r.base, r.tau, r.sign_mode), []).append(pos)
        self._groups = [(key, torch.tensor(p, dtype=torch.long).to(self.device)) for key, p in groups.items()]
        # the fused kernel's per-row settings (q, σ, z⁺, low scale, T_base, τ); no statistics yet
        # (the first step) = τ 0, which gives T_base exactly
        params = []
        for i in idx:
            r = self.requests[i]
            if r.stats is None:
                params.append((0.0, 1.0, 1.0, 1.0, r.base, 0.0))
            else:
                low = -r.stats.z_neg if r.sign_mode == "signed" else r.stats.z_neg
                params.append((r.stats.q, r.stats.sigma, r.stats.z_pos, low, r.base, r.tau))
        self._params = torch.tensor(params, dtype=torch.float32).to(self.device)

    def _scratch(self, x: torch.Tensor):
        """Two [rows, V] float32 work buffers. On CPU kept between steps: a fresh 10+ MB allocation
        is page-faulted in every step, which cost more than the arithmetic. On GPU new each step (the
        caching allocator reuses the blocks, and nothing stays allocated while the engine sleeps)."""
        if x.is_cuda:
            return torch.empty_like(x), torch.empty_like(x)
        if self._buffers is None or self._buffers[0].shape != x.shape:
            self._buffers = (torch.empty_like(x), torch.empty_like(x))
        return self._buffers

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """No device-to-host synchronisation per decoding step: every value stays on the device and
        the record is copied out after generation (`_Recorder.pop`). What remains: the host → device
        copies of row indices when requests join or leave (`_rebuild`), and in the eager path on CPU
        only, a check for −inf logits (a CPU tensor's `bool()` is not a device sync)."""
        if not self.requests:
            return logits
        rows = self._rows
        if rows.device != logits.device:  # the engine's sampler device differs from the one vLLM announced
            rows = self._rows = rows.to(logits.device)
            self._groups = [(k, p.to(logits.device)) for k, p in self._groups]
            self._params = self._params.to(logits.device)
        all_rows = rows.numel() == logits.shape[0]
        if all_rows:
            x = logits if logits.dtype == torch.float32 else logits.float()
        else:
            x = logits.index_select(0, rows).float()
        record = _fused(x, self._params)  # x ← x / T in place
        if record is None:
            record = self._eager(x)
        if all_rows and x.data_ptr() != logits.data_ptr():
            logits.copy_(x)
        elif not all_rows:
            logits[rows] = x.to(logits.dtype)
        reqs = [self.requests[i] for i in self._row_list]
        RECORDER.add([r.tag for r in reqs], [len(r.output_ids) for r in reqs], record)
        return logits

    # ---- the eager path (rollout.fused_processor=false, or where torch.compile cannot build) ------

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        """x ← x / T in place; the record [rows, 4] = (T, H, log Z_1, log Z_T). Few passes over the
        row, each a fast kernel (measured on CPU: amax and softmax are; max-with-indices, argmax and
        log_softmax + exp are several times slower):
        m = max x;  p = softmax(x);  log Z = m − log max p (max p ≥ 1/V: exact in fp32);
        H = log Z − Σ p·x (an elementwise product and torch's cascade sum: bmm's fp32 dot was
        1e-3 off at V = 49k);  log Z_T = m/T − log max softmax(x/T) (same argmax, T > 0)."""
        p, work = self._scratch(x)
        m = x.amax(dim=-1)
        torch.ops.aten._softmax.out(x, -1, False, out=p)
        log_z1 = m - p.amax(dim=-1).log()
        # −inf logits (masked tokens) would give 0·(−inf): on GPU finite stand-ins always (one extra
        # pass, no sync); on CPU only for the rows that came out NaN
        torch.mul(p, torch.nan_to_num(x, neginf=0.0) if x.is_cuda else x, out=work)
        entropy = log_z1 - work.sum(dim=-1)
        if not x.is_cuda and bool(entropy.isnan().any()):
            bad = entropy.isnan()
            entropy[bad] = log_z1[bad] - (p[bad] * torch.nan_to_num(x[bad], neginf=0.0)).sum(-1)
        temp = torch.empty_like(entropy)
        for (stats, base, tau, sign_mode), pos in self._groups:
            temp[pos] = adaptive_temperature(entropy[pos], stats, base, tau, sign_mode).to(temp.dtype)
        x.mul_((1.0 / temp)[:, None])
        torch.ops.aten._softmax.out(x, -1, False, out=p)
        log_zt = m / temp - p.amax(dim=-1).log()
        return torch.stack([temp, entropy, log_z1, log_zt], dim=1)


# ---- the fused path: one torch.compile'd kernel (C++/OpenMP on CPU, Triton on GPU) -------------
#
# Three reads and one write of the [rows, V] logits per step, against about ten passes of the eager
# path, and one call: (1) the row max m; (2) Σe and Σe·(x − m) with e = exp(x − m) in one loop:
# log Z_1 = m + log Σe, H = log Σe − Σe·(x − m)/Σe; T from H with each row's settings (the formula
# of `adaptive_temperature`, `h_tilde`); (3) x ← x/T with Σ exp(x/T − m/T) in the same loop (T > 0
# keeps the row max at m/T): log Z_T. −inf logits (masked tokens) give e = 0 and contribute 0 (the
# `where`), with no sync on any device.


def fused_step(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """x ← x / T in place; returns the record [rows, 4] = (T, H, log Z_1, log Z_T). params [rows, 6]:
    (q, σ, z⁺, low scale, T_base, τ), τ = 0 where a row has no statistics yet."""
    m = x.amax(dim=-1, keepdim=True)
    d = x - m
    e = torch.exp(d)
    s = e.sum(dim=-1)
    sd = torch.where(e > 0, e * d, 0.0).sum(dim=-1)
    log_s = s.log()
    m = m.squeeze(-1)
    entropy = log_s - sd / s
    q, sigma, z_pos, low, base, tau = params.unbind(-1)
    temp = base * (1.0 + tau * h_tilde(log_entropy(entropy), q, sigma, z_pos, low))
    inv_t = 1.0 / temp
    y = x * inv_t[:, None]
    mt = m * inv_t
    log_zt = mt + torch.exp(y - mt[:, None]).sum(dim=-1).log()
    x.copy_(y)
    return torch.stack([temp, entropy, m + log_s, log_zt], dim=1)


_FUSED = {"wanted": True, "kernel": None, "failed": None, "proven": set()}


def use_fused(wanted: bool) -> None:
    """rollout.fused_processor: the engine sets it before vLLM builds the processor."""
    _FUSED["wanted"] = bool(wanted)


def fused_failure() -> Optional[str]:
    """Why the fused kernel could not be built in this process, or None."""
    return _FUSED["failed"]


def _fused(x: torch.Tensor, params: torch.Tensor) -> Optional[torch.Tensor]:
    """`fused_step` compiled on first use, or None for the eager path: switched off, or a build failed
    on this device (said once, with the reason; the eager path serves from then on). Every call stays
    inside the fallback, not only the first: a later shape can recompile (a single row is specialised
    even with dynamic shapes), and a recompile that fails must not raise mid-generation. A build failure
    raises before the kernel writes anything."""
    if not _FUSED["wanted"] or _FUSED["failed"] is not None:
        return None
    if _FUSED["kernel"] is None:
        _FUSED["kernel"] = torch.compile(fused_step, dynamic=True)
    try:
        out = _FUSED["kernel"](x, params)
    except Exception as exc:  # noqa: BLE001 - no compiler, unsupported backend: the eager path is exact too
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _FUSED["failed"] = f"{type(exc).__name__}: {first}"[:300]
        print(f"megatron-hapo: the fused temperature processor could not be built on {x.device.type} "
              f"({_FUSED['failed']}); using the eager path (rollout.fused_processor=false skips the attempt)", flush=True)
        return None
    _FUSED["proven"].add(x.device.type)
    return out
