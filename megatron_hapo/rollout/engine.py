"""The vLLM rollout engine: generation with HAPO's per-token temperature and exact per-token records,
and in-place weight updates from the trainer.

The engine runs in its rank's process (VLLM_ENABLE_V1_MULTIPROCESSING=0): one engine per
inference-TP group, colocated with Megatron on the trainer's ranks (`rollout/colocated.py`), or on
engine ranks of their own under rollout.placement=separate (`rollout/engine_rank.py`, where the
engines' world is the engine ranks'). Placement (`engine_placement`): under torch.distributed
every engine uses vLLM's `external_launcher` executor, inference TP 1 included (as verl and TRL
do): it takes the rank's LOCAL_RANK as its device, where the single-process executor would put
every rank's engine on cuda:0 and move the process's current device there. The engines of
different inference-TP groups are independent ("external data parallel", the leading dimension
of vLLM's rank layout): no `data_parallel_size` is passed, which would make vLLM synchronise
every step across engines that run different numbers of steps. The temperature processor is
vLLM's V1 interface, so the V1 model runner is selected (VLLM_USE_V2_MODEL_RUNNER=0) before vLLM
is imported.

Memory on GPU (`enable_sleep_mode`): `sleep()` is vLLM's level 1 (weights offloaded to host
memory, KV cache discarded). Level 2 would discard the weights too, but buffers that are not
checkpoint weights (the rotary cos/sin cache) are not restored by the in-place reload, so the
engine would generate from garbage. `wake_up` runs in stages: weights first, then the caller
syncs the new weights, then the KV cache (`wake_up_kv_cache`), so the peak never holds the
training state, old weights and the KV cache at once.
"""
from __future__ import annotations

import itertools
import logging
import os
import weakref
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import device as dev
from .. import quiet
from ..algorithms import EntropyStats


def _vllm_env() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # the temperature processor is a V1 processor
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its per-engine INFO lines drown the training log
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # our handler, with the known-harmless lines filtered
    quiet.vllm_handler()


def _import_vllm() -> None:
    """The first `import vllm` of the process, from a thread of its own: vLLM's import keeps the
    importing stack's frames alive for the life of the process (measured with vLLM 0.32 on CPU), so an
    engine whose constructor imported it could never be collected, nor its GPU memory freed."""
    import sys
    import threading

    _vllm_env()
    if "vllm.entrypoints.llm" in sys.modules:
        return
    failure = []

    def run():
        try:  # vLLM's top level imports lazily: what the engine uses, the temperature processor's modules too
            import vllm

            vllm.LLM, vllm.SamplingParams, vllm.TokensPrompt  # noqa: B018 - resolving them runs the lazy imports
            from . import temperature_processor  # noqa: F401
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)

    t = threading.Thread(target=run, name="import-vllm")
    t.start()
    t.join()
    if failure:
        raise failure[0]


def _shutdown_engine(client) -> None:
    """Ordered shutdown of an in-process engine, in place of vLLM's own finalizer: the workers release
    the model, the KV cache and sleep mode's memory pools, the scheduler stops, and vLLM's process groups
    are destroyed, but the job's torch.distributed process group stays (vLLM 0.32's own teardown ends
    in `destroy_process_group()`, which would take the trainer's world with it). A later engine in the
    process creates vLLM's groups anew over the same world."""
    import gc

    from vllm.distributed import parallel_state as vps

    core = getattr(client, "engine_core", None)
    if core is None:
        return
    client.engine_core = None
    try:
        if getattr(core, "structured_output_manager", None) is not None:
            core.structured_output_manager.clear_backend()
        if getattr(core, "model_executor", None) is not None:
            core.model_executor.shutdown()
        if getattr(core, "scheduler", None) is not None:
            core.scheduler.shutdown()
    finally:
        gc.unfreeze()  # vLLM froze the objects of the engine's start-up
        if dist.is_initialized():  # at interpreter exit the world may be gone already: nothing left to destroy
            vps.destroy_model_parallel()
            if vps._WORLD is not None:
                vps._WORLD.destroy()
        vps._WORLD = None
        vps._NODE_COUNT = None
        gc.collect()
        if dev.is_gpu():
            torch.cuda.empty_cache()


from .engine_settings import (  # noqa: F401  (re-exported: the engine's settings and records)
    TOOL_TURN_OVERHEAD, Response, SamplingConfig, engine_placement, kv_bytes_per_token, kv_cache_advice,
    run_context_length, token_records)


def engine_for_run(cfg, model_dir: str, spec) -> "RolloutEngine":
    """The run's engine (rollout.* and parallel.inference_tensor_parallel_size), its context from the
    run (`run_context_length`); a KV cache too small for one sequence is refused with the settings
    to change (`kv_cache_advice`)."""
    r = cfg.rollout
    context = run_context_length(cfg, spec.max_position_embeddings)
    try:
        return RolloutEngine(model_dir, max_model_len=context, kv_cache_memory_bytes=r.kv_cache_memory_bytes,
                             seed=cfg.train.seed, tensor_parallel_size=cfg.parallel.inference_tensor_parallel_size,
                             dtype=cfg.model.dtype, gpu_memory_utilization=r.gpu_memory_utilization,
                             enable_sleep_mode=r.enable_sleep_mode, enforce_eager=r.enforce_eager,
                             fused_processor=r.fused_processor, record_routing=r.routing_replay)
    except ValueError as exc:
        if "KV cache" not in str(exc) and "cache blocks" not in str(exc):
            raise
        raise ValueError(kv_cache_advice(cfg, spec, context)) from exc


class RolloutEngine:
    def __init__(
        self,
        model_dir: str,
        *,
        max_model_len: int,
        kv_cache_memory_bytes: int = 256 * 2**20,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        dtype: str = "float32",
        max_num_seqs: int = 256,
        gpu_memory_utilization: Optional[float] = None,
        enable_sleep_mode: bool = False,
        enforce_eager: bool = True,
        fused_processor: bool = True,
        record_routing: bool = False,
    ):
        _import_vllm()  # the environment vLLM reads first (_vllm_env)
        from vllm import LLM

        # every in-place reload warns that rotary embeddings (a buffer, not a checkpoint weight) got no weights
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            lambda record: "RotaryEmbedding: Failed to load weights" not in record.getMessage())
        # token-id prompts only (skip_tokenizer_init): vLLM's chat-template warm-up cannot run, harmlessly
        logging.getLogger("vllm.renderers.base").addFilter(
            lambda record: not any(m in record.getMessage() for m in ("Chat template warmup failed", "Using None for EOS")))

        from .temperature_processor import HapoTemperatureProcessor, use_fused

        use_fused(fused_processor)

        kwargs = dict(
            model=model_dir, skip_tokenizer_init=True, max_model_len=max_model_len, seed=seed, dtype=dtype,
            # CUDA graphs (and vLLM's torch.compile) on GPU when enforce_eager=False: the temperature
            # processor runs in the sampler, outside the captured forward, and the in-place weight
            # reload and sleep mode keep the weights' addresses. The CPU backend runs eager.
            # routing replay records each position when it is computed: no prefix cache, no CUDA graphs
            max_num_seqs=max_num_seqs, enforce_eager=enforce_eager or not dev.is_gpu() or record_routing,
            logits_processors=[HapoTemperatureProcessor], enable_prefix_caching=not record_routing,
            # vLLM turns async scheduling on on GPU; with a custom logits processor it then synchronises every
            # step. Off until the GPU self-test shows the processor correct and sync-free with it on.
            async_scheduling=False,
            **engine_placement(tensor_parallel_size, dist.is_initialized(), dev.is_gpu()),
        )
        if dev.is_gpu():
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization or 0.5, enable_sleep_mode=enable_sleep_mode)
        else:
            # vLLM 0.32's CPU runner fails on a seeded request whose prefill is split over steps (it rewinds the
            # request's generator by an offset, which CPU generators do not have): a multi-turn round or a batch
            # of long prompts over max_num_batched_tokens. Without chunked prefill the scheduler leaves a prompt
            # that does not fit for the next step instead (what vLLM itself does for MLA models on CPU).
            kwargs.update(kv_cache_memory_bytes=kv_cache_memory_bytes, enable_chunked_prefill=False,
                          max_num_batched_tokens=max(max_model_len, 4096))
        self.sleep_enabled = enable_sleep_mode and dev.is_gpu()
        self.llm = LLM(**kwargs)
        dev.set_current()  # whatever vLLM did to the current device, the rank's own is current again
        client = self.llm.llm_engine.engine_core
        if getattr(client, "_finalizer", None) is not None and client._finalizer.detach() is not None:
            # ours instead of vLLM's: the same release of memory, without destroying the job's process group
            self._finalizer = weakref.finalize(self, _shutdown_engine, client)
        self.max_model_len = max_model_len
        self.record_routing = record_routing
        if record_routing:
            from . import routing

            if not self.llm.collective_rpc(routing.install)[0]:
                raise ValueError("rollout.routing_replay: the model has no MoE layers to record")
        self._counter = itertools.count()
        self.weight_version = 0

    def close(self) -> None:
        """Releases the engine (workers, KV cache, sleep-mode pools, vLLM's process groups) now, keeping
        the job's torch.distributed world; also what happens when the engine is collected. Idempotent."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()
        self.llm = None

    # ---- generation ---------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        sampling: SamplingConfig,
        stats: Optional[EntropyStats] = None,
        seeds: Optional[Sequence[int]] = None,
        max_tokens: Optional[Sequence[int]] = None,
    ) -> List[List[Response]]:
        """n responses per prompt (token-id prompts). seeds: one per prompt; sample j of prompt i
        uses seeds[i] + j, so results do not depend on batch composition. max_tokens: per prompt, a
        cap below sampling.max_tokens (a multi-turn response's remaining budget)."""
        from vllm import TokensPrompt

        from .temperature_processor import RECORDER

        if n < 1:
            raise ValueError(f"n: must be ≥ 1, got {n}")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds: {len(seeds)} seeds for {len(prompts)} prompts")
        if stats is not None and not isinstance(stats, EntropyStats):
            raise TypeError(f"stats: expected EntropyStats or None, got {type(stats).__name__}")
        out: List[List[Response]] = [[None] * n for _ in prompts]
        requests, params, keys = [], [], []
        for i, prompt in enumerate(prompts):
            prompt = list(prompt)
            problem = None
            if not prompt:
                problem = "empty prompt"
            elif len(prompt) >= self.max_model_len:
                problem = f"prompt of {len(prompt)} tokens leaves no room to generate (max_model_len={self.max_model_len})"
            if problem:
                for j in range(n):
                    out[i][j] = Response(i, j, [], [], [], [], [], None, error=problem)
                continue
            for j in range(n):
                tag = f"r{next(self._counter)}"
                params.append(self.request_params(
                    sampling, stats, tag, None if seeds is None else int(seeds[i]) + j,
                    min(sampling.max_tokens if max_tokens is None else max_tokens[i], self.max_model_len - len(prompt))))
                requests.append(TokensPrompt(prompt_token_ids=prompt))
                keys.append((i, j, tag))
        if requests:
            self._check_usable()
            if self.record_routing:
                from . import routing

                self.llm.collective_rpc(routing.set_enabled, args=(True,))
            try:
                results = self.llm.generate(requests, params, use_tqdm=False)
            finally:
                if self.record_routing:
                    self.llm.collective_rpc(routing.set_enabled, args=(False,))
            records = RECORDER.pop({k[2] for k in keys})
            experts = self._routing(requests, results) if self.record_routing else {}
            for (i, j, tag), res in zip(keys, results):
                out[i][j] = self._response(i, j, res.outputs[0], records[tag])
                out[i][j].routing = experts.get(res.request_id)
        return out

    def request_params(self, sampling: SamplingConfig, stats: Optional[EntropyStats], tag: str, seed: Optional[int],
                       max_tokens: int, delta: bool = False):
        """vLLM's SamplingParams of one HAPO request: temperature 1 for vLLM, the temperature processor
        scales per token (from `stats`, with adaptation on) and records under `tag`; the sampled
        token's raw log-prob returned; delta: outputs as increments (LLMEngine.step driving)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        hapo = {"tag": tag, "stats": stats.to_dict() if (stats is not None and sampling.adaptive) else None,
                "base_temperature": sampling.base_temperature, "tau": sampling.tau, "sign_mode": sampling.sign_mode}
        return SamplingParams(n=1, temperature=1.0, top_p=sampling.top_p, top_k=sampling.top_k, max_tokens=max_tokens,
                              logprobs=0, seed=seed, stop_token_ids=list(sampling.stop_token_ids), detokenize=False,
                              extra_args={"hapo": hapo}, **({"output_kind": RequestOutputKind.DELTA} if delta else {}))

    def _routing(self, requests, results) -> dict:
        from . import routing

        cfg = self.llm.llm_engine.model_config.hf_config
        lengths = {res.request_id: len(req["prompt_token_ids"]) + len(res.outputs[0].token_ids) - 1
                   for req, res in zip(requests, results)}
        steps = self.llm.collective_rpc(routing.take)[0]
        return routing.resolve(steps, lengths, int(cfg.num_hidden_layers), int(cfg.num_experts_per_tok))

    @staticmethod
    def _response(i, j, completion, record) -> Response:
        ids = list(completion.token_ids)
        raw = [completion.logprobs[pos][tok].logprob for pos, tok in enumerate(ids)]  # vLLM's: of the raw (T = 1) logits
        temps, ents, lp, lp1 = token_records(raw, record)
        return Response(i, j, ids, temps, ents, lp, lp1, completion.finish_reason)

    # ---- weights ------------------------------------------------------------------------------

    def model_state_shapes(self) -> dict:
        """{name: shape} the engine's model expects (HF checkpoint names)."""
        return self.llm.collective_rpc(_checkpoint_shapes)[0]

    def update_weights(
        self,
        named_tensors: Iterable[Tuple[str, torch.Tensor]],
        names_and_shapes: Optional[dict] = None,
    ) -> int:
        """Loads a complete set of HF-named weights in place, then resets the prefix cache.

        With `names_and_shapes` (what the stream will hold), the set is checked against the
        engine's model before a byte moves and the tensors stream through in bounded memory;
        without it, the tensors are collected and checked first. Either way a wrong name, shape
        or a missing tensor raises before loading, and the engine keeps serving its weights.
        A tensor that turns out non-finite or mismatched mid-stream raises too and marks the
        engine unusable until the next complete update (vLLM has no partial rollback).
        Returns the number of bytes loaded.
        """
        expected = self._expected
        # A tied model's lm_head is the embedding. vLLM's layerwise reload still wants to be handed
        # lm_head.weight (without it, it reports "ParallelLMHead: Failed to load weights" and the
        # model comes out wrong), so it is sent as a copy of the embedding, whatever the caller gave.
        tied = "lm_head.weight" not in expected
        named_tensors = _with_tied_head(named_tensors) if tied else named_tensors
        if names_and_shapes is not None and tied:
            names_and_shapes = {n: s for n, s in names_and_shapes.items() if n != "lm_head.weight"}
        if names_and_shapes is None:
            tensors = list(named_tensors)
            names_and_shapes = {n: tuple(t.shape) for n, t in tensors if not (tied and n == "lm_head.weight")}
            for n, t in tensors:
                _check_tensor(n, t, expected)
            stream = iter(tensors)
        else:
            stream = (_check_tensor(n, t, expected) for n, t in named_tensors)
        for name, shape in names_and_shapes.items():
            if name not in expected:
                raise KeyError(f"weight {name!r}: the engine's model has no such parameter")
            if tuple(shape) != tuple(expected[name]):
                raise ValueError(f"weight {name!r}: shape {tuple(shape)}, the engine expects {tuple(expected[name])}")
        missing = sorted(set(expected) - set(names_and_shapes))
        if missing:
            raise KeyError(f"weights: {len(missing)} parameters missing, e.g. {missing[:3]} (a partial update would corrupt the model)")
        loaded = [0]

        def counted():
            for n, t in stream:
                loaded[0] += t.numel() * t.element_size()
                yield n, t

        self._usable = False
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": counted()})
        self.llm.collective_rpc(_prepare_experts)
        self.llm.reset_prefix_cache()  # KV blocks computed with the old weights must not be reused
        self._usable = True
        self.weight_version += 1
        return loaded[0]

    def greedy(self, prompts: Sequence[Sequence[int]], max_tokens: int, stop_token_ids: Sequence[int] = ()) -> List[List[int]]:
        """Greedy completions (evaluation), with vLLM's own sampler: no temperature adaptation."""
        from vllm import SamplingParams, TokensPrompt

        self._check_usable()
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=list(stop_token_ids), detokenize=False)
        results = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [list(r.outputs[0].token_ids) for r in results]

    def score(self, sequences: Sequence[Sequence[int]]) -> List[List[float]]:
        """log p(token t | tokens < t) at T = 1 for t ≥ 1 of each sequence (vLLM prompt log-probs)."""
        from vllm import SamplingParams, TokensPrompt

        self._check_usable()
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        results = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False)
        out = []
        for seq, res in zip(sequences, results):
            out.append([res.prompt_logprobs[t][seq[t]].logprob for t in range(1, len(seq))])
        return out

    def _check_usable(self):
        if not getattr(self, "_usable", True):
            raise RuntimeError("rollout engine: the last weight update failed mid-stream; load a complete set first")

    @property
    def _expected(self) -> dict:
        if not hasattr(self, "_expected_cache"):
            self._expected_cache = self.model_state_shapes()
        return self._expected_cache

    def sleep(self) -> None:
        """Frees the engine's GPU memory during the update, level 1 (module docstring); no-op without
        sleep mode (and on CPU, where vLLM's sleep does nothing)."""
        if self.sleep_enabled:
            self.llm.sleep(level=1)

    def wake_up_weights(self) -> None:
        """First stage of waking: the weights only (the caller syncs new weights next)."""
        if self.sleep_enabled:
            dev.free_cached_memory()  # the trainer's cached blocks go back before vLLM's pool maps memory
            self.llm.wake_up(tags=["weights"])

    def wake_up_kv_cache(self) -> None:
        """Second stage: the KV cache, after the weight sync freed its temporaries."""
        if self.sleep_enabled:
            dev.free_cached_memory()
            if not self.llm.wake_up(tags=["kv_cache"]):  # anything else still asleep: wake it all
                self.llm.wake_up()
            self.llm.reset_prefix_cache()  # the freed KV blocks' contents are gone


def _with_tied_head(named_tensors):
    for name, t in named_tensors:
        if name == "lm_head.weight":
            continue
        yield name, t
        if name == "model.embed_tokens.weight":
            yield "lm_head.weight", t


def _check_tensor(name: str, t: torch.Tensor, expected: dict):
    # the tied head is checked as the embedding it copies
    key = "model.embed_tokens.weight" if name == "lm_head.weight" and name not in expected else name
    if key not in expected:
        raise KeyError(f"weight {name!r}: the engine's model has no such parameter")
    if tuple(t.shape) != tuple(expected[key]):
        raise ValueError(f"weight {name!r}: shape {tuple(t.shape)}, the engine expects {tuple(expected[key])}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"weight {name!r}: non-finite values")
    return name, t


def _checkpoint_shapes(worker) -> dict:
    """Runs inside the worker: HF checkpoint names and shapes of the loaded model."""
    from ..models.hf_config import ModelSpec
    from ..models.mapping import hf_param_shapes

    return hf_param_shapes(ModelSpec.from_hf(worker.model_runner.model_config.hf_config))


def _prepare_experts(worker) -> int:
    """Runs inside the worker after an in-place reload: each MoE layer's experts kernel prepares the
    new weights. vLLM 0.32 runs this step only at the first load (`_setup_kernel` skips it when a
    kernel exists); the CPU kernel prepacks the experts there, so without it a reload leaves the
    engine computing with stale packed experts (log-prob error ~1, docs/MOE.md). Where the kernel's
    step is a no-op (GPU kernels), this is one too. Returns the number of layers prepared."""
    count = 0
    for module in worker.model_runner.model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and hasattr(experts, "process_weights_after_loading"):
            experts.process_weights_after_loading(module)
            count += 1
    return count
