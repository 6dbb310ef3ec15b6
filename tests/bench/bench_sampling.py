"""Sampling benchmark: what the per-row sampling features cost the engine, and what a shared
prefill saves for n > 1, in one run on the engine benchmark's checkpoint and workloads.

Run: `.venv/bin/python -m tests.bench.bench_sampling` (flags: `--quick` for a smoke test on
the tiny model, `--rounds N` (default 2), `--dtype fp32|bf16` (default bf16)). Results go to
tests/bench/results/sampling.json (`--quick`: ~/.ferry/bench-logs/sampling-quick.json).
`--requests N` takes the mixed workload's first N requests only (a shared 2-core box: the
full 64 on the full model take many minutes per run under load).

Two comparisons, each A/B alternated in every round on one engine (same weights, same
process, 2 torch threads; ratios of medians over rounds):
- processors: the engine benchmark's mixed workload (64 requests, long-tailed prompt and
  output lengths, all at once) decoded greedily, plainly vs. with presence 0.5, frequency
  0.3 and repetition 1.1 penalties, 16 logit_bias entries and logprobs=5 on every row.
  Greedy both ways and the checkpoint has no eos, so both generate exactly the same number
  of tokens. Goal: tokens/s ratio >= 0.9.
- n=4: 4 prompts of 512 tokens, 32 new tokens, temperature 1, each as one request with
  n=4 (one prefill, forked) vs. four separate requests, with prefix caching on and off.
  Wall time to the last token; goal: >= 2x faster. With prefix caching on, four separate
  requests share most of the prefill too: the step's token budget (512) admits one 512-token
  prompt a step, whose full blocks are cached before the next is admitted; only the partial
  last block and the extra admission steps differ. Without it each computes its prompt. The
  gain is the prefill saved: with short prompts and long outputs both do the same decode
  work and the ratio tends to 1.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from tests.bench.bench_engine import (DTYPES, FERRY_ENGINE_CONFIG, FULL_MODEL, QUICK_MODEL,
                                      SEED, _set_threads, ensure_checkpoint, make_workload)
from tests.bench.common import write_results

RESULTS = Path(__file__).parent / "results" / "sampling.json"
QUICK_RESULTS = Path.home() / ".ferry" / "bench-logs" / "sampling-quick.json"


def processed_params(rng: random.Random, vocab: int, max_new: int):
    from workers.engine import SamplingParams
    bias = tuple((rng.randrange(vocab), rng.uniform(-5, 5)) for _ in range(16))
    return SamplingParams(max_new_tokens=max_new, presence_penalty=0.5, frequency_penalty=0.3,
                          repetition_penalty=1.1, logit_bias=bias, logprobs=5)


def run(engine, requests) -> tuple[float, int]:
    """Wall seconds until every request finished, and the tokens generated."""
    from workers.engine import EngineRequest
    t0 = time.perf_counter()
    for rid, ids, params in requests:
        engine.add(EngineRequest(rid, ids, params))
    tokens = 0
    while engine.has_work():
        for c in engine.step().finished:
            tokens += sum(len(ch.output_ids) for ch in c.choices) if c.choices \
                else len(c.output_ids)
    return time.perf_counter() - t0, tokens


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Ferry sampling benchmark (see the docstring)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None, help="default 2 (--quick: 1)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--requests", type=int, default=None,
                    help="only the mixed workload's first N requests (default: all 64)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 2)
    _set_threads()
    from workers.engine import Engine, EngineConfig, SamplingParams

    shape = QUICK_MODEL if args.quick else FULL_MODEL
    model_dir = ensure_checkpoint(shape)
    vocab = shape["vocab_size"]
    engine = Engine.from_dir(model_dir, dtype=DTYPES[args.dtype],
                             engine_config=EngineConfig(**FERRY_ENGINE_CONFIG))
    wl = make_workload("mixed", args.quick, vocab)
    if args.requests:
        wl = {**wl, "prompts": wl["prompts"][:args.requests],
              "max_new": wl["max_new"][:args.requests]}
    rng = random.Random(f"{SEED}-sampling")
    plain = [(f"p{i}", ids, SamplingParams(max_new_tokens=n))
             for i, (ids, n) in enumerate(zip(wl["prompts"], wl["max_new"]))]
    processed = [(f"q{i}", ids, processed_params(rng, vocab, n))
                 for i, (ids, n) in enumerate(zip(wl["prompts"], wl["max_new"]))]
    n_prompts, plen, new = (4, 128, 8) if args.quick else (4, 512, 32)
    prompts = [[rng.randrange(3, vocab) for _ in range(plen)] for _ in range(n_prompts)]
    forked = [(f"n{i}", ids, SamplingParams(max_new_tokens=new, temperature=1.0, seed=i, n=4))
              for i, ids in enumerate(prompts)]
    separate = [(f"s{i}-{j}", ids, SamplingParams(max_new_tokens=new, temperature=1.0,
                                                  seed=i * 4 + j))
                for i, ids in enumerate(prompts) for j in range(4)]
    run(engine, [(f"warm{i}", ids, SamplingParams(max_new_tokens=4))  # kernels, not prompts
                 for i, ids in enumerate(prompts[:1] + wl["prompts"][:3])])

    runs = ("plain", "processed", "n4", "separate", "separate-noprefix")
    times: dict[str, list[float]] = {k: [] for k in runs}
    tokens: dict[str, int] = {}
    for r in range(rounds):
        for name, reqs in zip(runs, (plain, processed, forked, separate, separate)):
            # an engine of its own each time (same weights): no prefix cache carried over
            fresh = Engine(engine.model, engine.config, engine.tokenizer,
                           engine_config=EngineConfig(
                               **FERRY_ENGINE_CONFIG,
                               enable_prefix_caching=name != "separate-noprefix"))
            wall, tokens[name] = run(fresh, reqs)
            times[name].append(wall)
            print(f"round {r}: {name:17s} {wall:7.2f} s  {tokens[name] / wall:8.1f} tok/s",
                  flush=True)
        report(args, rounds, shape, wl, times, tokens, (n_prompts, plen, new),
               partial=r + 1 < rounds)


def report(args, rounds, shape, wl, times, tokens, n4, partial: bool) -> None:
    """Print the ratios and (re)write the results file; `partial` until the last round."""
    n_prompts, plen, new = n4
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: tokens[k] / med[k] for k in med}
    summary = {"processors_tokens_per_s_ratio": tps["processed"] / tps["plain"],
               "n4_speedup_vs_separate": med["separate"] / med["n4"],
               "n4_speedup_vs_separate_noprefix": med["separate-noprefix"] / med["n4"]}
    print(f"\nprocessors (penalties + logit_bias + logprobs=5) vs plain greedy, tokens/s: "
          f"{summary['processors_tokens_per_s_ratio']:.3f}x (goal >= 0.9)")
    print(f"n=4 shared prefill vs 4 separate requests, wall: "
          f"{summary['n4_speedup_vs_separate']:.2f}x faster with prefix caching, "
          f"{summary['n4_speedup_vs_separate_noprefix']:.2f}x without (goal >= 2)")
    write_results(args.out or (QUICK_RESULTS if args.quick else RESULTS),
                  quick=args.quick, dtype=args.dtype, rounds=rounds, model=shape,
                  engine_config=FERRY_ENGINE_CONFIG, seconds=times, tokens=tokens,
                  tokens_per_s=tps, summary=summary, partial=partial,
                  mixed_requests=len(wl["prompts"]),
                  n4_workload=dict(prompts=n_prompts, prompt_tokens=plen, new_tokens=new))


if __name__ == "__main__":
    main()
