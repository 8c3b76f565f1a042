"""Reasoning parsers (`--reasoning-parser`): the split of an output into reasoning and answer,
against hand-written expectations; streamed splits against the whole output's at every cut;
and the chat endpoint's fields, with the output forced by a regex so that it is known."""

from __future__ import annotations

import dataclasses
import itertools

import anthropic
import httpx
import openai
import pytest

from tests.server_utils import ServerProcess
from tokenmill.engine.reasoning import ReasoningParser
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams
from tokenmill.server.chat_protocol import ChatMessage
from tokenmill.server.messages_protocol import MessagesRequest
from tokenmill.server.responses_protocol import ResponsesRequest

MODEL = "SmolLM2-135M-Instruct"
QWEN3_PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
THINKING_PROMPT = QWEN3_PROMPT + "<think>\n"

CASES = [
    # parser, prompt, output, (reasoning, answer)
    ("deepseek_r1", None, "abc</think>def", ("abc", "def")),
    ("deepseek_r1", None, "<think>\nabc\n</think>\n\ndef", ("\nabc\n", "\n\ndef")),
    ("deepseek_r1", None, "cut short while thinking", ("cut short while thinking", "")),
    ("deepseek_r1", None, "a</thi", ("a</thi", "")),
    ("deepseek_r1", None, "</think>", ("", "")),
    ("deepseek_r1", None, "x</think>y</think>z", ("x", "y</think>z")),
    ("qwen3", QWEN3_PROMPT, "<think>\nx\n</think>\n\ny", ("\nx\n", "\n\ny")),
    ("qwen3", QWEN3_PROMPT, "a plain answer", (None, "a plain answer")),
    ("qwen3", QWEN3_PROMPT, "a </think> b", (None, "a </think> b")),
    ("qwen3", QWEN3_PROMPT, "<thin", (None, "<thin")),
    ("qwen3", QWEN3_PROMPT, "<think>cut", ("cut", "")),
    ("qwen3", THINKING_PROMPT, "x</think>y", ("x", "y")),
    ("qwen3", THINKING_PROMPT, "x</think", ("x</think", "")),
]


@pytest.mark.parametrize("name, prompt, text, want", CASES)
def test_split(name, prompt, text, want):
    assert ReasoningParser(name).extract(text, prompt) == want


@pytest.mark.parametrize("name, prompt, text, want", CASES)
def test_streamed_split_equals_whole_at_every_cut(name, prompt, text, want):
    parser = ReasoningParser(name)
    for i, j in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        s = parser.streamer(prompt)
        parts = [s.feed(text[:i]), s.feed(text[i:j]), s.feed(text[j:]), s.finish()]
        reasoning = "".join(r for r, _ in parts)
        content = "".join(c for _, c in parts)
        assert (reasoning, content) == (want[0] or "", want[1]), (i, j)
        assert s.reasoned == (want[0] is not None)


def test_unknown_parser_is_refused():
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        ReasoningParser("o1")


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--reasoning-parser", "deepseek_r1")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


FORCED = {"structured_outputs": {"regex": "First, 2\\+2 is 4\\.</think>It is 4\\."}}


def _ask(client, **kw):
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 2+2?"}],
        max_tokens=40,
        temperature=0,
        extra_body=FORCED,
        **kw,
    )


def test_chat_reply_carries_reasoning(client):
    reply = _ask(client)
    msg = reply.choices[0].message.model_dump()
    assert msg["reasoning"] == msg["reasoning_content"] == "First, 2+2 is 4."
    assert msg["content"] == "It is 4."
    thought = reply.usage.completion_tokens_details.reasoning_tokens
    assert 0 < thought < reply.usage.completion_tokens
    chunks = list(_ask(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == thought


def test_include_reasoning_false_leaves_it_out(client):
    body = {**FORCED, "include_reasoning": False}
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "2+2?"}], "extra_body": body}
    msg = client.chat.completions.create(**kw).choices[0].message.model_dump()
    assert "reasoning" not in msg and msg["content"] == "It is 4."
    deltas = [
        c.choices[0].delta.model_dump()
        for c in client.chat.completions.create(**kw, stream=True)
        if c.choices
    ]
    assert not any(d.get("reasoning") for d in deltas)
    assert "".join(d.get("content") or "" for d in deltas) == "It is 4."


def test_streamed_chat_reasoning_then_content(client):
    reasoning, content, order = [], [], []
    for chunk in _ask(client, stream=True):
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            if delta.get("reasoning"):
                assert delta["reasoning_content"] == delta["reasoning"]
                reasoning.append(delta["reasoning"])
                order.append("r")
            if delta.get("content"):
                content.append(delta["content"])
                order.append("c")
    assert "".join(reasoning) == "First, 2+2 is 4." and "".join(content) == "It is 4."
    assert order == sorted(order, reverse=True)  # every reasoning piece before the answer


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_reasoning_sent_back_reaches_the_template(client, field):
    """Clients send a reply back as they got it: its reasoning is accepted, and templates that
    render past reasoning (Qwen3's, DeepSeek-R1's) find it as `reasoning_content`."""
    turn = {"role": "assistant", "content": "It is 4.", field: "2+2 is 4."}
    rendered = ChatMessage.model_validate(turn).as_template_message()
    assert rendered["reasoning_content"] == "2+2 is 4."
    messages = [{"role": "user", "content": "2+2?"}, turn, {"role": "user", "content": "And 3+3?"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert reply.choices[0].finish_reason in ("length", "stop")  # accepted, not a 400


# The Responses and Messages APIs force the output through a JSON schema: the JSON string
# "Think</think>Answer", quotes included.
STRING = {"type": "string", "enum": ["Think</think>Answer"]}


def test_responses_reasoning_item_then_message(client):
    fmt = {"format": {"type": "json_schema", "name": "s", "schema": STRING}}
    r = client.responses.create(model=MODEL, input="Go", text=fmt, max_output_tokens=20)
    kinds = [item.type for item in r.output]
    assert kinds == ["reasoning", "message"], kinds
    assert r.output[0].content[0].text == '"Think' and r.output_text == 'Answer"'
    events = list(
        client.responses.create(
            model=MODEL, input="Go", text=fmt, max_output_tokens=20, stream=True
        )
    )
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert deltas == '"Think' and [item.type for item in done] == ["reasoning", "message"]
    final = events[-1].response
    assert final.output[0].content[0].text == '"Think' and final.output_text == 'Answer"'
    for usage in (r.usage, final.usage):
        assert 0 < usage.output_tokens_details.reasoning_tokens < usage.output_tokens


def test_reasoning_tokens_counted_to_the_closing_tag():
    """The reasoning's token count: the tokens up to the one that completes `</think>`
    (a linear scan of the tokens' text as the reference), all of them when it never closed."""
    from types import SimpleNamespace

    from tokenmill.engine.tokenizer import load_tokenizer
    from tokenmill.loader.load import read_model_info
    from tokenmill.loader.resolve import resolve_model
    from tokenmill.server.chat import ChatRun

    tok = load_tokenizer(read_model_info(resolve_model(None))[0])
    serving = SimpleNamespace(reasoning_parser=ReasoningParser("deepseek_r1"), tokenizer=tok)
    run = ChatRun(SimpleNamespace(parser=None), SimpleNamespace(text=None), "r", [], None)
    for text in ("First, 2+2 is 4.</think>It is 4.", "x</think>", "still thinking"):
        ids = tok.encode(text, add_special_tokens=False)
        want = next(
            (k + 1 for k in range(len(ids)) if "</think>" in tok.decode(ids[: k + 1], False)),
            len(ids),
        )
        o = SimpleNamespace(text=tok.decode(ids), token_ids=ids)
        assert run.reasoning_tokens(serving, o) == want, text
    answer = SimpleNamespace(reasoning_parser=ReasoningParser("qwen3"), tokenizer=tok)
    ids = tok.encode("no reasoning here", add_special_tokens=False)
    assert (
        run.reasoning_tokens(answer, SimpleNamespace(text="no reasoning here", token_ids=ids)) == 0
    )


def test_messages_thinking_block_then_text(server):
    a = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    kw = {
        "model": MODEL,
        "max_tokens": 20,
        "messages": [{"role": "user", "content": "Go"}],
        "extra_body": {"output_config": {"format": {"type": "json_schema", "schema": STRING}}},
    }
    m = a.messages.create(**kw)
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == '"Think' and m.content[1].text == 'Answer"'
    with a.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == '"Think' and final.content[1].text == 'Answer"'


def test_reasoning_items_and_thinking_blocks_sent_back(server):
    """Responses' reasoning items and Messages' thinking blocks, sent back in a later request,
    are accepted and become the assistant turn's reasoning for the template."""
    items = [
        {"role": "user", "content": "2+2?"},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "4"}]},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?"},
    ]
    chat = ResponsesRequest.model_validate({"model": MODEL, "input": items}).messages()
    assert [m.get("reasoning_content") for m in chat] == [None, "4", None]
    thinking = {"type": "thinking", "thinking": "4", "signature": "x"}
    turns = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": [thinking, {"type": "text", "text": "It is 4."}]},
        {"role": "user", "content": "And 3+3?"},
    ]
    body = {"model": MODEL, "max_tokens": 4, "messages": turns}
    chat = MessagesRequest.model_validate(body).chat_messages()
    assert [m.get("reasoning_content") for m in chat] == [None, "4", None]
    r = httpx.post(server.url + "/v1/responses", json={"model": MODEL, "input": items})
    assert r.status_code == 200, r.text
    assert httpx.post(server.url + "/v1/messages", json=body).status_code == 200


def test_grammar_starts_after_its_token(llm_f32):
    """`after_token_id`: the output runs free up to that token (here the unconstrained greedy
    output's third token, standing for `</think>`), and the constraint holds after it."""
    prompt = "The three primary colors are"
    free = llm_f32.generate(prompt, SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    first, second, mark = free.token_ids
    assert mark not in (first, second)
    choice = ("yes", "no")
    gated = SamplingParams(
        temperature=0,
        max_tokens=12,
        structured_outputs=StructuredOutputsParams(choice=choice, after_token_id=mark),
    )
    out = llm_f32.generate(prompt, gated)[0].outputs[0]
    assert out.token_ids[:3] == [first, second, mark] and out.finish_reason == "stop"
    assert out.text.startswith(free.text) and out.text[len(free.text) :] in choice
    spec = StructuredOutputsParams(choice=choice)
    from_start = dataclasses.replace(gated, structured_outputs=spec)
    assert llm_f32.generate(prompt, from_start)[0].outputs[0].text in choice


class _Vocab:
    """A tokenizer stand-in: `</think>` as one token (id 7), or spelled in three."""

    def __init__(self, one_token: bool) -> None:
        self.one_token = one_token

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert text == "</think>" and not add_special_tokens
        return [7] if self.one_token else [1, 2, 3]


def test_where_constraints_start():
    """After `</think>` where a sample may reason and it is one token; else from the start."""
    deepseek, qwen3 = ReasoningParser("deepseek_r1"), ReasoningParser("qwen3")
    one, three = _Vocab(True), _Vocab(False)
    assert deepseek.grammar_after(None, one) == 7
    assert deepseek.grammar_after("x", three) is None
    assert qwen3.grammar_after(QWEN3_PROMPT, one) == 7  # may open <think>
    assert qwen3.grammar_after(THINKING_PROMPT, one) == 7
    assert qwen3.grammar_after(QWEN3_PROMPT + "<think>\n\n</think>\n\n", one) is None


def test_bad_after_token_ids_are_refused(llm_f32):
    with pytest.raises(ValueError, match="after_token_id"):
        StructuredOutputsParams(choice=("a",), after_token_id=-1)
    spec = StructuredOutputsParams(choice=("a",), after_token_id=10**9)
    with pytest.raises(ValueError, match="after_token_id 1000000000 is out of range"):
        llm_f32.generate("x", SamplingParams(structured_outputs=spec))


# A template that writes what it is told of the reasoning into the prompt, whose length the
# endpoints report: the reference is the count of the text it should render.
REASONING_TEMPLATE = (
    "{% for m in messages %}{{ m.content }}{% endfor %}"
    "{% if enable_thinking is defined %}"
    "{{ ' think it through first' if enable_thinking else ' answer' }}{% endif %}"
    "{% if reasoning_effort is defined %} effort {{ reasoning_effort }}{% endif %}"
)


def test_thinking_options_reach_the_template():
    """Anthropic's `thinking` and OpenAI's `reasoning_effort` / Responses' `reasoning.effort`
    become the template's `enable_thinking` (Qwen3's) and `reasoning_effort` (gpt-oss's);
    chat_template_kwargs win over them."""
    turns = [{"role": "user", "content": "Hi"}]
    body = {"model": MODEL, "max_tokens": 3, "messages": turns}
    disabled = MessagesRequest.model_validate(body | {"thinking": {"type": "disabled"}})
    assert disabled.chat_request().chat_template_kwargs == {"enable_thinking": False}
    srv = ServerProcess("--chat-template", REASONING_TEMPLATE)
    try:

        def count(url: str, payload: dict) -> int:
            r = httpx.post(srv.url + url, json=payload)
            assert r.status_code == 200, r.text
            data = r.json()
            if "usage" in data:
                return data["usage"].get("prompt_tokens", data["usage"].get("input_tokens"))
            return data.get("input_tokens", data.get("count"))

        def tokens(text: str) -> int:
            return count("/tokenize", {"prompt": text})

        for thinking, text in (
            ({"type": "enabled", "budget_tokens": 1024}, "Hi think it through first"),
            ({"type": "disabled"}, "Hi answer"),
            (None, "Hi"),
        ):
            extra = {} if thinking is None else {"thinking": thinking}
            assert count("/v1/messages/count_tokens", body | extra) == tokens(text), text
        chat = {"model": MODEL, "max_tokens": 1, "messages": turns}
        for extra, text in (
            ({"reasoning_effort": "high"}, "Hi think it through first effort high"),
            ({"reasoning_effort": "minimal"}, "Hi answer effort minimal"),
            (
                {"reasoning_effort": "none", "chat_template_kwargs": {"enable_thinking": True}},
                "Hi think it through first effort none",
            ),
        ):
            assert count("/v1/chat/completions", chat | extra) == tokens(text), text
        responses = {"model": MODEL, "input": "Hi", "max_output_tokens": 16}
        got = count(
            "/v1/responses", responses | {"reasoning": {"effort": "low", "summary": "auto"}}
        )
        assert got == tokens("Hi think it through first effort low")
        reply = httpx.post(srv.url + "/v1/messages", json=body | {"thinking": {"type": "enabled"}})
        assert reply.status_code == 200, reply.text
    finally:
        assert srv.stop() == 0
