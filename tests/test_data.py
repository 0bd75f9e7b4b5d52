"""Datasets: DAPO-Math-layout JSONL/JSON/Parquet with chat templates, reasoning-gym generators, the
addition task; malformed rows skipped and counted (or fatal under strict); the prompt sampler."""
import json

import pytest

from megatron_hapo.data import DataOptions, PromptSampler, load_prompts
from megatron_hapo.data import addition
from megatron_hapo.data.tokenizers import train_sentencepiece

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

QUESTIONS = ["What is 2+3? Put the answer after Answer:", "Solve x^2 = 4 for positive x.", "Compute 7*8.",
             "How many primes are below 10?"]


def dapo_row(question, answer, system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return {"data_source": "math_dapo", "prompt": messages, "ability": "MATH",
            "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"}, "extra_info": {"index": "x"}}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = QUESTIONS + ["<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n", "system You are helpful."] * 3
    return train_sentencepiece(str(tmp_path_factory.mktemp("tok")), corpus, 120, CHATML,
                               special_pieces=("<|im_start|>", "<|im_end|>", "\n"))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


def test_dapo_jsonl_renders_the_chat_template(tmp_path, tok):
    rows = [dapo_row(q, str(k)) for k, q in enumerate(QUESTIONS)] + [dapo_row(QUESTIONS[0], "5", system="You are helpful.")]
    ds = load_prompts(write_jsonl(tmp_path / "train.jsonl", rows), tok, DataOptions())
    assert len(ds) == 5 and ds.skipped == 0
    assert [x.ground_truth for x in ds.examples] == ["0", "1", "2", "3", "5"]
    text = tok.decode(ds[0].prompt_ids)
    assert text == f"<|im_start|>user\n{QUESTIONS[0]}<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ds[4].prompt_ids).startswith("<|im_start|>system\nYou are helpful.<|im_end|>")
    assert ds[0].where == "train.jsonl:1"


def test_parquet_and_json_give_the_same_examples(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dapo_row(q, str(k)) for k, q in enumerate(QUESTIONS)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    (tmp_path / "train.json").write_text(json.dumps(rows))
    jl = load_prompts(write_jsonl(tmp_path / "train.jsonl", rows), tok, DataOptions())
    for name in ("train.parquet", "train.json"):
        other = load_prompts(str(tmp_path / name), tok, DataOptions())
        assert [(x.prompt_ids, x.ground_truth) for x in other.examples] == [(x.prompt_ids, x.ground_truth) for x in jl.examples]


def test_plain_prompt_and_answer_fields(tmp_path, tok):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"question": QUESTIONS[2], "answer": 56}])
    ds = load_prompts(path, tok, DataOptions(prompt_key="question"))
    assert ds[0].ground_truth == "56"
    raw = load_prompts(path, tok, DataOptions(prompt_key="question", apply_chat_template=False))
    assert tok.decode(raw[0].prompt_ids, skip_special_tokens=True) == QUESTIONS[2]
    nested = write_jsonl(tmp_path / "nested.jsonl", [{"prompt": "Compute 7*8.", "meta": {"gold": "56"}}])
    assert load_prompts(nested, tok, DataOptions(answer_key="meta.gold"))[0].ground_truth == "56"


BAD_ROWS = [
    ('{"prompt": "Compute 7*8.", "answer": ', "invalid JSON"),
    ({"answer": "1"}, "no 'prompt' field"),
    ({"prompt": "Compute 7*8."}, "no answer under reward_model.ground_truth / answer / ground_truth / solution"),
    ({"prompt": "Compute 7*8.", "answer": "  "}, "empty answer"),
    ({"prompt": "", "answer": "1"}, "empty prompt"),
    ({"prompt": [{"role": "user"}], "answer": "1"}, "message 0 must be"),
    ({"prompt": [{"role": "wizard", "content": "hi"}], "answer": "1"}, "message 0 must be"),
    ({"prompt": 42, "answer": "1"}, "prompt must be a string or a non-empty list of messages, got int"),
    ({"prompt": "Compute 7*8. " * 200, "answer": "1"}, "exceeds data.max_prompt_tokens=64"),
    ('[1, 2]', "expected an object, got list"),
    ({"prompt": "Compute 7*8.", "answer": True}, "answer of type bool"),
]


def test_malformed_rows_are_skipped_and_counted(tmp_path, tok):
    good = dapo_row(QUESTIONS[0], "5")
    rows = [good] + [row for row, _ in BAD_ROWS] + [good]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    ds = load_prompts(path, tok, DataOptions(max_prompt_tokens=64))
    assert len(ds) == 2 and ds.skipped == len(BAD_ROWS)
    assert len(ds.reasons) == 5  # the first five, each naming file and line
    for k, (reason, (_, expected)) in enumerate(zip(ds.reasons, BAD_ROWS)):
        assert reason.startswith(f"mixed.jsonl:{k + 2}: ") and expected in reason, (reason, expected)
    assert "skipped 11 malformed rows" in ds.summary()


@pytest.mark.parametrize("row, expected", BAD_ROWS)
def test_strict_fails_on_the_first_bad_row_naming_it(tmp_path, tok, row, expected):
    path = write_jsonl(tmp_path / "strict.jsonl", [dapo_row(QUESTIONS[0], "5"), row])
    with pytest.raises(ValueError, match="malformed row at strict.jsonl:2") as err:
        load_prompts(path, tok, DataOptions(strict=True, max_prompt_tokens=64))
    assert expected in str(err.value)


def test_file_level_errors_name_the_file(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="no such file .*missing.jsonl"):
        load_prompts(str(tmp_path / "missing.jsonl"), tok, DataOptions())
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="data.csv: unknown dataset format"):
        load_prompts(str(tmp_path / "data.csv"), tok, DataOptions())
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="broken.parquet: cannot read Parquet"):
        load_prompts(str(tmp_path / "broken.parquet"), tok, DataOptions())
    (tmp_path / "dict.json").write_text('{"prompt": "x"}')
    with pytest.raises(ValueError, match="dict.json: expected a JSON list of rows"):
        load_prompts(str(tmp_path / "dict.json"), tok, DataOptions())
    only_bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}, "{"])
    with pytest.raises(ValueError, match=r"no usable rows \(2 malformed; first: bad.jsonl:1: no answer"):
        load_prompts(only_bad, tok, DataOptions())


def test_chat_messages_need_a_template(tmp_path, tok, tmp_path_factory):
    bare = train_sentencepiece(str(tmp_path_factory.mktemp("bare")), QUESTIONS, 60, "")
    path = write_jsonl(tmp_path / "t.jsonl", [dapo_row(QUESTIONS[0], "5")])
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        load_prompts(path, bare, DataOptions())
    with pytest.raises(ValueError, match="t.jsonl:1: chat messages need data.apply_chat_template=true"):
        load_prompts(path, bare, DataOptions(apply_chat_template=False))  # messages cannot be raw text
    plain = write_jsonl(tmp_path / "p.jsonl", [{"prompt": QUESTIONS[1], "answer": "2"}])
    assert bare.decode(load_prompts(plain, bare, DataOptions(apply_chat_template=False))[0].prompt_ids,
                       skip_special_tokens=True) == QUESTIONS[1]


def test_reasoning_gym_source_is_scored_by_its_own_checker(tok):
    from megatron_hapo.rewards import ReasoningGymVerifier

    ds = load_prompts("reasoning_gym:basic_arithmetic", tok, DataOptions(reasoning_gym_size=8, max_prompt_tokens=4096))
    assert len(ds) == 8
    held_out = load_prompts("reasoning_gym:basic_arithmetic", tok, DataOptions(reasoning_gym_size=8, max_prompt_tokens=4096),
                            split="eval")
    assert [x.ground_truth["question"] for x in held_out.examples] != [x.ground_truth["question"] for x in ds.examples]
    v = ReasoningGymVerifier()
    entry = ds[0].ground_truth
    assert v.score(f"<answer>{entry['answer']}</answer>", entry).correct
    assert not v.score("<answer>definitely wrong</answer>", entry).correct
    with pytest.raises(ValueError, match="reasoning_gym:no_such_task: cannot create the generator"):
        load_prompts("reasoning_gym:no_such_task", tok, DataOptions())


def test_addition_task_splits_and_tokenizer(tmp_path):
    train, held = addition.pairs("train"), addition.pairs("eval")
    assert not set(train) & set(held) and len(train) + len(held) == 90 * 90 and 700 < len(held) < 900
    tok = addition.build_tokenizer(str(tmp_path / "tok"))
    ds = load_prompts("addition:eval", tok, DataOptions())
    first = addition.rows("eval")[0]
    assert tok.decode(ds[0].prompt_ids) == "<s>" + first["prompt"] and ds[0].ground_truth == first["answer"]
    assert all(len(tok(str(n), add_special_tokens=False)["input_ids"]) == len(str(n)) for n in range(200))  # digits split


def test_sampler_epochs_and_positions():
    s = PromptSampler(10, seed=3)
    epoch0, epoch1 = s.indices(0, 10), s.indices(10, 10)
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    assert s.indices(7, 6) == epoch0[7:] + epoch1[:3]
    assert PromptSampler(10, seed=3).indices(13, 4) == epoch1[3:7]  # a resumed run sees the same prompts
    assert PromptSampler(10, seed=3, shuffle=False).indices(8, 4) == [8, 9, 0, 1]


def test_source_kinds_decide_defaults():
    from megatron_hapo.data.datasets import default_reward_type, held_out_sources

    assert held_out_sources("addition") == ["addition:eval"]
    assert held_out_sources(["reasoning_gym:countdown", "x.jsonl"]) == ["reasoning_gym:countdown"]
    assert held_out_sources(["a.parquet"]) is None
    assert default_reward_type("addition") == "exact"
    assert default_reward_type("addition_problems.jsonl") == "math"  # a file, whatever its name
    assert default_reward_type(["reasoning_gym:countdown"]) == "reasoning_gym"
    with pytest.raises(ValueError, match=r"mixes \['exact', 'math'\] sources"):
        default_reward_type(["addition", "x.jsonl"])


def test_split_evenly_covers_every_item_in_order():
    from megatron_hapo.data.datasets import split_evenly

    items = list(range(30))
    for parts in (1, 4, 7, 32):  # AIME's 30 problems over 32 engines: 30 engines take one, 2 take none
        slices = [split_evenly(items, parts, i) for i in range(parts)]
        assert [x for s in slices for x in s] == items
        assert max(map(len, slices)) - min(map(len, slices)) <= 1
    assert [split_evenly(list(range(8)), 4, i) for i in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_several_eval_sources_are_scored_per_benchmark_and_averaged(tmp_path, tok):
    from megatron_hapo.metrics import eval_metrics
    from megatron_hapo.rollout.collect import GroupSummary

    for name, n in (("aime-2024", 3), ("math500", 5)):
        rows = [{"prompt": [{"role": "user", "content": f"{name} {i}"}], "reward_model": {"ground_truth": str(i)}}
                for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_prompts([str(tmp_path / "aime-2024.jsonl"), str(tmp_path / "math500.jsonl")], tok, DataOptions(), "eval")
    assert ds.sources == ["aime-2024", "math500"]
    assert [x.source for x in ds.examples] == ["aime-2024"] * 3 + ["math500"] * 5
    # 2 samples each: aime solves 1 of 3 problems once (mean 1/6, pass 1/3); math500 all twice (1, 1)
    groups = [GroupSummary(i, [0.0, 0.0], [i == 0, False], ["ok", "ok"], [4, 4], 0, None) for i in range(3)]
    groups += [GroupSummary(3 + i, [1.0, 1.0], [True, True], ["ok", "ok"], [4, 4], 0, None) for i in range(5)]
    m = eval_metrics(groups, 2, [x.source for x in ds.examples])
    assert m["eval/aime-2024/mean@2"] == pytest.approx(1 / 6) and m["eval/aime-2024/pass@2"] == pytest.approx(1 / 3)
    assert m["eval/math500/mean@2"] == 1.0 and m["eval/math500/prompts"] == 5
    assert m["eval_mean@2"] == pytest.approx((1 / 6 + 1) / 2)  # the average of benchmarks, not the pool (11/16)
    assert m["eval_pass@2"] == pytest.approx((1 / 3 + 1) / 2) and m["eval_prompts"] == 8
    single = eval_metrics(groups[:3], 2, ["aime-2024"] * 3)
    assert single["eval_mean@2"] == pytest.approx(1 / 6) and not any(k.startswith("eval/") for k in single)


def test_chain_task_has_long_worked_answers_and_a_held_out_split(tmp_path):
    from megatron_hapo.data import chain

    train, held = chain.rows("train", seed=0), chain.rows("eval", seed=0)
    assert len(train) == chain.TRAIN_SIZE and len(held) == chain.EVAL_SIZE
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}  # held out: never trained on
    assert chain.rows("train", seed=1)[0] != train[0] and sorted(map(str, chain.rows("train", seed=1))) == sorted(map(str, train))
    tok = chain.build_tokenizer(str(tmp_path))
    lengths = [len(tok(r["answer"], add_special_tokens=False)["input_ids"]) + 1 for r in train[:2000]]  # + </s>
    assert 20 <= min(lengths) and max(lengths) <= 60
    for r in train[:200]:  # each step is right, and the last result is the value of the prompt
        steps = r["answer"].split(",")
        assert eval(r["prompt"][:-1]) == int(steps[-1].split("=")[1])  # noqa: S307 - digits and +/- only
        for a, b in zip(steps, steps[1:]):
            assert b.startswith(a.split("=")[1])
    import transformers

    params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(chain.tiny_model_config()).parameters())
    assert 0.5e6 <= params <= 2e6


def test_batched_tokenizing_equals_row_by_row(tmp_path, tok):
    """Rows are tokenized in batches (one fast-tokenizer call each): the same ids as one call a row, raw
    text (the tokenizer's own BOS) and chat template alike, with bad rows across batch edges kept in order."""
    from megatron_hapo.data.datasets import BadRow, Renderer

    rows = [dapo_row(q, str(k)) for k, q in enumerate(QUESTIONS * 3)]
    rows[4] = {"prompt": "Compute 7*8. " * 200, "answer": "1"}  # too long: found after tokenizing
    rows[7] = {"answer": "1"}  # found before
    for opts in (DataOptions(max_prompt_tokens=64), DataOptions(max_prompt_tokens=64, prompt_key="q", apply_chat_template=False)):
        items = [{"q": r["prompt"][0]["content"] if isinstance(r.get("prompt"), list) else r.get("prompt", ""), **r}
                 for r in rows] if opts.prompt_key == "q" else rows
        if opts.prompt_key == "q":
            del items[7]["q"]
        render = Renderer(tok, opts)
        got = list(render.many(((f"r{k}", row) for k, row in enumerate(items)), batch=3))
        assert [w for w, _ in got] == [f"r{k}" for k in range(len(items))]
        for k, (_, item) in enumerate(got):
            if k in (4, 7):
                assert isinstance(item, BadRow) and ("exceeds" in str(item)) == (k == 4), item
                continue
            text, _ = render.text(items[k])
            assert item.prompt_ids == tok(text, add_special_tokens=not opts.apply_chat_template)["input_ids"]
