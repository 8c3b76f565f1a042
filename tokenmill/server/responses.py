"""/v1/responses: OpenAI's Responses API, served by the chat path.

A request's `instructions` and `input` items become a chat conversation (messages, assistant
function calls, their results), its function tools, `tool_choice` and `text.format` the chat
request's tools and response_format; `chat.start_chat` renders, constrains and queues it as
for /v1/chat/completions. The output is a list of items: the assistant's message (one
`output_text` part) and the function calls the tool parser found. Streamed, the same items
arrive as OpenAI's typed events, `response.created` to `response.completed` (or
`response.incomplete` when `max_output_tokens` cut the output, `response.failed` on an error).

With `store` (OpenAI's default) a finished response is kept in memory, in a store bounded in
count and bytes that drops the oldest: `previous_response_id` then continues its conversation
(its messages and output, without its `instructions`, as OpenAI does), and GET / DELETE
/v1/responses/{id} read and remove it. Nothing is kept across restarts.

The request models are in responses_protocol.py, the store in responses_store.py, the output
items and stream events in responses_output.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.server.chat import ChatRun, new_pieces, start_chat
from tokenmill.server.chat_protocol import ChatCompletionRequest
from tokenmill.server.handlers import ContextLengthError, OpenAIServing, chat_logprobs
from tokenmill.server.protocol import RequestLimits, UnsupportedParameter
from tokenmill.server.responses_output import (
    Events,
    StreamedItems,
    assistant_message,
    call_item,
    message_item,
    text_part,
)
from tokenmill.server.responses_protocol import FunctionToolChoice, ResponsesRequest, new_id
from tokenmill.server.responses_store import ResponseStore, StoredResponse


def without_oldest_turn(chat: ChatCompletionRequest) -> ChatCompletionRequest | None:
    """`truncation: "auto"`: the conversation without its oldest turn (a user message and
    what follows it up to the next one; system messages stay), or None when only the last
    turn is left."""
    messages = chat.messages
    first = next((i for i, m in enumerate(messages) if m.role not in ("system", "developer")), None)
    if first is None:
        return None
    nxt = next((i for i in range(first + 1, len(messages)) if messages[i].role == "user"), None)
    if nxt is None:
        return None
    return chat.model_copy(update={"messages": messages[:first] + messages[nxt:]})


# Chat parameters named as the Responses API names them, in errors.
_PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text",
}


def _renamed(e: UnsupportedParameter) -> UnsupportedParameter:
    return UnsupportedParameter(_PARAMS.get(e.param, e.param), str(e))


async def responses_response(
    serving: OpenAIServing, body: ResponsesRequest, store: ResponseStore, limits: RequestLimits
) -> AsyncIterator[str] | Coroutine[Any, Any, dict]:
    """Validate and queue a Responses request (raising before any byte is sent), then return
    the coroutine of its response object or the async generator of its events."""
    body.check_supported()
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        if previous is None:
            raise UnsupportedParameter(
                "previous_response_id",
                f"Previous response with id '{body.previous_response_id}' not found "
                f"(responses are kept in memory, the newest {store.capacity} up to "
                f"{store.max_bytes >> 20} MiB, and only with store: true).",
            )
        history = previous.messages
    try:
        chat = body.chat_request(history)
        chat.check_limits(limits)
        while True:
            try:
                run: ChatRun = await start_chat(serving, chat, "resp")
                break
            except ContextLengthError:
                shorter = without_oldest_turn(chat) if body.truncation == "auto" else None
                if shorter is None:
                    raise
                chat = shorter
    except UnsupportedParameter as e:
        raise _renamed(e) from None
    except ContextLengthError as e:
        raise ContextLengthError(str(e), "max_output_tokens") from None
    response_id = new_id("resp")
    created = int(time.time())
    tok = serving.tokenizer
    k = body.top_logprobs or 0
    conversation = [m for m in chat.model_dump(exclude_none=True)["messages"]]
    if body.instructions:
        conversation = conversation[1:]

    def response_object(
        status: str,
        output: list[dict[str, Any]],
        final: RequestOutput | None,
        error: str | None = None,
    ) -> dict[str, Any]:
        n_out = sum(len(o.token_ids) for o in final.outputs) if final is not None else 0
        fmt = body.text.format if body.text is not None and body.text.format else None
        choice = body.tool_choice
        return {
            "id": response_id,
            "object": "response",
            "created_at": created,
            "status": status,
            "background": False,
            "error": None if error is None else {"code": "server_error", "message": error},
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "max_tool_calls": None,
            "metadata": body.metadata or {},
            "model": body.model,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": body.stores,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {
                "format": fmt.model_dump(by_alias=True, exclude_none=True)
                if fmt
                else {"type": "text"}
            },
            "tool_choice": choice.model_dump()
            if isinstance(choice, FunctionToolChoice)
            else (choice or "auto"),
            "tools": [t.model_dump() for t in body.tools or []],
            "top_logprobs": body.top_logprobs,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "truncation": body.truncation or "disabled",
            "usage": None
            if final is None
            else {
                "input_tokens": run.tracker.prompt_tokens,
                "input_tokens_details": {"cached_tokens": final.num_cached_tokens},
                "output_tokens": n_out,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": run.tracker.prompt_tokens + n_out,
            },
            "user": body.user,
        }

    def finish(o: CompletionOutput, output: list[dict[str, Any]], final: RequestOutput) -> dict:
        """The final response object; stored when asked for."""
        status = "incomplete" if o.finish_reason == "length" else "completed"
        response = response_object(status, output, final)
        if body.stores:
            messages = conversation + [assistant_message(output)]
            store.put(response_id, StoredResponse(response, messages, body.input_items()))
        return response

    def logprobs(o: CompletionOutput, start: int) -> list | None:
        lp = chat_logprobs(o, tok, k, start) if body.logprobs else None
        return None if lp is None else lp["content"]

    async def collect() -> dict:
        final, content, calls = await run.reply(serving)
        o = final.outputs[0]
        status = "incomplete" if o.finish_reason == "length" else "completed"
        output = []
        if content or not calls:
            message = message_item(status)
            message["content"] = [text_part(content, logprobs(o, 0))]
            output.append(message)
        output += [call_item(c.name, c.arguments, "completed") for c in calls]
        return finish(o, output, final)

    async def stream() -> AsyncIterator[str]:
        events = Events()
        items = StreamedItems(events)
        streamer = run.plan.parser.streamer() if run.plan.parser is not None else None
        yield events("response.created", response=response_object("in_progress", [], None))
        yield events("response.in_progress", response=response_object("in_progress", [], None))
        try:
            async for _, out in serving.merged(run.streams, run.tracker):
                o = out.outputs[0]
                start = len(o.token_ids) - len(o.delta_token_ids)
                lp = logprobs(o, start)
                content, calls = new_pieces(streamer, o)
                if content or (lp and streamer is None):
                    for line in items.text(content, lp):
                        yield line
                for d in calls:
                    for line in items.call(d.name, d.arguments):
                        yield line
                if o.finished:
                    status = "incomplete" if o.finish_reason == "length" else "completed"
                    if not items.output:  # an empty reply is still a message
                        for line in items.text("", [] if lp is not None else None):
                            yield line
                    for line in items.close(status):
                        yield line
                    response = finish(o, items.output, out)
                    yield events(f"response.{response['status']}", response=response)
        except Exception as e:  # noqa: BLE001 - reported in-band, the status is already sent
            for line in items.close("incomplete"):
                yield line
            failed = response_object("failed", items.output, None, str(e) or type(e).__name__)
            yield events("response.failed", response=failed)

    return stream() if body.stream else collect()
