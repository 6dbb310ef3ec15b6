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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from workers.scheduler import ScheduledRow


class DecodeSlab:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, max_bytes: int,
                 grain: int = 32) -> None:
        self.num_layers, self.kv, self.D, self.bs = num_layers, kv_heads, head_dim, block_size
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
        return [want[rid] for rid in self.ids]

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
