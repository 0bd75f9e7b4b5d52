"""When rewards fail: a script without a main guard stops at start with the fix, a verifier that
always raises stops the run quoting its error, one that fails on some rows is counted and the run
goes on (or stops at reward.max_error_fraction), and the messages say what happened."""
import json
import os
import subprocess
import sys
import textwrap

from megatron_hapo.metrics import eval_line, step_line

from .distributed import run_ranks
from .test_trainer import train_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_guard_detection(tmp_path):
    probe = "from megatron_hapo.rewards.base import main_script_without_guard; print('GUARD-CHECK', main_script_without_guard())"
    guarded = tmp_path / "guarded.py"
    guarded.write_text(f"import sys\nif __name__ == '__main__':\n    {probe}\n")
    bare = tmp_path / "bare.py"
    bare.write_text(probe + "\n")
    out = {p.name: subprocess.run([sys.executable, str(p)], capture_output=True, text=True, cwd=ROOT).stdout
           for p in (guarded, bare)}
    assert "GUARD-CHECK None" in out["guarded.py"]
    assert f"GUARD-CHECK {bare}" in out["bare.py"]
    module = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT).stdout
    assert "GUARD-CHECK None" in module  # -c (and -m) cannot be re-imported by spawned workers


def test_script_without_main_guard_fails_fast_with_the_fix(tmp_path):
    script = tmp_path / "my_run.py"
    script.write_text(textwrap.dedent(f"""
        from megatron_hapo.config import Config
        from megatron_hapo.demo import supervised_warmup
        from megatron_hapo.trainer import Trainer

        cfg = Config.load(None, ["train.run_dir={tmp_path / 'run'}", "reward.workers=2", "log.progress=off"])
        trainer = Trainer(cfg)
        supervised_warmup(trainer, 2)
        print("eval", trainer.evaluate())
    """))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode != 0
    assert "RewardWorkersError: reward workers cannot start" in res.stderr, res.stderr[-3000:]
    assert str(script) in res.stderr and 'if __name__ == "__main__":' in res.stderr and "reward.workers=0" in res.stderr
    assert "eval" not in res.stdout  # it stopped before evaluating on failure rewards


def test_verifier_that_always_raises_stops_the_run(tmp_path):
    extra = ["reward.type=tests.verifiers:AlwaysRaises", "rollout.dynamic_sampling=false"]
    out = run_ranks(1, train_worker, str(tmp_path), 1, extra, timeout=600)[0]
    assert out["error"] and "the verifier failed on 16 of 16 responses" in out["error"], out["error"]
    assert "ValueError: broken verifier: cannot parse the answer format" in out["error"]


def test_verifier_failing_on_some_rows_is_counted_or_stops_at_the_threshold(tmp_path):
    rows = [{"prompt": "12+34=", "reward_model": {"ground_truth": "boom"}}]
    rows += [{"prompt": f"{a}+{a}=", "reward_model": {"ground_truth": str(2 * a)}} for a in range(10, 20)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    extra = [f"data.train={tmp_path / 'train.jsonl'}", "data.shuffle=false", "rollout.dynamic_sampling=false",
             "reward.type=tests.verifiers:RaiseOnGroundTruth", "algorithm.name=dapo", "data.apply_chat_template=false"]
    out = run_ranks(1, train_worker, str(tmp_path / "run"), 1, extra, timeout=600)[0]
    assert out["error"] is None and len(out["history"]) == 1
    assert out["history"][0]["reward_errors"] == 4  # the 4 samples of the "boom" row, counted; the run went on
    strict = run_ranks(1, train_worker, str(tmp_path / "run2"), 1, [*extra, "reward.max_error_fraction=0.2"],
                       timeout=600)[0]
    assert "failed on 4 of 16 responses" in strict["error"] and "KeyError: 'boom'" in strict["error"]


def test_step_and_eval_lines_show_reward_failures(capsys):
    m = {"step": 3, "reward": -1.0, "rollout_accuracy": 0.0, "accuracy": 0.0, "response_length": 4.0, "entropy": 1.0,
         "temperature_min": 1.0, "temperature_max": 1.0, "clip_frac_low": 0.0, "clip_frac_high": 0.0,
         "logp_mismatch_mean": 0.0, "keep_rate": 1.0, "time_step": 1.0, "reward_timeouts": 0.0, "reward_errors": 4.0,
         "eval_mean@1": 0.25, "eval_reward_timeouts": 2.0, "eval_reward_errors": 0.0}
    print(step_line(m))
    print(eval_line(m))
    print(eval_line({"eval_mean@1": 0.5, "eval_reward_timeouts": 0.0, "eval_reward_errors": 0.0}))
    step, ev, quiet = capsys.readouterr().out.splitlines()
    assert "reward timeouts 0 errors 4" in step and "eval reward timeouts 2 errors 0" in step
    assert "eval_reward_timeouts 2.000" in ev and "eval_reward_errors" not in ev
    assert "eval_reward" not in quiet
