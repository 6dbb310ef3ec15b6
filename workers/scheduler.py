"""Iteration-level scheduling: which tokens of which requests run in the next step.

Plain Python (no tensors, no model): the scheduler decides, the engine executes. Every
step it gives each running row what it needs next, oldest first: one token for a decoding
row, a chunk of the prompt for one still prefilling (chunked, so a long prompt never stalls
the others), then admits waiting requests while the per-step token budget
(`max_num_batched_tokens`) and row budget (`max_num_seqs`) allow. A request admitted to
the running set first reuses the longest run of its full prompt blocks that the prefix
cache holds and computes only the rest (at least its last token: that one gives logits).

When a running row needs a block and none is free, the newest running row is preempted:
its blocks are freed (full ones stay in the prefix cache), and it goes back to the front of
the waiting queue, to be recomputed later from its prompt plus the tokens generated so far.
A row leaves the moment the engine finishes it; its seat and blocks are free at once.
Decisions depend only on the calls made, never on time, so tensor-parallel ranks that make
the same calls make the same decisions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from workers.kv_cache import BlockManager, block_hashes


@dataclass
class Sequence:
    """One request's tokens and where its keys/values live."""

    id: str
    tokens: list[int]                 # [num_tokens]: prompt, then generated tokens
    num_prompt: int
    score_from: int | None = None     # scoring: first position whose logits are still needed
    prompt_logits: bool = False       # prompt logprobs: logits at every prompt position (no
                                      # prefix-cache hits); the engine clears it once sampled
    num_computed: int = 0             # tokens whose keys/values are in the cache
    num_cached: int | None = None     # prompt tokens the prefix cache served; None: not admitted
    block_table: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)   # chained hashes of the full blocks

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def needs_logits_from(self) -> int:
        """The first position that must be computed (its logits are wanted)."""
        last = self.num_tokens - 1
        if self.prompt_logits:
            return 0
        return last if self.score_from is None else min(last, self.score_from)


@dataclass
class ScheduledRow:
    """What one row runs this step."""

    id: str
    token_ids: list[int]        # [n] tokens fed this step
    start: int                  # position of token_ids[0]; positions are start .. start + n - 1
    block_table: list[int]      # the row's blocks, covering positions 0 .. start + n - 1
    slots: list[int]            # [n] cache slot (block * block_size + offset) of each token
    logits: range               # positions whose next-token logits are wanted (maybe empty)
    sample: bool                # the last fed token is the row's last: sample the next one


@dataclass
class StepPlan:
    """The scheduler's decision for one step."""

    rows: list[ScheduledRow]
    preempted: list[str]        # ids sent back to waiting during this schedule()

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.rows)


class Scheduler:
    """Waiting and running queues over a `BlockManager`; see the module docstring."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        if not 1 <= max_num_seqs <= max_num_batched_tokens:
            raise ValueError("need 1 <= max_num_seqs <= max_num_batched_tokens (every running "
                             "row's decode token fits in one step)")
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []      # oldest first: the newest is preempted first
        self._by_id: dict[str, Sequence] = {}
        self.prefix_queries = 0                 # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0                    # of which served from it
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        if seq.id in self._by_id:
            raise ValueError(f"request id {seq.id!r} is already queued or running")
        self._by_id[seq.id] = seq
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, seq_id: str) -> Sequence | None:
        return self._by_id.get(seq_id)

    def finish(self, seq_id: str) -> Sequence | None:
        """Remove a waiting or running sequence and free its blocks; None if unknown."""
        seq = self._by_id.pop(seq_id, None)
        if seq is None:
            return None
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        return seq

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def schedule(self) -> StepPlan:
        """Decide the next step: running rows first (oldest first), then admissions."""
        plan = StepPlan([], [])
        decoding = sum(1 for s in self.running if s.num_tokens - s.num_computed == 1)
        # Decodes are always served: prefill chunks share what the decodes leave.
        budget = self.max_num_batched_tokens - decoding
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            todo = seq.num_tokens - seq.num_computed
            n = 1 if todo == 1 else min(todo, budget)
            if n <= 0:
                i += 1
                continue
            if not self._grow(seq, n, plan):
                break  # seq itself was the newest and got preempted
            budget -= n if todo > 1 else 0
            plan.rows.append(self._row(seq, n))
            i += 1
        # After a preemption blocks are short: admitting more would only thrash.
        while (self.waiting and not plan.preempted and budget > 0
               and len(self.running) < self.max_num_seqs):
            row = self._admit(self.waiting[0], budget)
            if row is None:
                break
            self.running.append(self.waiting.popleft())
            budget -= len(row.token_ids)
            plan.rows.append(row)
        return plan

    def update(self, plan: StepPlan) -> None:
        """The step ran: its tokens are computed; register blocks that are now full."""
        for row in plan.rows:
            seq = self.get(row.id)
            if seq is None:
                continue
            full_before = seq.num_computed // self.block_size
            seq.num_computed += len(row.token_ids)
            if seq.score_from is not None and row.logits:
                seq.score_from = max(seq.score_from, row.logits.stop)
            full = seq.num_computed // self.block_size
            if full > full_before:
                hashes = block_hashes(seq.tokens, self.block_size, seq.hashes)
                for j in range(full_before, full):
                    self.blocks.register(seq.block_table[j], hashes[j])

    def append(self, seq_id: str, token: int) -> None:
        """A token was sampled for a running row: it is fed next step."""
        seq = self.get(seq_id)
        assert seq is not None, seq_id
        seq.tokens.append(token)

    def fork(self, parent: Sequence, child_id: str) -> tuple[int, int] | None:
        """A new running sequence with `parent`'s tokens and computed keys/values: its full
        blocks shared (one more reference each), its partial last block a fresh one, returned
        as (parent's block, child's) for the caller to copy. With no block free the child
        waits instead, to be recomputed (its full blocks from the prefix cache)."""
        bs = self.block_size
        full, partial = divmod(parent.num_computed, bs)
        child = Sequence(child_id, list(parent.tokens), parent.num_prompt,
                         hashes=list(parent.hashes[:full]))
        if partial and self.blocks.num_free() < 1:
            self.add(child)
            return None
        self._by_id[child_id] = child
        shared = parent.block_table[:full]
        self.blocks.acquire(shared)
        fresh = self.blocks.allocate(1) if partial else []
        assert fresh is not None
        child.block_table = shared + fresh
        child.num_computed = parent.num_computed
        child.num_cached = parent.num_cached
        self.running.append(child)
        return (parent.block_table[full], fresh[0]) if partial else None

    def _grow(self, seq: Sequence, n: int, plan: StepPlan) -> bool:
        """Blocks for n more tokens of a running seq, preempting the newest rows if need
        be; False if seq itself had to go."""
        need = self.blocks_needed(seq.num_computed + n) - len(seq.block_table)
        while need > self.blocks.num_free():
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is seq:
                return False
        if need > 0:
            new = self.blocks.allocate(need)
            assert new is not None
            seq.block_table += new
        return True

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1
        plan.preempted.append(seq.id)

    def _admit(self, seq: Sequence, budget: int) -> ScheduledRow | None:
        """Map seq's cached prefix, allocate blocks for its first chunk, or None (no room)."""
        bs = self.block_size
        hashes = block_hashes(seq.tokens, bs, seq.hashes)
        hit = self.blocks.match_prefix(hashes[:seq.needs_logits_from // bs])
        computed = len(hit) * bs
        n = min(seq.num_tokens - computed, budget)
        need = self.blocks_needed(computed + n) - len(hit)
        if need > self.blocks.num_free() - self.blocks.num_evictable(hit):
            return None
        self.blocks.acquire(hit)
        new = self.blocks.allocate(need)
        assert new is not None
        seq.block_table = hit + new
        seq.num_computed = computed
        if seq.num_cached is None:  # first admission (a preempted request comes back)
            seq.num_cached = computed
            self.prefix_queries += seq.num_prompt
            self.prefix_hits += computed
        return self._row(seq, n)

    def _row(self, seq: Sequence, n: int) -> ScheduledRow:
        bs, start, table = self.block_size, seq.num_computed, seq.block_table
        stop = start + n
        if seq.prompt_logits:  # before the first sample: every position is the prompt's
            logits = range(start, stop)
        elif seq.score_from is None:
            logits = range(stop - 1, stop) if stop == seq.num_tokens else range(0)
        else:
            logits = range(max(start, seq.score_from), min(stop, seq.num_tokens - 1))
        return ScheduledRow(
            id=seq.id, token_ids=seq.tokens[start:stop], start=start, block_table=list(table),
            slots=[table[p // bs] * bs + p % bs for p in range(start, stop)], logits=logits,
            sample=seq.score_from is None and stop == seq.num_tokens)
