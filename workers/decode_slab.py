"""The decoding rows' keys and values, one contiguous run per row: attention reads them in place.

Why: in plain PyTorch, attention over a paged cache gathers every row's whole context out
of the block pools in every layer of every step (a fifth of a 64-row decode step here). The
slab copies a row's context once, when the row starts decoding, and then appends one token
per step, so decode attention multiplies with the slab itself. The block pools stay the
record: prefill chunks, prefix caching and preemption read them, and every token is still
written there; the slab mirrors them for the rows decoding now.

Layout per layer: K and V of shape (slots, kv_heads, cap, head_dim). Decoding rows hold
slots 0..R-1 (a leaving row's slot is taken by the last row, one row's copy), so the rows
of a step are the slab's leading part, and every row is padded to `cap` positions (masked
past its own length): `slab[:R]` is then one contiguous tensor, which matters, since
bf16 batched matmuls over a strided view measured 3x slower than over a contiguous one.
`cap` follows the longest row in steps of `grain` tokens (the whole slab is copied when it
changes, once per `grain` steps at most). Too large for `max_bytes`: the slab empties and
the caller gathers from the pools as before.

Spans: decode attention over the slab reads every slot up to `cap`, and it is bound by
memory bandwidth (measured: time follows bytes read), so with mixed lengths most of what it
reads is padding. In float32 the slab keeps its slots in descending length order (re-sorted
when joins make the order cost a fifth more than sorted) and attention runs span by span,
each span of slots reading only up to its own longest row (`spans`). Not in bf16: its
batched matmuls over a view whose matrices are spaced `cap` apart measured 3x slower than
over a contiguous tensor, which eats the saving.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from workers.scheduler import ScheduledRow

SPAN_SPLIT = 0.8     # a new span starts where the longest row left is 80% of the span's
SPAN_MIN_ROWS = 8    # ... and the span has this many slots (each span is 3 ops a layer)
RESORT_AT = 1.2      # re-sort when the current order reads 20% more than sorted would


def spans(lengths: Sequence[int], grain: int, cap: int) -> list[tuple[int, int, int]]:
    """(first slot, end slot, positions to read) per span over slots 0..len-1 holding
    `lengths` positions; positions rounded up to `grain`, at most `cap`. Spans follow the
    suffix maximum, so a short row moved into a long span only costs its own padding."""
    n = len(lengths)
    if not n:
        return []
    suffix = list(lengths)
    for s in range(n - 2, -1, -1):
        suffix[s] = max(suffix[s], suffix[s + 1])
    out, a = [], 0
    for s in range(1, n + 1):
        if s == n or (suffix[s] <= SPAN_SPLIT * suffix[a] and s - a >= SPAN_MIN_ROWS):
            out.append((a, s, min(cap, -(-suffix[a] // grain) * grain)))
            a = s
    return out


def span_cost(lengths: Sequence[int], grain: int, cap: int) -> int:
    """Positions attention reads over these slots, span by span."""
    return sum((b - a) * c for a, b, c in spans(lengths, grain, cap))


class DecodeSlab:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, max_bytes: int,
                 grain: int = 32) -> None:
        self.num_layers, self.kv, self.D, self.bs = num_layers, kv_heads, head_dim, block_size
        self.sorted_spans = dtype == torch.float32  # where it pays (the module's docstring)
        self.dtype, self.device, self.max_bytes = dtype, device, max_bytes
        self.grain = -(-grain // block_size) * block_size  # whole blocks: fills fit in cap
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.ids: list[str] = []      # slot -> row id
        self.lengths: list[int] = []  # slot -> positions held (0 .. length - 1)
        self.cap = 0
        self.layers: list[tuple[Tensor, Tensor]] = []

    def clear(self) -> None:
        self.ids, self.lengths, self.cap, self.layers = [], [], 0, []

    def bytes_for(self, slots: int, cap: int) -> int:
        return 2 * self.num_layers * slots * self.kv * cap * self.D * self.itemsize

    def plan(self, rows: Sequence[ScheduledRow],
             pools: Sequence[tuple[Tensor, Tensor]]) -> list[int] | None:
        """Bring the slab to this step's decoding rows (each feeds one token at `start`,
        so it needs positions 0 .. start - 1 held); returns the rows' order in the slab
        (`order[slot]` indexes `rows`), or None when they do not fit in `max_bytes` (the
        slab is empty then)."""
        want = {r.id: i for i, r in enumerate(rows)}
        self._drop_leavers(want)
        cap = -(-(max(r.start for r in rows) + 1) // self.grain) * self.grain
        slots = -(-len(rows) // 8) * 8
        if self.bytes_for(slots, cap) > self.max_bytes:
            self.clear()
            return None
        held = {rid: s for s, rid in enumerate(self.ids)}
        stale = [s for s, rid in enumerate(self.ids)
                 if self.lengths[s] != rows[want[rid]].start]
        joining = [i for i, r in enumerate(rows) if r.id not in held]
        # Shrink only by two grains or more: rows leave and join all the time.
        if (cap > self.cap or cap <= self.cap - 2 * self.grain
                or not self.layers or self.layers[0][0].shape[0] < len(rows)):
            self._resize(max(slots, len(self.ids)), cap)
        for i in joining:
            self.ids.append(rows[i].id)
            self.lengths.append(0)
        fill = stale + list(range(len(self.ids) - len(joining), len(self.ids)))
        if fill:
            self._fill(fill, [rows[want[self.ids[s]]] for s in fill], pools)
        for s in range(len(self.ids)):
            self.lengths[s] = rows[want[self.ids[s]]].start + 1  # after this step's write
        if self.sorted_spans:
            self._sort_if_worth_it()
        return [want[rid] for rid in self.ids]

    def spans(self) -> list[tuple[int, int, int]]:
        """This step's attention spans over the held slots (one span if not sorting)."""
        if not self.sorted_spans:
            return [(0, len(self.ids), self.cap)]
        return spans(self.lengths, self.bs, self.cap)

    def _sort_if_worth_it(self) -> None:
        """Slots in descending length order when the current order reads a fifth more than
        that: the copy costs about what one step's attention reads, a span saves that
        fifth or more every step the rows stay."""
        lengths = self.lengths
        if all(a >= b for a, b in zip(lengths, lengths[1:])):
            return  # already in order: most steps, where no row joined
        ordered = sorted(lengths, reverse=True)
        if span_cost(lengths, self.bs, self.cap) <= RESORT_AT * span_cost(
                ordered, self.bs, self.cap):
            return
        perm = sorted(range(len(self.ids)), key=lambda s: -self.lengths[s])
        n, keep = len(perm), max(self.lengths)
        index = torch.tensor(perm, device=self.device)
        for k, v in self.layers:
            for t in (k, v):
                t[:n, :, :keep] = t[:n, :, :keep].index_select(0, index)
        self.ids = [self.ids[s] for s in perm]
        self.lengths = [self.lengths[s] for s in perm]

    def _drop_leavers(self, want: dict[str, int]) -> None:
        """Rows not decoding this step leave; the last row moves into each hole."""
        s = 0
        while s < len(self.ids):
            if self.ids[s] in want:
                s += 1
                continue
            while self.ids[-1] not in want and len(self.ids) - 1 > s:
                self.ids.pop()
                self.lengths.pop()
            last = len(self.ids) - 1
            if last != s:
                n = self.lengths[last]
                for k, v in self.layers:
                    k[s, :, :n] = k[last, :, :n]
                    v[s, :, :n] = v[last, :, :n]
                self.ids[s], self.lengths[s] = self.ids[last], n
            self.ids.pop()
            self.lengths.pop()

    def _resize(self, slots: int, cap: int) -> None:
        old, n, keep = self.layers, len(self.ids), min(self.cap, cap)
        self.layers = []
        for i in range(self.num_layers):
            # Zeroed, not empty: padding positions are masked, but a NaN there would still
            # poison the masked softmax's product with V.
            k = torch.zeros(slots, self.kv, cap, self.D, dtype=self.dtype, device=self.device)
            v = torch.zeros_like(k)
            if old and n and keep:
                k[:n, :, :keep] = old[i][0][:n, :, :keep]
                v[:n, :, :keep] = old[i][1][:n, :, :keep]
                old[i] = (k, v)  # let the old layer go before the next one is made
            self.layers.append((k, v))
        self.cap = cap

    def _fill(self, slots: list[int], rows: list[ScheduledRow],
              pools: Sequence[tuple[Tensor, Tensor]]) -> None:
        """Copy each row's positions 0 .. start - 1 out of the block pools."""
        bs, kv = self.bs, self.kv
        nblocks = [-(-r.start // bs) for r in rows]
        width = max(nblocks)
        if not width:
            return
        tables = torch.tensor([r.block_table[:b] + [0] * (width - b)
                               for r, b in zip(rows, nblocks)])
        idx = (tables[:, None, :] * kv + torch.arange(kv)[None, :, None]).view(-1).to(
            self.device)
        target = torch.tensor(slots, device=self.device)
        for (k, v), (k_pool, v_pool) in zip(self.layers, pools):
            for slab, pool in ((k, k_pool), (v, v_pool)):
                got = pool.view(-1, bs * self.D).index_select(0, idx)
                slab[:, :, :width * bs].index_copy_(
                    0, target, got.view(len(rows), kv, width * bs, self.D))
