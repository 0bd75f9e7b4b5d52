"""Prompt datasets: JSONL / JSON / Parquet files in the DAPO-Math-17k layout, reasoning-gym's
procedural generators, and the embedded tasks (addition, chain); all rendered with the tokenizer's chat
template and checked row by row.

A source is one string:
    "path/to/file.jsonl" | ".json" | ".parquet"   rows with a prompt and a ground-truth answer
    "reasoning_gym:NAME"                           NAME's generator (e.g. countdown, basic_arithmetic)
    "addition" | "addition:eval"                   an embedded task (train split / held-out split):
    "chain" | "chain:eval"                         addition (3-token answers), chain (28-token worked solutions)

A row's prompt is a string or a list of chat messages ({"role", "content"}); its answer is found
under `answer_key` (a dotted path; "auto" tries reward_model.ground_truth, answer, ground_truth,
solution). Malformed rows are skipped, counted and the first reasons kept; with `strict` the
first one raises, naming file and line.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

AUTO_ANSWER_KEYS = ("reward_model.ground_truth", "answer", "ground_truth", "solution")
ROLES = ("system", "user", "assistant", "tool")
RG_INSTRUCTION = "\n\nGive only your final answer, inside <answer></answer> tags."
MAX_REASONS = 5


class BadRow(ValueError):
    pass


@dataclasses.dataclass
class Example:
    prompt_ids: List[int]
    ground_truth: Any
    where: str  # "file:line" (or "source#index"), for messages
    source: str = ""  # the short name of the source it came from (per-benchmark evaluation)
    row: Optional[dict] = None  # rollout.environment: the dataset row its episodes reset from


@dataclasses.dataclass
class PromptDataset:
    name: str
    examples: List[Example]
    skipped: int = 0
    reasons: List[str] = dataclasses.field(default_factory=list)
    sources: List[str] = dataclasses.field(default_factory=list)  # short names, in order

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def summary(self) -> str:
        text = f"{self.name}: {len(self.examples)} prompts"
        if self.skipped:
            text += f"; skipped {self.skipped} malformed rows (first: {'; '.join(self.reasons)})"
        return text


@dataclasses.dataclass
class DataOptions:
    prompt_key: str = "prompt"
    answer_key: str = "auto"
    apply_chat_template: bool = True
    max_prompt_tokens: int = 1024
    strict: bool = False
    reasoning_gym_size: int = 1000
    reasoning_gym_config: Dict[str, Any] = dataclasses.field(default_factory=dict)
    tools: Optional[List[dict]] = None  # multi-turn, chat-template calls: the tools the template renders (tools=)
    environment: Optional[Tuple[str, dict]] = None  # rollout.environment and its settings: the prompt is reset(row)


def _dig(row: dict, path: str):
    node = row
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _answer(row: dict, key: str):
    keys = AUTO_ANSWER_KEYS if key == "auto" else (key,)
    for k in keys:
        value = _dig(row, k)
        if value is not None:
            return value
    raise BadRow(f"no answer under {' / '.join(keys)}")


def _messages(prompt) -> List[Dict[str, str]]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRow("empty prompt")
        return [{"role": "user", "content": prompt}]
    if hasattr(prompt, "tolist"):  # a numpy array out of Parquet
        prompt = prompt.tolist()
    if not isinstance(prompt, list) or not prompt:
        raise BadRow(f"prompt must be a string or a non-empty list of messages, got {type(prompt).__name__}")
    out = []
    for k, m in enumerate(prompt):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise BadRow(f"message {k} must be {{'role': one of {list(ROLES)}, 'content': str}}, got {str(m)[:80]}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["content"].strip() for m in out):
        raise BadRow("empty prompt")
    return out


@dataclasses.dataclass
class _WithRow:
    """An environment row's answer (None without one) and the row itself, through the batched tokenizing."""

    answer: Any
    row: dict


class Renderer:
    """Rows → Examples with the tokenizer (chat template or raw text), checked row by row, tokenized in batches."""

    def __init__(self, tokenizer, opts: DataOptions):
        self.tok, self.opts = tokenizer, opts
        if opts.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.apply_chat_template: the tokenizer has no chat template; set it to false to feed "
                             "prompt strings as raw text")
        self.env = None
        if opts.environment:
            from ..rollout.env_api import make

            self.env = make(*opts.environment)

    def text(self, row) -> Tuple[str, Any]:
        """(the prompt as text, the answer) of a row, or BadRow; tokenizing is `many`'s, in batches. With an
        environment the prompt is its first message, reset(row), and the answer optional."""
        if not isinstance(row, dict):
            raise BadRow(f"expected an object, got {type(row).__name__}")
        if self.env is not None:
            return self._env_text(row)
        if self.opts.prompt_key not in row:
            raise BadRow(f"no {self.opts.prompt_key!r} field")
        messages = _messages(row[self.opts.prompt_key])
        answer = _answer(row, self.opts.answer_key)
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if isinstance(answer, str) and not answer.strip():
            raise BadRow("empty answer")
        if not isinstance(answer, (str, dict, list)):
            raise BadRow(f"answer of type {type(answer).__name__}")
        return self._render(messages, answer, isinstance(row[self.opts.prompt_key], str))

    def _render(self, messages: List[Dict[str, str]], answer, one_string: bool) -> Tuple[str, Any]:
        """The prompt's text: the chat template (with the run's tools), or the one string prompt as it is."""
        if self.opts.apply_chat_template:
            extra = {"tools": self.opts.tools} if self.opts.tools else {}
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra), answer
        if len(messages) != 1 or not one_string:
            raise BadRow("chat messages need data.apply_chat_template=true")
        return messages[0]["content"], answer

    def _env_text(self, row: dict) -> Tuple[str, Any]:
        from ..rollout.env_api import first_message

        try:
            first = first_message(self.env, row)
        except Exception as exc:  # noqa: BLE001 - the user's environment refusing a row: that row is malformed
            raise BadRow(f"environment reset: {type(exc).__name__}: {exc}") from None
        try:
            answer = _answer(row, self.opts.answer_key)
        except BadRow:
            answer = None
        return self._render([{"role": "user", "content": first}], _WithRow(answer, row), True)

    def _encode(self, texts: List[str]) -> List[List[int]]:
        """Token ids of each text: a chat-rendered prompt holds its special tokens already; raw text gets
        the tokenizer's own (BOS). One batched call (a fast tokenizer encodes it in Rust: 40,000 prompts
        in a fraction of the per-row calls' seconds)."""
        special = not self.opts.apply_chat_template
        backend = getattr(self.tok, "backend_tokenizer", None) if getattr(self.tok, "is_fast", False) else None
        if backend is not None:  # what the fast tokenizer's __call__ runs, without its per-row Python conversion
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=special)]
        return self.tok(texts, add_special_tokens=special)["input_ids"]

    def _finish(self, answer, ids, where: str) -> Example:
        if len(ids) > self.opts.max_prompt_tokens:
            raise BadRow(f"prompt of {len(ids)} tokens exceeds data.max_prompt_tokens={self.opts.max_prompt_tokens}")
        if isinstance(answer, _WithRow):
            return Example(list(ids), answer.answer, where, row=answer.row)
        return Example(list(ids), answer, where)

    def many(self, rows: Iterator[Tuple[str, Any]], batch: int = 2048) -> Iterator[Tuple[str, Any]]:
        """(where, Example or BadRow) for every (where, row or BadRow), in order, tokenized in batches."""
        pending: List[Tuple[str, Any]] = []

        def flush():
            texts = [item[0] for _, item in pending if not isinstance(item, BadRow)]
            encoded = iter(self._encode(texts) if texts else [])
            for where, item in pending:
                if isinstance(item, BadRow):
                    yield where, item
                    continue
                try:
                    yield where, self._finish(item[1], next(encoded), where)
                except BadRow as exc:
                    yield where, exc
            pending.clear()

        for where, row in rows:
            if isinstance(row, BadRow):
                pending.append((where, row))
            else:
                try:
                    pending.append((where, self.text(row)))
                except BadRow as exc:
                    pending.append((where, exc))
            if len(pending) >= batch:
                yield from flush()
        yield from flush()


def _file_rows(path: str) -> Iterator[Tuple[str, Any]]:
    """(where, row) for every row; an unparsable line yields (where, BadRow)."""
    name = os.path.basename(path)
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{name}:{n}", json.loads(line)
                except json.JSONDecodeError as exc:
                    yield f"{name}:{n}", BadRow(f"invalid JSON ({exc.msg} at column {exc.colno})")
    elif path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        for n, row in enumerate(data):
            yield f"{name}[{n}]", row
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
            raise ValueError(f"{path}: cannot read Parquet ({type(exc).__name__}: {exc})") from exc
        for n, row in enumerate(table.to_pylist()):
            yield f"{name}[{n}]", row
    else:
        raise ValueError(f"{path}: unknown dataset format (expected .jsonl, .json or .parquet)")


def _reasoning_gym_rows(name: str, size: int, seed: int, config: dict) -> Iterator[Tuple[str, Any]]:
    import reasoning_gym

    try:
        data = reasoning_gym.create_dataset(name, seed=seed, size=size, **config)
    except Exception as exc:  # noqa: BLE001 - an unknown name or a bad generator setting
        raise ValueError(f"reasoning_gym:{name}: cannot create the generator ({type(exc).__name__}: {exc})") from exc
    for n, entry in enumerate(data):
        yield f"{name}#{n}", {"prompt": entry["question"] + RG_INSTRUCTION, "answer": dict(entry)}


EMBEDDED_TASKS = ("addition", "chain", "multiply", "guess")  # modules of megatron_hapo.data: rows, build_model_dir
SOURCE_REWARDS = {"addition": "exact", "chain": "exact", "multiply": "exact", "guess": "environment", "reasoning_gym": "reasoning_gym", "file": "math"}


def as_sources(sources) -> List[str]:
    """A source or a list of them (the config's data.train / data.eval) as a list."""
    return [sources] if isinstance(sources, str) else list(sources or [])


def source_kind(source: str) -> str:
    """An embedded task's name ("addition", "chain"), "reasoning_gym" or "file"."""
    task, _, part = source.partition(":")
    if task in EMBEDDED_TASKS and part in ("", "train", "eval"):
        return task
    return "reasoning_gym" if source.startswith("reasoning_gym:") else "file"


def held_out_sources(train) -> Optional[List[str]]:
    """The held-out counterpart of each procedural training source (reasoning-gym: the same
    generator, another seed; see source_rows); files have none, so None when all are files."""
    out = []
    for s in as_sources(train):
        kind = source_kind(s)
        if kind in EMBEDDED_TASKS and s != f"{kind}:eval":
            out.append(f"{kind}:eval")
        elif kind == "reasoning_gym":
            out.append(s)
    return out or None


def default_reward_type(train) -> str:
    """reward.type=auto: exact for addition, reasoning_gym for its generators, math for files."""
    kinds = sorted({SOURCE_REWARDS[source_kind(s)] for s in as_sources(train)})
    if len(kinds) != 1:
        raise ValueError(f"reward.type=auto: data.train mixes {kinds} sources; set reward.type")
    return kinds[0]


def source_rows(source: str, split: str, seed: int, opts: DataOptions) -> Iterator[Tuple[str, Any]]:
    kind = source_kind(source)
    if kind in EMBEDDED_TASKS:
        part = "eval" if source.endswith(":eval") else "train"
        for n, row in enumerate(embedded_task(kind).rows(part, seed)):
            yield f"{source}#{n}", row
    elif kind == "reasoning_gym":
        # the eval split draws from another seed, so it is not the training set again
        yield from _reasoning_gym_rows(source.split(":", 1)[1], opts.reasoning_gym_size,
                                       seed + (1_000_003 if split == "eval" else 0), opts.reasoning_gym_config)
    else:
        if not os.path.exists(source):
            raise FileNotFoundError(f"data.{split}: no such file {source!r}")
        yield from _file_rows(source)


def load_prompts(sources, tokenizer, opts: DataOptions, split: str = "train", seed: int = 0) -> PromptDataset:
    """All usable rows of the sources, in order; malformed rows skipped and counted (or raised under strict)."""
    sources = as_sources(sources)
    if not sources:
        raise ValueError(f"data.{split}: no sources given")
    render = Renderer(tokenizer, opts)
    examples, skipped, reasons = [], 0, []
    names = source_names(sources)
    for source, short in zip(sources, names):
        for where, item in render.many(source_rows(str(source), split, seed, opts)):
            try:
                if isinstance(item, BadRow):
                    raise item
                examples.append(dataclasses.replace(item, source=short))
            except BadRow as exc:
                if opts.strict:
                    raise ValueError(f"data.{split}: malformed row at {where}: {exc} (data.strict=true)") from None
                skipped += 1
                if len(reasons) < MAX_REASONS:
                    reasons.append(f"{where}: {exc}")
    name = f"data.{split} ({', '.join(map(str, sources))})"
    if not examples:
        raise ValueError(f"{name}: no usable rows ({skipped} malformed; first: {'; '.join(reasons) or 'none'})")
    return PromptDataset(name, examples, skipped, reasons, names)


def source_names(sources: List[str]) -> List[str]:
    """Short, unique names for metrics: a file's stem (aime-2024), a generator's name, addition."""
    out: List[str] = []
    for s in sources:
        s = str(s)
        kind = source_kind(s)
        base = s.split(":", 1)[1] if kind == "reasoning_gym" else kind if kind in EMBEDDED_TASKS else \
            os.path.basename(s).split(".")[0]
        name, k = base or "source", 2
        while name in out:
            name, k = f"{base}_{k}", k + 1
        out.append(name)
    return out


class PromptSampler:
    """Global prompt positions → dataset indices: a fresh seeded permutation every epoch.

    Position p is the p-th prompt the run consumes (all ranks together), so a resumed run that
    restores the position sees exactly the prompts it would have seen."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True):
        if size < 1:
            raise ValueError("PromptSampler: empty dataset")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self._orders: Dict[int, List[int]] = {}

    def _order(self, epoch: int) -> List[int]:
        if epoch not in self._orders:
            order = list(range(self.size))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # keep one epoch in memory
        return self._orders[epoch]

    def indices(self, start: int, count: int) -> List[int]:
        return [self._order(p // self.size)[p % self.size] for p in range(start, start + count)]


def split_evenly(items: Sequence, parts: int, index: int) -> list:
    """The index-th of `parts` contiguous slices, as equal as possible: equal when len(items) is
    divisible by parts (training batches, validated at start), else the first len % parts slices
    hold one more (evaluation sets: every prompt is evaluated whatever the number of engines)."""
    n, extra = divmod(len(items), parts)
    start = index * n + min(index, extra)
    return list(items[start:start + n + (index < extra)])


def load_run_data(cfg, tokenizer, max_positions: int):
    """(train, eval or None) datasets of a run from its `data`, `rollout` and `eval` sections;
    prompts are capped so that prompt + response fit the model's `max_positions`."""
    d, r, e = cfg.data, cfg.rollout, cfg.eval
    max_prompt = min(d.max_prompt_tokens, max_positions - r.max_response_tokens)
    if max_prompt < 1:
        raise ValueError(f"rollout.max_response_tokens={r.max_response_tokens} leaves no room for a prompt in the "
                         f"model's {max_positions} positions")
    opts = DataOptions(prompt_key=d.prompt_key, answer_key=d.answer_key, apply_chat_template=d.apply_chat_template,
                       max_prompt_tokens=max_prompt, strict=d.strict, reasoning_gym_size=d.reasoning_gym_size,
                       reasoning_gym_config=dict(d.reasoning_gym_config))
    if r.tools:
        from ..rollout.tools import format_for_run

        opts.tools = format_for_run(r, tokenizer).render_prompt_tools()
    if r.environment:
        opts.environment = (r.environment, dict(r.environment_settings))
    train = load_prompts(d.train, tokenizer, opts, "train", seed=cfg.train.seed)
    eval_sources = d.eval if d.eval is not None else held_out_sources(d.train)
    evals = load_prompts(eval_sources, tokenizer, opts, "eval", seed=cfg.train.seed) if eval_sources else None
    if evals is None and (e.interval or e.before_train):
        raise ValueError(f"eval.interval={e.interval} / eval.before_train={e.before_train}: no eval set; "
                         f"set data.eval (the training sources {as_sources(d.train)} have no held-out split)")
    return train, evals


def embedded_task(name: str):
    """The module of an embedded task (`rows`, `build_model_dir`, `tiny_model_config`)."""
    import importlib

    if name not in EMBEDDED_TASKS:
        raise ValueError(f"unknown embedded task {name!r}; expected one of {EMBEDDED_TASKS}")
    return importlib.import_module(f"{__package__}.{name}")


def resolve_model_dir(hf_path, train_sources, run_dir: str, seed: int, rank: int) -> str:
    """The run's HF model folder: `model.hf_path`, or (unset: the demo's default) the built-in model
    of the embedded task `data.train` names (addition's for other sources), built once by rank 0 in
    run_dir/initial_model."""
    import torch.distributed as dist

    model_dir = hf_path or os.path.join(run_dir, "initial_model")
    if hf_path is None:
        tasks = [source_kind(s) for s in as_sources(train_sources) if source_kind(s) in EMBEDDED_TASKS] or ["addition"]
        if rank == 0 and not os.path.exists(os.path.join(model_dir, "tokenizer.json")):
            embedded_task(tasks[0]).build_model_dir(model_dir, seed=seed)
    if dist.is_initialized():
        dist.barrier()
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"model.hf_path: {model_dir!r} holds no config.json")
    return model_dir
