"""The stored responses of /v1/responses (`store`): kept in memory, bounded in count and bytes,
for `previous_response_id` and GET / DELETE /v1/responses/{id}."""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
from typing import Any

from tokenmill.server.protocol import UnsupportedParameter

MAX_STORED_RESPONSES = 1024  # the store's bounds: responses, and bytes of their JSON
MAX_STORED_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # the response object, as returned
    messages: list[dict[str, Any]]  # its conversation without instructions, output included
    input_items: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # with ids

    def size(self) -> int:
        """Its bytes as JSON, a measure of the memory it holds."""
        return len(json.dumps([self.response, self.messages, self.input_items]))

    def list_items(self, limit: int, order: str, after: str | None) -> dict[str, Any]:
        """OpenAI's list of the request's input items: `limit` of them in `order` (desc:
        newest first), after the item with id `after`."""
        items = self.input_items if order == "asc" else self.input_items[::-1]
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise UnsupportedParameter("after", f"no input item has id {after!r}")
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > len(page),
        }


class ResponseStore:
    """Finished responses by id, in memory: at most `capacity` of them and `max_bytes` of
    their JSON (a long conversation is stored whole in each of its turns), the oldest dropped
    first. A response larger than `max_bytes` alone is not kept."""

    def __init__(
        self, capacity: int = MAX_STORED_RESPONSES, max_bytes: int = MAX_STORED_BYTES
    ) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, tuple[StoredResponse, int]] = (
            collections.OrderedDict()
        )
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response_id: str, stored: StoredResponse) -> None:
        size = stored.size()
        if size > self.max_bytes:
            return
        with self._lock:
            self._items[response_id] = (stored, size)
            self._bytes += size
            while len(self._items) > self.capacity or self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            entry = self._items.get(response_id)
        return None if entry is None else entry[0]

    def delete(self, response_id: str) -> bool:
        with self._lock:
            entry = self._items.pop(response_id, None)
            if entry is not None:
                self._bytes -= entry[1]
        return entry is not None
