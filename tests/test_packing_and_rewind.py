"""Pieces of the crash-safe loop and of packing, alone: the metrics rewind on resume, the packer and
the packed layout (the end-to-end tests are test_crash_resume.py and test_policy_layouts.py)."""
import json
import random

import torch

from megatron_hapo.metrics import RunLogger
from megatron_hapo.training.batch import pack_sequences, packed_layout, sequence_lengths


def rows_of(path):
    return [json.loads(x)["step"] for x in path.read_text().splitlines()]


def test_rewind_keeps_what_the_checkpoint_holds(tmp_path):
    log = RunLogger(str(tmp_path), tensorboard=False, token_samples=0, enabled=True)
    metrics = tmp_path / "metrics.jsonl"
    eval_row = json.dumps({"step": 0, "eval_mean@1": 0.1})
    step_rows = [json.dumps({"step": s, "loss": 0.5}) for s in (1, 2, 3, 4)]
    metrics.write_text("\n".join([eval_row, *step_rows]) + '\n{"step": 5, "lo')  # the kill cut row 5
    (tmp_path / "token_samples.jsonl").write_text("\n".join(json.dumps({"step": s}) for s in (1, 2, 3)) + "\n")
    log.rewind(2)  # resumed from the step-2 checkpoint: rows 3, 4 and the cut one go (they are logged again)
    assert rows_of(metrics) == [0, 1, 2] and rows_of(tmp_path / "token_samples.jsonl") == [1, 2]
    assert log.start_step == 2
    log.rewind(0)  # no checkpoint: the run starts over, the step-0 evaluation included
    assert metrics.read_text() == "" and rows_of(tmp_path / "token_samples.jsonl") == []
    RunLogger(str(tmp_path / "absent"), False, 0, True).rewind(3)  # nothing logged yet: nothing to do


def test_rewind_only_on_the_logging_rank(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3}) + "\n")
    RunLogger(str(tmp_path), tensorboard=False, token_samples=0, enabled=False).rewind(1)
    assert rows_of(tmp_path / "metrics.jsonl") == [3]


def test_pack_sequences_places_each_once_within_the_budget():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 30))]
        budget = rng.randint(1, 80)
        bins = pack_sequences(lengths, budget)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        for b in bins:
            assert len(b) == 1 or sum(lengths[i] for i in b) <= budget  # a longer sequence rides alone
        assert bins == pack_sequences(lengths, budget)  # deterministic: the same on every rank and launch


def test_packed_layout_gathers_each_sequence_back():
    rows = [[5, 3], [7], [2, 2, 2]]
    seg, gather, cu = packed_layout(rows, width=8)
    values = torch.arange(3 * 8, dtype=torch.float32)
    flat = torch.cat([values, torch.tensor([-1.0])])  # the spare slot
    got = flat[gather]
    starts = [0, 5, 8, 16, 18, 20]
    for k, (n, s) in enumerate(zip([5, 3, 7, 2, 2, 2], starts)):
        assert got[k, :n].tolist() == list(range(s, s + n)) and (got[k, n:] == -1).all()
    assert seg[0].tolist() == [0] * 5 + [1] * 3 and seg[1].tolist()[:7] == [2] * 7 and seg[1, 7] != 2
    assert seg[2].tolist()[:6] == [3, 3, 4, 4, 5, 5] and len(set(seg[2, 6:].tolist())) == 1
    assert cu.tolist() == [0, 5, 8]


def test_sequence_lengths_from_the_loss_mask():
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, 3:7] = True  # last scored position 6: tokens 0..7
    mask[1, 2:9] = True  # ..9: the full row
    assert sequence_lengths(mask).tolist() == [8, 10, 1]  # nothing scored: one token
