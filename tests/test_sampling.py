"""Sampling features per row in one batch: each logits processor against transformers' own
(or a hand computation), the engine's greedy runs against transformers' generate with the
same processor, and a row's tokens never depending on its batch mates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (LlamaForCausalLM, MinNewTokensLengthLogitsProcessor,
                          MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper)

from workers.engine import Engine, EngineConfig, EngineRequest, GenerationInput, SamplingParams
from workers.sampler import History, RowSampling, Sampler, _filtered_probs, process

PROMPTS = ["The ship", "Kafka topics are partitioned by key, so every message with the same",
           "A", "Once upon a time there was a small ship that sailed between two islands"]
VOCAB = 64


@pytest.fixture(scope="module")
def base(tiny_model: Path) -> Engine:
    return Engine.from_dir(tiny_model)


@pytest.fixture(scope="module")
def hf(tiny_model: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def fresh(base: Engine) -> Engine:
    return Engine(base.model, base.config, base.tokenizer,
                  engine_config=EngineConfig(max_num_seqs=8))


def alone(engine: Engine, prompt: str, **params: object) -> list[int]:
    [out] = engine.generate([GenerationInput(engine.encode(prompt),
                                             SamplingParams(**params))])  # type: ignore[arg-type]
    return out.output_ids


def hf_generate(hf: LlamaForCausalLM, engine: Engine, prompt: str, n: int,
                **kwargs: object) -> list[int]:
    x = torch.tensor([engine.encode(prompt)])
    eos = engine.config.eos_token_id
    new = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                      pad_token_id=eos, **kwargs)[0, x.shape[1]:].tolist()
    return new[:new.index(eos)] if eos in new else new


# ---- each processor against transformers or by hand ------------------------------------

def _history(rows: int) -> list[History]:
    g = torch.Generator().manual_seed(1)
    return [History(torch.randint(0, VOCAB, (5,), generator=g).tolist(),
                    torch.randint(0, VOCAB, (i + 2,), generator=g).tolist()) for i in range(rows)]


def test_repetition_penalty_matches_transformers() -> None:
    logits = torch.randn(3, VOCAB)
    hist = _history(3)
    rows = [RowSampling(repetition_penalty=1.3), RowSampling(),
            RowSampling(repetition_penalty=0.7)]
    ours = process(logits.clone(), rows, hist)
    for i, r in enumerate(rows):
        ids = torch.tensor([list(hist[i].prompt) + list(hist[i].output)])
        want = RepetitionPenaltyLogitsProcessor(r.repetition_penalty)(ids, logits[i:i + 1].clone())
        torch.testing.assert_close(ours[i], want[0])


def test_presence_and_frequency_penalties_by_hand() -> None:
    logits = torch.randn(2, VOCAB)
    hist = [History([3, 3, 3], [5, 5, 9]), History([5], [1])]
    rows = [RowSampling(presence_penalty=0.5, frequency_penalty=0.25),
            RowSampling(frequency_penalty=-2.0)]
    ours = process(logits.clone(), rows, hist)
    want = logits.clone()
    want[0, 5] -= 0.5 + 2 * 0.25      # twice in the completion
    want[0, 9] -= 0.5 + 0.25
    want[1, 1] -= -2.0                # the prompt's tokens are never penalised
    torch.testing.assert_close(ours, want)


def test_logit_bias_and_min_tokens() -> None:
    logits = torch.randn(3, VOCAB)
    hist = [History([1], [2]), History([1], [2, 3]), History([1], [])]
    rows = [RowSampling(logit_bias=((4, -100.0), (7, 2.5))),
            RowSampling(min_tokens=2, banned=(0, 9)),       # reached: nothing masked
            RowSampling(min_tokens=2, banned=(0, 9))]
    ours = process(logits.clone(), rows, hist)
    want = logits.clone()
    want[0, 4] -= 100
    want[0, 7] += 2.5
    torch.testing.assert_close(ours[:2], want[:2])
    ids = torch.tensor([[1]])
    masked = MinNewTokensLengthLogitsProcessor(1, 2, [0, 9])(ids, logits[2:3].clone())
    assert torch.equal(ours[2], masked[0])


@pytest.mark.parametrize("temperature, top_k, min_p", [(0.7, 5, 0.0), (1.3, 0, 0.2),
                                                       (1.0, 10, 0.05)])
def test_top_k_and_min_p_keep_what_transformers_keeps(temperature: float, top_k: int,
                                                      min_p: float) -> None:
    logits = torch.randn(1, VOCAB) * 3
    probs = _filtered_probs(logits, [RowSampling(temperature, top_k=top_k, min_p=min_p)])
    x = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if min_p:
        x = MinPLogitsWarper(min_p)(None, x)
    assert torch.equal(probs[0] > 0, x[0].isfinite())
    torch.testing.assert_close(probs[0], x[0].softmax(-1))


def test_a_step_without_processors_leaves_the_logits_alone(monkeypatch) -> None:
    import workers.sampler as sampler_module
    monkeypatch.setattr(sampler_module, "process", lambda *a: pytest.fail("processed"))
    logits = torch.randn(2, VOCAB)
    out = Sampler(torch.device("cpu"), seed=0)(logits, [RowSampling(), RowSampling(0.8)])
    assert out.tokens[0] == int(logits[0].argmax())


# ---- the engine against transformers' generate ---------------------------------------

def test_greedy_repetition_penalty_and_bias_match_transformers(base: Engine,
                                                               hf: LlamaForCausalLM) -> None:
    for prompt in PROMPTS[:2]:
        assert (alone(base, prompt, max_new_tokens=12, repetition_penalty=1.5)
                == hf_generate(hf, base, prompt, 12, repetition_penalty=1.5))
        first = alone(base, prompt, max_new_tokens=1)[0]
        biased = alone(base, prompt, max_new_tokens=8, logit_bias=((first, -100.0),))
        assert biased[0] != first
        assert biased == hf_generate(hf, base, prompt, 8, sequence_bias={(first,): -100.0})


def test_penalties_change_greedy_output(base: Engine) -> None:
    plain = alone(base, PROMPTS[3], max_new_tokens=24)
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself
    pres = alone(base, PROMPTS[3], max_new_tokens=24, presence_penalty=2.0)
    assert pres != plain
    freq = alone(base, PROMPTS[3], max_new_tokens=24, frequency_penalty=2.0)
    assert freq != plain


def test_stop_token_ids_min_tokens_and_ignore_eos(base: Engine) -> None:
    plain = alone(base, PROMPTS[0], max_new_tokens=10)
    [out] = base.generate([GenerationInput(base.encode(PROMPTS[0]), SamplingParams(
        max_new_tokens=10, stop_token_ids=(plain[2],)))])
    cut = plain.index(plain[2])
    assert out.output_ids == plain[:cut] and out.finish_reason == "stop"
    # min_tokens: the stop id cannot come first, so the first token is the runner-up
    held = alone(base, PROMPTS[0], max_new_tokens=4, stop_token_ids=(plain[0],), min_tokens=2)
    assert held[0] != plain[0] and len(held) >= 2
    runner_up = alone(base, PROMPTS[0], max_new_tokens=1, logit_bias=((plain[0], -100.0),))
    assert held[0] == runner_up[0]
    # ignore_eos: eos biased to the top is output like any other token, to max_new_tokens
    eos = base.config.eos_token_id
    [forced] = base.generate([GenerationInput(base.encode(PROMPTS[0]), SamplingParams(
        max_new_tokens=3, logit_bias=((eos, 100.0),), ignore_eos=True))])
    assert forced.output_ids == [eos] * 3 and forced.finish_reason == "length"
    [stopped] = base.generate([GenerationInput(base.encode(PROMPTS[0]), SamplingParams(
        max_new_tokens=3, logit_bias=((eos, 100.0),), min_tokens=2))])
    assert len(stopped.output_ids) == 2 and stopped.finish_reason == "stop"


# ---- logprobs --------------------------------------------------------------------------

def test_logprobs_are_the_raw_model_distribution(base: Engine, hf: LlamaForCausalLM) -> None:
    """Completion and prompt logprobs equal transformers' log_softmax at every position, before
    the processors (the repetition penalty changes the tokens, not the logprobs)."""
    engine = fresh(base)  # a cached prefix would skip the prompt's logits
    ids = engine.encode(PROMPTS[1])
    [out] = engine.generate([GenerationInput(ids, SamplingParams(
        max_new_tokens=6, repetition_penalty=1.3, logprobs=5, prompt_logprobs=3))])
    engine_c = engine._run([EngineRequest("again", ids, SamplingParams(
        max_new_tokens=6, repetition_penalty=1.3, logprobs=5, prompt_logprobs=3))])["again"]
    assert engine_c.output_ids == out.output_ids
    full = ids + out.output_ids
    with torch.no_grad():
        lp = hf(torch.tensor([full])).logits[0].float().log_softmax(-1)
    assert engine_c.logprobs is not None and engine_c.prompt_logprobs is not None
    assert len(engine_c.logprobs) == len(out.output_ids)
    assert len(engine_c.prompt_logprobs) == len(ids) - 1
    for pos, entry in enumerate(engine_c.prompt_logprobs + engine_c.logprobs):
        assert entry.token == full[pos + 1]
        torch.testing.assert_close(entry.logprob, float(lp[pos, entry.token]), atol=1e-4,
                                   rtol=1e-4)
        k = len(entry.top)
        assert k == (3 if pos + 1 < len(ids) else 5)
        assert [t for t, _ in entry.top] == lp[pos].topk(k).indices.tolist()


def test_logprobs_through_prefill_chunks_and_a_cached_prefix(base: Engine) -> None:
    """Chunked prefill still gives every prompt position once; a prompt_logprobs request
    takes no prefix-cache hit."""
    engine = Engine(base.model, base.config, base.tokenizer,
                    engine_config=EngineConfig(max_num_seqs=4, max_num_batched_tokens=8))
    ids = engine.encode(PROMPTS[3])
    warm = engine._run([EngineRequest("warm", ids, SamplingParams(max_new_tokens=2))])["warm"]
    done = engine._run([EngineRequest("lp", ids, SamplingParams(
        max_new_tokens=2, prompt_logprobs=0, logprobs=0))])["lp"]
    assert done.output_ids == warm.output_ids and done.cached_tokens == 0
    assert [e.token for e in done.prompt_logprobs or []] == ids[1:]
    assert all(e.top == () for e in done.prompt_logprobs or [])


# ---- batch independence ---------------------------------------------------------------

MIXED = [dict(max_new_tokens=10, repetition_penalty=1.4),
         dict(max_new_tokens=10, temperature=0.9, seed=3, presence_penalty=1.0, top_k=8),
         dict(max_new_tokens=10),
         dict(max_new_tokens=10, temperature=1.2, seed=5, min_p=0.1, frequency_penalty=0.5,
              logit_bias=((5, 3.0),)),
         dict(max_new_tokens=10, min_tokens=4, stop_token_ids=(7,)),
         dict(max_new_tokens=10, temperature=0.7, seed=11, top_p=0.8, logprobs=3),
         dict(max_new_tokens=10, temperature=1.0, seed=21, n=3, presence_penalty=0.4)]


def test_rows_never_depend_on_their_batch_mates(base: Engine) -> None:
    engine = fresh(base)
    for i, params in enumerate(MIXED):
        engine.add(EngineRequest(f"r{i}", engine.encode(PROMPTS[i % 4]),
                                 SamplingParams(**params)))  # type: ignore[arg-type]
    done = {}
    while engine.has_work():
        done.update((c.id, c) for c in engine.step().finished)
    for i, params in enumerate(MIXED):
        assert done[f"r{i}"].output_ids == alone(base, PROMPTS[i % 4], **params), params
    alone_n = base._run([EngineRequest("n", base.encode(PROMPTS[(len(MIXED) - 1) % 4]),
                                       SamplingParams(**MIXED[-1]))])["n"]  # type: ignore[arg-type]
    assert done[f"r{len(MIXED) - 1}"].choices == alone_n.choices


# ---- validation -----------------------------------------------------------------------

@pytest.mark.parametrize("params, field", [
    (dict(min_p=1.5), "min_p"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(logit_bias=((10**6, 1.0),)), "logit_bias: token 1000000"),
    (dict(logit_bias=((1, 101.0),)), "logit_bias: bias 101"),
    (dict(stop_token_ids=(10**6,)), "stop_token_ids"),
    (dict(min_tokens=20, max_new_tokens=4), "min_tokens"),
])
def test_bad_params_name_the_field(base: Engine, params: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        base.check(EngineRequest("x", [1, 2], SamplingParams(**params)))  # type: ignore[arg-type]


# ---- n > 1: parallel samples over one prefill -----------------------------------------

def test_n_samples_fork_one_prefill(base: Engine) -> None:
    """Sample j of a seeded n=4 request is exactly the n=1 request seeded with
    sample_seed(seed, j): the forked KV (shared full blocks, copied partial block) is the
    prompt's; the prompt is computed once."""
    from workers.engine import sample_seed
    engine = Engine(base.model, base.config, base.tokenizer,
                    engine_config=EngineConfig(max_num_seqs=8, block_size=4,
                                               enable_prefix_caching=False))
    ids = engine.encode(PROMPTS[1])
    assert len(ids) % 4  # a partial last block to copy
    params = dict(max_new_tokens=8, temperature=1.0, seed=42)
    engine.add(EngineRequest("n4", ids, SamplingParams(n=4, logprobs=1, **params)))
    engine.step()  # the prefill: one row, then four
    assert len(engine.scheduler.running) == 4
    tables = [s.block_table for s in engine.scheduler.running]
    full = len(ids) // 4
    assert all(t[:full] == tables[0][:full] for t in tables)          # shared
    assert len({t[full] for t in tables}) == 4                         # copied, one each
    assert all(engine.blocks.ref_count(b) == 4 for b in tables[0][:full])
    done = {}
    while engine.has_work():
        done.update((c.id, c) for c in engine.step().finished)
    c = done["n4"]
    assert [ch.index for ch in c.choices] == [0, 1, 2, 3]
    for j, ch in enumerate(c.choices):
        want = alone(base, PROMPTS[1], **{**params, "seed": sample_seed(42, j)})
        assert ch.output_ids == want, j
        assert len(ch.logprobs) == len(ch.output_ids)
    assert c.output_ids == c.choices[0].output_ids and c.logprobs == c.choices[0].logprobs
    assert len({tuple(ch.output_ids) for ch in c.choices}) > 1
    assert engine.blocks.usage() == 0


def test_best_of_returns_the_most_likely(base: Engine) -> None:
    engine = fresh(base)
    params = dict(max_new_tokens=6, temperature=1.5, seed=7)
    [all5] = [engine._run([EngineRequest("a", engine.encode(PROMPTS[0]), SamplingParams(
        n=5, logprobs=0, **params))])["a"]]
    [best] = [engine._run([EngineRequest("b", engine.encode(PROMPTS[0]), SamplingParams(
        n=2, best_of=5, **params))])["b"]]
    ranked = sorted(all5.choices, key=lambda ch: -ch.cumulative_logprob)[:2]
    assert [ch.output_ids for ch in best.choices] == [ch.output_ids for ch in ranked]
    assert [ch.index for ch in best.choices] == [0, 1] and best.logprobs is None


def test_n_with_no_free_block_recomputes_and_aborts_whole(base: Engine) -> None:
    """4 blocks of 4 slots, an 11-token prompt in 3: the first fork takes the last free
    block, the second waits and is recomputed; preemptions follow. Greedy samples agree."""
    engine = Engine(base.model, base.config, base.tokenizer,
                    engine_config=EngineConfig(max_num_seqs=4, block_size=4, num_blocks=4))
    prompt = "Once upon a time there was"
    ids = engine.encode(prompt)
    assert len(ids) == 11
    greedy = alone(base, prompt, max_new_tokens=4)
    engine.add(EngineRequest("g", ids, SamplingParams(n=3, max_new_tokens=4)))
    engine.step()
    assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 1
    done = {}
    while engine.has_work():
        done.update((c.id, c) for c in engine.step().finished)
    assert [ch.output_ids for ch in done["g"].choices] == [greedy] * 3
    engine.add(EngineRequest("x", ids, SamplingParams(n=3, max_new_tokens=4)))
    engine.step()
    aborted = engine.abort("x")
    assert aborted is not None and aborted.finish_reason == "abort"
    assert not engine.has_work() and engine.blocks.usage() == 0
    with pytest.raises(ValueError, match="n: must be"):
        engine.check(EngineRequest("y", ids, SamplingParams(n=3, best_of=2)))
