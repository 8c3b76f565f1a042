"""Response and stream bodies of /v1/chat/completions (OpenAI's shapes), and the chat path
shared with /v1/responses and /v1/messages: render and queue a chat request (`start_chat`,
`ChatRun`) and split a sample's text into reasoning, content and tool calls (`ChatRun.split`;
streamed, `SampleSplitter`)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from tokenmill.engine.chat_template import template_variables
from tokenmill.engine.reasoning import END, ReasoningStreamer
from tokenmill.engine.tool_streamers import ToolStreamer
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.server.chat_protocol import ChatCompletionRequest, NamedToolChoice
from tokenmill.server.handlers import (
    OpenAIServing,
    PreparedPrompt,
    chat_logprobs,
    usage,
    vllm_prompt_logprobs,
)
from tokenmill.server.streams import chunker, error_event, stream_end
from tokenmill.server.tools import ToolPlan, new_call_id, plan_tools, tool_calls_json


@dataclasses.dataclass
class ChatRun:
    """A chat request rendered and queued: how its tools render, parse and constrain, its
    prompt, and the engine streams of its samples."""

    plan: ToolPlan
    prompt: PreparedPrompt
    request_id: str
    streams: list
    tracker: Any

    def split(self, serving: OpenAIServing, text: str) -> tuple[str | None, str, list]:
        """A sample's whole text as (reasoning, content, tool calls): the reasoning by the
        server's reasoning parser (None without one, or when the sample did not reason), the
        calls by the tool parser, from the answer only."""
        reasoning = None
        if serving.reasoning_parser is not None:
            reasoning, text = serving.reasoning_parser.extract(text, self.prompt.text)
        content, calls = (text, []) if self.plan.parser is None else self.plan.parser.extract(text)
        return reasoning, content, calls

    def reasoning_tokens(self, serving: OpenAIServing, o: CompletionOutput) -> int:
        """How many of a sample's tokens are its reasoning, `</think>` included (all of them
        when it never closed it; none without a reasoning parser or reasoning): the shortest
        run of its tokens whose text holds the whole tag."""
        parser = serving.reasoning_parser
        if parser is None or parser.extract(o.text, self.prompt.text)[0] is None:
            return 0
        ids, tok = o.token_ids, serving.tokenizer
        if END not in tok.decode(ids, False):
            return len(ids)
        lo, hi = 1, len(ids)  # the tag is in the text of ids[:hi], not of ids[:lo - 1]
        while lo < hi:
            mid = (lo + hi) // 2
            if END in tok.decode(ids[:mid], False):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def splitter(self, serving: OpenAIServing) -> SampleSplitter:
        """The streaming `split` of one sample."""
        reasoner = serving.reasoning_parser
        return SampleSplitter(
            reasoner.streamer(self.prompt.text) if reasoner is not None else None,
            self.plan.parser.streamer() if self.plan.parser is not None else None,
        )

    async def reply(self, serving: OpenAIServing) -> tuple[RequestOutput, str | None, str, list]:
        """Wait for a one-sample run to end: its final output and the sample's `split`."""
        final = None
        async for _, out in serving.merged(self.streams, self.tracker):
            final = out
        assert final is not None
        return final, *self.split(serving, final.outputs[0].text)


@dataclasses.dataclass
class SampleSplitter:
    """One sample's text, delta by delta, split as `ChatRun.split` splits the whole: the
    reasoning streamer first (None: no reasoning parser), then the tool streamer on the
    answer (None: no tool parser)."""

    reasoner: ReasoningStreamer | None
    tools: ToolStreamer | None

    def feed(self, delta: str, finished: bool) -> tuple[str, str, list]:
        """The (reasoning, content, tool-call pieces) that `delta` completes; once the sample
        `finished`, with what the streamers held back."""
        reasoning, text = "", delta
        if self.reasoner is not None:
            reasoning, text = self.reasoner.feed(delta)
            if finished:
                held_reasoning, held_text = self.reasoner.finish()
                reasoning, text = reasoning + held_reasoning, text + held_text
        if self.tools is None:
            return reasoning, text, []
        content, calls = self.tools.feed(text)
        if finished:
            tail, more = self.tools.finish()
            content, calls = content + tail, calls + more
        return reasoning, content, calls


async def render_chat(
    serving: OpenAIServing, body: ChatCompletionRequest
) -> tuple[ToolPlan, PreparedPrompt]:
    """Validate a chat request and render its conversation (tools included) to its prompt, in a
    worker thread (the event loop keeps serving)."""
    body.check_supported()
    tok = serving.tokenizer

    def render() -> tuple[ToolPlan, PreparedPrompt]:
        plan = plan_tools(
            [m.as_template_message() for m in body.messages],
            [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
            body.tool_choice.model_dump()
            if isinstance(body.tool_choice, NamedToolChoice)
            else body.tool_choice,
            body.parallel_tool_calls,
            tok,
            serving.tool_call_parser,
        )
        extra = body.reasoning_variables() | template_variables(body.chat_template_kwargs)
        if plan.template_tools:
            extra["tools"] = plan.template_tools
        text = tok.apply_chat_template(
            plan.messages,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            **extra,
        )
        if body.logprobs:
            tok.token_bytes([])  # the logprobs' byte table, built here on first use
        prompt = serving.prepare(text, bool(body.add_special_tokens), body.truncate_prompt_tokens)
        return plan, prompt

    return await asyncio.to_thread(render)


async def start_chat(serving: OpenAIServing, body: ChatCompletionRequest, prefix: str) -> ChatRun:
    """Validate, render and queue a chat request; raises before anything runs. Shared by
    /v1/chat/completions, /v1/responses and /v1/messages."""
    plan, prompt = await render_chat(serving, body)
    max_tokens = body.effective_max_tokens()
    serving.check_length(len(prompt.token_ids), max_tokens)
    params = body.sampling_params(
        max_tokens, body.num_logprobs(), body.prompt_logprobs, serving.sampling_defaults
    )
    if plan.constraint is not None:
        params = dataclasses.replace(params, structured_outputs=plan.constraint)
    reasoning = serving.reasoning_parser
    if params.structured_outputs is not None and reasoning is not None:
        after = reasoning.grammar_after(prompt.text, serving.tokenizer)  # the model thinks first
        constraint = dataclasses.replace(params.structured_outputs, after_token_id=after)
        params = dataclasses.replace(params, structured_outputs=constraint)
    if plan.keep_special_tokens:
        params = dataclasses.replace(params, skip_special_tokens=False)
    rid, streams, tracker = await serving.start([prompt], params, prefix, body.model)
    return ChatRun(plan, prompt, rid, streams, tracker)


async def chat_response(
    serving: OpenAIServing, body: ChatCompletionRequest
) -> AsyncIterator[str] | Coroutine[Any, Any, dict]:
    """Validate and queue a chat completion request (raising before any byte is sent), then
    return the coroutine of its response body or the async generator of its SSE chunks."""
    reply = _ChatReply(serving, body, await start_chat(serving, body, "chatcmpl"))
    return reply.stream() if body.stream else reply.collect()


class _ChatReply:
    """The reply to a queued chat completion request: the response body (`collect`) or the
    stream of chunks (`stream`), OpenAI's shapes."""

    def __init__(self, serving: OpenAIServing, body: ChatCompletionRequest, run: ChatRun) -> None:
        self.serving, self.body, self.run = serving, body, run
        self.created = int(time.time())
        self.splitters = {j: run.splitter(serving) for j in range(body.n)}
        self.called: set[int] = set()  # samples that streamed a tool call

    def base(self, choices: list[dict]) -> dict:
        """The fields every response body or chunk carries, with these choices."""
        return {
            "id": self.run.request_id,
            "object": "chat.completion.chunk" if self.body.stream else "chat.completion",
            "created": self.created,
            "model": self.body.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def usage_details(self, outputs: list[CompletionOutput]) -> dict:
        """With a reasoning parser, `completion_tokens_details.reasoning_tokens` over the
        samples (OpenAI's field); else nothing."""
        if self.serving.reasoning_parser is None:
            return {}
        n = sum(self.run.reasoning_tokens(self.serving, o) for o in outputs)
        return {"completion_tokens_details": {"reasoning_tokens": n}}

    def logprobs(self, o: CompletionOutput, start: int) -> dict | None:
        """The logprobs object of a sample's tokens from `start` on (None without logprobs)."""
        body = self.body
        k = body.top_logprobs or 0
        return chat_logprobs(o, self.serving.tokenizer, k, start, body.return_tokens_as_token_ids)

    def message(self, o: CompletionOutput) -> tuple[dict, str | None]:
        """The assistant message of a finished sample and its finish_reason: its reasoning
        (with a reasoning parser, under vLLM's `reasoning` and its older `reasoning_content`),
        then its answer, split into content and tool calls by the tool parser."""
        msg: dict = {"role": "assistant"}
        reasoning, content, calls = self.run.split(self.serving, o.text)
        if reasoning is not None and self.body.include_reasoning:
            msg |= {"reasoning": reasoning, "reasoning_content": reasoning}
        reason = o.finish_reason
        msg["content"] = (content or None) if calls or "reasoning" in msg else content
        if calls:
            reason = "tool_calls" if reason == "stop" else reason
            msg["tool_calls"] = tool_calls_json(calls)
        return msg, reason

    async def collect(self) -> dict:
        """The whole response body, once every sample finished."""
        body, run = self.body, self.run
        final = None
        async for _, out in self.serving.merged(run.streams, run.tracker):
            final = out
        choices = []
        for o in final.outputs:
            msg, reason = self.message(o)
            choices.append(
                {
                    "index": o.index,
                    "message": msg,
                    "logprobs": self.logprobs(o, 0),
                    "finish_reason": reason,
                }
            )
        n_out = sum(len(o.token_ids) for o in final.outputs)
        tokens = usage(run.tracker.prompt_tokens, n_out) | self.usage_details(final.outputs)
        response = self.base(choices) | {"usage": tokens}
        if body.prompt_logprobs is not None:
            response["prompt_logprobs"] = vllm_prompt_logprobs(
                run.prompt.token_ids,
                final.prompt_logprobs,
                body.prompt_logprobs,
                body.return_tokens_as_token_ids,
            )
        return response

    def deltas(self, o: CompletionOutput) -> list[dict]:
        """The chunk deltas for a sample's new text: reasoning (with a reasoning parser), then
        content or tool-call pieces (the id, type and name first, then argument fragments)."""
        reasoning, content, calls = self.splitters[o.index].feed(o.delta_text, o.finished)
        out: list[dict] = []
        if reasoning and self.body.include_reasoning:
            out.append({"reasoning": reasoning, "reasoning_content": reasoning})
        if content:
            out.append({"content": content})
        for d in calls:
            if d.name is not None:
                self.called.add(o.index)
                call = {"index": d.index, "id": new_call_id(), "type": "function"}
                call["function"] = {"name": d.name, "arguments": d.arguments}
            else:
                call = {"index": d.index, "function": {"arguments": d.arguments}}
            out.append({"tool_calls": [call]})
        return out

    def sample_choices(self, o: CompletionOutput) -> list[dict]:
        """The chunk choices for a sample's new output, one chunk each: its content or
        tool-call pieces (the logprobs on the first), then its finish_reason once finished."""
        start = len(o.token_ids) - len(o.delta_token_ids)
        pieces = self.deltas(o)
        if not pieces and o.delta_token_ids and self.body.logprobs:
            pieces = [{"content": ""}]
        choices = [
            {
                "index": o.index,
                "delta": delta,
                "logprobs": self.logprobs(o, start) if i == 0 else None,
                "finish_reason": None,
            }
            for i, delta in enumerate(pieces)
        ]
        if o.finished:
            reason = o.finish_reason
            if o.index in self.called and reason == "stop":
                reason = "tool_calls"
            choices.append(
                {"index": o.index, "delta": {}, "logprobs": None, "finish_reason": reason}
            )
        return choices

    async def stream(self) -> AsyncIterator[str]:
        """The SSE chunks: each sample's role first, then its pieces as they come, then the
        usage (when asked for) and [DONE]; an error after the start is an error event."""
        body, run = self.body, self.run
        counts: dict[int, int] = {}
        chunk = chunker(body, self.base, run.tracker, counts)
        try:
            for j in range(body.n):
                role = {"role": "assistant", "content": ""}
                yield chunk([{"index": j, "delta": role, "logprobs": None, "finish_reason": None}])
            done: dict[int, CompletionOutput] = {}  # samples whose finish_reason went out
            async for _, out in self.serving.merged(run.streams, run.tracker):
                for o in out.outputs:
                    if o.index in done:
                        continue  # outputs repeat the finished samples
                    if o.finished:
                        done[o.index] = o
                    counts[o.index] = len(o.token_ids)
                    for choice in self.sample_choices(o):
                        yield chunk([choice])
            details = self.usage_details(list(done.values()))
            end = stream_end(body, self.base([]), run.tracker.prompt_tokens, counts, details)
            for line in end:
                yield line
        except Exception as e:  # noqa: BLE001 - reported in-band, the status is already sent
            yield error_event(e)
