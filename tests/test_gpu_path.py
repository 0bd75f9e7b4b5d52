"""What of the GPU path can be checked without CUDA: both layer specs' name maps, the device
abstraction, engine placement, the allocator setting, scoped CPU shims, tolerant checkpoint
loads, the Slurm launcher (shellcheck, and run with stand-in Slurm commands), a graceful stop on
SIGUSR1 with its resume, and tools/gpu_selftest.py run on the CPU (no pass it did not measure)."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from .distributed import error_text, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- name maps of both specs ------------------------------------------------------------------

def names_worker(rank, world):
    from megatron_hapo import device as dev
    from megatron_hapo.models.hf_config import ModelSpec, build_gpt_model, transformer_config
    from megatron_hapo.models.mapping import hf_to_megatron, megatron_to_hf
    from megatron_hapo.training.parallel import init_model_parallel

    from .tiny_models import hf_model

    init_model_parallel(1, 1)
    out = {}
    for family in ("llama", "qwen2", "qwen3"):
        hf = hf_model(family)
        spec = ModelSpec.from_hf(hf.config)
        model = build_gpt_model(spec, transformer_config(spec), pre_process=True, post_process=True, layer_spec="local")
        with dev.megatron_scope():
            sharded = model.sharded_state_dict()
        local_names = {k for k in model.state_dict() if "_extra_state" not in k}
        # The TE spec's parameter names, from megatron-core's own spec definitions: the local spec
        # stores its tensors under the TE names in distributed checkpoints (sharded_state_dict_keys_map).
        te_names = set()
        for k, v in sharded.items():
            if "_extra_state" in k:
                continue
            m = k.split(".")
            te_names.add(f"decoder.layers.{m[2]}." + v.key[len("decoder.layers."):] if k.startswith("decoder.layers.")
                         else v.key)
        hf_sd = {k: v for k, v in hf.state_dict().items()}
        mapped = {s: hf_to_megatron(hf_sd, spec, layer_spec=s) for s in ("local", "te")}
        back = {}
        for s in ("local", "te"):
            pairs = {}
            for name, t in mapped[s].items():
                if name == "output_layer.weight" and spec.tie_word_embeddings:
                    continue
                pairs.update(dict(megatron_to_hf(name, t, spec)))
            back[s] = all(torch.equal(pairs[k], hf_sd[k]) for k in pairs) and set(pairs) == {
                k for k in hf_sd if not (spec.tie_word_embeddings and k == "lm_head.weight")}
        out[family] = {"local_ok": set(mapped["local"]) == local_names, "te_ok": set(mapped["te"]) == te_names,
                       "te_fused": any("linear_qkv.layer_norm_weight" in n for n in mapped["te"]),
                       "round_trip": back, "diff": sorted(set(mapped["te"]) ^ te_names)[:4]}
    return out


def test_layer_spec_name_maps_both_ways():
    out = run_ranks(1, names_worker, timeout=300)[0]
    for family, r in out.items():
        assert r["local_ok"], family
        assert r["te_ok"], (family, r["diff"])
        assert r["te_fused"], family
        assert r["round_trip"] == {"local": True, "te": True}, family


# ---- device abstraction, placement, allocator ---------------------------------------------------

def test_device_abstraction_on_cpu(monkeypatch):
    from megatron_hapo import device as dev

    assert dev.device() == torch.device("cpu") and dev.dist_backend() == "gloo"
    assert dev.resolve_layer_spec("auto") == "local" and dev.resolve_layer_spec(None) == "local"
    with pytest.raises(ValueError, match="model.layer_spec=te"):
        dev.resolve_layer_spec("te")
    with pytest.raises(ValueError, match="model.layer_spec"):
        dev.resolve_layer_spec("fused")
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        dev.local_rank()
    assert dev.memory_report() == {}


def test_engine_placement():
    from megatron_hapo.rollout.engine import engine_placement

    # under torch.distributed every engine uses the external launcher, inference TP 1 included,
    # and no engine is told about the others (no data_parallel_size)
    for gpu in (False, True):
        one = engine_placement(1, distributed=True, gpu=gpu)
        assert one == {"tensor_parallel_size": 1, "distributed_executor_backend": "external_launcher"}
        two = engine_placement(2, distributed=True, gpu=gpu)
        assert two["distributed_executor_backend"] == "external_launcher" and "data_parallel_size" not in two
        assert two.get("disable_custom_all_reduce", False) == gpu
    assert engine_placement(1, distributed=False, gpu=True) == {"tensor_parallel_size": 1}
    with pytest.raises(ValueError, match="torchrun"):
        engine_placement(2, distributed=False, gpu=True)


def test_allocator_setting_with_sleep_mode():
    from megatron_hapo import device as dev

    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,max_split_size_mb:512"}
    assert dev.check_allocator_config(False, env) is None and "expandable" in env["PYTORCH_CUDA_ALLOC_CONF"]
    note = dev.check_allocator_config(True, env)
    assert "expandable_segments removed" in note and env["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments: True"}
    assert dev.check_allocator_config(True, env) and "PYTORCH_CUDA_ALLOC_CONF" not in env
    assert dev.check_allocator_config(True, {}) is None


def test_config_refuses_what_cannot_run_here():
    from megatron_hapo.config import Config

    with pytest.raises(ValueError, match="model.layer_spec=te"):
        Config.load(None, ["model.layer_spec=te"]).validate(1)
    with pytest.raises(ValueError, match="parallel.sequence_parallel"):  # SP runs on CPU too now, with TP > 1
        Config.load(None, ["parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=1"]).validate(2)
    Config.load(None, ["parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=2"]).validate(2)
    with pytest.raises(ValueError, match="control_timeout_s"):
        Config.load(None, ["parallel.control_timeout_s=100"]).validate(1)


# ---- scoped shims, tolerant loads, optimizer workarounds ----------------------------------------

def shims_worker(rank, world, tmp):
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    from megatron_hapo import device as dev
    from megatron_hapo.algorithms import AlgorithmConfig
    from megatron_hapo.models.convert import load_sharded
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.training.checkpoint import _torch_adams, save_checkpoint
    from megatron_hapo.training.parallel import control_group, init_model_parallel
    from megatron_hapo.training.policy import MegatronPolicy, PolicyBatch, PolicyConfig

    from .tiny_models import hf_model

    init_model_parallel(1, 1)
    hf = hf_model("qwen2")
    policy = MegatronPolicy(ModelSpec.from_hf(hf.config), PolicyConfig(micro_batch_size=2, lr_warmup_steps=0),
                            AlgorithmConfig.preset("dapo"))
    policy.load_hf_state_dict(hf.state_dict())
    ids = torch.randint(0, 200, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 3:11] = True
    old, _ = policy.compute_logprobs(PolicyBatch(ids, mask))
    policy.train_step(PolicyBatch(ids, mask, advantages=torch.tensor([1.0, -1.0]), old_logp=old))
    out = {"mode_active_after": torch._C._is_torch_function_mode_enabled()}
    try:
        torch.zeros(1, device="cuda")
        out["cuda_outside_scope"] = "allowed"
    except (RuntimeError, AssertionError) as exc:
        out["cuda_outside_scope"] = type(exc).__name__
    with dev.megatron_scope():
        out["cuda_inside_scope"] = str(torch.zeros(1, device="cuda").device)
    out["control_backend"] = str(torch.distributed.get_backend(control_group()))
    out["torch_adams"] = [type(o).__name__ for o in _torch_adams(policy)]
    # an inner optimizer that is not torch's Adam (as TE's FusedAdam is not) gets no CPU workaround
    from types import SimpleNamespace

    params = [torch.nn.Parameter(torch.zeros(1))]
    sgd, adamw = torch.optim.SGD(params, lr=0.1), torch.optim.AdamW(params)
    mixed = SimpleNamespace(optimizer=SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=sgd),
                                                                          SimpleNamespace(optimizer=adamw)]))
    out["non_adam_excluded"] = _torch_adams(mixed) == [adamw]

    path = save_checkpoint(f"{tmp}/ckpt", 1, policy)
    with open(f"{path}/trainer_state.json") as f:
        out["recorded_spec"] = json.load(f)["layer_spec"]
    model_sd = policy.chunks[0].module.sharded_state_dict()
    # a TE model has _extra_state objects a local-spec checkpoint may lack: tolerated
    extra = dict(model_sd)
    extra["decoder.layers.0.self_attention.linear_qkv.te_only._extra_state"] = ShardedObject(
        "decoder.layers.self_attention.linear_qkv.te_only._extra_state", None, (1,), (0,), replica_id=0)
    load_sharded({"model": extra}, path, "te-like model")
    out["extra_state_tolerated"] = True
    bogus = dict(model_sd)
    bogus["decoder.bogus.weight"] = ShardedTensor.from_rank_offsets("decoder.bogus.weight", torch.zeros(3), replica_id=0)
    out["bogus"] = error_text(KeyError, load_sharded, {"model": bogus}, path, "bogus model")
    return out


def test_shims_scoped_and_tolerant_checkpoint_loads(tmp_path):
    out = run_ranks(1, shims_worker, str(tmp_path), timeout=300, fresh=True)[0]  # process-wide state from start-up
    assert out["mode_active_after"] is False  # no process-wide TorchFunctionMode left entered
    assert out["cuda_outside_scope"] != "allowed" and out["cuda_inside_scope"] == "cpu"
    assert out["control_backend"] == "gloo"
    assert out["torch_adams"] == ["AdamW"] and out["non_adam_excluded"]
    assert out["recorded_spec"] == "local"
    assert out["extra_state_tolerated"]
    assert out["bogus"] and "decoder.bogus.weight" in out["bogus"]


# ---- the Slurm launcher -----------------------------------------------------------------------

SLURM = os.path.join(ROOT, "examples", "qwen2.5-math-7b", "launch.slurm")


def test_slurm_script_passes_shellcheck():
    shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    res = subprocess.run([shellcheck, "-S", "warning", SLURM], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _stub(folder, name, body):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write("#!/usr/bin/env bash\n" + body + "\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def test_slurm_script_with_stand_in_slurm(tmp_path):
    """srun/scontrol/sbatch replaced by scripts (no Slurm here): the launch line, the config path
    inside the container's working folder, and SIGUSR1 → stop file → wait for the job → resubmit."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # many nodes: a pipe that stops reading after the first line would die of SIGPIPE under pipefail
    _stub(bin_dir, "scontrol", "echo node-a; for i in $(seq 20000); do echo node-$i; done")
    _stub(bin_dir, "srun", f'printf "%s\\n" "$@" > {tmp_path}/srun_args; '
                           f'for i in $(seq 100); do [ -f {tmp_path}/stop ] && break; sleep 0.1; done; sleep 0.5')
    _stub(bin_dir, "sbatch", f'echo "$@" > {tmp_path}/resubmitted')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2",
               SLURM_JOB_ID="77", STOP_FILE=str(tmp_path / "stop"), RESUBMIT="1", IFNAME="lo")
    proc = subprocess.Popen(["bash", SLURM, "dapo", "train.steps=5"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for _ in range(100):
        if (tmp_path / "srun_args").exists():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert (tmp_path / "stop").exists() and "SIGUSR1" in output
    args = (tmp_path / "srun_args").read_text().splitlines()
    workdir = next(a.split("=", 1)[1] for a in args if a.startswith("--container-workdir="))
    assert workdir == "/workspace/megatron_hapo"  # the Dockerfile's WORKDIR, where the image holds the repository
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        assert f"WORKDIR {workdir}" in f.read()
    command = args[-1]
    config = command.split("--config ")[1].split()[0]
    assert os.path.exists(os.path.join(ROOT, config)), config  # the path resolves from the working folder
    assert "train.steps=5" in command and "MASTER_ADDR" not in command and "node-a" in command
    assert (tmp_path / "resubmitted").read_text().split()[1:] == ["dapo", "train.steps=5"]


# ---- graceful stop and resume -------------------------------------------------------------------

def test_sigusr1_saves_and_exits_then_resumes(tmp_path):
    run_dir = tmp_path / "run"
    base = [sys.executable, "-m", "megatron_hapo.train", f"train.run_dir={run_dir}", "log.progress=off",
            "rollout.max_response_tokens=4", "eval.at_end=false", "reward.workers=0", "rollout.prompts_per_step=4",
            "train.mini_batch_prompts=4", "train.micro_batch_size=4", "rollout.samples_per_prompt=2",
            "log.tensorboard=false", "rollout.dynamic_sampling=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    proc = subprocess.Popen(base + ["train.steps=200"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    assert "stop requested (SIGUSR1)" in output
    from megatron_hapo.training.checkpoint import find_latest

    latest = find_latest(str(run_dir / "checkpoints"))
    stopped_at = int(os.path.basename(latest).split("_")[1])
    assert 1 <= stopped_at < 200
    res = subprocess.run(base + [f"train.steps={stopped_at + 1}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {latest} at step {stopped_at}" in res.stdout
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.strip()]
    assert steps == list(range(1, stopped_at + 2))


# ---- the self-test on a machine without a GPU ---------------------------------------------------

def test_gpu_selftest_on_cpu_through_the_device_script(tmp_path):
    """tools/device_check.sh, the one command a bare GPU machine runs, here on the CPU: it runs the
    self-test with the 2-rank check over gloo, every check that needs CUDA or a missing library says
    why it skipped, every other one measured its figure, and the table and JSON land in the folder."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, BUDGET="800", WHEELS=str(tmp_path / "none"))
    res = subprocess.run(["bash", "tools/device_check.sh", str(out), "--skip", "trainer", "--multi-on-cpu"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    doc = json.loads((out / "gpu_selftest.json").read_text())
    results = {r["check"]: r for r in doc["results"]}
    by_status = {}
    for r in results.values():
        by_status.setdefault(r["status"], []).append(r["check"])
    assert "FAIL" not in by_status, by_status
    assert doc["complete"] is True and doc["preflight"] == {"compile": None}, doc["preflight"]
    assert "local spec, block-diagonal mask" in results[next(c for c in results if c.startswith("packed"))]["figure"]
    # the checks that need CUDA say so; every other one ran on the CPU and measured its figure
    gpu_only = [c for c in results if "sleep/wake" in c or "MFU" in c or "CUDA graphs" in c]
    assert len(gpu_only) == 3 and all(results[c]["figure"].startswith("skipped: no GPU") for c in gpu_only), gpu_only
    te_only = [c for c in results if "local-spec (CPU-converted)" in c]
    assert results[te_only[0]]["figure"] == "skipped: not installed (transformer_engine)"
    ran = [c for c, r in results.items() if r["status"] == "pass"]
    assert len(ran) >= 14, by_status
    assert doc["layer_spec"] == "local"
    assert "native GPU modules skipped: no GPU" in results[next(c for c in results if c.startswith("stack"))]["figure"]
    assert "(CPU, gloo)" in results[next(c for c in results if c.startswith("2 GPUs"))]["figure"]
    assert "(own process)" in results[next(c for c in results if c.startswith("MoE engine"))]["figure"]
    # tiers: the stack first, Transformer Engine next, the engines after the training path, measurements last
    order = [r["check"] for r in doc["results"]]
    first = {key: next(i for i, c in enumerate(order) if key in c) for key in
             ("stack", "TE spec", "parameters, gradients", "engine built after", "MFU", "2 GPUs")}
    assert first["stack"] < first["TE spec"] < first["parameters, gradients"] < first["engine built after"] \
        < first["MFU"] < first["2 GPUs"], order
    table = (out / "gpu_selftest.txt").read_text()
    assert "| check" in table and "peak GiB" in table and len(table.splitlines()) == len(order) + 2
    assert "| check" in (out / "gpu_selftest.log").read_text()


def test_gpu_selftest_budget_and_missing_stack(tmp_path):
    """Checks not started within --budget are skipped (never a failure); a machine where the stack does not
    import gets exit 2 naming the missing module and the way out, not a traceback; and a machine without
    psutil (and accelerate, which needs it), as the lent GPU machine, saves and resumes a checkpoint
    (megatron's forked writer hung there before training/lib_shims) and runs the MoE router."""
    out = tmp_path / "selftest.json"
    res = subprocess.run([sys.executable, "tools/gpu_selftest.py", "--out", str(out), "--budget", "0.5",
                          "--only", "stack,vocab-parallel"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert results[0]["status"] == "pass"  # started at once
    assert any(r["figure"] == "skipped: over the --budget of 0.5 s" for r in results if "vocab" in r["check"])
    # the lent machine without transformers (or any module the checks import): exit 2 naming it, before any check
    env = dict(os.environ, PYTHON=sys.executable, HAPO_BLOCK_MODULES="transformers,psutil", WHEELS=str(tmp_path / "none"),
               PYTHONPATH=os.path.join(ROOT, "tests", "blocked_site"))
    res = subprocess.run(["bash", "tools/device_check.sh", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 2 and "does not import: missing module 'transformers'" in res.stdout, res.stdout
    assert "tools/device_wheels.txt" in res.stdout and "--fetch-wheels" in res.stdout, res.stdout
    assert not (tmp_path / "o" / "gpu_selftest.json").exists()
    # no psutil (nor accelerate, which needs it), no C++ compiler: the preflight says so at once and the kernel
    # check skips with that reason; the JSON is written after every check (read here while the run is still
    # going), so a timeout or a kill keeps what finished
    env.update(HAPO_BLOCK_MODULES="psutil,accelerate", CXX="/nonexistent/c++")
    out = tmp_path / "p" / "gpu_selftest.json"
    proc = subprocess.Popen(["bash", "tools/device_check.sh", str(tmp_path / "p"), "--only",
                             "stack,save → resume,MoE (tiny,temperature kernel"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[   pass] stack"):
            break
    partial = json.loads(out.read_text())
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, rest[-3000:]
    assert any("preflight: the fused temperature kernel cannot compile here: no C++ compiler" in x for x in lines), lines
    assert partial["complete"] is False and [r["status"] for r in partial["results"]] == ["pass"], partial
    ran = {r["check"].split(":")[0][:12]: (r["status"], r["figure"]) for r in json.loads(out.read_text())["results"]
           if r["figure"] != "skipped: not selected"}
    assert {k: v[0] for k, v in ran.items()} == {"stack and na": "pass", "save → resum": "pass", "MoE (tiny Qw": "pass",
                                                  "temperature ": "skipped"}, ran
    assert "cannot compile here: no C++ compiler" in ran["temperature "][1], ran


def test_device_wheels_pinned_and_named_alike():
    """The pinned set --fetch-wheels downloads: exact versions, one of each, no torch or CUDA wheel, and the
    header and the README name that file (the exit-2 message is checked above)."""
    lines = [x.strip() for x in open(os.path.join(ROOT, "tools", "device_wheels.txt")) if x.strip() and not x.startswith("#")]
    names = [x.split("==")[0].lower().replace("_", "-") for x in lines]
    assert all(x.count("==") == 1 for x in lines) and len(set(names)) == len(names), lines
    assert {"megatron-core", "transformers"} <= set(names) and not any(
        n in ("torch", "psutil") or n.startswith("nvidia") for n in names), names
    header = open(os.path.join(ROOT, "tools", "device_check.sh")).read().split("set -uo")[0]
    assert "tools/device_wheels.txt" in header and f"{len(lines)} wheels" in header
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "tools/device_wheels.txt" in readme and "--fetch-wheels" in readme


def test_te_spec_gets_no_explicit_mask():
    """TE's causal attention implies the mask: the policy builds none for it (a [b, 1, s, s] bool
    tensor per micro-batch otherwise), with the same positions and labels as the local spec's."""
    from megatron_hapo.models.hf_config import attention_mask_for
    from megatron_hapo.training.batch import model_inputs

    ids = torch.randint(0, 100, (3, 17))
    pos, mask, labels = model_inputs(ids)
    pos_te, mask_te, labels_te = model_inputs(ids, with_mask=False)
    assert mask_te is None and torch.equal(pos, pos_te) and torch.equal(labels, labels_te)
    assert mask.shape == (3, 1, 17, 17) and bool(mask[0, 0, 0, 1]) and not bool(mask[0, 0, 1, 0])
    assert attention_mask_for("te", mask) is None and attention_mask_for("local", mask) is mask
    seg = torch.tensor([[0] * 8 + [1] * 9] * 3)
    pos_thd, mask_thd, _ = model_inputs(ids, seg, with_mask=False)  # THD: the segments travel as cu_seqlens
    assert mask_thd is None and pos_thd[0].tolist() == list(range(8)) + list(range(9))
    assert torch.equal(model_inputs(ids, seg)[0], pos_thd)
