"""The output items of a /v1/responses response (the assistant's reasoning, with a reasoning
parser; its message; its function calls) and, streamed, the typed SSE events that build them
item by item."""

from __future__ import annotations

import json
from typing import Any

from tokenmill.server.responses_protocol import new_id
from tokenmill.server.tools import new_call_id


def message_item(status: str) -> dict[str, Any]:
    return {
        "id": new_id("msg"),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [],
    }


def text_part(text: str, logprobs: list | None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return part


def reasoning_item(text: str, status: str) -> dict[str, Any]:
    """The reply's reasoning, as its text (OpenAI's `reasoning_text` content; no summary)."""
    return {
        "id": new_id("rs"),
        "type": "reasoning",
        "status": status,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def call_item(name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": new_id("fc"),
        "type": "function_call",
        "status": status,
        "call_id": new_call_id(),
        "name": name,
        "arguments": arguments,
    }


def assistant_message(output: list[dict[str, Any]]) -> dict[str, Any]:
    """The output items as the chat message a later turn replays."""
    text = "".join(
        p["text"] for item in output if item["type"] == "message" for p in item["content"]
    )
    calls = [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        for item in output
        if item["type"] == "function_call"
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    reasoning = [item for item in output if item["type"] == "reasoning"]
    if reasoning:
        message["reasoning_content"] = "".join(p["text"] for p in reasoning[0]["content"])
    return message


class Events:
    """The SSE lines of a response stream: each event named in an `event:` line and typed in
    its data, numbered from 0."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, type_: str, **fields: Any) -> str:
        data = {"type": type_, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {type_}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class StreamedItems:
    """The output items of a streamed response, built from reasoning, text and tool-call pieces
    in order: reasoning opens a reasoning item and text a message item if the open item is not
    one, a named call piece opens a function_call item, and opening an item closes the one
    before. Each method returns the
    events it implies."""

    def __init__(self, events: Events) -> None:
        self.events = events
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None

    def _add(self, item: dict[str, Any]) -> list[str]:
        lines = self.close("completed")
        self.output.append(item)
        self.open = item
        lines.append(
            self.events(
                "response.output_item.added", output_index=len(self.output) - 1, item=dict(item)
            )
        )
        return lines

    def _where(self) -> dict[str, Any]:
        assert self.open is not None
        return {"item_id": self.open["id"], "output_index": len(self.output) - 1}

    def text(self, delta: str, logprobs: list | None) -> list[str]:
        lines: list[str] = []
        if self.open is None or self.open["type"] != "message":
            lines += self._add(message_item("in_progress"))
            part = text_part("", [] if logprobs is not None else None)
            lines.append(
                self.events(
                    "response.content_part.added", **self._where(), content_index=0, part=part
                )
            )
            self.open["part"] = part
        part = self.open["part"]
        part["text"] += delta
        if logprobs is not None:
            part["logprobs"] += logprobs
        lines.append(
            self.events(
                "response.output_text.delta",
                **self._where(),
                content_index=0,
                delta=delta,
                logprobs=logprobs or [],
            )
        )
        return lines

    def reasoning(self, delta: str) -> list[str]:
        lines: list[str] = []
        if self.open is None or self.open["type"] != "reasoning":
            lines += self._add(reasoning_item("", "in_progress") | {"content": []})
            part = {"type": "reasoning_text", "text": ""}
            lines.append(
                self.events(
                    "response.content_part.added", **self._where(), content_index=0, part=part
                )
            )
            self.open["part"] = part
        self.open["part"]["text"] += delta
        where = self._where()
        lines.append(
            self.events("response.reasoning_text.delta", **where, content_index=0, delta=delta)
        )
        return lines

    def call(self, name: str | None, arguments: str) -> list[str]:
        lines = self._add(call_item(name, "", "in_progress")) if name is not None else []
        assert self.open is not None and self.open["type"] == "function_call"
        self.open["arguments"] += arguments
        if arguments:
            lines.append(
                self.events(
                    "response.function_call_arguments.delta", **self._where(), delta=arguments
                )
            )
        return lines

    def close(self, status: str) -> list[str]:
        """Finish the open item (if any) with `status`."""
        item, lines = self.open, []
        if item is None:
            return lines
        where = self._where()
        if item["type"] == "reasoning":
            part = item.pop("part")
            lines.append(
                self.events(
                    "response.reasoning_text.done", **where, content_index=0, text=part["text"]
                )
            )
            lines.append(
                self.events("response.content_part.done", **where, content_index=0, part=part)
            )
            item["content"] = [part]
        elif item["type"] == "message":
            part = item.pop("part")
            lines.append(
                self.events(
                    "response.output_text.done",
                    **where,
                    content_index=0,
                    text=part["text"],
                    logprobs=part.get("logprobs") or [],
                )
            )
            lines.append(
                self.events("response.content_part.done", **where, content_index=0, part=part)
            )
            item["content"] = [part]
        else:
            lines.append(
                self.events(
                    "response.function_call_arguments.done",
                    **where,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        item["status"] = status
        lines.append(
            self.events("response.output_item.done", output_index=where["output_index"], item=item)
        )
        self.open = None
        return lines
