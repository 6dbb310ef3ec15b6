"""The paged KV cache: block pools per layer, and the bookkeeping of which block holds what.

Keys and values live in fixed-size blocks of `block_size` token slots. `KVPools` holds the
tensors: per layer one K and one V pool of shape (num_blocks + 1, kv_heads, block_size,
head_dim), with the *local* kv head count so a tensor-parallel rank holds only its heads.
Block 0 is the null block: never handed out, zeroed, it is what padded gathers read.

`BlockManager` is plain Python (the scheduler drives it without a model): a free list,
reference counts, and prefix caching. A block whose `block_size` tokens are all computed
is registered under the hash of (hash of the blocks before it, its tokens), so a request
whose prompt starts with the same full blocks maps them to the same physical blocks. A
cached block nobody references stays cached in an LRU and is evicted (unregistered and
reused) only when the free list is empty.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

ROOT_HASH = 0  # the "hash of everything before" the first block (an int: same on every rank)


def block_hashes(tokens: Sequence[int], block_size: int, known: list[int]) -> list[int]:
    """Extend `known` (hashes of the first full blocks of `tokens`) to every full block.

    Chained: a block's hash covers its tokens and, through its parent, every token
    before it. Python hashes tuples of ints the same in every process.
    """
    for i in range(len(known), len(tokens) // block_size):
        parent = known[-1] if known else ROOT_HASH
        known.append(hash((parent, tuple(tokens[i * block_size:(i + 1) * block_size]))))
    return known


class BlockManager:
    """Block ids 1..num_blocks: allocation, ref counts, and the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need num_blocks >= 1 and block_size >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free = list(range(num_blocks, 0, -1))     # a stack: low ids first
        self._high_water = 0           # highest block ever handed out
        self._fresh: list[int] = []    # never-used blocks handed out since `take_fresh`
        self._ref = [0] * (num_blocks + 1)
        self._hash_of: dict[int, int] = {}               # block id -> its registered hash
        self._cached: dict[int, int] = {}                # hash -> block id
        self._lru: OrderedDict[int, None] = OrderedDict()  # unreferenced cached, oldest first

    def num_free(self) -> int:
        """Blocks an allocation may take: free ones plus evictable cached ones."""
        return len(self._free) + len(self._lru)

    def usage(self) -> float:
        """Fraction of blocks referenced by some request."""
        return 1.0 - self.num_free() / self.num_blocks

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def is_cached(self, block: int) -> bool:
        return block in self._hash_of

    def match_prefix(self, hashes: Sequence[int]) -> list[int]:
        """Blocks holding the longest cached run of `hashes` (references not taken)."""
        blocks: list[int] = []
        if self.enable_prefix_caching:
            for h in hashes:
                block = self._cached.get(h)
                if block is None:
                    break
                blocks.append(block)
        return blocks

    def num_evictable(self, blocks: Sequence[int]) -> int:
        """How many of `blocks` are unreferenced (taking them shrinks `num_free`)."""
        return sum(1 for b in blocks if self._ref[b] == 0)

    def acquire(self, blocks: Sequence[int]) -> None:
        """Take a reference on cached blocks (a prefix hit)."""
        for b in blocks:
            if self._ref[b] == 0:
                del self._lru[b]
            self._ref[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (referenced once), evicting LRU cached ones if needed; None if
        fewer than n are available (nothing is taken then)."""
        if n > self.num_free():
            return None
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
                if b > self._high_water:  # the stack hands out never-used blocks in order
                    self._high_water = b
                    self._fresh.append(b)
            else:
                b, _ = self._lru.popitem(last=False)
                del self._cached[self._hash_of.pop(b)]
            self._ref[b] = 1
            out.append(b)
        return out

    def take_fresh(self) -> list[int]:
        """Blocks handed out for the first time since the last call: their memory was never
        written, so the pools must zero them before use (see `KVPools.zero`)."""
        fresh, self._fresh = self._fresh, []
        return fresh

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; unreferenced cached ones stay cached (LRU).

        Freed tail-first, so a request's last blocks (the least shared) are evicted first.
        """
        for b in reversed(blocks):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._hash_of:
                    self._lru[b] = None
                else:
                    self._free.append(b)

    def register(self, block: int, block_hash: int) -> None:
        """`block` is full: make it findable by `block_hash` (unless another block already
        holds the same tokens; this one then stays private and is freed as usual)."""
        if (self.enable_prefix_caching and block_hash not in self._cached
                and block not in self._hash_of):
            self._cached[block_hash] = block
            self._hash_of[block] = block_hash


class KVPools:
    """Per layer, K and V pools (num_blocks + 1, kv_heads, block_size, head_dim).

    Head-major inside a block: one kv head's `block_size` keys are one contiguous run, so a
    row's context gathers straight into the (kv_heads, length, head_dim) layout attention
    multiplies with.

    Allocated empty (pages are committed as blocks are first used), so unwritten memory
    may hold any bits, NaN among them. Attention reads whole blocks (the slots past a row's
    length are masked, but a NaN key still poisons the masked softmax), so the null block 0
    is zeroed here and every other block the first time it is handed out (`zero`).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int,
                 kv_heads: Sequence[int], head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.layers: list[tuple[Tensor, Tensor]] = []
        for i in range(num_layers):
            shape = (num_blocks + 1, kv_heads[i], block_size, head_dim)
            k = torch.empty(shape, dtype=dtype, device=device)
            v = torch.empty(shape, dtype=dtype, device=device)
            k[0].zero_()
            v[0].zero_()
            self.layers.append((k, v))

    def zero(self, blocks: list[int]) -> None:
        index = torch.tensor(blocks, device=self.layers[0][0].device)
        for k, v in self.layers:
            k.index_fill_(0, index, 0)
            v.index_fill_(0, index, 0)

    def copy(self, src: int, dst: int) -> None:
        """Block `dst` gets `src`'s keys and values in every layer (a forked sequence's
        partial last block)."""
        for k, v in self.layers:
            k[dst].copy_(k[src])
            v[dst].copy_(v[src])

    @staticmethod
    def block_bytes(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers, K and V."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * kv_heads * head_dim * itemsize
