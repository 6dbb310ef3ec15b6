"""Engine benchmark: Ferry's continuous-batching engine against the old static engine,
transformers (continuous batching and static `generate`) and vLLM's CPU build, on the same
random-weight Llama checkpoint, the same token ids and the same machine, in one run.

Run: `.venv/bin/python -m tests.bench.bench_engine` (flags: `--quick` for a one-minute smoke
test on a tiny model and 8 requests, `--rounds N` (default 2), `--dtypes fp32,bf16`,
`--systems ferry,ferry-noprefix,static,hf-cb,vllm` (the default; add hf-static or say
`all` for transformers' static `generate` too), `--workloads uniform,mixed,few-shot`,
`--vllm-ferry-budgets` to give vLLM Ferry's 64 seqs / 512 tokens per step instead of its
own CPU defaults). Results go to tests/bench/results/engine.json (rewritten after every
child, `"partial": true` until the run ends; `--quick` writes
~/.ferry/bench-logs/engine-quick.json instead) and one table of ratios is printed at the end.

Wall time on 2 cores (x86 with AMX/AVX512-BF16). The default is 2 rounds x 2 dtypes x
(3 workloads x 4 systems + few-shot without prefix caching) = 52 children. Estimated from the
model's FLOPs at the matmul rates this machine reaches when quiet (bf16 ~600, fp32 ~145
GFLOP/s at 64 rows), with each engine at about half of them: about 30-40 minutes for the
default, dominated by the few-shot prefill of the systems without prefix caching
(64 x 1,056 prompt tokens, ~14 TFLOP: ~1 min in bf16, ~3 min in fp32 each) and by
transformers CB (several times slower than the others on CPU). For ~20-25 minutes use
`--rounds 1`, or `--workloads uniform,mixed` (few-shot is over half the time). Under load
from other jobs it is several times slower (a 2-thread OMP team stalls whenever a core is
taken): one round of bf16 on uniform took 28 s for Ferry, 28 s static, 181 s transformers
CB, 41 s vLLM (its start-up included). First time only: +4 minutes for the vLLM venv (see
tests/bench/peers.py; 6 GB) and ~30 s for the checkpoint (cached under
~/.ferry/bench-models/). `--quick`: about a minute. Read the ratios, taken between systems
run back to back in the same rounds (A B C D A B C D ...), rather than absolute numbers.

How each measurement is made:
- Each (system, workload, dtype, round) runs in a fresh interpreter (torch threads = 2,
  OMP/MKL threads = 2), which loads the checkpoint, warms up on four prompts as long as the
  workload's first four but of other ids (4 new tokens; no prefix cache learns the real
  prompts), then gets all the workload's requests at once (`--group`, implied by --quick:
  one child per system runs every workload on one load). t0 = the moment all are
  submitted. Per request: TTFT = t0 to its first generated token (step-level engines: the
  first step that returns a token for it), e2e = t0 to its last token. Systems that only
  return when a whole call ends (static batches, the `generate` fallback) have e2e = the
  end of their call and TTFT n/a.
  Output tokens/s = all generated tokens / (t0 to the last request's end). Peak RSS = the
  child's ru_maxrss (model, runtime and KV cache included; vLLM's 4 GiB KV space counts
  only where touched).
- Lengths are exact: the checkpoint has no eos token at all (config.json and
  generation_config.json say `eos_token_id: null`), so neither Ferry engine nor transformers
  has anything to stop on; transformers CB is also told eos -1 and vLLM gets
  `ignore_eos=True`. Every request generates exactly its max_new_tokens; the runner checks.
- Greedy decoding everywhere; the correctness column compares each system's fp32 output ids
  with Ferry's, token for token per request (random weights make near-ties, so bf16 is shown
  for information only, not as a check).
- Budgets: Ferry EngineConfig(max_num_seqs=64, max_num_batched_tokens=512, block_size=16),
  prefix caching on ("ferry") and off ("ferry-noprefix", few-shot only); transformers CB the
  same budgets and block sharing on, sized by hand (its automatic sizing needs psutil on CPU,
  which Ferry's venv lacks: a shim reads /proc instead); vLLM its own defaults (0.32 on CPU:
  256 seqs, 4096 tokens a step, prefix caching on) unless --vllm-ferry-budgets; the static
  engines batches of 16 in arrival order, each run until its longest request is done.
- Ceilings, measured once a round in their own child (each rate's best round kept): memory
  bandwidth (a 512 MiB tensor
  copy, read + write bytes / s), matmul GFLOP/s (64 x 768 x 2048 linear and a 2048^3 square,
  fp32 and bf16), and the linear-layer ceiling: 64 / (time of one 64-row pass through every
  linear layer of the model, each timed at its own shape, lm_head included), i.e. the decode
  tokens/s the linear layers alone allow at 64 rows. "decode at 64 rows" for a step-level
  engine = 64 x steps / time of the steps in which all 64 requests were decoding.

This module imports only the standard library at the top: the vLLM child runs it from
vLLM's own venv (`python tests/bench/bench_engine.py --child ...`), which has no Ferry.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).parent / "results" / "engine.json"
MODELS = Path.home() / ".ferry" / "bench-models"
QUICK_RESULTS = Path.home() / ".ferry" / "bench-logs" / "engine-quick.json"
LOGS = Path.home() / ".ferry" / "bench-logs" / "engine"  # a failed child's log
THREADS = 2
SEED = 0

SYSTEMS = ["ferry", "ferry-noprefix", "static", "hf-cb", "hf-static", "vllm"]
DEFAULT_SYSTEMS = ["ferry", "ferry-noprefix", "static", "hf-cb", "vllm"]  # + hf-static: slow
WORKLOADS = ["uniform", "mixed", "few-shot"]
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
ONLY_ON = {"ferry-noprefix": {"few-shot"}}  # prefix caching off only matters with a prefix
STATIC_BATCH = 16
FERRY_ENGINE_CONFIG = dict(max_num_seqs=64, max_num_batched_tokens=512, block_size=16)

FULL_MODEL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, intermediate_size=2048, vocab_size=32000,
                  max_position_embeddings=2048)
QUICK_MODEL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=256, vocab_size=1024,
                   max_position_embeddings=2048)


class Unavailable(RuntimeError):
    """A system that cannot run here (not installed, API missing): reported, not fatal."""


# ----------------------------------------------------------------------------- workloads


def make_workload(name: str, quick: bool, vocab: int) -> dict:
    """{name, prompts: [[ids]], max_new: [n]}: all arriving at once, fixed seed per name."""
    rng = random.Random(f"{SEED}-{name}")
    n = 8 if quick else 64

    def ids(k: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(k)]

    if name == "uniform":
        plen, new = (32, 8) if quick else (128, 64)
        prompts, max_new = [ids(plen) for _ in range(n)], [new] * n
    elif name == "mixed":  # long-tailed: lognormal lengths, clipped
        lo_p, hi_p, lo_n, hi_n = (16, 64, 4, 32) if quick else (16, 256, 8, 256)
        plens = [min(hi_p, max(lo_p, int(rng.lognormvariate(math.log(lo_p * 4), 0.8))))
                 for _ in range(n)]
        max_new = [min(hi_n, max(lo_n, int(rng.lognormvariate(math.log(lo_n * 6), 0.9))))
                   for _ in range(n)]
        prompts = [ids(k) for k in plens]
    elif name == "few-shot":  # one shared prefix, distinct tails
        prefix_len, tail, new = (128, 16, 8) if quick else (1024, 32, 32)
        prefix = ids(prefix_len)
        prompts, max_new = [prefix + ids(tail) for _ in range(n)], [new] * n
    else:
        raise ValueError(f"unknown workload {name!r}")
    return {"name": name, "prompts": prompts, "max_new": max_new, "vocab": vocab}


# ----------------------------------------------------------------------------- checkpoint


def model_dir_for(shape: dict) -> Path:
    key = ("llama-h{hidden_size}-l{num_hidden_layers}-a{num_attention_heads}"
           "-kv{num_key_value_heads}-i{intermediate_size}-v{vocab_size}"
           "-p{max_position_embeddings}").format(**shape) + f"-seed{SEED}"
    return MODELS / key


def ensure_checkpoint(shape: dict) -> Path:
    """A random-weight Llama in HF layout (fp32 safetensors), no eos, cached by shape."""
    out = model_dir_for(shape)
    if (out / ".complete").exists():
        print(f"checkpoint: reusing {out}")
        return out
    print(f"checkpoint: building {out}", flush=True)
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(**shape, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=None,
                                               pad_token_id=None)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    for name in ("config.json", "generation_config.json"):  # spell out: no eos anywhere
        file = tmp / name
        data = json.loads(file.read_text()) if file.exists() else {}
        data.update(eos_token_id=None, bos_token_id=None, pad_token_id=None)
        file.write_text(json.dumps(data, indent=2) + "\n")
    (tmp / ".complete").write_text("")
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    return out


# ----------------------------------------------------------------------------- children


_LOADED: dict = {}


def _once(key: str, make):
    """One load per child: a grouped child (--quick) runs several workloads on it."""
    if key not in _LOADED:
        _LOADED[key] = make()
        _LOADED[key + ":rss"] = _rss_mib()
    return _LOADED[key], _LOADED[key + ":rss"]


def _set_threads() -> None:
    import torch
    torch.set_num_threads(THREADS)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _torch_dtype(dtype: str):
    import torch
    return getattr(torch, DTYPES[dtype])


def warm_prompts(wl: dict) -> list[list[int]]:
    """Warm-up prompts as long as the workload's first four, of other (seeded) ids: the
    kernels see the shapes they will run, and no prefix cache learns the real prompts."""
    rng = random.Random(f"{SEED}-warm")
    return [[rng.randrange(3, wl["vocab"]) for _ in p] for p in wl["prompts"][:4]]


def _step_loop(add_all, step, has_work, n: int) -> dict:
    """Drive a step-level engine: returns ids, ttft, e2e, decode-at-n timing.

    add_all(): submits everything. step() -> (new: {rid: [tokens]}, finished: {rid: ids}).
    """
    add_all()
    t0 = time.perf_counter()
    first: dict[str, float] = {}
    end: dict[str, float] = {}
    outputs: dict[str, list[int]] = {}
    decode_steps, decode_time, prev = 0, 0.0, t0
    steps = 0
    while has_work():
        new, finished = step()
        now = time.perf_counter()
        steps += 1
        if len(new) == n and all(rid in first for rid in new) \
                and all(len(t) == 1 for t in new.values()):
            decode_steps += 1
            decode_time += now - prev
        for rid, toks in new.items():
            if toks:
                first.setdefault(rid, now)
        for rid, ids in finished.items():
            end[rid] = now
            outputs[rid] = list(ids)
            first.setdefault(rid, now)
        prev = now
    order = sorted(outputs, key=int)
    return {"outputs": [outputs[r] for r in order],
            "ttft": [first[r] - t0 for r in order], "e2e": [end[r] - t0 for r in order],
            "wall": max(end.values()) - t0, "steps": steps,
            "decode_rows": n, "decode_steps": decode_steps, "decode_time": decode_time}


def run_ferry(spec: dict, wl: dict) -> dict:
    _set_threads()
    from workers import engine as E

    noprefix = spec["system"] == "ferry-noprefix"
    kw = {}
    if hasattr(E, "EngineConfig"):
        kw["engine_config"] = E.EngineConfig(**FERRY_ENGINE_CONFIG,
                                             enable_prefix_caching=not noprefix)
    elif noprefix:
        raise Unavailable("workers.engine has no EngineConfig yet (prefix caching switch)")
    engine, rss_loaded = _once("ferry", lambda: E.Engine.from_dir(
        spec["model_dir"], dtype=DTYPES[spec["dtype"]], **kw))
    engine.generate([E.GenerationInput(ids, E.SamplingParams(max_new_tokens=4))
                     for ids in warm_prompts(wl)])
    prompts, max_new = wl["prompts"], wl["max_new"]
    mode = "generate"
    if all(hasattr(engine, a) for a in ("add", "step", "has_work")) \
            and hasattr(E, "EngineRequest"):
        mode = "step"

        def add_all() -> None:
            for i, (ids, n) in enumerate(zip(prompts, max_new)):
                engine.add(E.EngineRequest(str(i), ids, E.SamplingParams(max_new_tokens=n)))

        cached = [0]

        def step():
            out = engine.step()
            cached[0] += sum(getattr(c, "cached_tokens", 0) for c in out.finished)
            return ({str(k): list(v) for k, v in out.new_tokens.items()},
                    {str(c.id): c.output_ids for c in out.finished})

        res = {**_step_loop(add_all, step, engine.has_work, len(prompts)),
               "prefix_cached_tokens": cached[0]}
    else:
        batch = [E.GenerationInput(ids, E.SamplingParams(max_new_tokens=n))
                 for ids, n in zip(prompts, max_new)]
        t0 = time.perf_counter()
        outs = engine.generate(batch)
        wall = time.perf_counter() - t0
        res = {"outputs": [o.output_ids for o in outs], "ttft": None,
               "e2e": [wall] * len(outs), "wall": wall}
    stats = None
    if hasattr(engine, "stats"):
        try:
            raw = engine.stats()
            if dataclasses.is_dataclass(raw):
                raw = dataclasses.asdict(raw)
            stats = json.loads(json.dumps(raw, default=str))
        except Exception as exc:  # stats are informational
            stats = f"stats() failed: {exc!r}"
    return {**res, "mode": mode, "rss_loaded_mib": rss_loaded, "engine_stats": stats,
            "engine_config": kw.get("engine_config") and str(kw["engine_config"])}


def _chunked(run_chunk, prompts, max_new) -> dict:
    """Static batches of STATIC_BATCH in arrival order; e2e = end of the request's batch."""
    t0 = time.perf_counter()
    outputs, e2e = [], []
    for i in range(0, len(prompts), STATIC_BATCH):
        outs = run_chunk(prompts[i:i + STATIC_BATCH], max_new[i:i + STATIC_BATCH])
        now = time.perf_counter() - t0
        outputs += outs
        e2e += [now] * len(outs)
    return {"outputs": outputs, "ttft": None, "e2e": e2e, "wall": e2e[-1],
            "mode": f"static batches of {STATIC_BATCH}"}


def run_static(spec: dict, wl: dict) -> dict:
    _set_threads()
    from workers.static_engine import GenerationInput, SamplingParams, StaticEngine

    engine, rss_loaded = _once("static", lambda: StaticEngine.from_dir(
        spec["model_dir"], dtype=DTYPES[spec["dtype"]]))
    engine.generate([GenerationInput(ids, SamplingParams(max_new_tokens=4))
                     for ids in warm_prompts(wl)])

    def chunk(prompts, max_new):
        outs = engine.generate([GenerationInput(ids, SamplingParams(max_new_tokens=n))
                                for ids, n in zip(prompts, max_new)])
        return [o.output_ids for o in outs]

    return {**_chunked(chunk, wl["prompts"], wl["max_new"]), "rss_loaded_mib": rss_loaded}


def _hf_model(spec: dict):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(spec["model_dir"], dtype=_torch_dtype(spec["dtype"]),
                                             attn_implementation="sdpa").eval()
    torch.set_grad_enabled(False)
    return model


def run_hf_static(spec: dict, wl: dict) -> dict:
    _set_threads()
    import torch
    from transformers import GenerationConfig

    model, rss_loaded = _once("hf", lambda: _hf_model(spec))

    def chunk(prompts, max_new):
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        config = GenerationConfig(do_sample=False, max_new_tokens=max(max_new),
                                  min_new_tokens=max(max_new), eos_token_id=None,
                                  pad_token_id=0, bos_token_id=None)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        return [out[i, width:width + n].tolist() for i, n in enumerate(max_new)]

    warm = warm_prompts(wl)
    chunk(warm, [4] * len(warm))
    return {**_chunked(chunk, wl["prompts"], wl["max_new"]), "rss_loaded_mib": rss_loaded,
            "mode": f"model.generate, static batches of {STATIC_BATCH}, left padded"}


def _cpu_memory_shim() -> None:
    """transformers CB sizes its cache from free device memory; on CPU it reads that with
    psutil, which Ferry's venv lacks (it then sees 0 bytes and refuses). Give it the same
    numbers from /proc: total RAM, this process's RSS."""
    import torch
    from transformers.generation.continuous_batching import cache

    def breakdown():
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text()
                       .splitlines() if ":" in line)
        total = int(meminfo["MemTotal"].split()[0]) * 1024
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text()
                      .splitlines() if ":" in line)
        rss = int(status["VmRSS"].split()[0]) * 1024
        return torch.device("cpu"), total, rss, rss

    if importlib.util.find_spec("psutil") is None:  # with psutil, transformers' own works
        cache.get_device_and_memory_breakdown = breakdown


def run_hf_cb(spec: dict, wl: dict) -> dict:
    _set_threads()
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model, rss_loaded = _once("hf", lambda: _hf_model(spec))
    prompts, max_new = wl["prompts"], wl["max_new"]
    config = GenerationConfig(do_sample=False, max_new_tokens=max(max_new), eos_token_id=-1,
                              pad_token_id=0, bos_token_id=None)
    # Sized by hand: the automatic sizing reads free GPU memory (negative on CPU). Same
    # budget as Ferry's engine config: 16-token blocks, 512 tokens and 64 requests a step,
    # enough blocks for every request at once (+ slack), block sharing (prefix caching) on.
    block = FERRY_ENGINE_CONFIG["block_size"]
    blocks = sum(-(-(len(p) + n) // block) for p, n in zip(prompts, max_new)) + 64
    cb = ContinuousBatchingConfig(block_size=block, num_blocks=blocks,
                                  max_batch_tokens=FERRY_ENGINE_CONFIG["max_num_batched_tokens"],
                                  max_requests_per_batch=FERRY_ENGINE_CONFIG["max_num_seqs"],
                                  allow_block_sharing=True, use_cuda_graph=False,
                                  use_async_batching=False)
    _cpu_memory_shim()
    manager = model.init_continuous_batching(generation_config=config,
                                             continuous_batching_config=cb)
    manager.start()
    try:
        def collect(ids: set[str], t0: float):
            done: dict[str, object] = {}
            ends: dict[str, float] = {}
            while len(done) < len(ids):
                r = manager.get_result(timeout=1)
                if r is None:
                    if not manager.is_running():
                        raise RuntimeError("transformers CB generation thread died")
                    continue
                if r.request_id in ids and r.is_finished():
                    if r.error:
                        raise RuntimeError(f"transformers CB: {r.error}")
                    done[r.request_id] = r
                    ends[r.request_id] = time.perf_counter() - t0
            return done, ends

        warm = warm_prompts(wl)
        for i, ids in enumerate(warm):
            manager.add_request(ids, request_id=f"warm{i}", max_new_tokens=4, eos_token_id=-1)
        collect({f"warm{i}" for i in range(len(warm))}, time.perf_counter())
        for i, (ids, n) in enumerate(zip(prompts, max_new)):
            manager.add_request(ids, request_id=str(i), max_new_tokens=n, eos_token_id=-1,
                                record_timestamps=True)
        t0 = time.perf_counter()
        done, ends = collect({str(i) for i in range(len(prompts))}, t0)
    finally:
        manager.stop(block=True, timeout=30)
    order = [str(i) for i in range(len(prompts))]
    ttft = [(done[r].timestamps[0] - t0) if done[r].timestamps else None for r in order]
    e2e = [(done[r].timestamps[-1] - t0) if done[r].timestamps else ends[r] for r in order]
    return {"outputs": [list(done[r].generated_tokens) for r in order],
            "ttft": ttft if all(t is not None for t in ttft) else None,
            "e2e": e2e, "wall": max(ends.values()), "rss_loaded_mib": rss_loaded,
            "mode": "init_continuous_batching manager (paged|sdpa), per-request max_new_tokens",
            "cb_config": str(manager.continuous_batching_config)[:400]}


def run_vllm(spec: dict, wl: dict) -> dict:
    from vllm import LLM, SamplingParams  # the vLLM venv only
    import vllm

    budgets = {}
    if spec.get("vllm_ferry_budgets"):  # else vLLM's own CPU defaults (recorded below)
        budgets = dict(max_num_seqs=FERRY_ENGINE_CONFIG["max_num_seqs"],
                       max_num_batched_tokens=FERRY_ENGINE_CONFIG["max_num_batched_tokens"])
    llm, rss_loaded = _once("vllm", lambda: LLM(
        model=spec["model_dir"], enforce_eager=True, dtype=DTYPES[spec["dtype"]],
        skip_tokenizer_init=True, max_model_len=2048, seed=SEED, **budgets))
    try:
        sched = llm.llm_engine.vllm_config.scheduler_config
        budgets = {"max_num_seqs": sched.max_num_seqs,
                   "max_num_batched_tokens": sched.max_num_batched_tokens,
                   "enable_prefix_caching":
                       llm.llm_engine.vllm_config.cache_config.enable_prefix_caching}
    except AttributeError:
        budgets = None

    def params(n: int):
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)

    llm.generate([{"prompt_token_ids": ids} for ids in warm_prompts(wl)], params(4), use_tqdm=False)
    prompts, max_new = wl["prompts"], wl["max_new"]
    engine = getattr(llm, "llm_engine", None)
    if engine is not None and all(hasattr(engine, a) for a in
                                  ("add_request", "step", "has_unfinished_requests")):
        seen: dict[str, int] = {}

        def add_all() -> None:
            for i, (ids, n) in enumerate(zip(prompts, max_new)):
                engine.add_request(str(i), {"prompt_token_ids": ids}, params(n))

        def step():
            new, finished = {}, {}
            for out in engine.step():
                toks = list(out.outputs[0].token_ids) if out.outputs else []
                rid = out.request_id
                if len(toks) > seen.get(rid, 0):  # cumulative outputs: the new tail
                    new[rid] = toks[seen.get(rid, 0):]
                    seen[rid] = len(toks)
                if out.finished:
                    finished[rid] = toks
            return new, finished

        res = {**_step_loop(add_all, step, engine.has_unfinished_requests, len(prompts)),
               "mode": "llm_engine.add_request/step"}
    else:
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                            [params(n) for n in max_new], use_tqdm=False)
        wall = time.perf_counter() - t0
        res = {"outputs": [list(o.outputs[0].token_ids) for o in outs], "ttft": None,
               "e2e": [wall] * len(outs), "wall": wall, "mode": "LLM.generate"}
    return {**res, "rss_loaded_mib": rss_loaded, "version": vllm.__version__,
            "engine_config": budgets}


def run_ceilings(spec: dict) -> dict:
    """Memory bandwidth, matmul rates and the linear-layer ceiling for `spec['shape']`."""
    _set_threads()
    import torch
    import torch.nn.functional as F

    def best_time(fn, min_time: float = 0.5, reps: int = 5) -> float:
        """Best per-call time over `reps` runs of min_time / reps each: the best, since
        other load on the machine only ever adds time."""
        fn()
        best = math.inf
        for _ in range(reps):
            n, t0 = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                el = time.perf_counter() - t0
                if el >= min_time / reps:
                    break
            best = min(best, el / n)
        return best

    with torch.inference_mode():
        quick = spec.get("quick")
        def copy_rate(numel: int) -> float:
            src = torch.ones(numel, dtype=torch.float32)
            dst = torch.empty_like(src)
            t = best_time(lambda: dst.copy_(src), min_time=0.3 if quick else 1.0)
            return 2 * numel * 4 / t / 1e9  # read + write

        bandwidth = copy_rate((32 if quick else 128) * 1024 * 1024)  # 128 / 512 MiB
        shape = spec["shape"]
        h, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
        hd = h // shape["num_attention_heads"]
        kv = shape["num_key_value_heads"] * hd
        layer = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
        linears = layer * shape["num_hidden_layers"] + [(h, vocab)]
        flops_per_token = 2 * sum(i * o for i, o in linears)
        out: dict = {"mem_bandwidth_gb_s": bandwidth, "flops_per_token_linear": flops_per_token,
                     "rows": spec.get("rows", 64)}
        rows = spec.get("rows", 64)  # as many rows as the workloads have requests
        scale = 0.3 if quick else 1.0
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            x = torch.randn(64, 768, dtype=dtype)
            w = torch.randn(2048, 768, dtype=dtype)
            t = best_time(lambda: F.linear(x, w), min_time=0.4 * scale)
            out[f"linear_64x768x2048_gflops_{name}"] = 2 * 64 * 768 * 2048 / t / 1e9
            a = torch.randn(2048, 2048, dtype=dtype)
            t = best_time(lambda: a @ a, min_time=1.0 * scale)
            out[f"square_2048_gflops_{name}"] = 2 * 2048 ** 3 / t / 1e9
            per_shape = {}
            for i, o in dict.fromkeys(linears):
                x = torch.randn(rows, i, dtype=dtype)
                w = torch.randn(o, i, dtype=dtype)
                per_shape[(i, o)] = best_time(lambda: F.linear(x, w), min_time=0.3 * scale)
            step = sum(per_shape[s] for s in linears)
            out[f"linear_ceiling_tok_s_{name}"] = rows / step
            out[f"linear_ceiling_flop_rate_tok_s_{name}"] = (
                out[f"linear_64x768x2048_gflops_{name}"] * 1e9 / flops_per_token)
            out[f"linear_pass_gflops_{name}"] = rows * flops_per_token / step / 1e9
    return out


RUNNERS = {"ferry": run_ferry, "ferry-noprefix": run_ferry, "static": run_static,
           "hf-cb": run_hf_cb, "hf-static": run_hf_static, "vllm": run_vllm}


def child_main(spec_file: str, out_file: str) -> None:
    """Run one spec: the ceilings, or one system on each of spec["workloads"] in turn (one
    load; peak RSS is then the peak so far, so a grouped child's later workloads include
    the earlier ones' peaks). Writes {"ok", "results": {workload: result}} to out_file."""
    spec = json.loads(Path(spec_file).read_text())
    t_start = time.perf_counter()
    if spec["system"] == "ceilings":
        try:
            result = {"ok": True, **run_ceilings(spec)}
        except Exception as exc:
            traceback.print_exc()
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600]}
    else:
        result = {"ok": True, "results": {}}
        for name, file in spec["workloads"]:
            wl = json.loads(Path(file).read_text())
            t_wl = time.perf_counter()
            try:
                one = {"ok": True, **RUNNERS[spec["system"]](spec, wl)}
                got = [len(o) for o in one["outputs"]]
                if got != wl["max_new"]:
                    bad = sum(g != w for g, w in zip(got, wl["max_new"]))
                    raise RuntimeError(f"{bad} requests did not generate exactly max_new "
                                       f"tokens (got {got[:4]}, wanted {wl['max_new'][:4]})")
            except Unavailable as exc:
                one = {"ok": False, "unavailable": True, "error": str(exc)}
            except Exception as exc:
                traceback.print_exc()
                one = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600]}
            one["peak_rss_mib"] = _rss_mib()
            one["child_s"] = time.perf_counter() - t_wl
            result["results"][name] = one
            sys.stdout.flush()
    result["peak_rss_mib"] = _rss_mib()
    result["child_s"] = time.perf_counter() - t_start
    Path(out_file).write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # skip slow interpreter teardown (and vLLM's atexit hooks)


# ----------------------------------------------------------------------------- orchestration


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    return env


def run_child(spec: dict, tmp: Path, timeout: float, vllm_python: Path | None) -> dict:
    tag = "-".join([spec["system"], *(w for w, _ in spec.get("workloads", [])),
                    spec.get("dtype", "")]).strip("-")
    spec_file, out_file, log_file = tmp / f"{tag}.spec", tmp / f"{tag}.out", tmp / f"{tag}.log"
    spec_file.write_text(json.dumps(spec))
    out_file.unlink(missing_ok=True)
    if spec["system"] == "vllm":
        from tests.bench.peers import vllm_env
        cmd = [str(vllm_python), str(Path(__file__).resolve()), "--child", str(spec_file),
               str(out_file)]
        env = vllm_env(child_env())
    else:
        cmd = [sys.executable, "-m", "tests.bench.bench_engine", "--child", str(spec_file),
               str(out_file)]
        env = child_env()
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    if out_file.exists():
        result = json.loads(out_file.read_text())
    else:
        tail = log_file.read_text()[-1500:] if log_file.exists() else ""
        result = {"ok": False, "error": f"child exited {rc} without a result; log tail: "
                                        f"{tail.strip()[-600:]}"}
    result["process_s"] = wall
    if not result.get("ok") or not all(x.get("ok") for x in result.get("results", {}).values()):
        result["log"] = str(log_file)
    return result


def summarize(result: dict, wl: dict) -> dict:
    n_out = sum(wl["max_new"])
    wall = result["wall"]
    row = {"output_tok_s": n_out / wall, "req_s": len(wl["prompts"]) / wall, "wall_s": wall,
           "ttft_p50_ms": None, "ttft_p99_ms": None,
           "e2e_p50_ms": pct(result["e2e"], 50) * 1000, "e2e_p99_ms": pct(result["e2e"], 99) * 1000,
           "peak_rss_mib": result["peak_rss_mib"], "mode": result.get("mode")}
    if result.get("ttft"):
        row["ttft_p50_ms"] = pct(result["ttft"], 50) * 1000
        row["ttft_p99_ms"] = pct(result["ttft"], 99) * 1000
    if result.get("decode_steps"):
        row["decode_tok_s_at_rows"] = (result["decode_rows"] * result["decode_steps"]
                                       / result["decode_time"])
        row["decode_rows"] = result["decode_rows"]
        row["decode_steps"] = result["decode_steps"]
    return row


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 \
        else values[0]


def median_rows(rows: list[dict]) -> dict:
    out = dict(rows[0])
    for k, v in rows[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
            out[k] = statistics.median(vals) if vals else None
    out["rounds"] = len(rows)
    return out


def _fmt(v, spec: str = ".1f", na: str = "n/a") -> str:
    return na if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Ferry engine benchmark (see module docstring)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: tiny model, 8 requests, 1 round, fp32, grouped children, "
                         f"results to {QUICK_RESULTS} (not engine.json)")
    ap.add_argument("--rounds", type=int, default=None, help="default 2 (--quick: 1)")
    ap.add_argument("--dtypes", default=None, help="default fp32,bf16 (--quick: fp32)")
    ap.add_argument("--group", action="store_true",
                    help="one child per system running every workload (faster, RSS cumulative)")
    ap.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                    help=f"comma separated, from {','.join(SYSTEMS)} or 'all' "
                         f"(default: all but hf-static)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per child run")
    ap.add_argument("--vllm-ferry-budgets", action="store_true",
                    help="run vLLM with Ferry's max_num_seqs=64 / max_num_batched_tokens=512 "
                         "instead of its own CPU defaults (256 / 4096 in 0.32)")
    ap.add_argument("--no-vllm-install", action="store_true",
                    help="use the vLLM venv only if it already exists")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"default {RESULTS.relative_to(REPO)}")
    ap.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(*args.child)
        return

    started = time.perf_counter()
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.dtypes is None:
        args.dtypes = "fp32" if args.quick else "fp32,bf16"
    if args.out is None:
        args.out = QUICK_RESULTS if args.quick else RESULTS
    args.group = args.group or args.quick
    systems = SYSTEMS if args.systems == "all" else [
        s.strip() for s in args.systems.split(",") if s.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for name, given, known in (("system", systems, SYSTEMS), ("workload", workloads, WORKLOADS),
                               ("dtype", dtypes, list(DTYPES))):
        if bad := [x for x in given if x not in known]:
            ap.error(f"unknown {name}(s) {bad}; choose from {known}")
    shape = QUICK_MODEL if args.quick else FULL_MODEL

    unavailable: dict[str, str] = {}
    vllm_python = None
    if "vllm" in systems:
        from tests.bench import peers
        try:
            if args.no_vllm_install and not peers.vllm_ready():
                raise RuntimeError(f"no ready venv at {peers.VLLM_VENV} (--no-vllm-install)")
            vllm_python = peers.ensure_vllm_venv()
        except Exception as exc:
            unavailable["vllm"] = f"venv: {exc}"[:300]
            print(f"vllm: unavailable ({unavailable['vllm']})")

    model_dir = ensure_checkpoint(shape)
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmpname:
        tmp = Path(tmpname)
        wl_files = {}
        wls = {}
        for w in workloads:
            wls[w] = make_workload(w, args.quick, shape["vocab_size"])
            wl_files[w] = tmp / f"{w}.json"
            wl_files[w].write_text(json.dumps(wls[w]))
        ceilings: dict = {"ok": False, "error": "not measured", "per_round": []}
        for r in range(args.rounds):
            # The ceilings once a round, best of the rounds kept: load from others only
            # ever lowers them.
            print(f"round {r + 1} ceilings: memory bandwidth and matmul rates", flush=True)
            c = run_child({"system": "ceilings", "shape": shape, "quick": args.quick,
                           "rows": len(next(iter(wls.values()))["prompts"])}, tmp, 600, None)
            print("  " + ", ".join(f"{k}={v:.1f}" for k, v in c.items()
                                   if isinstance(v, float) and k not in ("child_s",
                                                                         "process_s")),
                  flush=True)
            ceilings = best_ceilings(ceilings, c)
            for dtype in dtypes:
                # one child per (system, workload), or per system with --group (quick)
                groups = [[w] for w in workloads] if not args.group else [workloads]
                for group in groups:
                    for s in systems:
                        mine = [w for w in group if w in ONLY_ON.get(s, {w})]
                        if not mine or s in unavailable:
                            continue
                        spec = {"system": s, "dtype": dtype, "model_dir": str(model_dir),
                                "vllm_ferry_budgets": args.vllm_ferry_budgets,
                                "workloads": [(w, str(wl_files[w])) for w in mine]}
                        res = run_child(spec, tmp, args.timeout * len(mine), vllm_python)
                        for w in mine:
                            one = res.get("results", {}).get(w) or {
                                "ok": False, "error": res.get("error", "no result")}
                            record(results, unavailable, r, dtype, w, s, one, res, wls[w])
                        with contextlib.redirect_stdout(io.StringIO()):  # partial results
                            report(args, shape, systems, workloads, dtypes, ceilings, results,
                                   unavailable, wls, time.perf_counter() - started,
                                   partial=True)

    report(args, shape, systems, workloads, dtypes, ceilings, results, unavailable, wls,
           time.perf_counter() - started)


def best_ceilings(best: dict, new: dict) -> dict:
    """Each rate's best over the rounds so far (all of them are higher-is-better)."""
    rounds = best.get("per_round", []) + [new]
    good = [c for c in rounds if c.get("ok")]
    if not good:
        return {**new, "per_round": rounds}
    out = {k: (max(c[k] for c in good) if isinstance(v, float) and k not in
               ("child_s", "process_s", "peak_rss_mib") else v) for k, v in good[0].items()}
    out["per_round"] = rounds
    return out


def record(results: dict, unavailable: dict, r: int, dtype: str, w: str, s: str, one: dict,
           res: dict, wl: dict) -> None:
    key = f"{s}|{w}|{dtype}"
    if one.get("ok"):
        row = summarize(one, wl)
        print(f"round {r + 1} {dtype:<5}{w:<9}{s:<15}{row['output_tok_s']:>8.1f} tok/s  "
              f"ttft p50 {_fmt(row['ttft_p50_ms'], '.0f'):>6} ms  "
              f"e2e p50 {row['e2e_p50_ms']:>7.0f} ms  rss {row['peak_rss_mib']:>6.0f} MiB  "
              f"(child {res['process_s']:.0f}s)", flush=True)
        results.setdefault(key, []).append(
            {**row, "outputs": one["outputs"], "round": r,
             "engine_stats": one.get("engine_stats"),
             "engine_config": one.get("engine_config"),
             "prefix_cached_tokens": one.get("prefix_cached_tokens"),
             "version": one.get("version")})
        return
    print(f"round {r + 1} {dtype:<5}{w:<9}{s:<15}FAILED: {one.get('error')}", flush=True)
    if one.get("unavailable") or (s == "vllm" and "results" not in res):
        unavailable[s] = str(one.get("error", "?"))[:300]  # don't retry what cannot start
    saved = None
    if res.get("log") and Path(res["log"]).exists():
        LOGS.mkdir(parents=True, exist_ok=True)
        saved = LOGS / Path(res["log"]).name
        saved.write_text(Path(res["log"]).read_text()[-20000:])
        print(f"  log: {saved}")
    results.setdefault(key, []).append({"error": one.get("error"), "round": r,
                                        "log": str(saved) if saved else None})


def correctness(results: dict, systems: list[str], w: str, dtype: str) -> dict[str, str]:
    """Per system: how many requests match Ferry's output ids exactly (first good round)."""
    def first_ok(s):
        return next((r for r in results.get(f"{s}|{w}|{dtype}", []) if "outputs" in r), None)

    ref = first_ok("ferry")
    col = {}
    for s in systems:
        runs = [r for r in results.get(f"{s}|{w}|{dtype}", []) if "outputs" in r]
        if not runs or ref is None:
            continue
        same = sum(a == b for a, b in zip(runs[0]["outputs"], ref["outputs"]))
        stable = all(r["outputs"] == runs[0]["outputs"] for r in runs)
        col[s] = f"{same}/{len(ref['outputs'])}" + ("" if stable else " (varies by round)")
    return col


def report(args, shape, systems, workloads, dtypes, ceilings, results, unavailable, wls,
           total_s, partial: bool = False) -> None:
    """Print the tables and write the results file (`partial`: after each child, so an
    interrupted run still leaves what it measured)."""
    summary: dict[str, dict] = {}
    for key, runs in results.items():
        good = [r for r in runs if "outputs" in r]
        if good:
            summary[key] = median_rows([{k: v for k, v in r.items()
                                         if k not in ("outputs", "engine_stats")} for r in good])
            summary[key]["engine_stats"] = good[-1].get("engine_stats")
        else:
            summary[key] = {"error": runs[-1].get("error")}

    def get(s, w, d, k="output_tok_s"):
        return summary.get(f"{s}|{w}|{d}", {}).get(k)

    n = len(next(iter(wls.values()))["prompts"]) if wls else 0
    print(f"\n{n} requests at once per workload, {shape['num_hidden_layers']} layers x "
          f"{shape['hidden_size']} hidden Llama (random weights), {THREADS} torch threads, "
          f"median of {args.rounds} round(s)\n")
    head = (f"{'system':<15}{'workload':<10}{'dtype':<6}{'out tok/s':>10}{'req/s':>8}"
            f"{'TTFT p50':>10}{'p99':>8}{'e2e p50':>9}{'p99':>8}{'RSS MiB':>9}"
            f"{f'dec@{n} tok/s':>13}  {'fp32 ids = ferry':<16}")
    print(head + "\n" + "-" * len(head))
    corr = {w: correctness(results, systems, w, "fp32") for w in workloads}
    for w in workloads:
        for d in dtypes:
            for s in systems:
                if w not in ONLY_ON.get(s, {w}):
                    continue
                row = summary.get(f"{s}|{w}|{d}")
                if row is None or "error" in row:
                    reason = (row or {}).get("error") or unavailable.get(s, "not run")
                    print(f"{s:<15}{w:<10}{d:<6}  {s}: unavailable ({str(reason)[:90]})")
                    continue
                print(f"{s:<15}{w:<10}{d:<6}{row['output_tok_s']:>10.1f}{row['req_s']:>8.2f}"
                      f"{_fmt(row['ttft_p50_ms'], '.0f'):>10}{_fmt(row['ttft_p99_ms'], '.0f'):>8}"
                      f"{row['e2e_p50_ms']:>9.0f}{row['e2e_p99_ms']:>8.0f}"
                      f"{row['peak_rss_mib']:>9.0f}"
                      f"{_fmt(row.get('decode_tok_s_at_rows'), '.0f', '-'):>13}  "
                      f"{corr[w].get(s, '-') if d == 'fp32' else '':<16}")
    for s, why in unavailable.items():
        print(f"{s}: unavailable ({why[:200]})")

    print("\nceilings: memory bandwidth {:.1f} GB/s; matmul GFLOP/s 64x768x2048 fp32 {:.0f}, "
          "bf16 {:.0f}; 2048^3 fp32 {:.0f}, bf16 {:.0f}; linear-layer ceiling at {} rows: "
          "fp32 {:.0f} tok/s, bf16 {:.0f} tok/s".format(
              *(ceilings.get(k, float("nan")) for k in (
                  "mem_bandwidth_gb_s", "linear_64x768x2048_gflops_fp32",
                  "linear_64x768x2048_gflops_bf16", "square_2048_gflops_fp32",
                  "square_2048_gflops_bf16", "rows", "linear_ceiling_tok_s_fp32",
                  "linear_ceiling_tok_s_bf16"))) if ceilings.get("ok") else
          f"\nceilings: failed ({ceilings.get('error')})")

    ratios = []

    def ratio(label, num, den, kind="x"):
        if num is None or den is None or not den:
            ratios.append((label, None, kind))
        else:
            ratios.append((label, num / den, kind))

    for w in workloads:
        for d in dtypes:
            f = get("ferry", w, d)
            for peer, label in (("vllm", "vLLM"), ("static", "static engine"),
                                ("hf-cb", "transformers CB"), ("hf-static", "transformers static")):
                if peer in systems:
                    ratio(f"{w} {d}: Ferry / {label} (output tok/s)", f, get(peer, w, d))
            if "vllm" in systems:
                ft, vt = get("ferry", w, d, "ttft_p50_ms"), get("vllm", w, d, "ttft_p50_ms")
                ratio(f"{w} {d}: Ferry / vLLM TTFT p50 (lower is better)", ft, vt)
    if "few-shot" in workloads and "ferry-noprefix" in systems:
        for d in dtypes:
            ratio(f"few-shot {d}: prefix caching on / off (output tok/s)",
                  get("ferry", "few-shot", d), get("ferry-noprefix", "few-shot", d))
            ratio(f"few-shot {d}: prefix caching on / off TTFT p50 (lower is better)",
                  get("ferry", "few-shot", d, "ttft_p50_ms"),
                  get("ferry-noprefix", "few-shot", d, "ttft_p50_ms"))
    for d in dtypes:
        ceiling = ceilings.get(f"linear_ceiling_tok_s_{d}")
        for s in ("ferry", "vllm"):
            if s in systems and "uniform" in workloads:
                ratio(f"uniform {d}: {s} decode at {n} rows / linear-layer ceiling",
                      get(s, "uniform", d, "decode_tok_s_at_rows"), ceiling, "%")
    print("\nratios (above 1x: Ferry is faster; n/a: a side did not run)")
    for label, value, kind in ratios:
        shown = "n/a" if value is None else (f"{value * 100:.0f}%" if kind == "%"
                                             else f"{value:.2f}x")
        print(f"  {label:<72}{shown:>8}")
    print(f"\ntotal wall time: {total_s / 60:.1f} min")

    write = {"partial": partial, "quick": args.quick, "rounds": args.rounds, "model_shape": shape,
             "threads": THREADS, "requests": n, "ferry_engine_config": FERRY_ENGINE_CONFIG,
             "workloads": {w: {"prompt_tokens": sum(map(len, x["prompts"])),
                               "output_tokens": sum(x["max_new"])} for w, x in wls.items()},
             "ceilings": ceilings, "summary": summary,
             "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "outputs"} for r in v]
                      for k, v in results.items()},
             "correctness_fp32_vs_ferry": corr, "unavailable": unavailable,
             "ratios": {label: value for label, value, _ in ratios},
             "total_wall_s": total_s}
    try:
        from tests.bench.common import write_results
        write_results(args.out, **write)
    except ImportError:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(write, indent=2) + "\n")


if __name__ == "__main__":
    main()
