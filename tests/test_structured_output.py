"""Structured output: token bitmasks in the sampler, grammar state in the engine, and the
OpenAI / vLLM request forms through the official `openai` SDK. Outputs are checked with
`jsonschema` (an independent validator), regexes with Python's `re`."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest
import torch

from tests.server_utils import ServerProcess
from tokenmill.engine.structured_output import StructuredOutputManager
from tokenmill.layers.ops import TorchOps
from tokenmill.sample.sampler import Sampler, apply_token_bitmask_, build_sampling_metadata
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams

SCHEMAS = json.loads((Path(__file__).parent / "data/json_schemas.json").read_text())
MODEL = "SmolLM2-135M-Instruct"


def _pack(allowed: list[set[int]], vocab: int) -> torch.Tensor:
    """Bitmask rows from sets of allowed ids, packed bit by bit in Python (the reference)."""
    words = (vocab + 31) // 32
    rows = []
    for ids in allowed:
        row = [0] * words
        for t in ids:
            row[t // 32] |= 1 << (t % 32)
        rows.append([w - (1 << 32) if w >= 1 << 31 else w for w in row])  # as int32
    return torch.tensor(rows, dtype=torch.int32)


# ---- sampler ----------------------------------------------------------------------------------
def test_bitmask_masks_only_its_rows():
    torch.manual_seed(0)
    vocab = 70  # not a multiple of 32: the last word is partial
    logits = torch.randn(4, vocab)
    out = logits.clone()
    allowed = [{0, 31, 32, 69}, {5}]
    apply_token_bitmask_(out, _pack(allowed, vocab), torch.tensor([1, 3]))
    for row, ids in ((1, allowed[0]), (3, allowed[1])):
        for t in range(vocab):
            expected = logits[row, t].item() if t in ids else float("-inf")
            assert out[row, t].item() == expected
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    every = logits.clone()
    apply_token_bitmask_(every, _pack([{1}, {2}, {3}, {68}], vocab))
    assert every.argmax(dim=1).tolist() == [1, 2, 3, 68]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_never_leaves_the_mask(temperature):
    """Masked logits, then greedy or random rows with penalties and logprobs (the runner's
    order): every sampled token is allowed."""
    torch.manual_seed(1)
    vocab, rows = 100, 6
    allowed = [{3, 50, 99}, {7}, {0, 1, 2, 3, 4}]
    params = [
        SamplingParams(temperature=temperature, repetition_penalty=1.3, logprobs=2)
        for _ in range(rows)
    ]
    md = build_sampling_metadata(
        params, [[1, 2]] * rows, [[3]] * rows, {}, vocab, torch.device("cpu")
    )
    for _ in range(20):
        logits = torch.randn(rows, vocab) * 5
        apply_token_bitmask_(logits, _pack(allowed, vocab), torch.tensor([0, 2, 5]))
        out = Sampler(TorchOps())(logits, md)
        for row, ids in zip([0, 2, 5], allowed):
            assert out.sampled_token_ids[row].item() in ids


# ---- engine (offline API) ------------------------------------------------------------------
def _messages(name: str) -> list[dict]:
    return [{"role": "user", "content": f"Reply with a JSON object describing a {name}."}]


@pytest.mark.slow
def test_preemption_mid_constraint_stays_valid():
    """A KV cache so small that requests get preempted and recomputed mid-output: the grammar
    state survives (tokens are kept), every output still validates."""
    from tokenmill import LLM

    llm = LLM(dtype="float32", quantization="none", max_model_len=512, num_kv_blocks=8)
    names = ["array_of_objects", "nested_address", "optional_fields"] * 2
    params = [
        SamplingParams(
            temperature=1.0,
            seed=i,
            max_tokens=120,
            structured_outputs=StructuredOutputsParams(json=SCHEMAS[n]),
        )
        for i, n in enumerate(names)
    ]
    outs = llm.chat([_messages(n) for n in names], params)
    assert llm.engine.scheduler.num_preemptions_total > 0
    for n, o in zip(names, outs):
        c = o.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMAS[n])


def test_constraint_does_not_change_free_rows(llm_f32):
    """Free greedy requests give the same tokens whether the rest of the batch is constrained
    or not (same batch shapes: only the mask differs)."""
    free = [f"Tell me about {x}." for x in ("the sea", "mountains", "cats")]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    regex = StructuredOutputsParams(regex=r"[a-z]{5} [a-z]{5} [a-z]{5} [a-z]{5} [a-z]{5}")
    constrained = SamplingParams(temperature=0, max_tokens=24, structured_outputs=regex)
    unconstrained = SamplingParams(temperature=0, max_tokens=24)
    with_grammar = llm_f32.generate([*free, "Five words:"], [greedy] * 3 + [constrained])
    without = llm_f32.generate([*free, "Five words:"], [greedy] * 3 + [unconstrained])
    for a, b in zip(with_grammar[:3], without[:3]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    text = with_grammar[3].outputs[0].text
    assert re.fullmatch(regex.regex, text) and with_grammar[3].outputs[0].finish_reason == "stop"


def test_compilation_never_stalls_the_batch(llm_f32, monkeypatch):
    """While one request's grammar compiles (made slow here), the engine keeps stepping the
    others; the constrained request starts once its grammar is ready."""
    engine = llm_f32.engine
    release = threading.Event()
    slow_compile = engine.structured_outputs._compile

    def compile_after_release(key):
        assert release.wait(30)
        return slow_compile(key)

    monkeypatch.setattr(engine.structured_outputs, "_compile", compile_after_release)
    spec = StructuredOutputsParams(regex=r"(yes|no), because [a-z ]{1,20}\.")
    engine.add_request("slow", "Answer:", SamplingParams(max_tokens=40, structured_outputs=spec))
    engine.add_request("free", "Hello", SamplingParams(temperature=0, max_tokens=8))
    finished = {}
    steps_before_release = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if "free" not in finished:
            steps_before_release += 1
        elif not release.is_set():
            release.set()
    assert steps_before_release >= 7  # the free request ran its 8 tokens meanwhile
    assert re.fullmatch(spec.regex, finished["slow"].outputs[0].text)


def test_bad_constraints_raise_before_queueing(llm_f32):
    for spec in (
        StructuredOutputsParams(regex="(unclosed"),
        StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "nope"}}}),
        StructuredOutputsParams(grammar="start: missing_rule"),
        StructuredOutputsParams(json="{not json"),
    ):
        with pytest.raises(ValueError):
            llm_f32.generate("x", SamplingParams(structured_outputs=spec))
    assert not llm_f32.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])


def _accepts(llm, schema: dict, text: str) -> bool:
    """Whether the compiled schema lets `text` (the tokenizer's own tokens of it) be the whole
    output."""
    manager: StructuredOutputManager = llm.engine.structured_outputs
    matcher = manager.new_matcher(manager.compile(StructuredOutputsParams(json=schema)))
    ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
    return all(matcher.accept(t) for t in ids) and matcher.is_terminated


AGE = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}


@pytest.mark.parametrize(
    "schema,text,accepted",
    [
        # properties without a word on other keys: closed, as llama.cpp and xgrammar read them
        (AGE, '{"age": 3}', True),
        (AGE, '{"age": 3, "name": "x"}', False),
        ({"type": "array", "items": AGE}, '[{"age": 3, "name": "x"}]', False),
        # the schema's own word stands
        ({**AGE, "additionalProperties": True}, '{"age": 3, "name": "x"}', True),
        ({**AGE, "additionalProperties": {"type": "string"}}, '{"age": 3, "name": "x"}', True),
        ({"type": "object"}, '{"name": "x"}', True),  # no properties listed: any object
        # merged schemas stay open, else one side would forbid the other's keys
        (
            {"allOf": [AGE, {"properties": {"name": {"type": "string"}}, "required": ["name"]}]},
            '{"age": 3, "name": "x"}',
            True,
        ),
        (
            {
                "$defs": {"Base": AGE},
                "allOf": [{"$ref": "#/$defs/Base"}],
                "properties": {"name": {"type": "string"}},
                "required": ["name"],
            },
            '{"age": 3, "name": "x"}',
            True,
        ),
    ],
)
def test_json_objects_closed_unless_the_schema_says(llm_f32, schema, text, accepted):
    if accepted:  # valid under JSON Schema itself too
        jsonschema.validate(json.loads(text), schema)
    assert _accepts(llm_f32, schema, text) is accepted


def test_too_deep_schemas_are_grammar_errors():
    """Deeper than Python's recursion: a GrammarError (a 400), not a RecursionError (a 500)."""
    from tokenmill.engine.structured_output import GrammarError, close_objects
    from tokenmill.server.tools import tool_call_grammar

    deep: dict = {"type": "string"}
    for _ in range(5000):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(GrammarError, match="nests too deeply"):
        close_objects(deep)
    with pytest.raises(GrammarError, match="nests too deeply"):
        tool_call_grammar([{"name": "f", "parameters": {"type": "object", "x": deep}}], False)


def test_manager_caches_compilations(llm_f32):
    manager: StructuredOutputManager = llm_f32.engine.structured_outputs
    spec = StructuredOutputsParams(json=SCHEMAS["person"])
    first = manager.compile(spec)
    again = manager.compile(StructuredOutputsParams(json=json.dumps(SCHEMAS["person"])))
    assert first is again


# ---- server, through the openai SDK ----------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--max-num-seqs", "32")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


SETTINGS = {
    "greedy": dict(temperature=0),
    "temperature-1": dict(temperature=1.0, seed=7),
    "n3-seeded": dict(temperature=1.0, n=3, seed=11),
}


@pytest.mark.slow
def test_json_schemas_validate_in_every_setting(client, server):
    def ask(name: str, setting: str) -> tuple[str, str, list]:
        resp = client.chat.completions.create(
            model=MODEL,
            messages=_messages(name),
            max_tokens=200,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True},
            },
            **SETTINGS[setting],
        )
        return name, setting, resp.choices

    jobs = [(n, s) for n in SCHEMAS for s in SETTINGS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: ask(*job), jobs))
    for name, setting, choices in results:
        assert len(choices) == SETTINGS[setting].get("n", 1)
        for c in choices:
            assert c.finish_reason == "stop", (name, setting, c.message.content)
            jsonschema.validate(json.loads(c.message.content), SCHEMAS[name])
    server.wait_idle()


def test_json_object_and_vllm_forms(client):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=_messages("book"),
        max_tokens=120,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(resp.choices[0].message.content), dict)
    for extra in (
        {"guided_json": SCHEMAS["enum_color"]},
        {"structured_outputs": {"json": SCHEMAS["enum_color"]}},
    ):
        resp = client.chat.completions.create(
            model=MODEL, messages=_messages("color"), max_tokens=60, extra_body=extra
        )
        jsonschema.validate(json.loads(resp.choices[0].message.content), SCHEMAS["enum_color"])


def test_regex_choice_and_grammar(client):
    date = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    for extra in ({"guided_regex": date}, {"structured_outputs": {"regex": date}}):
        resp = client.completions.create(
            model=MODEL, prompt="Today's date is", max_tokens=20, extra_body=extra
        )
        assert re.fullmatch(date, resp.choices[0].text)
        assert resp.choices[0].finish_reason == "stop"
    choices = ["positive", "negative", "neutral"]
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Sentiment of 'I love it'?"}],
        n=4,
        temperature=1.0,
        max_tokens=10,
        extra_body={"guided_choice": choices},
    )
    assert all(c.message.content in choices for c in resp.choices)
    lark = 'start: "The answer is " num "."\nnum: /[0-9]{1,3}/'
    gbnf = 'root ::= "The answer is " [0-9] [0-9]? "."'
    for grammar in (lark, gbnf):
        resp = client.completions.create(
            model=MODEL, prompt="Q: 2+2?", max_tokens=20, extra_body={"guided_grammar": grammar}
        )
        assert re.fullmatch(r"The answer is [0-9]{1,3}\.", resp.choices[0].text)


def test_streamed_constrained_output(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=_messages("person"),
        max_tokens=80,
        temperature=0,
        stream=True,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "p", "schema": SCHEMAS["person"]},
        },
    )
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    jsonschema.validate(json.loads(text), SCHEMAS["person"])
    assert finish == "stop"


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"guided_regex": "(unclosed"}, None),
        ({"guided_json": {"type": "object", "properties": {"a": {"type": "nope"}}}}, None),
        ({"guided_grammar": "start: missing"}, None),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"bogus": 1}}, None),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, None),
    ],
)
def test_bad_constraints_are_400(client, server, extra, param):
    t = time.monotonic()
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body=extra)
    body = err.value.body
    assert body["message"] and body["type"] == "invalid_request_error"
    if param:
        assert body["param"] == param
    assert time.monotonic() - t < 10
    server.wait_idle()


def test_logprobs_under_a_constraint_are_valid_json(client, server):
    """Tokens a grammar forbids have logprob -inf; JSON shows them as -9999.0 (as vLLM does)
    instead of failing to serialise."""
    for stream in (False, True):
        resp = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "yes or no?"}],
            max_tokens=5,
            logprobs=True,
            top_logprobs=5,
            stream=stream,
            extra_body={"guided_choice": ["yes"]},  # only y / ye / yes may start it
        )
        chunks = list(resp) if stream else [resp]
        entries = [
            t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.content or []
        ]
        assert entries
        values = [t.logprob for t in entries] + [a.logprob for t in entries for a in t.top_logprobs]
        assert all(v >= -9999.0 for v in values)
        assert -9999.0 in values  # the forbidden alternatives
    server.wait_idle()
