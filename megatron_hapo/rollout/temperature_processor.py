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
from ..algorithms.entropy import SIGN_MODES

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
        copies of row indices when requests join or leave (`_rebuild`), and on CPU only, a check for
        −inf logits (a CPU tensor's `bool()` is not a device sync; on GPU the safe form runs always)."""
        if not self.requests:
            return logits
        rows = self._rows
        if rows.device != logits.device:  # the engine's sampler device differs from the one vLLM announced
            rows = self._rows = rows.to(logits.device)
            self._groups = [(k, p.to(logits.device)) for k, p in self._groups]
        all_rows = rows.numel() == logits.shape[0]
        if all_rows:
            x = logits if logits.dtype == torch.float32 else logits.float()
        else:
            x = logits.index_select(0, rows).float()
        # The statistics in few passes over the row, each a fast kernel (measured on CPU: amax and
        # softmax are; max-with-indices, argmax and log_softmax + exp are several times slower):
        #   m = max x;  p = softmax(x);  log Z = m − log max p (max p ≥ 1/V: exact in fp32);
        #   H = log Z − Σ p·x (an elementwise product and torch's cascade sum: bmm's fp32 dot was
        #   1e-3 off at V = 49k);  later log Z_T = m/T − log max softmax(x/T) (same argmax, T > 0).
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
        y = x.mul_((1.0 / temp)[:, None])  # float32; the logits themselves when x is them
        if all_rows and y.data_ptr() != logits.data_ptr():
            logits.copy_(y)
        elif not all_rows:
            logits[rows] = y.to(logits.dtype)
        torch.ops.aten._softmax.out(y, -1, False, out=p)  # p is free again: softmax at T into it
        log_zt = m / temp - p.amax(dim=-1).log()
        del p, work
        reqs = [self.requests[i] for i in self._row_list]
        RECORDER.add([r.tag for r in reqs], [len(r.output_ids) for r in reqs],
                     torch.stack([temp, entropy, log_z1, log_zt], dim=1).float())
        return logits
