"""The scheduler without a model: budgets, chunked prefill, admission, preemption, exits.

A fake runner plays the engine: after each `schedule` it calls `update`, then "samples"
token 7 for every row that reached its end, finishing rows at their `max_new_tokens`.
"""

from __future__ import annotations

import pytest

from workers.kv_cache import BlockManager
from workers.scheduler import Scheduler, Sequence, StepPlan


def make(num_blocks: int = 64, block_size: int = 4, seqs: int = 8, tokens: int = 16,
         prefix_caching: bool = True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size, prefix_caching), seqs, tokens)


def seq(rid: str, n: int, first: int = 100) -> Sequence:
    return Sequence(rid, list(range(first, first + n)), n)


def run_step(s: Scheduler, limits: dict[str, int]) -> StepPlan:
    """One step with the fake runner; rows finish after limits[id] generated tokens."""
    plan = s.schedule()
    s.update(plan)
    for row in plan.rows:
        if row.sample:
            got = s.get(row.id)
            assert got is not None
            if got.num_tokens - got.num_prompt + 1 >= limits[row.id]:
                s.finish(row.id)
            else:
                s.append(row.id, 7)
    return plan


def fed(plan: StepPlan) -> dict[str, int]:
    return {r.id: len(r.token_ids) for r in plan.rows}


def test_chunked_prefill_respects_the_token_budget_and_decodes_go_on() -> None:
    s = make(tokens=16)
    s.add(seq("a", 5))
    assert fed(run_step(s, {"a": 100})) == {"a": 5}
    s.add(seq("long", 40, first=500))
    plans = [run_step(s, {"a": 100, "long": 100}) for _ in range(3)]
    # "a" decodes one token every step; "long" gets what the budget leaves, chunk by chunk.
    assert [fed(p) for p in plans] == [{"a": 1, "long": 15}, {"a": 1, "long": 15},
                                       {"a": 1, "long": 10}]
    assert all(p.num_tokens <= 16 for p in plans)
    last = plans[-1].rows[1]
    assert last.start == 30 and last.sample and list(last.logits) == [39]
    assert not plans[0].rows[1].sample and not plans[0].rows[1].logits


def test_rows_budget_and_admission_mid_flight() -> None:
    s = make(seqs=2, tokens=32)
    for rid in "abc":
        s.add(seq(rid, 3))
    assert fed(run_step(s, dict.fromkeys("abc", 3))) == {"a": 3, "b": 3}
    assert [q.id for q in s.waiting] == ["c"]
    s.add(seq("d", 2))
    assert fed(run_step(s, dict.fromkeys("abcd", 3))) == {"a": 1, "b": 1}
    # a and b finish at their third token: their seats go to c and d in the very next step.
    assert fed(run_step(s, dict.fromkeys("abcd", 3))) == {"a": 1, "b": 1}
    assert fed(run_step(s, dict.fromkeys("abcd", 3))) == {"c": 3, "d": 2}
    assert s.blocks.usage() == 2 / 64


def test_a_finished_row_frees_its_blocks_at_once() -> None:
    s = make(num_blocks=5, block_size=4, seqs=4, tokens=32)
    s.add(seq("a", 12))
    s.add(seq("b", 4))
    run_step(s, {"a": 1, "b": 5})
    # a gave its 3 blocks back at once; b keeps 1
    assert s.get("a") is None and s.blocks.usage() == pytest.approx(1 / 5)
    s.add(seq("c", 12, first=300))
    assert fed(run_step(s, {"b": 5, "c": 5})) == {"b": 1, "c": 12}


def test_blocks_running_out_preempt_the_newest_row_and_it_resumes() -> None:
    s = make(num_blocks=4, block_size=4, seqs=4, tokens=32, prefix_caching=False)
    s.add(seq("old", 7))
    s.add(seq("new", 7, first=200))
    limits = {"old": 6, "new": 6}
    assert fed(run_step(s, limits)) == {"old": 7, "new": 7}   # 2 blocks each: all 4 used
    assert fed(run_step(s, limits)) == {"old": 1, "new": 1}   # tokens 8: still in block 2
    plan = run_step(s, limits)                                 # old's 9th token needs block 3
    assert plan.preempted == ["new"] and fed(plan) == {"old": 1}
    assert s.preemptions == 1 and [q.id for q in s.waiting] == ["new"]
    back = s.get("new")
    assert back is not None and back.num_computed == 0 and not back.block_table
    assert back.tokens[7:] == [7, 7]  # the generated tokens stay and are recomputed
    while s.has_work():
        plan = run_step(s, limits)
        if "new" in fed(plan) and fed(plan)["new"] > 1:
            resumed = plan.rows[0]
            assert resumed.start == 0 and resumed.token_ids == back.tokens[:9]
    assert s.blocks.usage() == 0.0


def test_the_only_row_never_preempts_itself_into_a_loop() -> None:
    s = make(num_blocks=2, block_size=4, seqs=2, tokens=32)
    s.add(seq("a", 3))
    limits = {"a": 6}
    steps = 0
    while s.has_work():
        run_step(s, limits)
        steps += 1
    assert steps == 6 and s.preemptions == 0


def test_prefix_cache_serves_full_blocks_and_computes_at_least_the_last_token() -> None:
    s = make(block_size=4, tokens=64)
    s.add(seq("a", 10))
    run_step(s, {"a": 1})  # a finishes; its 2 full blocks stay cached
    s.add(seq("b", 10))
    plan = run_step(s, {"b": 1})
    assert plan.rows[0].start == 8 and len(plan.rows[0].token_ids) == 2
    s.add(seq("c", 8))  # fully cached prompt: the last block is recomputed for its logits
    plan = run_step(s, {"c": 1})
    assert plan.rows[0].start == 4 and plan.rows[0].token_ids == [104, 105, 106, 107]
    assert (s.prefix_queries, s.prefix_hits) == (28, 8 + 4)
    assert s.get("b") is None


def test_score_rows_want_logits_from_the_last_prompt_token_across_chunks() -> None:
    s = make(block_size=4, seqs=2, tokens=6)
    s.add(Sequence("s", list(range(10)), 4, score_from=3))
    plans = [run_step(s, {}) for _ in range(2)]
    assert [list(p.rows[0].logits) for p in plans] == [[3, 4, 5], [6, 7, 8]]
    assert not any(r.sample for p in plans for r in p.rows)
    got = s.get("s")
    assert got is not None and got.num_computed == 10


def test_slots_follow_the_block_table() -> None:
    s = make(block_size=4, tokens=16)
    s.add(seq("a", 6))
    [row] = s.schedule().rows
    t = row.block_table
    assert row.slots == [t[0] * 4 + i for i in range(4)] + [t[1] * 4, t[1] * 4 + 1]
    assert row.start == 0 and list(row.logits) == [5]


def test_duplicate_ids_and_bad_budgets_are_refused() -> None:
    s = make()
    s.add(seq("a", 2))
    with pytest.raises(ValueError, match="already"):
        s.add(seq("a", 2))
    with pytest.raises(ValueError):
        make(seqs=8, tokens=4)


def test_finish_unknown_or_waiting() -> None:
    s = make()
    assert s.finish("nope") is None
    s.add(seq("w", 3))
    assert s.finish("w") is not None and not s.has_work()
