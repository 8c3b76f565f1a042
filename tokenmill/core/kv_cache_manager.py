"""KVCacheManager: maps requests to blocks (their block tables) on top of a BlockPool."""

from __future__ import annotations

from collections.abc import Sequence

from tokenmill.core.block_pool import BlockPool, KVBlock, hash_block_tokens
from tokenmill.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Allocates slots for the tokens a step computes and frees a request's blocks at once."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.req_to_blocks: dict[str, list[KVBlock]] = {}
        # prefix-cache lookups, in tokens: asked for (full blocks of new prompts) and found
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def _update_block_hashes(self, request: Request) -> None:
        """Extend request.block_hashes to cover every full block of its known tokens."""
        bs = self.block_size
        hashes = request.block_hashes
        # an adapter changes every layer's K/V: its blocks are its own
        extra = () if request.lora_id is None else (("lora", request.lora_id),)
        for i in range(len(hashes), request.num_tokens // bs):
            parent = hashes[-1] if hashes else None
            tokens = request.token_ids_slice(i * bs, (i + 1) * bs)
            hashes.append(hash_block_tokens(parent, tokens, extra))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of a new request: (blocks, number of tokens they hold).

        At least one token is always left to compute, so the step produces logits to sample.
        A request that needs the hidden states of its first positions (prompt logprobs, mean or
        first-token pooling) uses no cached block (its own full blocks are still cached for
        later requests).
        """
        if not self.enable_prefix_caching or request.needs_every_position:
            return [], 0
        self._update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for h in request.block_hashes[:max_blocks]:
            block = self.block_pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        self.num_prefix_query_tokens += max_blocks * self.block_size
        self.num_prefix_hit_tokens += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVBlock] = (),
        num_lookahead_tokens: int = 0,
    ) -> list[KVBlock] | None:
        """Make room for `num_new_tokens` more tokens; None (and no change) if blocks run out.

        `new_computed_blocks` are prefix-cache hits found by get_computed_blocks for a request
        being scheduled for the first time; their tokens count as already computed.
        `num_lookahead_tokens` more slots come after those (a draft model writes the keys and
        values of its guesses there); they never make a block count as full for the cache.
        """
        blocks = self.req_to_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_required = cdiv(num_computed + num_new_tokens + num_lookahead_tokens, self.block_size)
        num_new_blocks = num_required - len(blocks) - len(new_computed_blocks)
        # Cache hits sitting in the free queue stop being free once we take them.
        num_hits_free = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.block_pool.num_free_blocks - num_hits_free:
            return None
        if new_computed_blocks:
            self.block_pool.touch(new_computed_blocks)
            blocks = blocks + list(new_computed_blocks)
        if num_new_blocks > 0:
            blocks = blocks + self.block_pool.get_new_blocks(num_new_blocks)
        self.req_to_blocks[request.request_id] = blocks
        if self.enable_prefix_caching:
            self._cache_full_blocks(request, blocks, num_computed + num_new_tokens)
        return blocks

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], num_tokens: int) -> None:
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        # A request's cached blocks are a prefix of its list (hits first, then each block as it
        # fills): only the full blocks after the last cached one are new, and a decode step
        # looks at one block, not all of them (which grew quadratically with the output).
        first = num_full
        while first > 0 and blocks[first - 1].block_hash is None:
            first -= 1
        if first == num_full:
            return
        self._update_block_hashes(request)
        for i in range(first, num_full):
            self.block_pool.cache_full_block(blocks[i], request.block_hashes[i])

    def free(self, request: Request) -> None:
        blocks = self.req_to_blocks.pop(request.request_id, None)
        if blocks:
            self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]
