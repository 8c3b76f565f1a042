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
from tokenmill.server.chat import ChatRun, start_chat
from tokenmill.server.chat_protocol import ChatCompletionRequest
from tokenmill.server.handlers import ContextLengthError, OpenAIServing, chat_logprobs
from tokenmill.server.protocol import RequestLimits, UnsupportedParameter
from tokenmill.server.responses_output import (
    Events,
    StreamedItems,
    assistant_message,
    call_item,
    message_item,
    reasoning_item,
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
        chat, run = await _start(serving, chat, body.truncation == "auto")
    except UnsupportedParameter as e:
        raise _renamed(e) from None
    except ContextLengthError as e:
        raise ContextLengthError(str(e), "max_output_tokens") from None
    reply = _ResponseReply(serving, body, store, chat, run)
    return reply.stream() if body.stream else reply.collect()


async def _start(
    serving: OpenAIServing, chat: ChatCompletionRequest, truncate: bool
) -> tuple[ChatCompletionRequest, ChatRun]:
    """Queue the chat request; with `truncate` (`truncation: "auto"`), drop its oldest turns
    while it is too long for the context. Returns the request that ran and its run."""
    while True:
        try:
            return chat, await start_chat(serving, chat, "resp")
        except ContextLengthError:
            shorter = without_oldest_turn(chat) if truncate else None
            if shorter is None:
                raise
            chat = shorter


def _request_fields(body: ResponsesRequest) -> dict[str, Any]:
    """The request's parameters as every response object of it repeats them."""
    fmt = body.text.format if body.text is not None and body.text.format else None
    choice = body.tool_choice
    return {
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": None,
        "metadata": body.metadata or {},
        "model": body.model,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": body.stores,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": {
            "format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}
        },
        "tool_choice": choice.model_dump()
        if isinstance(choice, FunctionToolChoice)
        else (choice or "auto"),
        "tools": [t.model_dump() for t in body.tools or []],
        "top_logprobs": body.top_logprobs,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "truncation": body.truncation or "disabled",
        "user": body.user,
    }


# The order of a response object's fields (OpenAI's).
_FIELDS = (
    "id object created_at status background error incomplete_details instructions "
    "max_output_tokens max_tool_calls metadata model output parallel_tool_calls "
    "previous_response_id reasoning service_tier store temperature text tool_choice tools "
    "top_logprobs top_p truncation usage user"
).split()


class _ResponseReply:
    """The reply to a queued Responses request: the response object (`collect`) or the
    stream of its events (`stream`); a finished response is stored when the request asks."""

    def __init__(
        self,
        serving: OpenAIServing,
        body: ResponsesRequest,
        store: ResponseStore,
        chat: ChatCompletionRequest,
        run: ChatRun,
    ) -> None:
        self.serving, self.body, self.store, self.run = serving, body, store, run
        self.response_id = new_id("resp")
        self.created = int(time.time())
        self.fields = _request_fields(body)
        conversation = list(chat.model_dump(exclude_none=True)["messages"])
        self.conversation = conversation[1:] if body.instructions else conversation

    def response_object(
        self,
        status: str,
        output: list[dict[str, Any]],
        final: RequestOutput | None,
        error: str | None = None,
    ) -> dict[str, Any]:
        """The response object in this status, with this output (usage once `final`)."""
        n_out = sum(len(o.token_ids) for o in final.outputs) if final is not None else 0
        prompt_tokens = self.run.tracker.prompt_tokens
        response = self.fields | {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": False,
            "error": None if error is None else {"code": "server_error", "message": error},
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "output": output,
            "usage": None
            if final is None
            else {
                "input_tokens": prompt_tokens,
                "input_tokens_details": {"cached_tokens": final.num_cached_tokens},
                "output_tokens": n_out,
                "output_tokens_details": {
                    "reasoning_tokens": self.run.reasoning_tokens(self.serving, final.outputs[0])
                },
                "total_tokens": prompt_tokens + n_out,
            },
        }
        return {name: response[name] for name in _FIELDS}

    def finish(
        self, o: CompletionOutput, output: list[dict[str, Any]], final: RequestOutput
    ) -> dict:
        """The final response object; stored when asked for."""
        status = "incomplete" if o.finish_reason == "length" else "completed"
        response = self.response_object(status, output, final)
        if self.body.stores:
            messages = self.conversation + [assistant_message(output)]
            stored = StoredResponse(response, messages, self.body.input_items())
            self.store.put(self.response_id, stored)
        return response

    def logprobs(self, o: CompletionOutput, start: int) -> list | None:
        """The output_text logprobs of a sample's tokens from `start` on (None unless asked)."""
        body = self.body
        if not body.logprobs:
            return None
        lp = chat_logprobs(o, self.serving.tokenizer, body.top_logprobs or 0, start)
        return None if lp is None else lp["content"]

    async def collect(self) -> dict:
        """The whole response object, once the reply finished: a reasoning item (with a
        reasoning parser, when the sample reasoned), a message item (unless the reply is only
        function calls) and a function_call item per call."""
        final, reasoning, content, calls = await self.run.reply(self.serving)
        o = final.outputs[0]
        status = "incomplete" if o.finish_reason == "length" else "completed"
        output = [] if reasoning is None else [reasoning_item(reasoning, "completed")]
        if content or not calls:
            message = message_item(status)
            message["content"] = [text_part(content, self.logprobs(o, 0))]
            output.append(message)
        output += [call_item(c.name, c.arguments, "completed") for c in calls]
        return self.finish(o, output, final)

    async def stream(self) -> AsyncIterator[str]:
        """The typed events: response.created and .in_progress, the items' events as the
        text comes, then response.completed / .incomplete (or .failed on an error)."""
        run = self.run
        events = Events()
        items = StreamedItems(events)
        splitter = run.splitter(self.serving)
        # logprobs ride on text events: with a parser, only where the answer's text goes out
        plain = splitter.tools is None and splitter.reasoner is None
        yield events("response.created", response=self.response_object("in_progress", [], None))
        yield events("response.in_progress", response=self.response_object("in_progress", [], None))
        try:
            async for _, out in self.serving.merged(run.streams, run.tracker):
                o = out.outputs[0]
                lp = self.logprobs(o, len(o.token_ids) - len(o.delta_token_ids))
                reasoning, content, calls = splitter.feed(o.delta_text, o.finished)
                lines = items.reasoning(reasoning) if reasoning else []
                lines += items.text(content, lp) if content or (lp and plain) else []
                for d in calls:
                    lines += items.call(d.name, d.arguments)
                if o.finished:
                    lines += self.finished_events(events, items, o, out, lp)
                for line in lines:
                    yield line
        except Exception as e:  # noqa: BLE001 - reported in-band, the status is already sent
            for line in items.close("incomplete"):
                yield line
            failed = self.response_object("failed", items.output, None, str(e) or type(e).__name__)
            yield events("response.failed", response=failed)

    def finished_events(
        self,
        events: Events,
        items: StreamedItems,
        o: CompletionOutput,
        out: RequestOutput,
        lp: list | None,
    ) -> list[str]:
        """The events that end a stream once the sample finished: an empty message when no
        answer came (an empty reply is still a message), the items' closing events, and the
        final response."""
        status = "incomplete" if o.finish_reason == "length" else "completed"
        answered = any(item["type"] != "reasoning" for item in items.output)
        lines = [] if answered else list(items.text("", [] if lp is not None else None))
        lines += items.close(status)
        response = self.finish(o, items.output, out)
        return lines + [events(f"response.{response['status']}", response=response)]
