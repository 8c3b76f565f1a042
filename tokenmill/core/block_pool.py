"""BlockPool: the fixed set of KV-cache blocks, with reference counts and content hashes.

A block holds the KV of `block_size` consecutive tokens of some sequence. A full block may carry
a hash of its content (its tokens and all tokens before it), so a later request with the same
prefix can reuse it. The hash is a sha256 chained over (parent hash, token ids, extra keys), and
a hit is verified against the block's recorded parent, tokens and extra keys, so neither a
crafted collision nor an accidental one can hand a request another request's KV. Freed
blocks that hold cached content go to the tail of an LRU free queue;
a freed block keeps its hash (and stays findable) until it is handed out again, which evicts it
from the cache. Freed blocks without cached content go to the front: blocks whose memory was
already written are handed out again before never-used ones, so the pages of the KV pool that
the OS has committed follow the tokens actually cached (the pool is reserved untouched).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import NamedTuple


class BlockHash(NamedTuple):
    """A full block's cache key (`digest`) and the content it was computed from."""

    digest: bytes  # sha256(parent digest, token ids, extra keys)
    parent: bytes  # the previous block's digest (b"" for the first block)
    token_ids: tuple[int, ...]
    extra_keys: tuple = ()  # reserved for what else shapes the KV (LoRA id, image hashes)


def hash_block_tokens(
    parent: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple = ()
) -> BlockHash:
    """The key of one full block, chained to the key of the block before it."""
    parent_digest = parent.digest if parent is not None else b""
    tokens = tuple(token_ids)
    h = hashlib.sha256(parent_digest)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return BlockHash(h.digest(), parent_digest, tokens, extra_keys)


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        h = self.block_hash.digest.hex()[:8] if self.block_hash else None
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, hash={h})"


class BlockPool:
    """Owns every block; hands them out, takes them back, and indexes full ones by hash."""

    def __init__(self, num_blocks: int, enable_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks in eviction order (front = evicted first).
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by some request (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """Take n blocks from the front of the free queue (evicting their cached content)."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, only {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                if self._cached.get(block.block_hash.digest) is block:
                    del self._cached[block.block_hash.digest]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        """The block cached under this key, if its recorded content (parent, tokens, extra
        keys) is the one asked for."""
        if not self.enable_caching:
            return None
        block = self._cached.get(block_hash.digest)
        return block if block is not None and block.block_hash == block_hash else None

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on blocks found in the cache (they may be sitting in the free queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block. Blocks reaching zero join the free queue: at the
        tail when they hold cached content (LRU), else at the front (reused first).

        Callers pass a sequence's blocks in reverse so its last blocks are evicted first.
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                if block.block_hash is None:
                    self._free.move_to_end(block.block_id, last=False)

    def cache_full_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Record that `block` holds the content identified by `block_hash`."""
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        self._cached.setdefault(block_hash.digest, block)

    def check_invariants(self) -> None:
        """Assert internal consistency (used by tests after every operation)."""
        free_ids = set(self._free)
        for block in self.blocks:
            assert block.ref_cnt >= 0, block
            assert (block.ref_cnt == 0) == (block.block_id in free_ids), block
        for h, block in self._cached.items():
            assert block.block_hash is not None and block.block_hash.digest == h, (h, block)
        assert len(free_ids) == len(self._free)
