"""The continuous-batching engine on the tiny checkpoint: every row's tokens equal its
tokens run alone (and transformers' greedy ones) whatever its batch mates, admission mid-
flight, preemption, prefix-cache hits, aborts, sampling edge cases, scoring, bf16, and two
tensor-parallel ranks stepping in lockstep."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.test_model import hf_greedy
import workers.sampler as sampler_module
from workers.engine import (Completion, Engine, EngineConfig, EngineRequest, GenerationInput,
                            SamplingParams)
from workers.ranks import RankedEngine, follow, launch_local, load_engine, wait_all
from workers.reshard import reshard
from workers.sampler import RowSampling, Sampler
from workers.tp import env_rank, init_distributed

PROMPTS = ["The ship", "Kafka topics are partitioned by key, so every message with the same",
           "A", "Once upon a time there was a small ship that sailed between two islands",
           "Hello Ferry", "Tensor parallel ranks talk through torch distributed, each holding"]


@pytest.fixture(scope="module")
def base(tiny_model: Path) -> Engine:
    return Engine.from_dir(tiny_model)


def variant(base: Engine, **config: object) -> Engine:
    """An engine over the same weights with its own KV cache and budgets."""
    config.setdefault("max_num_seqs", 8)
    return Engine(base.model, base.config, base.tokenizer,
                  engine_config=EngineConfig(**config))  # type: ignore[arg-type]


def req(engine: Engine, rid: str, prompt: str, **params: object) -> EngineRequest:
    return EngineRequest(rid, engine.encode(prompt),
                         SamplingParams(**params))  # type: ignore[arg-type]


def drain(engine: Engine) -> dict[str, Completion]:
    done: dict[str, Completion] = {}
    while engine.has_work():
        done.update((c.id, c) for c in engine.step().finished)
    return done


def alone(engine: Engine, prompt: str, **params: object) -> list[int]:
    [out] = engine.generate([GenerationInput(engine.encode(prompt),
                                             SamplingParams(**params))])  # type: ignore[arg-type]
    return out.output_ids


# ---- batch independence ---------------------------------------------------------------


def test_greedy_rows_match_transformers_whatever_their_batch_mates(tiny_model: Path,
                                                                   base: Engine) -> None:
    engine = variant(base, max_num_batched_tokens=16, max_num_seqs=4, block_size=4)
    lengths = [30, 5, 17, 24, 9, 12]  # chunked prefills, decodes and admissions in one step
    outs = engine.generate([GenerationInput(engine.encode(p), SamplingParams(max_new_tokens=n))
                            for p, n in zip(PROMPTS, lengths)])
    expected = hf_greedy(tiny_model, engine, PROMPTS, 30)
    for out, want, n in zip(outs, expected, lengths):
        assert out.output_ids == want[:n]
    assert any(len(o.output_ids) > 8 for o in outs)


def test_unpacked_linears_give_the_same_greedy_tokens(tiny_model: Path, base: Engine) -> None:
    plain = Engine.from_dir(tiny_model, engine_config=EngineConfig(prepack_weights=False))
    assert plain.model.packed_lm_head is None
    assert base.model.packed_lm_head is not None  # the default packs on CPU
    assert [alone(plain, p, max_new_tokens=8) for p in PROMPTS[:3]] == \
        [alone(base, p, max_new_tokens=8) for p in PROMPTS[:3]]


def test_a_request_added_mid_flight_gets_its_alone_tokens(base: Engine) -> None:
    engine = variant(base, max_num_batched_tokens=24, block_size=4)
    for i, p in enumerate(PROMPTS[:3]):
        engine.add(req(engine, f"r{i}", p, max_new_tokens=20))
    streamed: dict[str, list[int]] = {}
    done: dict[str, Completion] = {}
    for _ in range(5):
        out = engine.step()
        done.update((c.id, c) for c in out.finished)
        for rid, toks in out.new_tokens.items():
            streamed.setdefault(rid, []).extend(toks)
    assert engine.stats().running > 0  # the others are decoding when the new one arrives
    engine.add(req(engine, "late", PROMPTS[3], max_new_tokens=20))
    while engine.has_work():
        out = engine.step()
        done.update((c.id, c) for c in out.finished)
        for rid, toks in out.new_tokens.items():
            streamed.setdefault(rid, []).extend(toks)
    assert done["late"].output_ids == alone(base, PROMPTS[3], max_new_tokens=20)
    for i, p in enumerate(PROMPTS[:3]):
        assert done[f"r{i}"].output_ids == alone(base, p, max_new_tokens=20)
        assert streamed.get(f"r{i}", []) == done[f"r{i}"].output_ids


def test_preempted_requests_resume_with_their_alone_tokens(base: Engine) -> None:
    # 14 blocks of 4 slots: three rows admitted with 3 blocks each, each growing to 10 blocks
    # (10 prompt ids + 30 new tokens), cannot all stay. Token ids, not text: the preemption
    # must not depend on how the test tokenizer happens to split a prompt.
    engine = variant(base, num_blocks=14, block_size=4, max_num_batched_tokens=64)
    prompts = [[(7 * i + 3 * j) % 500 + 2 for j in range(10)] for i in range(3)]
    for i, ids in enumerate(prompts):
        engine.add(EngineRequest(f"p{i}", ids, SamplingParams(max_new_tokens=30)))
    done = drain(engine)
    assert engine.stats().preemptions > 0
    for i, ids in enumerate(prompts):
        [out] = base.generate([GenerationInput(ids, SamplingParams(max_new_tokens=30))])
        assert done[f"p{i}"].output_ids == out.output_ids
    assert engine.stats().kv_cache_usage == 0.0


def _churn(engine: Engine) -> tuple[dict[str, list[int]], list[int]]:
    """Rows of many lengths joining while others leave, n > 1 forks, a prefix shared by two,
    a preempting cache: every path into and out of the decode slab. Also returns the slab's
    row counts seen per step."""
    rows_seen = []
    ids = [[(11 * i + 5 * j) % 500 + 2 for j in range(3 + 7 * i)] for i in range(7)]
    ids.append(ids[6][:20] + [9, 9, 9])  # shares blocks with ids[6]
    for i, prompt in enumerate(ids[:4]):
        engine.add(EngineRequest(f"r{i}", prompt, SamplingParams(max_new_tokens=6 + 9 * i)))
    engine.add(EngineRequest("fork", ids[4], SamplingParams(max_new_tokens=12, n=3,
                                                            temperature=1.0, seed=5)))
    done: dict[str, list[int]] = {}
    steps = 0
    while engine.has_work():
        steps += 1
        if steps == 4:
            for i in (5, 6, 7):
                engine.add(EngineRequest(f"r{i}", ids[i], SamplingParams(max_new_tokens=25)))
        for c in engine.step().finished:
            done[c.id] = c.output_ids + [t for ch in (c.choices or [])[1:]
                                         for t in ch.output_ids]
        if engine.slab is not None:
            rows_seen.append(len(engine.slab.ids))
    return done, rows_seen


def test_decode_slab_gives_the_tokens_of_the_gather_path(base: Engine) -> None:
    kw = dict(num_blocks=40, block_size=4, max_num_batched_tokens=24, max_num_seqs=6)
    gathered, _ = _churn(variant(base, decode_slab_bytes=0, **kw))
    slab_engine = variant(base, **kw)
    on_slab, rows_seen = _churn(slab_engine)
    assert on_slab == gathered
    assert max(rows_seen) >= 4 and slab_engine.stats().preemptions > 0
    # A slab too small for the rows: it empties, the step gathers, the tokens stay.
    tiny = variant(base, decode_slab_bytes=slab_engine.slab.bytes_for(8, 32), **kw)
    on_tiny, tiny_rows = _churn(tiny)
    assert on_tiny == gathered
    assert 0 in tiny_rows[len(tiny_rows) // 2:] and max(tiny_rows) > 0


def test_slab_spans_follow_the_suffix_maximum() -> None:
    from workers.decode_slab import spans
    lengths = [90] * 8 + [40] * 8 + [95] + [10] * 8   # a long row joined last
    assert spans(lengths, 16, 128) == [(0, 17, 96), (17, 25, 16)]
    assert spans(sorted(lengths, reverse=True), 16, 128) == [(0, 9, 96), (9, 17, 48),
                                                              (17, 25, 16)]
    assert spans([5] * 3, 16, 8) == [(0, 3, 8)] and spans([], 16, 8) == []


def test_sorted_slab_spans_give_the_tokens_of_the_gather_path(base: Engine) -> None:
    """Two dozen rows of very different lengths, joining in three waves (each wave breaks
    the slab's length order): attention span by span over a re-sorted slab gives each row
    the tokens and logprobs of the gather path."""
    kw = dict(num_blocks=400, block_size=4, max_num_batched_tokens=64, max_num_seqs=32)
    prompts = [[(13 * i + 7 * j) % 500 + 2 for j in range(2 + (37 * i) % 90)]
               for i in range(24)]

    def run(engine: Engine) -> tuple[dict[str, Completion], int, int]:
        done: dict[str, Completion] = {}
        most_spans = resorts = 0
        for wave in range(3):
            for i in range(wave, 24, 3):
                engine.add(EngineRequest(f"r{i}", prompts[i], SamplingParams(
                    max_new_tokens=8 + i % 5 * 6, logprobs=0)))
            for _ in range(6):
                order = list(engine.slab.ids) if engine.slab is not None else []
                done.update((c.id, c) for c in engine.step().finished)
                if engine.slab is not None:
                    most_spans = max(most_spans, len(engine.slab.spans()))
                    kept = [r for r in order if r in engine.slab.ids]
                    resorts += kept != [r for r in engine.slab.ids if r in kept]
        done.update(drain(engine))
        return done, most_spans, resorts

    gathered, _, _ = run(variant(base, decode_slab_bytes=0, **kw))
    on_slab, most_spans, resorts = run(variant(base, **kw))
    assert len(gathered) == 24 and most_spans >= 2 and resorts >= 1
    for rid, want in gathered.items():
        got = on_slab[rid]
        assert got.output_ids == want.output_ids
        assert [lp.logprob for lp in got.logprobs] == pytest.approx(
            [lp.logprob for lp in want.logprobs], abs=1e-5)


def test_prefix_cache_hit_gives_the_same_tokens_and_counts_cached_tokens(base: Engine) -> None:
    engine = variant(base, block_size=4)
    shared = PROMPTS[3]
    engine.add(req(engine, "first", shared, max_new_tokens=4))
    first = drain(engine)["first"]
    engine.add(req(engine, "second", shared + " and more", max_new_tokens=16))
    second = drain(engine)["second"]
    cold = variant(base, block_size=4, enable_prefix_caching=False)
    assert first.cached_tokens == 0 and second.cached_tokens >= 12
    assert second.output_ids == alone(cold, shared + " and more", max_new_tokens=16)
    stats = engine.stats()
    assert stats.prefix_hits == second.cached_tokens and stats.prefix_queries > stats.prefix_hits


def test_seeded_sampling_is_batch_independent_and_the_seed_matters(base: Engine) -> None:
    engine = variant(base, max_num_batched_tokens=16, block_size=4)
    params: dict = {"max_new_tokens": 12, "temperature": 0.9, "top_p": 0.9, "top_k": 40}
    batch = [GenerationInput(engine.encode(p), SamplingParams(seed=3 + i, **params))
             for i, p in enumerate(PROMPTS)]
    batch.insert(2, GenerationInput(engine.encode(PROMPTS[0]), SamplingParams(temperature=1.0)))
    outs = engine.generate(batch)
    del outs[2]
    for i, (p, out) in enumerate(zip(PROMPTS, outs)):
        assert out.output_ids == alone(base, p, seed=3 + i, **params)
    draws = {tuple(alone(base, PROMPTS[2], seed=s, **params)) for s in range(6)}
    assert len(draws) > 1


@pytest.mark.parametrize("params", [
    {"temperature": 1e-30}, {"temperature": 100.0}, {"temperature": 1.0, "top_p": 1e-30},
    {"temperature": 100.0, "top_p": 1e-30, "seed": 1}, {"temperature": 1e-30, "seed": 5},
    {"temperature": 0.7, "top_k": 1}, {"temperature": 2.0, "top_k": 10_000, "seed": 2},
])
def test_extreme_sampling_params_still_give_tokens(base: Engine, params: dict) -> None:
    [out] = base.generate([GenerationInput(base.encode(PROMPTS[1]),
                                           SamplingParams(max_new_tokens=6, **params))])
    assert out.finish_reason in ("stop", "length")
    assert all(0 <= t < base.config.vocab_size for t in out.output_ids)
    if params.get("temperature") == 1e-30 or params.get("top_k") == 1 \
            or params.get("top_p") == 1e-30:  # one candidate left: the greedy token
        assert out.output_ids == alone(base, PROMPTS[1], max_new_tokens=6)


def test_a_failing_row_fails_alone(base: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.multinomial

    def flaky(probs: torch.Tensor, n: int, generator: torch.Generator | None = None):
        if generator is not None and generator.initial_seed() == 666:
            raise RuntimeError("injected failure")
        return real(probs, n, generator=generator)

    monkeypatch.setattr(sampler_module.torch, "multinomial", flaky)
    engine = variant(base)
    engine.add(req(engine, "bad", PROMPTS[0], max_new_tokens=8, temperature=1.0, seed=666))
    engine.add(req(engine, "good", PROMPTS[0], max_new_tokens=8, temperature=1.0, seed=7))
    engine.add(req(engine, "greedy", PROMPTS[1], max_new_tokens=8))
    done = drain(engine)
    assert done["bad"].finish_reason == "error" and "injected" in (done["bad"].error or "")
    assert done["good"].output_ids == alone(base, PROMPTS[0], max_new_tokens=8,
                                            temperature=1.0, seed=7)
    assert done["greedy"].output_ids == alone(base, PROMPTS[1], max_new_tokens=8)
    assert done["greedy"].error is None


def test_sampler_nan_rows_fail_alone_and_degenerate_rows_fall_back_to_argmax() -> None:
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.randn(4, 50)
    logits[1] = float("nan")
    logits[2, 7] = float("inf")  # softmax(inf / T) is nan: fall back to the argmax
    rows = [RowSampling(), RowSampling(1.0), RowSampling(1.0), RowSampling(0.5, 0.5, 3)]
    out = sampler(logits, rows)
    assert list(out.errors) == [1]
    assert out.tokens[0] == int(logits[0].argmax()) and out.tokens[2] == 7
    assert out.tokens[3] in logits[3].topk(3).indices.tolist()


# ---- aborts, validation, scoring, dtypes ----------------------------------------------


def test_abort_frees_the_blocks_and_says_abort(base: Engine) -> None:
    engine = variant(base, block_size=4)
    engine.add(req(engine, "a", PROMPTS[1], max_new_tokens=30))
    engine.add(req(engine, "w", PROMPTS[2], max_new_tokens=30))
    engine.step()
    engine.step()
    assert engine.stats().kv_cache_usage > 0
    aborted = engine.abort("a")
    assert aborted is not None and aborted.finish_reason == "abort"
    assert len(aborted.output_ids) == 2  # one token per step so far
    assert engine.abort("a") is None and engine.abort("never") is None
    assert engine.abort("w") is not None
    assert engine.stats().kv_cache_usage == 0.0 and not engine.has_work()


def test_check_names_the_field_before_any_compute(base: Engine) -> None:
    engine = variant(base)
    bad = [(EngineRequest("e", [], SamplingParams()), "empty"),
           (EngineRequest("v", [engine.config.vocab_size], SamplingParams()), "vocabulary"),
           (EngineRequest("c", [5] * 250, SamplingParams(max_new_tokens=7)), "context"),
           (EngineRequest("t", [5], SamplingParams(temperature=-1)), "temperature"),
           (EngineRequest("p", [5], SamplingParams(top_p=0)), "top_p"),
           (EngineRequest("k", [5], SamplingParams(top_k=-1)), "top_k"),
           (EngineRequest("m", [5], SamplingParams(max_new_tokens=-1)), "max_new_tokens"),
           (EngineRequest("s", [5], SamplingParams(), score_ids=[]), "score_ids")]
    for request, field in bad:
        with pytest.raises(ValueError, match=field):
            engine.add(request)
    engine.add(EngineRequest("dup", [5], SamplingParams()))
    with pytest.raises(ValueError, match="id"):
        engine.add(EngineRequest("dup", [6], SamplingParams()))
    with pytest.raises(ValueError, match="KV blocks"):
        variant(base, num_blocks=2, block_size=4).check(
            EngineRequest("big", [5] * 8, SamplingParams(max_new_tokens=4)))
    assert engine.stats().waiting == 1


def test_zero_new_tokens_finish_at_once(base: Engine) -> None:
    engine = variant(base)
    engine.add(req(engine, "z", PROMPTS[0], max_new_tokens=0))
    [done] = engine.step().finished
    assert done.finish_reason == "length" and done.output_ids == []


def test_scoring_matches_a_hand_computation_across_chunks_and_cache_hits(base: Engine) -> None:
    prompt, target = base.encode(PROMPTS[3]), base.encode(" and then the ferry left")[1:]
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logits = base.model(ids, torch.arange(ids.shape[1])[None])[0]
    logprobs = torch.log_softmax(logits.float(), -1)[len(prompt) - 1:-1]
    want = float(logprobs.gather(-1, torch.tensor(target)[:, None]).mean())
    engine = variant(base, max_num_batched_tokens=8, block_size=4)
    assert engine.score(prompt, target) == pytest.approx(want, abs=1e-4)
    assert engine.score(prompt, target) == pytest.approx(want, abs=1e-4)  # prefix cache hit
    assert engine.stats().prefix_hits > 0
    # Scoring and generating share steps without disturbing each other.
    engine.add(EngineRequest("s", prompt, SamplingParams(), score_ids=target))
    engine.add(req(engine, "g", PROMPTS[1], max_new_tokens=10))
    done = drain(engine)
    assert done["s"].score == pytest.approx(want, abs=1e-4) and done["s"].output_ids == []
    assert done["g"].output_ids == alone(base, PROMPTS[1], max_new_tokens=10)


def test_bf16_engine_runs_with_bf16_pools(tiny_model: Path) -> None:
    engine = Engine.from_dir(tiny_model, dtype=torch.bfloat16,
                             engine_config=EngineConfig(block_size=4, max_num_seqs=4,
                                                        max_num_batched_tokens=16))
    assert engine.pools.layers[0][0].dtype == torch.bfloat16
    outs = engine.generate([GenerationInput(engine.encode(p), SamplingParams(
        max_new_tokens=8, temperature=0.8, seed=1)) for p in PROMPTS[:3]])
    assert all(o.finish_reason in ("stop", "length") for o in outs)
    assert any(o.output_ids for o in outs)
    assert engine.score(engine.encode(PROMPTS[0]), engine.encode(" ship")[1:]) < 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_op_threads_change_speed_only(tiny_model: Path, dtype: torch.dtype) -> None:
    """Norms, RoPE and gathers on one thread, matmuls on all: the same tokens and scores as
    everything on all threads, and torch's thread count is back after every step."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for threads in (None, 1):
            engine = Engine.from_dir(tiny_model, dtype=dtype, engine_config=EngineConfig(
                block_size=4, max_num_seqs=4, max_num_batched_tokens=16,
                small_op_threads=threads))
            outs = engine.generate([GenerationInput(engine.encode(p), SamplingParams(
                max_new_tokens=8)) for p in PROMPTS])
            assert torch.get_num_threads() == 2
            results.append(([o.output_ids for o in outs],
                            engine.score(engine.encode(PROMPTS[1]), engine.encode(" key")[1:])))
        assert results[0] == results[1]
    finally:
        torch.set_num_threads(before)


# ---- tensor-parallel lockstep -----------------------------------------------------------


class _Recording(Engine):
    """A follower that keeps what its steps and aborts finished, to compare with rank 0's."""

    finished: list[Completion]

    def step(self):  # type: ignore[override]
        out = super().step()
        self.finished = getattr(self, "finished", []) + out.finished
        return out

    def abort(self, request_id: str) -> Completion | None:
        out = super().abort(request_id)
        self.finished = getattr(self, "finished", []) + ([out] if out else [])
        return out


def _protocol(engine: Engine | RankedEngine) -> list[Completion]:
    """Adds, steps, a mid-flight add, an abort and a score; returns what finished."""
    tok = engine.tokenizer
    assert tok is not None
    greedy, sampled = SamplingParams(max_new_tokens=10), SamplingParams(
        max_new_tokens=10, temperature=0.9, top_k=20)
    engine.add(EngineRequest("g", tok.encode(PROMPTS[1]), greedy))
    engine.add(EngineRequest("u", tok.encode(PROMPTS[2]), sampled))  # unseeded: rank 0 seeds it
    engine.add(EngineRequest("x", tok.encode(PROMPTS[4]), greedy))
    engine.add(EngineRequest("s", tok.encode(PROMPTS[3]), SamplingParams(),
                             score_ids=tok.encode(PROMPTS[5])[1:]))
    done = engine.step().finished + engine.step().finished
    engine.add(EngineRequest("late", tok.encode(PROMPTS[0]), greedy))
    aborted = engine.abort("x")
    assert aborted is not None
    done.append(aborted)
    while engine.has_work():
        done += engine.step().finished
    return sorted(done, key=lambda c: c.id)


def _tp_rank(model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    rank, world = env_rank()
    engine = load_engine(model_dir, rank, world,
                         engine_config=EngineConfig(max_num_seqs=4, max_num_batched_tokens=12,
                                                    block_size=4))
    init_distributed(timeout_s=20, startup_timeout_s=60)
    if rank == 0:
        ranked = RankedEngine(engine, timeout_s=20)
        done = _protocol(ranked)
        ranked.close()
    else:
        follower = _Recording(engine.model, engine.config, engine.tokenizer,
                              engine_config=engine.engine_config)
        follow(follower)
        done = sorted(follower.finished, key=lambda c: c.id)
    Path(out, f"rank{rank}.json").write_text(json.dumps([dataclasses.asdict(c) for c in done]))
    torch.distributed.destroy_process_group()


def test_tp2_ranks_step_in_lockstep_and_match_one_process(tiny_model: Path,
                                                          tmp_path: Path) -> None:
    sliced = reshard(tiny_model, 2, tmp_path / "tp2")
    assert wait_all(launch_local(2, _tp_rank, str(sliced), str(tmp_path)), 120) == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank finished the same rows with the same tokens
    by_id = {c["id"]: c for c in ranks[0]}
    assert by_id["x"]["finish_reason"] == "abort" and by_id["u"]["output_ids"]
    solo = Engine.from_dir(tiny_model, engine_config=EngineConfig(
        max_num_seqs=4, max_num_batched_tokens=12, block_size=4))
    expected = {c.id: c for c in _protocol(solo)}
    for rid in ("g", "late", "x"):
        assert by_id[rid]["output_ids"] == expected[rid].output_ids
    assert by_id["s"]["score"] == pytest.approx(expected["s"].score, abs=1e-4)
