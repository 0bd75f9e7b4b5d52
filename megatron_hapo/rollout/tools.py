"""Multi-turn rollouts with tools: the model writes a call, the sandbox runs it, the result is appended
as a tool turn and generation continues from the whole context (`rollout.tools`); and with an
environment (`rollout.environment`, rollout/env_api.py), whose reply to every model turn is appended
the same way until it says the episode is done.

One response is the whole trajectory: model turns and tool turns, in order. Per token it carries a
model mask: the engine's records (temperature, entropy, log-probs) exist for model tokens only;
tool tokens are context (loss mask 0), so they never enter the entropy statistics, h-hat, the
advantages, redistribution, clipping, TIS or the mismatch metrics (docs/HAPO.md, "Tools").

A round: every live trajectory of the batch generates until its turn ends (chat template: EOS, the
turn holding any number of <tool_call> blocks; tags: the close tag, a stop token, so it must be one
token, after one call), or its budget; the calls of every paused trajectory run in parallel
(`rollout.tool_workers` at once, each bounded by its timeout; rollout/tool_api.py), each result, cut
to `rollout.max_tool_output_tokens`, is appended in call order and the trajectory goes on in the
next round with prefix caching. Caps: `rollout.max_response_tokens` counts model tokens; the
context (prompt + model + tool tokens) is bounded by the engine's max_model_len; `rollout.max_turns`
bounds the model turns (a call that closes the last one is not run).

Failure is data: a malformed call, a program that errors, times out, floods its output or hits a
sandbox limit becomes a short tool message saying so ("Error: ..." after what it printed, kept
whatever the cut; the tokenizer's <error> token where it cannot spell it), counted per response
(tool_calls, tool_errors, tool_timeouts, turns). Tool output is plain text: a program printing a
control token's string (`</s>`, `<|im_start|>`, the format's tags) never puts that token in the
context (`ToolCallFormat.plain_ids`). Two call syntaxes (`ToolCallFormat`): the chat template's
Qwen `<tool_call>{"name": "python", "arguments": {"code": ...}}</tool_call>` form, and a tag pair
for base models (`<python>print(3*4)</python>` → `<output>12</output>`).
"""
from __future__ import annotations

import time
import dataclasses
import json
from typing import List, Optional, Sequence, Tuple

import torch.distributed as dist

from ..rewards.sandbox import SandboxLimits
from .builtin_tools import Python
from ..training import stop

PYTHON_TOOL = Python.schema()
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
TRUNCATED = "…"  # appended to a result cut to max_tool_output_tokens
ERROR_TOKEN = "<error>"  # marks a tool error where the tokenizer cannot spell the message (the multiply task's)


def _single_token(tokenizer, text: str, setting: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{setting}: {text!r} is {len(ids)} tokens in this tokenizer; generation stops on the call's "
                         f"close, which must be one token (add it as a special token, or choose another)")
    return ids[0]


class TextFormat:
    """Text from outside the model (a tool's output, an environment's reply) as plain tokens, for one
    tokenizer, and an environment's reply as a turn: kind chat_template (a user turn of the template) |
    tags (between the result tags, tags[2] and tags[3]) | auto (chat_template where the template marks
    a user turn, else tags)."""

    def __init__(self, tokenizer, kind: str = "auto", tags: Sequence[str] = ("<python>", "</python>", "<output>", "</output>"),
                 errors: bool = False):
        """errors: the model may read a tool's error, which the tokenizer must spell or mark (<error>)."""
        self.tok = tokenizer
        self._turns: dict = {}  # the template's tool turns for n results, user turn (`_around`, `_user_turn`)
        if kind == "auto":
            kind = "chat_template" if any(self._user_turn("")) else "tags"
        self.kind = kind
        if kind == "tags":
            self.result_open, self.result_close = tags[2], tags[3]
        self._plain_setup(tags if kind == "tags" else (CALL_OPEN, CALL_CLOSE), errors)

    # ---- tool and environment text as plain text ------------------------------------------------------
    #
    # A tokenizer matches its added and special tokens inside any text it is given: a program printing
    # `</s>` or `<|im_start|>assistant` would put an end of sequence or a new turn into the model's
    # context. Text from outside the model is split at every such string (and the format's own tags)
    # and those parts are tokenized one character at a time, where no multi-character token can match:
    # the model reads the characters the tool printed (as far as the tokenizer can spell them), never a
    # control token.

    def _plain_setup(self, tags, errors: bool) -> None:
        import re

        tok = self.tok
        added = {i: getattr(t, "content", str(t)) for i, t in getattr(tok, "added_tokens_decoder", {}).items()}
        names = set(added.values()) | {str(x) for x in getattr(tok, "all_special_tokens", [])} | set(tags)
        unk = getattr(tok, "unk_token_id", None)
        self._control_ids = ({i for i, c in added.items() if len(c) > 1} | set(getattr(tok, "all_special_ids", []))) - {unk}
        names = sorted((n for n in names if len(n) > 1), key=len, reverse=True)
        self._control_re = re.compile("|".join(map(re.escape, names))) if names else None
        ids = tok(ERROR_TOKEN, add_special_tokens=False)["input_ids"]
        self.error_id = ids[0] if len(ids) == 1 else None
        probe = "Error: timed out after 5 s"
        if errors and not self._spells(probe) and self.error_id is None:
            raise ValueError(f"rollout.tools: this tokenizer cannot spell a tool's error ({probe!r} reads as "
                             f"{self.tok.decode(self.plain_ids(probe))!r}) and has no {ERROR_TOKEN} token to mark one with; "
                             f"add it (tokenizer.add_tokens([{ERROR_TOKEN!r}]), within the model's vocabulary)")

    def _enc(self, text: str) -> List[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def plain_ids(self, text: str) -> List[int]:
        """`text` (a tool's output, an environment's reply) as plain text: no added or special token of the
        tokenizer, nor the format's tags, whatever the text holds."""
        if self._control_re is None or not self._control_re.search(text):
            ids = self._enc(text)
        else:
            ids, at = [], 0
            for m in self._control_re.finditer(text):
                ids += self._enc(text[at:m.start()])
                ids += [i for ch in m.group() for i in self._enc(ch)]
                at = m.end()
            ids += self._enc(text[at:])
        if self._control_ids.intersection(ids):  # a tokenizer that merges plain text into one: every character alone
            ids = [i for ch in text for i in self._enc(ch) if i not in self._control_ids]
        return ids

    def _spells(self, text: str) -> bool:
        return self.tok.decode(self.plain_ids(text), skip_special_tokens=False) == text

    def error_ids(self, message: str, lead: str = "") -> List[int]:
        """"Error: message" as plain text, or the tokenizer's <error> token where it cannot spell it."""
        text = f"{lead}Error: {message}"
        if self._spells(text) or self.error_id is None:
            return self.plain_ids(text)
        return [self.error_id]

    def render_prompt_tools(self) -> Optional[list]:
        """What a prompt's chat template gets as tools= (chat_template form with tools), else None."""
        return None

    def stop_ids(self) -> Tuple[int, ...]:
        """What ends a model turn besides EOS."""
        return ()

    # ---- an environment's reply ---------------------------------------------------------------------

    def reply_ids(self, text: str, max_tokens: int, turn_end: str = "") -> List[int]:
        """The tokens after a model turn that an environment answered: its reply as plain text, cut to
        max_tokens (marked), as the template's next user turn up to the assistant header (turn_end: the
        text of the model's last token, which the context holds already) or between the result tags."""
        before, after = (self.result_open, self.result_close) if self.kind == "tags" else self._user_turn(turn_end)
        return self._enc(before) + self._body_ids(text, max_tokens) + self._enc(after)

    def _body_ids(self, text: str, max_tokens: int, error: Optional[str] = None) -> List[int]:
        """`text` as plain text cut to max_tokens (marked), then the error, if any, whatever the cut: the
        text gives way to it (the error itself cut to max_tokens, its start "Error:" first)."""
        err = self.error_ids(error, "\n" if text else "")[:max_tokens] if error else []
        ids, room = self.plain_ids(text), max(0, max_tokens - len(err))
        if len(ids) > room:
            ids = ids[:room] + self.plain_ids(TRUNCATED)
        return ids + err

    def _user_turn(self, turn_end: str) -> Tuple[str, str]:
        """(head, tail) of the template's user turn after an assistant turn: [user, assistant, user]
        rendered with sentinels and split; the head without `turn_end` where it begins with it."""
        if "user" not in self._turns:
            marks = [f"\x00HAPO-{k}\x00" for k in range(3)]
            try:
                text = self.tok.apply_chat_template([{"role": r, "content": m} for r, m in zip(("user", "assistant", "user"), marks)],
                                                    tokenize=False, add_generation_prompt=True)
                at = text.index(marks[1]) + len(marks[1])
                self._turns["user"] = (text[at:text.index(marks[2])], text[text.index(marks[2]) + len(marks[2]):])
            except Exception:  # noqa: BLE001 - no template, or one without these roles (jinja's own errors)
                self._turns["user"] = ("", "")
        head, tail = self._turns["user"]
        return head.removeprefix(turn_end), tail


class ToolCallFormat(TextFormat):
    """How calls are written and results rendered, for one tokenizer: `kind` chat_template | tags."""

    def __init__(self, tokenizer, kind: str = "auto", tags: Sequence[str] = ("<python>", "</python>", "<output>", "</output>"),
                 tools: Optional[Sequence[dict]] = None):
        """tools: the schemas of the run's tools (tool_api.schemas; default: python alone). The tags form
        writes one tool's calls: the text between the tags is its one required string argument."""
        self.tools = list(tools) if tools else [PYTHON_TOOL]
        template = getattr(tokenizer, "chat_template", None) or ""
        if kind == "auto":
            kind = "chat_template" if CALL_CLOSE in template and len(
                tokenizer(CALL_CLOSE, add_special_tokens=False)["input_ids"]) == 1 else "tags"
        if kind == "chat_template" and CALL_OPEN not in template:
            raise ValueError("rollout.tool_format=chat_template: the tokenizer's chat template defines no "
                             f"{CALL_OPEN} … {CALL_CLOSE} calls; use rollout.tool_format=tags")
        super().__init__(tokenizer, kind, tags, errors=True)
        if kind == "chat_template":
            self.open, self.close = CALL_OPEN, CALL_CLOSE
            self.close_id = _single_token(tokenizer, CALL_CLOSE, "rollout.tool_format=chat_template")
        else:
            self.open, self.close = tags[0], tags[1]
            self.close_id = _single_token(tokenizer, self.close, "rollout.tool_tags[1]")
            fn = self.tools[0]["function"]
            required = fn.get("parameters", {}).get("required", [])
            if len(self.tools) != 1 or len(required) != 1:
                raise ValueError(f"rollout.tool_format=tags: the tags carry one tool's one argument; the run has "
                                 f"{[t['function']['name'] for t in self.tools]} (use a chat template with tool calls "
                                 f"for several tools)")
            self.tag_tool, self.tag_argument = fn["name"], required[0]

    def render_prompt_tools(self) -> Optional[list]:
        return list(self.tools) if self.kind == "chat_template" else None

    # ---- a model turn's calls ----------------------------------------------------------------------
    #
    # Tags: a turn stops at the close tag and holds one call. Chat template: a turn goes on to the
    # model's end of turn (EOS) and may hold several <tool_call> blocks (Qwen's templates render them
    # in one assistant message); they run in parallel and their results follow in call order, each a
    # tool message of the template's tool turn.

    def stop_ids(self) -> Tuple[int, ...]:
        """What ends a model turn besides EOS: the close tag (tags form), nothing more (chat template)."""
        return (self.close_id,) if self.kind == "tags" else ()

    def wants_tools(self, turn_ids: List[int], turn_text: str) -> bool:
        """Whether a turn that ended on a stop token (EOS or the close tag) calls tools."""
        if self.kind == "tags":
            return bool(turn_ids) and turn_ids[-1] == self.close_id
        return self.open in turn_text or self.close_id in turn_ids

    def parse_turn(self, turn_text: str) -> List[Tuple[Optional[Tuple[str, dict]], Optional[str]]]:
        """Each call of a turn, in order, as `parse` gives it."""
        if self.kind == "tags":
            return [self.parse(turn_text)]
        out, at = [], 0
        while True:
            start, end = turn_text.find(self.open, at), turn_text.find(self.close, at)
            if start < 0 and end < 0:
                break
            if end < 0:
                out.append((None, f"malformed call: no {self.close} after {self.open}"))
                break
            out.append(self.parse(turn_text[at:end + len(self.close)]))
            at = end + len(self.close)
        return out or [(None, f"malformed call: no {self.open} … {self.close}")]

    def parse(self, turn_text: str) -> Tuple[Optional[Tuple[str, dict]], Optional[str]]:
        """((tool name, arguments), None) from the text of a model turn that ended with the call's close,
        or (None, what is wrong with the call). The arguments are checked against the tool's schema when
        the call runs (`tool_api.ToolBox`)."""
        body = turn_text[:turn_text.rfind(self.close)] if self.close in turn_text else turn_text
        start = body.rfind(self.open)
        if start < 0:
            return None, f"malformed call: no {self.open} before {self.close}"
        body = body[start + len(self.open):]
        if self.kind == "tags":
            return ((self.tag_tool, {self.tag_argument: body}), None) if body.strip() else \
                (None, f"malformed call: empty {self.tag_argument}")
        try:
            call = json.loads(body)
        except ValueError as exc:
            return None, f"malformed call: not JSON ({exc.msg})"
        names = [t["function"]["name"] for t in self.tools]
        if not isinstance(call, dict) or call.get("name") not in names:
            return None, f"unknown tool {call.get('name') if isinstance(call, dict) else call!r}; available: {', '.join(names)}"
        args = call.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None, "malformed call: arguments are not JSON"
        if not isinstance(args, dict):
            return None, "malformed call: arguments must be a JSON object"
        return (call["name"], args), None

    def result_ids(self, output: str, max_tokens: int, error: Optional[str] = None) -> List[int]:
        """The tokens of a tool turn holding `output` as plain text, cut to max_tokens tokens (marked), and
        after it the error, if any, whatever the cut: the output gives way to it (the error itself is
        cut to max_tokens, its start "Error:" first)."""
        before, after = (self.result_open, self.result_close) if self.kind == "tags" else self._around(1, "")[::2]
        return self._enc(before) + self._body_ids(output, max_tokens, error) + self._enc(after)

    def turn_ids(self, results: Sequence["ToolResult"], max_tokens: int, turn_end: str = "") -> List[int]:
        """The tokens after a model turn that called tools: each result (`result_ids`' rules, max_tokens
        each) in call order, in the template's tool turn, up to the next assistant header. turn_end: the
        text of the turn's last token (the model's EOS), which the template's text after the calls
        starts with and the context already holds."""
        if self.kind == "tags":
            return self.result_ids(results[0].text, max_tokens, results[0].error)
        head, sep, tail = self._around(len(results), turn_end)
        ids = self._enc(head)
        for k, res in enumerate(results):
            ids += (self._enc(sep) if k else []) + self._body_ids(res.text, max_tokens, res.error)
        return ids + self._enc(tail)

    def _around(self, n: int, turn_end: str) -> Tuple[str, str, str]:
        """(head, separator, tail) of the template's tool turn for n results: [user, assistant with n calls,
        n tool messages] rendered with sentinel outputs and split at them; the head begins after the last
        call's close, without `turn_end` where it begins with it."""
        if n not in self._turns:
            marks = [f"\x00TOOL-OUTPUT-{k}\x00" for k in range(n)]
            call = {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "python", "arguments": {"code": "x"}}}] * n}
            text = self.tok.apply_chat_template([{"role": "user", "content": "x"}, call] +
                                                [{"role": "tool", "content": m} for m in marks],
                                                tokenize=False, add_generation_prompt=True, tools=[PYTHON_TOOL])
            at = [text.index(m) for m in marks]
            head = text[text.rindex(CALL_CLOSE, 0, at[0]) + len(CALL_CLOSE):at[0]]
            sep = text[at[0] + len(marks[0]):at[1]] if n > 1 else ""
            self._turns[n] = (head, sep, text[at[-1] + len(marks[-1]):])
        head, sep, tail = self._turns[n]
        return head.removeprefix(turn_end), sep, tail


@dataclasses.dataclass
class ToolResult:
    text: str  # what the program printed (the model reads it as plain text)
    status: str  # ok | error | timeout | malformed
    error: Optional[str] = None  # what went wrong, shown after the text whatever the cut


class MultiTurnEngine:
    """The rollout engine with tools or an environment: the same `generate` as `RolloutEngine` (the
    collector does not know the difference, but passes each prompt's dataset row where `needs_rows`),
    each response a whole trajectory with its model mask and tool counts."""

    def __init__(self, engine, fmt: TextFormat, tools, max_turns: int, max_tool_output_tokens: int, group=None,
                 env=None, has_env: bool = False):
        """tools: the run's `tool_api.ToolBox`; env: its `env_api.Episodes` (has_env: the run has an
        environment, on every rank). group: the engine's inference-TP group (gloo) when it spans several
        ranks: every rank of an engine must send it the same requests, so its first rank runs the tools
        and steps the environments (None on the others) and broadcasts the results (a timeout on one rank
        only would make the contexts differ)."""
        self.engine, self.fmt, self.tool, self.group, self.env = engine, fmt, tools, group, env
        self.has_tools, self.has_env = isinstance(fmt, ToolCallFormat), has_env or env is not None
        self.max_turns, self.max_tool_output_tokens = max_turns, max_tool_output_tokens
        self.tool_seconds = 0.0  # wall time spent in tools and environments (bench)

    @property
    def needs_rows(self) -> bool:
        return self.env is not None

    def __getattr__(self, name):  # weights, sleep, greedy, score: the engine's own
        return getattr(self.engine, name)

    def close(self) -> None:
        if self.tool is not None:
            self.tool.close()
        if self.env is not None:
            self.env.close()
        self.engine.close()

    def generate(self, prompts, n: int, sampling, stats=None, seeds=None, rows=None):
        """n trajectories per prompt; the first turn as `RolloutEngine.generate` (the same seeds), turn k of
        sample j of prompt i seeded with seeds[i] + j + 1_000_003·k, so results do not depend on the batch.
        rows: each prompt's dataset row (an environment's reset; on the rank that steps it)."""
        from .collect import SEED_MODULUS
        from .engine import Response

        sampling = dataclasses.replace(sampling, stop_token_ids=tuple(sampling.stop_token_ids) + self.fmt.stop_ids())
        max_len = self.engine.max_model_len
        first = self.engine.generate(prompts, n, sampling, stats, seeds=seeds)
        out = [[_Trajectory(list(p), r) for r in rs] for p, rs in zip(prompts, first)]
        if self.env is not None:
            if rows is None or len(rows) != len(prompts):
                raise ValueError("rollout.environment: generate() needs each prompt's dataset row (rows=)")
            for row, rs in zip(rows, out):
                for t, ep in zip(rs, self.env.start([row] * len(rs))):
                    t.episode = ep
        live = [t for rs in out for t in rs]
        for turn in range(1, self.max_turns + 1):
            last = turn == self.max_turns
            calls, parsed, answered = [], [], []
            for t in live:
                if not t.ended_on_stop() or t.env_over:
                    continue
                text = self._decode(t.last_turn)
                if self.has_tools and self.fmt.wants_tools(t.last_turn, text):
                    if not last:  # a call that closes the last allowed turn is not run
                        calls.append(t)
                        parsed.append(self.fmt.parse_turn(text))
                elif self.has_env:  # the environment answers every turn, the last one too (its reward counts)
                    answered.append((t, text))
            t0 = time.perf_counter()
            pending = self.tool.submit([c for p in parsed for c, _ in p if c is not None]) if self.tool is not None else []
            replies = self.env.step([t.episode for t, _ in answered], [x for _, x in answered]) \
                if self.env is not None and answered else []
            stop.mark("tools")  # every round, calls or not: where the kill tests land with tools in flight
            ran = [f.result() for f in pending]
            if self.group is not None:  # the engine's first rank ran them; all its ranks continue alike
                box = [(ran, replies)]
                dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
                ran, replies = box[0]
            ran = iter(ran)
            self.tool_seconds += time.perf_counter() - t0
            grown = []
            for t, turn_calls in zip(calls, parsed):
                results = [next(ran) if c is not None else ToolResult("", "malformed", error) for c, error in turn_calls]
                t.add_tool(self.fmt.turn_ids(results, self.max_tool_output_tokens, self._end(t)), [r.status for r in results])
                grown.append(t)
            for (t, _), reply in zip(answered, replies):
                if reply is None:  # done, failed or timed out: the trajectory ends with this turn
                    t.env_over = True
                elif not last:
                    t.add_tool(self.fmt.reply_ids(reply, self.max_tool_output_tokens, self._end(t)), [])
                    grown.append(t)
            live = []
            for t in grown:
                t.budget = min(sampling.max_tokens - t.model_tokens, max_len - t.context_len)
                if t.budget < 1:  # the model-token cap or the context is used up: the response ends here
                    t.finish_reason = "length"
                else:
                    live.append(t)
            if not live:
                break
            conts = self.engine.generate(
                [t.context for t in live], 1, sampling, stats,
                seeds=None if seeds is None else [(seeds[t.i] + t.j + 1_000_003 * turn) % SEED_MODULUS for t in live],
                max_tokens=[t.budget for t in live])
            for t, rs in zip(live, conts):
                t.add_model(rs[0])
        return [[t.response(Response, self.env, self.has_tools) for t in rs] for rs in out]

    def _decode(self, ids) -> str:
        return self.fmt.tok.decode(ids, skip_special_tokens=False)

    def _end(self, t) -> str:
        """The text of a turn's last token (the model's EOS), which the template's next turn starts with."""
        return self.fmt.tok.decode(t.last_turn[-1:], skip_special_tokens=False)


class _Trajectory:
    """One response being built, turn by turn."""

    def __init__(self, prompt: List[int], first):
        self.i, self.j, self.prompt = first.prompt_index, first.sample_index, prompt
        self.ids, self.mask = [], []
        self.records = {k: [] for k in ("temperatures", "entropies", "logprobs", "logprobs_t1")}
        self.calls = self.errors = self.timeouts = self.turns = 0
        self.answer_start, self.error, self.last_turn = 0, first.error, []
        self.episode, self.env_over = None, False  # environment: this trajectory's episode; it has ended
        self.routing = None  # routing replay: experts [layers, positions fed so far, k], each as first computed
        self.add_model(first)

    @property
    def model_tokens(self) -> int:
        return sum(self.mask)

    @property
    def context(self) -> List[int]:
        return self.prompt + self.ids

    @property
    def context_len(self) -> int:
        return len(self.prompt) + len(self.ids)

    def add_model(self, r) -> None:
        self.turns += 1
        self.answer_start = len(self.ids)
        self.ids += r.token_ids
        self.mask += [True] * len(r.token_ids)
        for k, v in self.records.items():
            v += list(getattr(r, k))
        self.last_turn, self.finish_reason = list(r.token_ids), r.finish_reason
        self.error = self.error or r.error
        self._add_routing(getattr(r, "routing", None))

    def _add_routing(self, record) -> None:
        """Routing replay: a turn's request records every position it fed (the whole context, the prefix
        cache being off); the positions an earlier turn recorded keep that record (each sampled token's
        experts are the ones it was sampled with), the new ones (the tool or environment tokens and this
        turn's) come from this one. A turn without a record (a failed request) leaves none for the response."""
        if record is None or (self.routing is None and self.turns > 1):
            self.routing = None
            return
        if self.routing is None:
            self.routing = record
            return
        import numpy as np

        self.routing = np.concatenate([self.routing, record[:, self.routing.shape[1]:]], axis=1)

    def ended_on_stop(self) -> bool:
        return not self.error and self.finish_reason == "stop" and bool(self.last_turn)

    def add_tool(self, ids: List[int], statuses: List[str]) -> None:
        self.calls += len(statuses)
        self.errors += sum(s in ("error", "malformed") for s in statuses)
        self.timeouts += sum(s == "timeout" for s in statuses)
        self.ids += ids
        self.mask += [False] * len(ids)
        fill = {"temperatures": 1.0, "entropies": 0.0, "logprobs": 0.0, "logprobs_t1": 0.0}  # not sampled: masked out
        for k, v in self.records.items():
            v += [fill[k]] * len(ids)

    def response(self, cls, env=None, tools: bool = True):
        """The trajectory as a Response (`cls`): tools (calls, errors, timeouts, turns), or (turns,) for an
        environment without tools; env: the run's Episodes, for the episode's reward."""
        return cls(self.i, self.j, self.ids, *(self.records[k] for k in ("temperatures", "entropies", "logprobs", "logprobs_t1")),
                   self.finish_reason, error=self.error, model_mask=list(self.mask), answer_start=self.answer_start,
                   tools=(self.calls, self.errors, self.timeouts, self.turns) if tools else (self.turns,),
                   env=env.result(self.episode) if env is not None and self.episode is not None else None,
                   routing=self.routing)


def tools_for_run(cfg, engine, tokenizer, limits: SandboxLimits):
    """The run's engine with tools (rollout.tools) or an environment (rollout.environment), or the
    engine itself with neither. Under torch.distributed every rank calls it (the inference-TP groups
    are created collectively)."""
    from ..training.parallel import engine_group

    from .env_api import Episodes
    from .tool_api import ToolBox

    r = cfg.rollout
    if not r.tools and not r.environment:
        return engine
    fmt = format_for_run(r, tokenizer)
    itp = cfg.parallel.inference_tensor_parallel_size
    group = engine_group(itp, cfg.parallel.control_timeout_s) if dist.is_initialized() else None
    leader = group is None or dist.get_rank() % itp == 0
    tools = ToolBox(r.tools, r.tool_settings, limits, r.tool_timeout_s, r.tool_workers) if leader and r.tools else None
    env = Episodes(r.environment, r.environment_settings, r.tool_timeout_s, r.tool_workers) \
        if leader and r.environment else None
    return MultiTurnEngine(engine, fmt, tools, r.max_turns, r.max_tool_output_tokens, group, env, bool(r.environment))


def format_for_run(r, tokenizer) -> TextFormat:
    """The multi-turn format of a run's rollout config for its tokenizer: its tool calls (rollout.tools,
    tool_format, tool_tags) and an environment's replies; None for a single-turn run."""
    from .tool_api import schemas

    if r.tools:
        return ToolCallFormat(tokenizer, r.tool_format, r.tool_tags, schemas(r.tools))
    return TextFormat(tokenizer, r.tool_format, r.tool_tags) if r.environment else None
