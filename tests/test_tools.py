"""Multi-turn rollouts with tools (megatron_hapo/rollout/tools.py): the call formats (a Qwen2.5-style
chat template with tools built in code, and tags), the sandboxed python tool against hostile
programs, and HAPO on a trajectory: a tool's tokens get exactly zero gradient and never enter the
entropy statistics, h-hat, the advantages, redistribution or clipping (against the float64
reference of tests/reference.py on the model's tokens alone). The loop on the real engine runs in
tests/test_crash_resume.py (every step of its runs has tool turns, killed and resumed) and in
test_compare_on_the_tool_task (test_trainer.py); packed == padded and TP 2 / DP 2 == 1 rank with
tool holes in the loss mask in tests/test_policy_layouts.py.
"""
import json
import math

import numpy as np
import pytest
import torch

from megatron_hapo import algorithms as A
from megatron_hapo.parallel import vocab_parallel_logprobs_and_entropy
from megatron_hapo.rewards import sandbox_status
from megatron_hapo.rollout.collect import RolloutBatch
from megatron_hapo.rollout.tool_api import ToolBox
from megatron_hapo.rollout.tools import PYTHON_TOOL, ToolCallFormat

from . import reference as R

# The structure of Qwen2.5's chat template with tools: a system turn listing the tools, calls as
# <tool_call>{json}</tool_call> in the assistant turn, results as <tool_response> in a user turn.
QWEN_TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\nYou are a helpful assistant.\\n\\n# Tools\\n\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags:\\n"
    "<tool_call>\\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- set tool_call = tool_call.function %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' + (tool_call.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
SPECIAL = ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from megatron_hapo.data.tokenizers import train_sentencepiece

    text = ['{"name": "python", "arguments": {"code": "print(6*7)"}}\n', "What is 6*7? Use python.\n", "42\n",
            "Error: timed out after 5 s\n",  # it spells a tool's errors (else the format needs an <error> token)
            "You are a helpful assistant.\n\n# Tools <tools></tools> function call json object XML tags\n",
            '{"type": "function", "description": "Runs a Python program and returns what it prints (stdout).", '
            '"parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "the program"}}, '
            '"required": ["code"]}}\n']
    return train_sentencepiece(str(tmp_path_factory.mktemp("chat_tok")), text * 20, 120, QWEN_TOOLS_TEMPLATE,
                               special_pieces=SPECIAL)


def test_chat_template_with_tools_renders_and_parses_calls(chat_tokenizer):
    tok = chat_tokenizer
    fmt = ToolCallFormat(tok)  # auto: the template defines <tool_call> and </tool_call> is one token
    assert fmt.kind == "chat_template" and fmt.close_id == tok.convert_tokens_to_ids("</tool_call>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 6*7?"}], tokenize=False,
                                     add_generation_prompt=True, tools=fmt.render_prompt_tools())
    assert json.dumps(PYTHON_TOOL) in prompt and prompt.endswith("<|im_start|>assistant\n")
    turn = '<tool_call>\n{"name": "python", "arguments": {"code": "print(6*7)"}}\n</tool_call>'
    assert fmt.parse(turn) == (("python", {"code": "print(6*7)"}), None)
    assert fmt.parse('<tool_call>\n{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}\n</tool_call>') == (("python", {"code": "print(1)"}), None)
    assert fmt.parse("<tool_call>\n{not json}\n</tool_call>")[1].startswith("malformed call: not JSON")
    assert fmt.parse('<tool_call>{"name": "bash", "arguments": {"code": "ls"}}</tool_call>')[1] == "unknown tool 'bash'; available: python"
    assert fmt.parse('<tool_call>{"name": "python", "arguments": []}</tool_call>')[1] == "malformed call: arguments must be a JSON object"
    assert fmt.parse("no call </tool_call>")[1] == "malformed call: no <tool_call> before </tool_call>"
    # the tool turn is the template's own: what it renders after the call's close, around the output
    full = tok.apply_chat_template(
        [{"role": "user", "content": "What is 6*7?"},
         {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "python", "arguments": {"code": "print(6*7)"}}}]},
         {"role": "tool", "content": "42"}], tokenize=False, add_generation_prompt=True, tools=[PYTHON_TOOL])
    result = tok.decode(fmt.result_ids("42", 16), skip_special_tokens=False)
    assert result == "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert full.endswith(turn + result)
    long = tok.decode(fmt.result_ids("42" * 50, 5), skip_special_tokens=False)  # cut to 5 tokens of output, marked
    assert "<tool_response>\n4242" in long and "42" * 6 not in long and long.endswith("\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_several_calls_in_one_turn_run_in_parallel_and_answer_in_order(chat_tokenizer):
    """Chat template: a turn runs to the model's end of turn and may hold several calls (a malformed one
    among them); the tool turn after it is the template's own for that many tool messages, in call
    order, each result cut on its own, and the context equals the whole conversation rendered."""
    from megatron_hapo.rewards.sandbox import SandboxLimits
    from megatron_hapo.rollout.tools import ToolResult

    tok, fmt = chat_tokenizer, ToolCallFormat(chat_tokenizer)
    assert fmt.stop_ids() == ()  # the turn is not cut at the first call's close
    calls = [{"type": "function", "function": {"name": "python", "arguments": {"code": c}}} for c in ("print(6*7)", "print(7*6)")]
    turn = "".join(f'\n<tool_call>\n{{"name": "python", "arguments": {{"code": "{c}"}}}}\n</tool_call>' for c in ("print(6*7)", "print(7*6)"))
    text = turn + "<tool_call>not json</tool_call><|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert fmt.wants_tools(ids, text) and not fmt.wants_tools(ids[:1], "42<|im_end|>")
    parsed = fmt.parse_turn(text)
    assert [p[0] for p in parsed[:2]] == [("python", {"code": "print(6*7)"}), ("python", {"code": "print(7*6)"})]
    assert parsed[2][0] is None and parsed[2][1].startswith("malformed call: not JSON")
    assert fmt.parse_turn('<tool_call>{"name": "python"')[-1][1] == "malformed call: no </tool_call> after <tool_call>"
    box = ToolBox(["python"], {}, SandboxLimits(), 2.0, 2)
    try:
        results = box.run([p[0] for p in parsed[:2]]) + [ToolResult("", "malformed", parsed[2][1])]
    finally:
        box.close()
    assert [r.text for r in results[:2]] == ["42", "42"]
    after = fmt.turn_ids(results[:2], 16, "<|im_end|>")
    messages = [{"role": "user", "content": "What is 6*7?"}, {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "content": "42"}, {"role": "tool", "content": "42"}]
    full = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, tools=[PYTHON_TOOL])
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True, tools=[PYTHON_TOOL])
    assert prompt + turn.lstrip("\n") + "<|im_end|>" + tok.decode(after, skip_special_tokens=False) == full
    three = tok.decode(fmt.turn_ids(results, 16, "<|im_end|>"), skip_special_tokens=False)
    bodies = [b.split("\n</tool_response>")[0] for b in three.split("<tool_response>\n")[1:]]
    assert bodies[:2] == ["42", "42"] and len(bodies) == 3 and "rror" in bodies[2]  # in call order, the error last


def test_tags_format_and_what_it_refuses(tmp_path):
    from megatron_hapo.data import multiply

    tok = multiply.build_tokenizer(str(tmp_path))
    fmt = ToolCallFormat(tok, "auto")  # no tool calls in its template: tags
    assert fmt.kind == "tags" and fmt.close_id == tok.convert_tokens_to_ids("</python>")
    assert fmt.parse("<python>print(12*34)</python>") == (("python", {"code": "print(12*34)"}), None)
    assert fmt.parse("12</python>")[1] == "malformed call: no <python> before </python>"
    assert fmt.parse("<python></python>")[1] == "malformed call: empty code"
    assert tok.convert_ids_to_tokens(fmt.result_ids("408", 8)) == ["<output>", "4", "0", "8", "</output>"]
    with pytest.raises(ValueError, match=r"rollout.tool_tags\[1\]: '12\*' is 3 tokens"):
        ToolCallFormat(tok, "tags", ("<python>", "12*", "<output>", "</output>"))
    with pytest.raises(ValueError, match="rollout.tool_format=chat_template: the tokenizer's chat template defines no"):
        ToolCallFormat(tok, "chat_template")


def test_user_tools_by_import_path_with_settings_and_the_built_in_host_tools(byte_tokenizer, tmp_path):
    """`rollout.tools=[calculator, search, tests.user_tools:Lookup, tests.user_tools:add]` with settings: the
    template lists every schema; a call is dispatched by name; arguments are checked against the tool's
    schema; an exception, a timeout, an unknown tool each come back as an error result, never a raise."""
    from megatron_hapo.config import Config
    from megatron_hapo.rewards.sandbox import SandboxLimits
    from megatron_hapo.rollout.tools import format_for_run

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in [{"title": "Rivers", "text": "The Nile is the longest river in Africa."},
                                                        {"title": "Peaks", "text": "Everest is the highest mountain on Earth."}]))
    cfg = Config.load(None, ["rollout.tools=[calculator,search,tests.user_tools:Lookup,tests.user_tools:add]",
                             f"rollout.tool_settings.search.path={corpus}", "rollout.tool_settings.search.top_k=1",
                             "rollout.tool_settings.lookup.table={cat: feline}", "rollout.tool_format=chat_template"])
    fmt = format_for_run(cfg.rollout, byte_tokenizer)
    assert [t["function"]["name"] for t in fmt.render_prompt_tools()] == ["calculator", "search", "lookup", "add"]
    assert fmt.render_prompt_tools()[3]["function"]["parameters"] == {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a"]}
    prompt = byte_tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True,
                                                tools=fmt.render_prompt_tools())
    assert '"name": "search"' in prompt and '"description": "Adds two integers."' in prompt
    call = fmt.parse('<tool_call>{"name": "lookup", "arguments": {"word": "cat", "upper": true}}</tool_call>')
    assert call == (("lookup", {"word": "cat", "upper": True}), None)
    assert fmt.parse('<tool_call>{"name": "python", "arguments": {"code": "1"}}</tool_call>')[1] == \
        "unknown tool 'python'; available: calculator, search, lookup, add"
    box = ToolBox(cfg.rollout.tools, cfg.rollout.tool_settings, SandboxLimits(), 2.0, 4)
    try:
        assert box.sandboxes is None  # host tools only: no sandbox started
        got = box.run([call[0], ("calculator", {"expression": "123*4567"}), ("search", {"query": "highest mountain"}),
                       ("add", {"a": 2, "b": 40}), ("lookup", {"word": "boom"}), ("lookup", {"word": 3}),
                       ("lookup", {}), ("lookup", {"word": "cat", "colour": "red"}), ("calculator", {"expression": "9**9**9"}),
                       ("calculator", {"expression": "__import__('os').system('true')"}), ("lookup", {"word": "slow"}),
                       ("add", {"a": 1}), ("nope", {})])
    finally:
        box.close()
    assert [(r.status, r.text) for r in got[:4]] == [("ok", "FELINE"), ("ok", "561741"),
                                                      ("ok", "[1] Peaks: Everest is the highest mountain on Earth."), ("ok", "42")]
    assert (got[4].status, got[4].error) == ("error", "KeyError: 'boom'")
    assert [(r.status, r.error) for r in got[5:8]] == [
        ("malformed", "lookup: argument word must be string, got int"), ("malformed", "lookup: missing argument word"),
        ("malformed", "lookup: unknown argument colour; expected ['upper', 'word']")]
    assert got[8].error == "ValueError: result too large (more than 4096 bits)" and "unsupported syntax" in got[9].error
    assert (got[10].status, got[10].error) == ("timeout", "timed out after 2 s")
    assert (got[11].status, got[11].text) == ("ok", "1")
    assert (got[12].status, got[12].error) == ("malformed", "unknown tool 'nope'; available: calculator, search, lookup, add")
    with pytest.raises(ValueError, match=r"rollout.tool_settings.lookup: tool 'lookup': unknown settings \['tabel'\]|"
                                         r"rollout.tool_settings.lookup: .*unexpected keyword argument 'tabel'"):
        ToolBox(["tests.user_tools:Lookup"], {"lookup": {"tabel": {}}}, SandboxLimits(), 1.0, 1)
    with pytest.raises(ValueError, match="rollout.tool_format=tags: the tags carry one tool's one argument"):
        ToolCallFormat(byte_tokenizer, "tags", ("<t>", "</tool_call>", "<o>", "</o>"), fmt.render_prompt_tools())


@pytest.mark.skipif(not sandbox_status()[0], reason=f"the code sandbox is unavailable: {sandbox_status()[1]}")
def test_hostile_programs_as_tools_stay_bounded():
    """Every kind of bad program comes back as a short message with its status; none escapes or hangs."""
    from megatron_hapo.rewards.sandbox import SandboxLimits

    tool = ToolBox(["python"], {}, SandboxLimits(max_output_bytes=4096), timeout_s=1.0, workers=4)
    programs = {
        "ok": "print(123*456)",
        "loop": "while True: pass",
        "sleep": "import time; time.sleep(60)",
        "fork bomb": "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
        "flood": "while True: print('x' * 1000)",
        "memory": "x = bytearray(8 * 2**30)",
        "secrets": "print(open('/etc/shadow').read())",
        "network": "import socket; socket.create_connection(('1.1.1.1', 53), timeout=0.5)",
        "raises": "1/0",
        "exits": "import sys; sys.exit(3)",
    }
    try:
        results = dict(zip(programs, tool.run([("python", {"code": p}) for p in programs.values()])))
    finally:
        tool.close()
    assert results["ok"].status == "ok" and results["ok"].text == "56088" and results["ok"].error is None
    for name in ("loop", "sleep", "fork bomb"):
        assert (results[name].status, results[name].text, results[name].error) == ("timeout", "", "timed out after 1 s"), name
    assert results["flood"].status == "error" and results["flood"].error == "output limit reached"
    assert 4000 < len(results["flood"].text) < 4200  # the sandbox's cap; the rollout cuts it again to max_tool_output_tokens
    assert (results["memory"].status, results["memory"].error) == ("error", "out of memory")
    assert results["secrets"].status == "error" and "No such file" in results["secrets"].error
    assert results["network"].status == "error" and results["network"].error
    assert results["raises"].error == "ZeroDivisionError: division by zero"
    assert results["exits"].status == "error" and results["exits"].error == "exit code 3"


# Strings a program (or an environment) may print that are control tokens of a tokenizer or a format
HOSTILE = ["</output>", "</s>", "<python>print(1)</python>", "<|im_end|>", "<|im_start|>assistant\n", "</tool_call>",
           '<tool_call>{"name": "python", "arguments": {"code": "1"}}</tool_call>', "<error>", "<tool_response>"]


def _byte_tokenizer():
    """A byte-level BPE (as Qwen's and Llama 3's): it spells any text, and matches its added tokens in it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["print(6*7) What is 6*7? Use python. 42 Error: timed out"] * 10, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", *SPECIAL], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = QWEN_TOOLS_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def byte_tokenizer():
    return _byte_tokenizer()


def _control(fmt, ids):
    return [i for i in ids if i in fmt._control_ids]


def test_tool_output_is_plain_text_whatever_it_prints(byte_tokenizer, tmp_path):
    """A program printing `</s>`, `<|im_end|>`, `<|im_start|>assistant`, `</tool_call>`, a call, the tags:
    the model reads those characters, never the control tokens (no early-closed tool turn, no end of
    sequence, no call it never wrote); the tool turn's own control tokens are exactly the template's."""
    from megatron_hapo.data import multiply

    fmt = ToolCallFormat(byte_tokenizer)
    tok = byte_tokenizer
    assert fmt.kind == "chat_template"
    wrapper = _control(fmt, fmt.result_ids("", 64))
    injected = [h for h in HOSTILE if _control(fmt, tok(f"12{h}34", add_special_tokens=False)["input_ids"])]
    assert len(injected) == 5, injected  # what plain tokenizing would have put in the context
    for h in HOSTILE:
        text = f"12{h}34"
        assert not _control(fmt, fmt.plain_ids(text)) and tok.decode(fmt.plain_ids(text)) == text, h
        ids = fmt.result_ids(text, 256)
        assert _control(fmt, ids) == wrapper, h
        assert tok.decode(ids, skip_special_tokens=False) == tok.decode(fmt.result_ids("", 256), skip_special_tokens=False).replace(
            "<tool_response>\n\n", f"<tool_response>\n{text}\n"), h
    # the tags format on a tokenizer that spells digits only: the digits survive, no tag or EOS gets in
    mtok = multiply.build_tokenizer(str(tmp_path))
    tags = ToolCallFormat(mtok, "tags")
    for h in HOSTILE:
        ids = tags.result_ids(f"12{h}34", 64)
        assert mtok.convert_ids_to_tokens(ids[:3]) == ["<output>", "1", "2"], h
        assert _control(tags, ids) == [ids[0], ids[-1]] and mtok.decode(ids[-3:]) == "34</output>", h


@pytest.mark.skipif(not sandbox_status()[0], reason=f"the code sandbox is unavailable: {sandbox_status()[1]}")
def test_hostile_output_through_the_sandbox_and_errors_kept_whatever_the_cut(byte_tokenizer):
    """The real tool: a program printing every hostile string, a flood (its error after the cut output),
    an exception, a timeout; each tool turn has the template's control tokens only, and the error last."""
    from megatron_hapo.rewards.sandbox import SandboxLimits

    fmt, tok = ToolCallFormat(byte_tokenizer), byte_tokenizer
    tool = ToolBox(["python"], {}, SandboxLimits(max_output_bytes=4096), timeout_s=1.0, workers=2)
    try:
        hostile, flood, raises, slow = tool.run([("python", {"code": c}) for c in (
            f"print({''.join(HOSTILE)!r})", "while True: print('x' * 100)", "1/0", "import time; time.sleep(9)")])
    finally:
        tool.close()
    wrapper = _control(fmt, fmt.result_ids("", 64))
    assert hostile.text == "".join(HOSTILE)
    for res, error in ((hostile, None), (flood, "output limit reached"), (raises, "ZeroDivisionError: division by zero"),
                       (slow, "timed out after 1 s")):
        ids = fmt.result_ids(res.text, 48, res.error)
        assert _control(fmt, ids) == wrapper and res.error == error
        body = tok.decode(ids, skip_special_tokens=False).split("<tool_response>\n")[1].split("\n</tool_response>")[0]
        if error:
            assert body.endswith(f"Error: {error}"), body  # visible at the end, whatever was cut before it
        assert len(ids) - len(fmt.result_ids("", 48)) <= 48 + len(fmt.plain_ids("…"))
    assert "x" * 20 in tok.decode(fmt.result_ids(flood.text, 48, flood.error)) and "…" in tok.decode(fmt.result_ids(flood.text, 48, flood.error))


def test_a_tokenizer_that_cannot_spell_errors_marks_them(tmp_path):
    """The multiply task's vocabulary has digits and tags only: an error is its <error> token (before, the
    model read `5` for "Error: timed out after 5 s" and nothing for an exception); a tokenizer that can
    neither spell an error nor mark it is refused at start, naming the fix."""
    from megatron_hapo.data import multiply
    from megatron_hapo.data.addition import CHAT_TEMPLATE
    from megatron_hapo.data.tokenizers import train_sentencepiece

    tok = multiply.build_tokenizer(str(tmp_path / "with"))
    fmt = ToolCallFormat(tok, "tags")
    for error in ("timed out after 5 s", "ZeroDivisionError: division by zero", "output limit reached"):
        assert tok.convert_ids_to_tokens(fmt.result_ids("", 8, error)) == ["<output>", "<error>", "</output>"]
    assert tok.convert_ids_to_tokens(fmt.result_ids("12" * 9, 4, "output limit reached")) == [
        "<output>", "1", "2", "1", "<error>", "</output>"]  # the cut output gives way to the error ("…" unspellable)
    assert fmt.result_ids("", 8, "x")[1] == len(tok) - 1 < multiply.VOCAB  # appended after the trained pieces, in the model's rows
    bare = train_sentencepiece(str(tmp_path / "bare"), ["12*34=408"] * 10, 20, CHAT_TEMPLATE, special_pieces=multiply.TAGS)
    with pytest.raises(ValueError, match=r"rollout.tools: this tokenizer cannot spell a tool's error .*tokenizer.add_tokens\(\['<error>'\]\)"):
        ToolCallFormat(bare, "tags")


def test_sandbox_folders_left_by_killed_processes_are_cleaned_at_start(tmp_path):
    """A scorer or tool call killed with SIGKILL cannot remove its `hapo-sbx-*` folders; the next process
    to use the sandbox removes those whose creator is gone (and unnamed ones of earlier versions, old)."""
    import os
    import subprocess
    import time

    from megatron_hapo.rewards.sandbox import LEGACY_AGE_S, clean_stale_dirs

    dead = subprocess.Popen(["true"])
    dead.wait()
    names = {"gone": f"hapo-sbx-{dead.pid}-ab1", "gone_io": f"hapo-sbx-io-{dead.pid}-x_2", "mine": f"hapo-sbx-{os.getpid()}-c3",
             "alive": "hapo-sbx-1-d4", "legacy_old": "hapo-sbx-k9zz0abc", "legacy_new": "hapo-sbx-io-q1w2e3r4",
             "other": "hapo-sbxfoo"}
    for key, name in names.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "main.py").write_text("x")
    old = time.time() - LEGACY_AGE_S - 60
    os.utime(tmp_path / names["legacy_old"], (old, old))
    assert clean_stale_dirs(str(tmp_path)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[k] for k in ("mine", "alive", "legacy_new", "other"))


@pytest.mark.skipif(not sandbox_status()[0], reason=f"the code sandbox is unavailable: {sandbox_status()[1]}")
def test_a_reused_sandbox_leaves_nothing_for_the_next_call():
    """One pooled sandbox (a fork server, a fresh child per call), each call followed by one that looks
    for what it left: files (in /sandbox and /tmp), background processes (a setsid'd daemon, a sleeping
    child, a fork bomb's), interpreter state (modules, builtins, sys.path, signal handlers, recursion
    limit, rlimits), environment, working directory. Then a program that kills the fork server: the
    call is `killed`, the next runs in a new sandbox. ~4 s."""
    from megatron_hapo.rewards.sandbox import SandboxLimits
    from megatron_hapo.rewards.sandbox_pool import SandboxPool

    look = ("import os, sys, builtins, signal, resource\n"
            "procs = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
            "print(sorted(os.listdir('/sandbox')), sorted(os.listdir('/tmp')), len(procs), os.getcwd(), os.environ.get('LEAK'),\n"
            "      'json' in sys.modules, hasattr(builtins, 'leak'), sys.path[-1] == '/x', signal.getsignal(signal.SIGTERM),\n"
            "      sys.getrecursionlimit() == 50, resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    leaves = {
        "files": "import os\nopen('/sandbox/a', 'w').write('x'); os.makedirs('/tmp/d/e'); open('/tmp/d/e/f', 'w').write('y')",
        "daemon": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n    os._exit(0)",
        "child": "import subprocess; subprocess.Popen(['sleep', '60'])",
        "fork bomb": "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
        "state": ("import sys, json, builtins, signal, resource, os\nbuiltins.leak = 1; sys.path.append('/x')\n"
                  "signal.signal(signal.SIGTERM, signal.SIG_IGN); sys.setrecursionlimit(50)\n"
                  "resource.setrlimit(resource.RLIMIT_NOFILE, (8, 8)); os.environ['LEAK'] = '1'; os.chdir('/proc')"),
    }
    pool = SandboxPool(SandboxLimits(wall_s=1.0, max_output_bytes=4096), workers=1)
    try:
        clean = pool.run(look)
        assert clean.status == "ok", clean
        for name, program in leaves.items():
            ran = pool.run(program)
            assert ran.status in ("ok", "timeout"), (name, ran)
            after = pool.run(look)
            assert (after.status, after.stdout) == ("ok", clean.stdout), (name, after, clean.stdout)
        assert pool.started == 1  # all of it in the one sandbox
        killed = pool.run("import os, signal; os.kill(os.getppid(), signal.SIGKILL); import time; time.sleep(5)")
        assert killed.status == "killed", killed
        assert pool.run(look).stdout == clean.stdout and pool.started == 2
    finally:
        pool.close()


def _trajectories():
    """Four responses of two groups; rows 0 and 2 called a tool once (tokens 3-6 of their response are
    the tool's), row 1 twice, row 3 answered directly."""
    g = torch.Generator().manual_seed(3)
    prompts = [[1, 5, 6], [1, 7], [1, 5, 6], [1, 7]]
    lengths = [12, 16, 11, 6]
    masks = [np.ones(n, dtype=bool) for n in lengths]
    masks[0][3:7] = False
    masks[1][2:5] = False
    masks[1][8:12] = False
    masks[2][3:7] = False
    responses = [torch.randint(3, 30, (n,), generator=g).tolist() for n in lengths]
    engine = [np.where(m, np.random.default_rng(i).normal(-1.5, 0.3, len(m)), 0.0).astype(np.float32) for i, m in enumerate(masks)]
    batch = RolloutBatch(prompt_ids=prompts, response_ids=responses, rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]),
                         group_ids=[0, 1, 0, 1], per_token={"logprobs": engine}, kept=[], seen=[], gen_batches=1,
                         model_masks=[masks[0], masks[1], masks[2], None])
    return batch, masks


def test_tool_tokens_get_no_gradient_and_stay_out_of_the_statistics():
    batch, masks = _trajectories()
    ids, mask = batch.padded()
    # the loss mask: the response's model tokens, none of the tool's
    for i, (p, r) in enumerate(zip(batch.prompt_lens, batch.response_lens)):
        want = torch.zeros(ids.shape[1], dtype=torch.bool)
        want[p - 1: p - 1 + r] = torch.as_tensor(masks[i])
        assert torch.equal(mask[i], want)
    assert batch.lengths.tolist() == [8, 9, 7, 6]  # model tokens: what B's token weights and overlong count
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(*ids.shape, 32, generator=g, dtype=torch.float64)
    # the tool's positions get logits that would move every statistic if they counted (near-uniform: high entropy)
    tool = torch.zeros_like(mask)
    for i, (p, r) in enumerate(zip(batch.prompt_lens, batch.response_lens)):
        tool[i, p - 1: p - 1 + r] = ~torch.as_tensor(masks[i])
    logits[tool] *= 0.01
    logits.requires_grad_(True)
    labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
    logp, ent = vocab_parallel_logprobs_and_entropy(logits, labels)
    old = (logp.detach() + 0.3 * torch.randn(logp.shape, generator=g, dtype=torch.float64)) * mask
    algo = A.AlgorithmConfig.preset("hapo")
    stats = A.entropy_stats(ent.detach(), mask, algo.pivot)
    h_hat = A.normalized_entropy(ent.detach(), stats, algo.sign_mode)
    adv, _ = A.compute_advantages(algo, batch.rewards.double(), batch.lengths, batch.group_ids)
    loss, metrics = A.compute_policy_loss(algo, logp, old, adv, mask, h_hat=h_hat)
    loss.backward()
    assert float(logits.grad[tool].abs().max()) == 0.0  # exactly: the tool's tokens are not trained
    assert float(logits.grad[mask].abs().sum()) > 0
    assert int(metrics["tokens"]) == sum(batch.lengths.tolist())

    # the float64 reference on the model's tokens alone (plain Python, tests/reference.py)
    def model_only(t):
        return [[float(v) for v, m in zip(row, mrow) if m] for row, mrow in zip(t.detach().tolist(), mask.tolist())]

    ents, lps, olds = model_only(ent), model_only(logp), model_only(old)
    ref_stats = R.entropy_stats([h for row in ents for h in row])
    assert (stats.q, stats.sigma, stats.z_pos, stats.z_neg) == pytest.approx(ref_stats, rel=1e-9)
    ref_adv = R.token_group_advantages(batch.rewards.tolist(), [len(r) for r in ents], batch.group_ids)
    assert adv.tolist() == pytest.approx(ref_adv, rel=1e-9)
    a, lo, hi = [], [], []
    for i, row in enumerate(ents):
        a.append([]), lo.append([]), hi.append([])
        for t, h in enumerate(row):
            ht = R.h_tilde(h, ref_stats)
            low, high = R.clip_bounds(ht)
            a[i].append(R.redistribute(ref_adv[i], ht, math.exp(lps[i][t] - olds[i][t]), low, high))
            lo[i].append(low)
            hi[i].append(high)
    ref_loss = R.policy_loss(lps, olds, a, [[True] * len(r) for r in ents], lo, hi)
    assert float(loss.detach()) == pytest.approx(ref_loss, rel=1e-9)


def test_the_tool_task_warm_up_shows_the_call_on_a_share_and_never_trains_the_result(tmp_path):
    from megatron_hapo.data import multiply

    tok = multiply.build_tokenizer(str(tmp_path))
    fmt = ToolCallFormat(tok)
    rows = multiply.rows("train")[:200]
    targets = [multiply.warmup_target(r["prompt"], r["answer"], k, tok, fmt) for k, r in enumerate(rows)]
    calls = [(ids, mask) for ids, mask in targets if not all(mask)]
    assert abs(len(calls) / len(rows) - multiply.TOOL_SHARE) < 0.05
    ids, mask = calls[0]
    r = rows[[k for k, (_, m) in enumerate(targets) if not all(m)][0]]
    text = tok.decode(ids, skip_special_tokens=False)
    assert text == f"<python>print({r['prompt'][:-1]})</python><output>{r['answer']}</output>{r['answer']}</s>"
    tool = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)
    assert tool == f"<output>{r['answer']}</output>"  # exactly the tool's turn is unscored
    direct = [(ids, m) for ids, m in targets if all(m)]
    assert all(tok.decode(ids, skip_special_tokens=False).endswith("</s>") and "<python>" not in tok.decode(ids)
               for ids, _ in direct)
    # the held-out split never meets the training split
    train = {x["prompt"] for x in multiply.rows("train")}
    assert not train & {x["prompt"] for x in multiply.rows("eval")}


# ---- environments (rollout/env_api.py) -------------------------------------------------------------------

def test_an_environment_by_import_path_steps_in_parallel_and_contains_failures():
    """`rollout.environment=tests.user_tools:Echo`: one instance per trajectory, reset from its row; every
    live trajectory's step runs at once (four steps meet at a barrier only parallel steps pass); a step
    that raises or overruns, and a row the environment refuses, end that trajectory with the failure
    reward and their status, never a raise; the reward is the sum of the steps'."""
    from megatron_hapo.rollout.env_api import Episodes, resolve

    assert resolve("guess").__name__ == "Guess"
    for spec, msg in [("nope", "neither a built-in environment"), ("json:dumps", "not a subclass"),
                      ("nopkg:Env", "cannot import 'nopkg:Env'")]:
        with pytest.raises(ValueError, match=msg):
            resolve(spec)
    eps = Episodes("tests.user_tools:Echo", {"reward": 0.5, "meet": 4}, timeout_s=0.5, workers=8)
    try:
        rows = [{"level": k} for k in range(1, 9)] + [{"level": 9, "bad": True}]
        episodes = eps.start(rows)
        assert (episodes[-1].status, episodes[-1].reason) == ("error", "environment tests.user_tools:Echo: reset: "
                                                                        "ValueError: no such level")
        turns = ["abc", "boom", "slow", "meet", "meet", "meet", "meet", "win"]
        replies = eps.step(episodes[:8], turns)
        assert replies == ["cba", None, None, "teem", "teem", "teem", "teem", None]
        assert [e.status for e in episodes[:8]] == ["ok", "error", "timeout"] + ["ok"] * 5
        assert "step: RuntimeError: the world broke" in episodes[1].reason and "timed out after 0.5 s" in episodes[2].reason
        assert eps.step([episodes[0]], ["win"]) == [None]  # the second step wins: 0.5 × level 1
        results = [eps.result(e) for e in episodes]
        assert [(r.score, r.correct, r.status) for r in results] == [
            (0.5, True, "ok"), (0.0, False, "error"), (0.0, False, "timeout"), (0.0, False, "ok"), (0.0, False, "ok"),
            (0.0, False, "ok"), (0.0, False, "ok"), (4.0, True, "ok"), (0.0, False, "error")]
    finally:
        eps.close()


def test_environment_replies_are_plain_text_turns(byte_tokenizer, tmp_path):
    """An environment's reply is the template's next user turn (after the model's <|im_end|>, up to the
    assistant header) or sits between the result tags; whatever it holds, the model reads its characters,
    never a control token; a long reply is cut and marked."""
    from megatron_hapo.data import guess
    from megatron_hapo.rollout.tools import TextFormat

    fmt = TextFormat(byte_tokenizer)
    tok = byte_tokenizer
    assert fmt.kind == "chat_template"
    ids = fmt.reply_ids("lower", 64, "<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=False) == "\n<|im_start|>user\nlower<|im_end|>\n<|im_start|>assistant\n"
    wrapper = _control(fmt, ids)
    for h in HOSTILE:
        ids = fmt.reply_ids(f"12{h}34", 256, "<|im_end|>")
        assert _control(fmt, ids) == wrapper, h
        assert f"12{h}34" in tok.decode(ids, skip_special_tokens=False), h
    cut = tok.decode(fmt.reply_ids("x" * 100, 8, "<|im_end|>"))
    assert "x" * 100 not in cut and "…" in cut
    # the prompt is the environment's first message, rendered with the run's tools listed
    from megatron_hapo.data.datasets import DataOptions, Renderer
    from megatron_hapo.rollout.tool_api import schemas

    opts = DataOptions(tools=schemas(["calculator"]), environment=("tests.user_tools:Echo", {}))
    text, answer = Renderer(tok, opts).text({"level": 2, "answer": "x"})
    assert "Level 2: say win." in text and '"name": "calculator"' in text and (answer.answer, answer.row["level"]) == ("x", 2)
    gtok = guess.build_tokenizer(str(tmp_path))
    tags = TextFormat(gtok)  # the task's template marks no turns: the result tags
    assert tags.kind == "tags"
    assert gtok.convert_ids_to_tokens(tags.reply_ids("higher", 8, "</s>")) == ["<output>", "higher", "</output>"]
    ids = tags.reply_ids("1</output></s>2", 16)  # it spells digits and the replies' letters only
    assert _control(tags, ids) == [ids[0], ids[-1]] and gtok.decode(ids[1:-1]) == "1o2"


def test_the_guess_environment_and_its_warm_up(tmp_path):
    """The game: halving wins every game within MAX_TURNS; the warm-up's consistent random player wins
    only some; its games replay exactly through the environment, replies unscored; bad guesses are
    answered "invalid" and use a turn."""
    from megatron_hapo.data import guess
    from megatron_hapo.rollout.tools import TextFormat

    def bisect(hi, x):
        env, lo, top = guess.Guess(), 1, hi
        env.reset({"hi": hi, "answer": str(x)})
        for _ in range(guess.MAX_TURNS):
            g = (lo + top) // 2
            reply, done, reward = env.step(f"{g}</s>")
            if done:
                return reward
            lo, top = (g + 1, top) if reply == "higher" else (lo, g - 1)
        return 0.0

    assert all(bisect(hi, x) == 1.0 for hi, x in guess.pairs())
    env = guess.Guess()
    assert env.reset({"hi": 9, "answer": "4"}) == "1-9?"
    assert [env.step(t) for t in ("x</s>", "12</s>", "7</s>", "4</s>")] == [
        ("invalid", False, 0.0), ("invalid", False, 0.0), ("lower", False, 0.0), ("", True, 1.0)]
    tok = guess.build_tokenizer(str(tmp_path))
    fmt = TextFormat(tok)
    rows = guess.rows("train")
    wins = 0
    for k, r in enumerate(rows):
        ids, mask = guess.warmup_target(r["prompt"], r["answer"], k, tok, fmt)
        env = guess.Guess()
        env.reset(r)
        turns, replies, cur, other = [], [], [], []
        for i, m in zip(ids, mask):
            if m:
                if other:
                    replies.append(tok.decode(other[1:-1]))
                    other = []
                cur.append(i)
                if i == tok.eos_token_id:
                    turns.append(tok.decode(cur, skip_special_tokens=False))
                    cur = []
            else:
                other.append(i)
        assert not cur and not other and len(turns) <= guess.MAX_TURNS
        steps = [env.step(t) for t in turns]
        assert [s[0] for s in steps[:-1]] == replies and all(s[0] in ("higher", "lower") for s in steps[:-1])
        wins += steps[-1][2] == 1.0
    assert 0.5 < wins / len(rows) < 0.95, wins / len(rows)  # room for RL: halving wins them all


def multi_call_turn(tmp):
    """A model taught one trajectory (a chat turn with two calculator calls, the template's tool turn with
    both results, the answer), then generated on the real engine with the real tools: (what came out,
    what it was taught)."""
    from megatron_hapo.rollout.engine import RolloutEngine, SamplingConfig
    from megatron_hapo.rollout.tool_api import ToolBox, schemas
    from megatron_hapo.rollout.tools import MultiTurnEngine, ToolResult

    from .tiny_models import hf_model

    tok = _byte_tokenizer()
    fmt = ToolCallFormat(tok, "chat_template", tools=schemas(["calculator"]))
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = enc("<|im_start|>user\n6*7 and 2+3?<|im_end|>\n<|im_start|>assistant\n")
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "%s"}}\n</tool_call>'
    turn = enc(call % "6*7" + "\n" + call % "2+3" + "<|im_end|>")
    results = fmt.turn_ids([ToolResult("42", "ok"), ToolResult("5", "ok")], 64, "<|im_end|>")
    answer = enc("42 and 5<|im_end|>")
    taught = turn + results + answer
    model = hf_model("qwen2", vocab_size=len(tok), hidden_size=128, intermediate_size=256, max_position_embeddings=512)
    model.train()
    x = torch.tensor([prompt + taught])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 1e-3:
            break
    model.save_pretrained(tmp)
    box = ToolBox(["calculator"], {}, None, 5.0, 2)
    engine = MultiTurnEngine(RolloutEngine(tmp, max_model_len=512, kv_cache_memory_bytes=32 * 2**20, seed=0), fmt, box, 4, 64)
    sampling = SamplingConfig(max_tokens=200, top_k=1, stop_token_ids=(tok.eos_token_id,))
    r = engine.generate([prompt], 1, sampling, None, seeds=[3])[0][0]
    engine.close()
    return {"ids": r.token_ids, "mask": r.model_mask, "tools": r.tools, "taught": taught,
            "taught_mask": [True] * len(turn) + [False] * len(results) + [True] * len(answer),
            "tool_text": tok.decode(results, skip_special_tokens=False), "loss": loss.item()}


def env_engine_worker(rank, world, tmp):
    """The guess environment on the real vLLM engine (random weights: turns end on a digit or EOS); then
    a chat turn with two tool calls (`multi_call_turn`)."""
    import transformers

    from megatron_hapo.algorithms import entropy_stats
    from megatron_hapo.data import guess
    from megatron_hapo.rollout.engine import RolloutEngine, SamplingConfig
    from megatron_hapo.rollout.env_api import Episodes
    from megatron_hapo.rollout.tools import MultiTurnEngine, TextFormat

    guess.build_model_dir(tmp)
    tok = transformers.AutoTokenizer.from_pretrained(tmp)
    engine = MultiTurnEngine(RolloutEngine(tmp, max_model_len=64, kv_cache_memory_bytes=32 * 2**20, seed=0), TextFormat(tok),
                             None, guess.MAX_TURNS, 4, env=Episodes("guess", {}, 5.0, 4))
    rows = guess.rows("train")[:6]
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"] for r in rows]
    digits = tuple(tok.convert_tokens_to_ids(str(d)) for d in range(10))
    stats = entropy_stats(torch.rand(1, 64) * 3, torch.ones(1, 64))  # HAPO's temperatures on the model's tokens
    sampling = SamplingConfig(max_tokens=30, tau=0.2, stop_token_ids=(tok.eos_token_id,) + digits)
    seeds = [11 * k + 1 for k in range(len(rows))]
    first = engine.generate(prompts, 4, sampling, stats, seeds=seeds, rows=rows)
    again = engine.generate(prompts, 4, sampling, stats, seeds=seeds, rows=rows)
    out = []
    for row, rs, rs2 in zip(rows, first, again):
        for r, r2 in zip(rs, rs2):
            out.append({"row": row, "ids": r.token_ids, "mask": r.model_mask, "temps": r.temperatures, "lp": r.logprobs,
                        "finish": r.finish_reason, "env": (r.env.score, r.env.correct, r.env.status, r.env.reason),
                        "same": r2.token_ids == r.token_ids, "tools": r.tools, "answer_start": r.answer_start})
    engine.close()
    return {"out": out, "eos": tok.eos_token_id, "digits": digits, "tags": tok.convert_tokens_to_ids(list(guess.TAGS)),
            "multi_call": multi_call_turn(tmp + "-calls"),
            "vocab": [tok.decode([i], skip_special_tokens=False) for i in range(guess.VOCAB)]}  # the model's ids past the tokenizer's: ""


def test_the_environment_and_a_multi_call_turn_on_the_real_engine(tmp_path):
    """Every model turn that ends on a stop token gets the environment's reply, exactly what a fresh game
    replays from the model's turns, as unscored context; the last allowed turn is stepped too (its reward
    counts); the episode's reward and status come back with the response; seeds make it reproducible.
    Then a chat-template turn with two calls: both run, their results follow in call order in one tool
    turn, and the model goes on from it (it was taught that exact trajectory)."""
    from megatron_hapo.data import guess

    from .distributed import run_ranks

    got = run_ranks(1, env_engine_worker, str(tmp_path / "model"), timeout=600)[0]
    eos, stops, (open_, close) = got["eos"], set(got["digits"]) | {got["eos"]}, got["tags"]
    vocab = got["vocab"]
    multi = 0
    for r in got["out"]:
        ids, mask = r["ids"], r["mask"]
        assert r["same"] and len(r["temps"]) == len(r["lp"]) == len(ids) == len(mask)
        # split into model turns and the environment's turns
        turns, replies, cur, k = [], [], [], 0
        while k < len(ids):
            if mask[k]:
                cur.append(ids[k])
                k += 1
                continue
            assert ids[k] == open_ and cur and cur[-1] in stops
            end = ids.index(close, k)
            assert not any(mask[k:end + 1]) and all(t == 1.0 for t in r["temps"][k:end + 1])
            turns.append(cur)
            replies.append("".join(vocab[i] for i in ids[k + 1:end]))
            cur, k = [], end + 1
        turns.append(cur)
        multi += len(turns) > 1
        assert len(turns) <= guess.MAX_TURNS and r["tools"] == (len(turns),)
        assert r["answer_start"] == len(ids) - len(turns[-1])
        env = guess.Guess()
        env.reset(r["row"])
        total, steps, done = 0.0, 0, False
        for n, t in enumerate(turns):
            if t[-1] not in stops:  # the budget ran out mid-turn: never stepped
                assert n == len(turns) - 1 and r["finish"] == "length"
                break
            reply, done, reward = env.step("".join(vocab[i] for i in t))
            total, steps = total + reward, steps + 1
            if n < len(turns) - 1:
                assert reply == replies[n] and not done
        assert done or steps in (guess.MAX_TURNS, len(turns))
        assert r["env"] == (total, total > 0, "ok", f"environment: reward {total:g} after {steps} steps"), r
    assert multi >= len(got["out"]) // 2  # most trajectories got replies and went on
    m = got["multi_call"]
    assert m["loss"] < 1e-2, m["loss"]
    assert m["ids"] == m["taught"] and m["mask"] == m["taught_mask"] and m["tools"] == (2, 0, 0, 2)
    assert m["tool_text"].index("<tool_response>\n42\n</tool_response>") < m["tool_text"].index("<tool_response>\n5\n")
