"""The execution unit: requests in, one token per running row per step, completions out.

Kafka-agnostic, and continuous: `add` queues a request, `step` runs one scheduler
iteration (`workers/scheduler.py` decides which tokens run), one packed forward over a paged
KV cache (`workers/kv_cache.py`, `Transformer.forward_paged`) and one batched sampling
(`workers/sampler.py`), and returns what finished. A row leaves the moment it finishes (eos,
a stop string, its own `max_new_tokens`, an abort) and a waiting request takes its seat in
the next step. A row's result does not depend on its batch mates: greedy rows take the
argmax, seeded rows draw from their own generator, and each row attends only to its own
blocks. Nothing here reads a clock: deadlines are the caller's, turned into `abort`s, so
tensor-parallel ranks that make the same calls stay in lockstep.

Why one long module: add, step, abort and the per-step bookkeeping share the running set
and its KV blocks; split apart they would pass that state back and forth every step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from workers.decode_slab import DecodeSlab
from workers.engine_config import EngineConfig
from workers.kv_cache import BlockManager, KVPools
from workers.loader import load_model
from workers.model import AttnGroup, ModelConfig, PagedStep, Transformer, small_op_threads
from workers.sampler import (MIN_TEMPERATURE, History, RowSampling, Sampler, TokenLogprobs,
                             token_logprobs)
from workers.scheduler import ScheduledRow, Scheduler, Sequence, StepPlan
from workers.tokenizer import Tokenizer, load_tokenizer


MAX_LOGPROBS = 20  # top alternatives per token (vLLM's default limit)


class EngineDown(RuntimeError):
    """The engine can run no batch again (e.g. a tensor-parallel rank died): the worker
    must stop without answering, so its uncommitted requests go to another replica."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded."""

    max_new_tokens: int = 16
    temperature: float = 0.0       # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                 # 0 = off
    seed: int | None = None        # None: drawn from the engine's generator
    stop: tuple[str, ...] = ()     # needs a tokenizer; ignored without one
    min_p: float = 0.0             # 0 = off
    presence_penalty: float = 0.0  # OpenAI's, [-2, 2], over the completion
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # transformers', > 0, over prompt and completion
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    stop_token_ids: tuple[int, ...] = ()  # finish ("stop") when sampled, like eos
    min_tokens: int = 0            # eos and stop ids masked until this many tokens
    ignore_eos: bool = False       # eos is a token like any other
    logprobs: int | None = None    # per completion token its logprob and the top k (raw model)
    prompt_logprobs: int | None = None  # the same for every prompt token but the first
    n: int = 1                     # samples returned (`Completion.choices`)
    best_of: int | None = None     # samples drawn (>= n); the n of highest cumulative raw
                                   # logprob are returned, most likely first

    @property
    def samples(self) -> int:
        return self.best_of or self.n


@dataclass
class GenerationInput:
    """One request of an offline batch: prompt token ids and how to decode them."""

    input_ids: list[int]            # [prompt_tokens], used exactly as given (no bos added)
    params: SamplingParams


@dataclass
class GenerationOutput:
    """One request's completion."""

    output_ids: list[int]           # [completion_tokens], stop text / eos excluded
    text: str                       # decoded completion ("" without tokenizer), cut before the stop
    finish_reason: str              # "stop" (eos or stop string) | "length" | "error"
    prompt_tokens: int


@dataclass(frozen=True)
class EngineRequest:
    """One request for `Engine.add`."""

    id: str
    input_ids: list[int]              # [prompt_tokens]
    params: SamplingParams
    score_ids: list[int] | None = None  # [score_tokens]: teacher-forced scoring, no decode


@dataclass
class Completion:
    """One finished request."""

    id: str
    output_ids: list[int]           # [completion_tokens], stop text / eos excluded
    text: str
    finish_reason: str              # "stop" | "length" | "abort" | "error"
    prompt_tokens: int
    score: float | None = None      # scoring requests: mean log-prob per score token
    error: str | None = None        # set when finish_reason == "error" (that row alone failed)
    cached_tokens: int = 0          # prompt tokens served from the prefix cache
    logprobs: list[TokenLogprobs] | None = None         # [completion_tokens] if asked
    prompt_logprobs: list[TokenLogprobs] | None = None  # [prompt_tokens - 1]: tokens 1..
    choices: list[Choice] | None = None  # n > 1 or best_of: the samples returned; the
                                         # fields above mirror choices[0]


@dataclass
class Choice:
    """One sample of a request with n > 1."""

    index: int
    output_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float = 0.0  # of its sampled tokens, raw (best_of ranks by it)


@dataclass
class StepOutput:
    """What one step produced. A stop string that spans several tokens can cut tokens an
    earlier step already emitted: `Completion.output_ids` is the final word."""

    finished: list[Completion]
    new_tokens: dict[str, list[int]]  # row id (`sample_of`) -> token ids emitted this step
    # Streaming's view of what the rows computed: the new token's logprobs (rows that compute
    # them), and a request's prompt logprobs the step its first token is sampled.
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)  # row id ->
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # request id ->
    # Samples of a request with n > 1 that ended this step while others run on (row id -> its
    # Choice), so a stream can finish them before the request; the request's end is `finished`.
    ended: dict[str, Choice] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_cache_usage: float           # fraction of KV blocks referenced by requests
    num_blocks: int
    prefix_queries: int             # prompt tokens looked up in the prefix cache
    prefix_hits: int                # of which served from it
    preemptions: int


@dataclass
class _Request:
    """One request's progress (one sample's, when n > 1), beside its scheduler `Sequence`."""

    request: EngineRequest
    sampling: RowSampling
    sid: str = ""                                  # its scheduler id
    group: _Group | None = None                    # n > 1: the request's samples
    index: int = 0                                 # which sample
    cumulative: float = 0.0                        # raw logprobs of its sampled tokens
    prompt_unique: Tensor | None = None            # repetition penalty: distinct prompt ids
    ids: list[int] = field(default_factory=list)   # the completion so far
    text: str | None = None                        # set once the stop check has cut it
    logprob_sum: float = 0.0                       # scoring requests
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass
class _Group:
    """The samples of a request with n > 1 (or best_of): sample 0 prefills; once its prompt
    is computed, the others fork from it (full blocks shared, the partial last one copied)
    and draw their first tokens from the same logits."""

    request: EngineRequest
    samples: list[_Request]
    choices: dict[int, Choice] = field(default_factory=dict)
    first_seq: Sequence | None = None   # sample 0's, once finished (its cached tokens)


class Engine:
    """Continuous batching with a `Transformer`; see the module docstring."""

    def __init__(self, model: Transformer, config: ModelConfig, tokenizer: Tokenizer | None,
                 device: str | torch.device = "cpu",
                 engine_config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.engine_config = ec = engine_config or EngineConfig()
        self.max_context: int = config.max_position_embeddings
        eos = config.eos_token_ids  # config.json, overridden by generation_config.json
        if not eos and tokenizer is not None and tokenizer.eos_id is not None:
            eos = (tokenizer.eos_id,)
        self.eos_ids = frozenset(eos)
        attn = [layer.self_attn for layer in model.model.layers]  # local (TP) head counts
        dtype = model.model.embed_tokens.weight.dtype
        num_blocks = ec.num_blocks or max(1, ec.kv_cache_bytes // sum(
            KVPools.block_bytes(1, ec.block_size, a.n_kv_heads, a.head_dim, dtype) for a in attn))
        self.blocks = BlockManager(num_blocks, ec.block_size, ec.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, ec.max_num_seqs, ec.max_num_batched_tokens)
        self.pools = KVPools(len(attn), num_blocks, ec.block_size, [a.n_kv_heads for a in attn],
                             config.head_dim, dtype, self.device)
        self.sampler = Sampler(self.device)
        if ec.prepack_weights and model.packed_lm_head is None:
            model.prepack()
        self._kv_heads = attn[0].n_kv_heads  # local (TP) kv heads, the same in every layer
        self._group_size = attn[0].n_heads // attn[0].n_kv_heads  # q heads per kv head
        self._dtype = dtype
        self._small_op_threads = ec.small_op_threads if self.device.type == "cpu" else None
        self.slab = DecodeSlab(len(attn), self._kv_heads, config.head_dim, ec.block_size,
                               dtype, self.device, ec.decode_slab_bytes) \
            if ec.decode_slab_bytes > 0 else None
        self._requests: dict[str, _Request] = {}
        self._done: list[Completion] = []     # finished outside a step, returned by the next
        self._serial = itertools.count()

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str | None = None,
                 engine_config: EngineConfig | None = None) -> Engine:
        """Model and tokenizer from a Hugging Face layout directory (see `load_model`)."""
        model, config = load_model(path, device=device, dtype=dtype)
        return cls(model, config, load_tokenizer(path), device, engine_config)

    @property
    def healthy(self) -> bool:
        """A single-process engine stays usable; a ranked one reports its ranks' state."""
        return True

    def encode(self, prompt: str) -> list[int]:
        """Prompt text to ids (bos included if the tokenizer adds it)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer.json: send input_ids instead of text")
        return self.tokenizer.encode(prompt)

    # ---- the protocol ----------------------------------------------------------------

    def check(self, request: EngineRequest) -> None:
        """ValueError naming the field if `request` cannot run; nothing is computed."""
        ids, p, who = request.input_ids, request.params, f"request {request.id!r}"
        if request.id in self._requests or any(c.id == request.id for c in self._done):
            raise ValueError(f"{who}: id is already in use")
        if not ids:
            raise ValueError(f"{who}: input_ids is empty")
        self._check_vocab(who, "input_ids", ids)
        if p.max_new_tokens < 0:
            raise ValueError(f"{who}: max_new_tokens must be >= 0")
        if not (math.isfinite(p.temperature) and p.temperature >= 0):
            raise ValueError(f"{who}: temperature must be a finite number >= 0")
        if not 0 < p.top_p <= 1:
            raise ValueError(f"{who}: top_p must be in (0, 1]")
        if p.top_k < 0:
            raise ValueError(f"{who}: top_k must be >= 0")
        _check_sampling(who, p, self.config.vocab_size)
        if not 1 <= p.n <= p.samples <= self.engine_config.max_num_seqs:
            raise ValueError(f"{who}: n: must be >= 1 and <= best_of <= "
                             f"{self.engine_config.max_num_seqs} (rows of this engine)")
        if p.samples > 1 and request.score_ids is not None:
            raise ValueError(f"{who}: n: a scoring request has one sample")
        if request.score_ids is not None:
            if not request.score_ids:
                raise ValueError(f"{who}: score_ids is empty")
            self._check_vocab(who, "score_ids", request.score_ids)
            total, what = len(ids) + len(request.score_ids), "score_ids"
        else:
            total, what = len(ids) + p.max_new_tokens, "max_new_tokens"
        if total > self.max_context:
            raise ValueError(f"{who}: {len(ids)} prompt tokens + {what} exceed the context "
                             f"of {self.max_context}")
        if self.scheduler.blocks_needed(total) > self.blocks.num_blocks:
            raise ValueError(f"{who}: {total} tokens ({what}) need more than the "
                             f"{self.blocks.num_blocks} KV blocks of this engine")

    def add(self, request: EngineRequest) -> None:
        """Check, then queue; it runs from the next `step`."""
        self.check(request)
        p = request.params
        req = _Request(request, self._row_sampling(p, 0), request.id)
        if p.samples > 1:
            req.group = _Group(request, [req])
        self._requests[request.id] = req
        tokens = list(request.input_ids)
        score_from = None
        if request.score_ids is not None:
            score_from, tokens = len(tokens) - 1, tokens + list(request.score_ids)
        elif p.max_new_tokens == 0:
            self._done.append(self._complete(req, None, "length"))
            return
        self.scheduler.add(Sequence(request.id, tokens, len(request.input_ids), score_from,
                                    prompt_logits=p.prompt_logprobs is not None
                                    and len(tokens) > 1))

    def _row_sampling(self, p: SamplingParams, index: int) -> RowSampling:
        gen = None
        if p.seed is not None and p.temperature >= MIN_TEMPERATURE:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(sample_seed(p.seed, index))
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_ids))
        bias: dict[int, float] = {}
        for token, value in p.logit_bias:  # one entry per token: repeats add up
            bias[token] = bias.get(token, 0.0) + value
        return RowSampling(p.temperature, p.top_p, p.top_k, gen, p.min_p, p.presence_penalty,
                           p.frequency_penalty, p.repetition_penalty, tuple(bias.items()),
                           p.min_tokens, tuple(sorted(banned)) if p.min_tokens else (),
                           0 if p.logprobs is None and p.best_of is not None else p.logprobs)

    def abort(self, request_id: str) -> Completion | None:
        """Drop a waiting or running request and free its blocks; None if unknown."""
        req = self._requests.get(request_id)
        if req is None or req.sid != request_id or req.index > 0:
            return None
        return self._finish(req, "abort")

    def step(self) -> StepOutput:
        """One iteration: schedule, one forward, sample; returns what finished."""
        out = StepOutput(self._done, {})
        self._done = []
        plan = self.scheduler.schedule()
        if plan.rows:
            with torch.inference_mode(), small_op_threads(self._small_op_threads):
                if fresh := self.blocks.take_fresh():
                    self.pools.zero(fresh)
                try:
                    logits = self._forward(plan)
                except BaseException:
                    if self.slab is not None:
                        self.slab.clear()  # it may hold half a step's writes
                    raise
            self.scheduler.update(plan)
            self._consume(plan, logits, out)
        return out

    def has_work(self) -> bool:
        return bool(self._done) or self.scheduler.has_work()

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(len(s.running), len(s.waiting), self.blocks.usage(),
                           self.blocks.num_blocks, s.prefix_queries, s.prefix_hits,
                           s.preemptions)

    # ---- offline conveniences --------------------------------------------------------

    def generate(self, batch: list[GenerationInput]) -> list[GenerationOutput]:
        """Run every prompt of `batch` to completion; outputs are in the same order.

        Raises ValueError (before any compute) if any row is invalid (see `check`).
        Requests already added keep running alongside; their completions come out of
        the next `step`.
        """
        n = next(self._serial)
        requests = [EngineRequest(f"generate-{n}-{i}", x.input_ids, x.params)
                    for i, x in enumerate(batch)]
        done = self._run(requests)
        return [GenerationOutput(c.output_ids, c.text, c.finish_reason, c.prompt_tokens)
                for c in (done[r.id] for r in requests)]

    def score(self, prompt_ids: list[int], target_ids: list[int]) -> float:
        """Mean log-probability per token of `target_ids` following `prompt_ids`, teacher-
        forced (how likely this model finds another model's answer)."""
        if not prompt_ids or not target_ids:
            raise ValueError("score: prompt and target must both be non-empty")
        request = EngineRequest(f"score-{next(self._serial)}", prompt_ids, SamplingParams(),
                                score_ids=target_ids)
        score = self._run([request])[request.id].score
        assert score is not None
        return score

    def _run(self, requests: list[EngineRequest]) -> dict[str, Completion]:
        for r in requests:
            self.check(r)
        for r in requests:
            self.add(r)
        want = {r.id for r in requests}
        done: dict[str, Completion] = {}
        others: list[Completion] = []
        while len(done) < len(want):
            for c in self.step().finished:
                if c.id in want:
                    done[c.id] = c
                else:
                    others.append(c)
        self._done = others + self._done
        return done

    def _check_vocab(self, who: str, what: str, ids: list[int]) -> None:
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise ValueError(f"{who}: {what} outside the vocabulary "
                             f"[0, {self.config.vocab_size})")

    # ---- one step --------------------------------------------------------------------

    def _forward(self, plan: StepPlan) -> Tensor:
        """Logits (K, vocab) for every position a row wants, in row order."""
        rows, dev = plan.rows, self.device
        ids = [t for r in rows for t in r.token_ids]
        positions = [p for r in rows for p in range(r.start, r.start + len(r.token_ids))]
        slots = [s for r in rows for s in r.slots]
        offsets = list(itertools.accumulate((len(r.token_ids) for r in rows), initial=0))
        logits_idx = [o + p - r.start for r, o in zip(rows, offsets) for p in r.logits]
        decode = [i for i, r in enumerate(rows) if len(r.token_ids) == 1]
        chunks = [i for i, r in enumerate(rows) if len(r.token_ids) > 1]
        bs, kv = self.blocks.block_size, self._kv_heads
        order = None
        if decode and self.slab is not None:
            order = self.slab.plan([rows[i] for i in decode], self.pools.layers)
        if order is None:
            if self.slab is not None:
                self.slab.clear()  # rows decoding without it fall out of step with it
            decode_groups = _split_by_context(decode, rows)
        else:
            decode_groups = []
        groups = [_group([rows[i] for i in g], [offsets[i] for i in g], bs, kv,
                         self._group_size, self._dtype, dev)
                  for g in (*decode_groups, chunks) if g]
        if order is not None:
            in_slab = [decode[i] for i in order]
            groups.insert(0, _slab_group([rows[i] for i in in_slab],
                                         [offsets[i] for i in in_slab], len(ids), self.slab.cap,
                                         kv, self._group_size, self._dtype, dev,
                                         self.slab.spans()))
        slot = torch.tensor(slots)
        write_idx = ((slot // bs * kv)[:, None] + torch.arange(kv)) * bs + (slot % bs)[:, None]
        step = PagedStep(write_idx.view(-1).to(dev), groups)
        return self.model.forward_paged(torch.tensor(ids, device=dev),
                                        torch.tensor(positions, device=dev),
                                        self.pools.layers, step,
                                        torch.tensor(logits_idx, dtype=torch.long, device=dev),
                                        self.slab.layers if order is not None else None)

    def _consume(self, plan: StepPlan, logits: Tensor, out: StepOutput) -> None:
        """Sample the rows that reached their end, accumulate scores, finish rows."""
        at, sampled, scored, prompt = 0, [], [], []
        for row in plan.rows:
            span = (at, at + len(row.logits))
            at = span[1]
            req = self._requests[row.id]
            if req.request.params.prompt_logprobs is not None and row.logits and not req.index:
                prompt.append((req, row, span[0]))
            if row.sample:
                sampled.append((req, span[1] - 1))
                if req.group is not None and len(req.group.samples) == 1:
                    sampled += [(self._fork(req.group, j), span[1] - 1)
                                for j in range(1, req.request.params.samples)]
            elif req.request.score_ids is not None:
                scored.append((req, row, span))
        if scored:
            self._score(logits, scored)
        if prompt:
            self._prompt_logprobs(logits, prompt)
        if sampled:
            at_rows = [i for _, i in sampled]
            picked = logits if at_rows == list(range(len(logits))) else logits[at_rows]
            rows = [req.sampling for req, _ in sampled]
            history = ([History(req.request.input_ids, req.ids, self._prompt_unique(req))
                        for req, _ in sampled] if any(r.processed for r in rows) else None)
            result = self.sampler(picked, rows, history)
            for k, (req, _) in enumerate(sampled):
                if req.sid not in self._requests:
                    continue  # its request ended this step (another sample failed)
                if k in result.errors:
                    self._end(out, req, "error", result.errors[k])
                else:
                    self._advance(req, result.tokens[k], out, result.logprobs.get(k))
        for req, _, _ in scored:
            seq = self.scheduler.get(req.sid)
            if seq is not None and seq.num_computed == seq.num_tokens:
                self._end(out, req, "stop")

    def _score(self, logits: Tensor, scored: list[tuple[_Request, ScheduledRow, tuple]]) -> None:
        scored = [s for s in scored if s[1].logits]
        if not scored:
            return
        rows = torch.cat([logits[a:b] for _, _, (a, b) in scored]).float().log_softmax(-1)
        targets = []
        for req, row, _ in scored:
            seq = self.scheduler.get(req.sid)
            assert seq is not None
            targets += seq.tokens[row.logits.start + 1:row.logits.stop + 1]
        picked = rows.gather(-1, torch.tensor(targets, device=rows.device)[:, None])[:, 0]
        at = 0
        for req, row, _ in scored:
            req.logprob_sum += float(picked[at:at + len(row.logits)].sum())
            at += len(row.logits)

    def _prompt_unique(self, req: _Request) -> Tensor | None:
        """A repetition-penalised request's distinct prompt ids, computed once."""
        if req.prompt_unique is None and req.sampling.repetition_penalty != 1:
            req.prompt_unique = torch.unique(torch.tensor(req.request.input_ids))
        return req.prompt_unique

    def _prompt_logprobs(self, logits: Tensor, rows: list[tuple[_Request, ScheduledRow, int]]
                         ) -> None:
        """Logprobs of the prompt tokens these rows' logits predict (each position once: a
        preempted row recomputes its prompt)."""
        at, targets, ks, owners = [], [], [], []
        for req, row, first in rows:
            seq = self.scheduler.get(req.sid)
            assert seq is not None
            nxt = len(req.prompt_logprobs)  # the next position still to record
            for p in row.logits:
                if p == nxt and p + 1 < seq.num_prompt:
                    at.append(first + p - row.logits.start)
                    targets.append(seq.tokens[p + 1])
                    ks.append(req.request.params.prompt_logprobs or 0)
                    owners.append(req)
                    nxt += 1
        if not at:
            return
        picked = logits[torch.tensor(at, device=logits.device)].float()
        entries = token_logprobs(picked, torch.tensor(targets), ks)
        for req, entry in zip(owners, entries):
            req.prompt_logprobs.append(entry)

    def _advance(self, req: _Request, token: int, out: StepOutput,
                 logprob: TokenLogprobs | None = None) -> None:
        rid, p = req.sid, req.request.params
        seq = self.scheduler.get(rid)
        if seq is not None:
            seq.prompt_logits = False  # the prompt is done: only the last position from now
        if not req.ids and not req.index and p.prompt_logprobs is not None:
            out.prompt_logprobs[rid] = req.prompt_logprobs
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            self._end(out, req, "stop")
            return
        req.ids.append(token)
        if logprob is not None:
            req.logprobs.append(logprob)
            req.cumulative += logprob.logprob
        n = len(req.ids)
        if p.stop and self.tokenizer is not None and self._cut_at_stop(req):
            self._end(out, req, "stop")
        elif len(req.ids) >= p.max_new_tokens:
            self._end(out, req, "length")
        else:
            self.scheduler.append(rid, token)
        if len(req.ids) == n:  # not cut by a stop string
            out.new_tokens[rid] = [token]
            if logprob is not None:
                out.logprobs[rid] = logprob

    def _cut_at_stop(self, req: _Request) -> bool:
        """If the completion now contains a stop string, cut text and ids before it.

        Decodes the whole completion each step, but only for rows that have stop strings.
        output_ids keeps the longest prefix whose decoding fits before the stop, so a token
        that straddles the stop is dropped whole (approximate at multi-byte boundaries).
        """
        assert self.tokenizer is not None
        text = self.tokenizer.decode(req.ids)
        hits = [i for i in (text.find(s) for s in req.request.params.stop if s) if i >= 0]
        if not hits:
            return False
        req.text = text[:min(hits)]
        keep = len(req.ids)
        while keep > 0 and len(self.tokenizer.decode(req.ids[:keep])) > len(req.text):
            keep -= 1
        del req.ids[keep:]
        return True

    def _finish(self, req: _Request, reason: str, error: str | None = None
                ) -> Completion | None:
        """End a row: its Completion, or None while other samples of its request run."""
        seq = self.scheduler.finish(req.sid)
        group = req.group
        if group is None:
            return self._complete(req, seq, reason, error)
        first = group.samples[0]
        if reason in ("abort", "error"):  # one sample fails: the request does
            for sample in group.samples[1:]:
                self.scheduler.finish(sample.sid)
                self._requests.pop(sample.sid, None)
            return self._complete(first, seq if req is first else group.first_seq, reason,
                                  error)
        group.choices[req.index] = self._choice(req, reason)
        if req is first:
            group.first_seq = seq  # it stays in _requests: abort(id) finds the request
        else:
            del self._requests[req.sid]
        if len(group.choices) < req.request.params.samples:
            return None
        return self._complete_group(group)

    def _end(self, out: StepOutput, req: _Request, reason: str,
             error: str | None = None) -> None:
        if (done := self._finish(req, reason, error)) is not None:
            out.finished.append(done)
        elif req.group is not None and req.index in req.group.choices:
            out.ended[req.sid] = req.group.choices[req.index]

    def _fork(self, group: _Group, index: int) -> _Request:
        """Sample `index` of a group, drawing its first token from sample 0's logits this
        step: sample 0's sequence is forked (its blocks shared, the partial last one
        copied; when no block is free it waits and recomputes, from the prefix cache)."""
        r = group.request
        req = _Request(r, self._row_sampling(r.params, index), f"{r.id}\x00{index}", group,
                       index)
        group.samples.append(req)
        self._requests[req.sid] = req
        parent = self.scheduler.get(r.id)
        assert parent is not None
        copy = self.scheduler.fork(parent, req.sid)
        if copy is not None:
            if fresh := self.blocks.take_fresh():  # zeroed before the copy, not after it
                self.pools.zero(fresh)
            self.pools.copy(*copy)
        return req

    def _choice(self, req: _Request, reason: str) -> Choice:
        text = req.text
        if text is None:
            text = self.tokenizer.decode(req.ids) if self.tokenizer is not None else ""
        return Choice(req.index, req.ids, text, reason, req.logprobs[:len(req.ids)],
                      req.cumulative)

    def _complete_group(self, group: _Group) -> Completion:
        p = group.request.params
        ranked = [group.choices[i] for i in range(len(group.choices))]
        if p.best_of is not None:  # the n most likely samples, most likely first
            ranked.sort(key=lambda c: -c.cumulative_logprob)
        choices = [dataclasses.replace(c, index=i,
                                       logprobs=c.logprobs if p.logprobs is not None else None)
                   for i, c in enumerate(ranked[:p.n])]
        top = choices[0]
        done = self._complete(group.samples[0], group.first_seq, top.finish_reason)
        done.output_ids, done.text, done.logprobs = top.output_ids, top.text, top.logprobs
        done.choices = choices
        return done

    def _complete(self, req: _Request, seq: Sequence | None, reason: str,
                  error: str | None = None) -> Completion:
        del self._requests[req.request.id]
        r = req.request
        text = req.text
        if text is None:
            text = self.tokenizer.decode(req.ids) if self.tokenizer is not None else ""
        score = None
        if r.score_ids is not None and reason == "stop":
            score = req.logprob_sum / len(r.score_ids)
        p = r.params
        return Completion(r.id, req.ids, text, reason, len(r.input_ids), score, error,
                          (seq.num_cached or 0) if seq is not None else 0,
                          req.logprobs[:len(req.ids)] if p.logprobs is not None else None,
                          req.prompt_logprobs if p.prompt_logprobs is not None else None)


def sample_of(row_id: str) -> tuple[str, int]:
    """(request id, sample index) of a `StepOutput` row id: sample j > 0 of a request with
    n > 1 runs as "<request id>\\x00<j>" (`Engine._fork`)."""
    request_id, _, index = row_id.partition("\x00")
    return request_id, int(index) if index else 0


def sample_seed(seed: int, index: int) -> int:
    """Sample `index`'s seed: the request's own for sample 0 (n=1 and the first of n agree),
    a hash of (seed, index) for the others (the same in every process)."""
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _check_sampling(who: str, p: SamplingParams, vocab: int) -> None:
    """The processors' parameters (ValueError naming the field)."""
    if not 0 <= p.min_p <= 1:
        raise ValueError(f"{who}: min_p: must be in [0, 1]")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(p, name) <= 2:
            raise ValueError(f"{who}: {name}: must be in [-2, 2]")
    if not (math.isfinite(p.repetition_penalty) and p.repetition_penalty > 0):
        raise ValueError(f"{who}: repetition_penalty: must be a finite number > 0")
    for token, bias in p.logit_bias:
        if not 0 <= token < vocab:
            raise ValueError(f"{who}: logit_bias: token {token} is outside the vocabulary "
                             f"[0, {vocab})")
        if not -100 <= bias <= 100:
            raise ValueError(f"{who}: logit_bias: bias {bias} of token {token} must be in "
                             f"[-100, 100]")
    if bad := [t for t in p.stop_token_ids if not 0 <= t < vocab]:
        raise ValueError(f"{who}: stop_token_ids: token {bad[0]} is outside the vocabulary "
                         f"[0, {vocab})")
    for name in ("logprobs", "prompt_logprobs"):
        if (k := getattr(p, name)) is not None and not 0 <= k <= MAX_LOGPROBS:
            raise ValueError(f"{who}: {name}: must be in [0, {MAX_LOGPROBS}]")
    if not 0 <= p.min_tokens <= max(p.max_new_tokens, 0):
        raise ValueError(f"{who}: min_tokens: must be in [0, max_new_tokens]")


def _split_by_context(decode: list[int], rows: list[ScheduledRow]) -> list[list[int]]:
    """Decode rows in one group, or two (short and long contexts) when that pads the
    gathered keys/values by a quarter less: each group pads to its own longest row."""
    by_len = sorted(decode, key=lambda i: len(rows[i].block_table))
    blocks = [len(rows[i].block_table) for i in by_len]
    if len(blocks) < 2:
        return [by_len]
    whole = len(blocks) * blocks[-1]
    cost, s = min((s * blocks[s - 1] + (len(blocks) - s) * blocks[-1], s)
                  for s in range(1, len(blocks)))
    return [by_len[:s], by_len[s:]] if cost <= 0.75 * whole else [by_len]


def _slab_group(rows: list[ScheduledRow], offsets: list[int], num_tokens: int, cap: int,
                kv_heads: int, group_size: int, dtype: torch.dtype, device: torch.device,
                spans: list[tuple[int, int, int]]) -> AttnGroup:
    """Index tensors for decode rows on the slab, `rows` in slab order (slot i = rows[i]),
    attending span by span (`DecodeSlab.spans`) when there is more than one."""
    R = len(rows)
    start = torch.tensor([r.start for r in rows])
    q_idx = torch.tensor(offsets)[:, None]
    attend = torch.arange(cap)[None] <= start[:, None]                       # (R, cap)
    bias = torch.where(attend, 0.0, float("-inf")).to(dtype)[:, None, None].expand(
        R, kv_heads, group_size, cap).reshape(R * kv_heads, group_size, cap).to(device)
    slab_spans = None
    if len(spans) > 1:
        slab_spans = [(a, b, c, bias[a * kv_heads:b * kv_heads, :, :c].contiguous())
                      for a, b, c in spans]
    slab_idx = ((torch.arange(R)[:, None] * kv_heads + torch.arange(kv_heads)) * cap
                + start[:, None]).view(-1)
    out_idx = q_idx.view(-1)
    identity = R == num_tokens and bool((out_idx == torch.arange(R)).all())
    return AttnGroup(q_idx.to(device), out_idx.new_empty(0).to(device), None, bias,
                     out_idx.to(device), None, identity=identity, slab_idx=slab_idx.to(device),
                     slab_spans=slab_spans)


def _group(rows: list[ScheduledRow], offsets: list[int], block_size: int, kv_heads: int,
           group_size: int, dtype: torch.dtype, device: torch.device) -> AttnGroup:
    """Index tensors for rows that attend together (built once, used by all layers).

    Queries are padded to the longest row (padding repeats the row's last query, and is
    dropped after), contexts to the most blocks (padding reads the null block, masked).
    """
    n = torch.tensor([len(r.token_ids) for r in rows])
    start = torch.tensor([r.start for r in rows])
    Q, B = int(n.max()), max(len(r.block_table) for r in rows)
    j = torch.arange(Q)
    q_idx = torch.tensor(offsets)[:, None] + torch.minimum(j, n[:, None] - 1)
    blocks = torch.tensor([r.block_table + [0] * (B - len(r.block_table)) for r in rows])
    kv_idx = (blocks[:, None, :] * kv_heads + torch.arange(kv_heads)[None, :, None]).view(-1)
    q_pos = start[:, None] + torch.minimum(j, n[:, None] - 1)          # (R, Q)
    attend = torch.arange(B * block_size)[None, None] <= q_pos[:, :, None]   # causal, in-row
    mask = bias = None
    if Q == 1:  # decode: an additive bias per (row, kv head), shared by the group's q heads
        zero = torch.zeros((), dtype=dtype)
        bias = torch.where(attend, zero, float("-inf")).to(dtype).expand(
            len(rows), kv_heads * group_size, B * block_size).reshape(
            len(rows) * kv_heads, group_size, B * block_size).to(device)
    else:  # one mask row per folded (query, q head of the group) pair, additive as SDPA
        # would turn a bool mask into in every layer
        mask = torch.where(attend, 0.0, float("-inf")).to(dtype)
        mask = mask.repeat_interleave(group_size, dim=1)[:, None].to(device)
    keep = (j < n[:, None]).view(-1)
    out_idx = q_idx.view(-1)[keep]
    all_kept = bool(keep.all())
    identity = all_kept and offsets[0] == 0 and bool(
        (out_idx == torch.arange(len(out_idx))).all())
    return AttnGroup(q_idx.to(device), kv_idx.to(device), mask, bias, out_idx.to(device),
                     None if all_kept else keep.to(device), identity=identity)
