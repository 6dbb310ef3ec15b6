"""Next tokens for a whole step at once, in float32.

First the logits processors, in tensor ops over the rows that use them (a step where no row
does skips them): repetition penalty (transformers' semantics, over prompt and completion),
presence and frequency penalties (OpenAI's, over the completion), `logit_bias`, and the
`min_tokens` mask (eos and stop ids at -inf until the completion is long enough). Greedy
rows (temperature 0, or below `MIN_TEMPERATURE`, where 1/T would overflow) take the
argmax of the processed logits. Sampled rows are scaled by 1/T, cut to their top_k, top_p
nucleus and min_p floor (vLLM's order) in batched tensor ops, then drawn: unseeded rows in one `multinomial` call on the sampler's own
generator, seeded rows each from their own generator, so a seeded row's tokens depend on
its logits and seed only, never on its batch mates. Any valid input gives a token: a row
whose distribution is degenerate (inf/nan after scaling) falls back to its argmax; a row
whose logits hold NaN, or whose draw still raises, fails alone (an entry in `errors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

MIN_TEMPERATURE = 1e-5  # below this a row is greedy: 1/T would overflow float32 logits


@dataclass(frozen=True)
class RowSampling:
    """How one row of a step draws its next token."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0                          # 0 = off
    generator: torch.Generator | None = None  # seeded rows; None: the sampler's generator
    min_p: float = 0.0                      # 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0         # 1 = off
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, added to its logit)
    min_tokens: int = 0                     # `banned` ids stay at -inf until this many
    banned: tuple[int, ...] = ()            # eos and stop ids, for min_tokens
    logprobs: int | None = None             # None: none; k: the token's and the top k

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)

    @property
    def processed(self) -> bool:
        """Whether any logits processor applies to this row (else it costs nothing)."""
        return self.penalized or bool(self.logit_bias) or (self.min_tokens > 0
                                                            and bool(self.banned))


@dataclass(frozen=True)
class History:
    """The tokens a row's processors read: its prompt and its completion so far."""

    prompt: Sequence[int]
    output: Sequence[int]
    prompt_unique: Tensor | None = None     # the prompt's distinct ids, if known already

    def prompt_ids(self) -> Tensor:
        if self.prompt_unique is not None:
            return self.prompt_unique
        return torch.unique(torch.tensor(list(self.prompt), dtype=torch.long))


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability under the raw model distribution (before any processor,
    temperature or cut, as vLLM returns by default), and the top alternatives'."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]      # (token id, logprob), most likely first


@dataclass
class Sampled:
    tokens: list[int]            # [rows] (a failed row's entry is meaningless)
    errors: dict[int, str]       # row index -> why that row failed
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)  # rows that asked


class Sampler:
    """Draws a step's tokens; `generator` serves every unseeded sampled row."""

    def __init__(self, device: torch.device, seed: int | None = None) -> None:
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: Tensor, rows: list[RowSampling],
                 history: list[History] | None = None) -> Sampled:
        """logits (S, vocab) for S rows, any float dtype (float32 ones may be changed in
        place by the processors); `history` is needed when any row has processors (see
        `RowSampling.processed`)."""
        logits = logits.float()
        top, tokens = logits.max(-1)  # max propagates NaN: one pass finds both
        nan = top.isnan().tolist()
        errors = {i: "the model produced NaN logits" for i, bad in enumerate(nan) if bad}
        want = [i for i, r in enumerate(rows) if r.logprobs is not None and i not in errors]
        if want:  # the raw distribution's, taken before the processors change the logits
            raw_lp = (logits if len(want) == len(rows) else logits[want]).log_softmax(-1)
        if any(r.processed for r in rows):
            assert history is not None
            with torch.inference_mode():  # the engine's logits are inference tensors
                logits = process(logits, rows, history)
            tokens = logits.argmax(-1)
        drawn = [i for i, r in enumerate(rows) if not r.greedy and i not in errors]
        if drawn:
            probs = _filtered_probs(logits[drawn], [rows[i] for i in drawn])
            ok = (probs.isfinite().all(-1) & (probs.sum(-1) > 0)).tolist()
            draws = [(i, p) for i, p, good in zip(drawn, probs, ok) if good]
            self._draw(draws, rows, tokens, errors)
        out = Sampled(tokens.tolist(), errors)
        if want:
            picked = tokens if len(want) == len(rows) else tokens[want]
            out.logprobs = dict(zip(want, _entries(raw_lp, picked,
                                                   [rows[i].logprobs or 0 for i in want])))
        return out

    def _draw(self, draws: list[tuple[int, Tensor]], rows: list[RowSampling], tokens: Tensor,
              errors: dict[int, str]) -> None:
        shared = [(i, p) for i, p in draws if rows[i].generator is None]
        if shared:
            picks = torch.multinomial(torch.stack([p for _, p in shared]), 1,
                                      generator=self.generator)[:, 0]
            tokens[[i for i, _ in shared]] = picks
        for i, p in draws:  # the seeded rows, one generator each
            gen = rows[i].generator
            if gen is None:
                continue
            try:
                tokens[i] = torch.multinomial(p, 1, generator=gen)[0]
            except RuntimeError as exc:
                errors[i] = f"sampling failed: {exc}"


def _filtered_probs(logits: Tensor, rows: list[RowSampling]) -> Tensor:
    """softmax(logits / T) cut to each row's top_k, top_p and min_p (the top token always
    stays)."""
    temps = torch.tensor([r.temperature for r in rows], device=logits.device)
    x = logits / temps[:, None]
    vocab = x.shape[-1]
    ks = [r.top_k if 0 < r.top_k < vocab else vocab for r in rows]
    if min(ks) < vocab:
        top = x.topk(max(k for k in ks if k < vocab), dim=-1).values
        kth = torch.tensor([k - 1 if k < vocab else 0 for k in ks], device=x.device)
        floor = top.gather(-1, kth[:, None])
        keep_all = torch.tensor([k >= vocab for k in ks], device=x.device)[:, None]
        x = x.masked_fill((x < floor) & ~keep_all, float("-inf"))
    if max(r.min_p for r in rows) > 0:
        # transformers' MinPLogitsWarper / vLLM: drop tokens below min_p x the top token's
        # probability (after temperature).
        p = x.softmax(-1)
        min_p = torch.tensor([r.min_p for r in rows], device=x.device)[:, None]
        x = x.masked_fill(p < min_p * p.max(-1, keepdim=True).values, float("-inf"))
    if min(r.top_p for r in rows) < 1:
        sorted_x, order = x.sort(dim=-1, descending=True)
        p = sorted_x.softmax(-1)
        top_p = torch.tensor([r.top_p for r in rows], device=x.device)[:, None]
        # Cut where the mass before a token already reaches top_p; rows at 1 keep all
        # (float cumsums can pass 1.0 in the tail), and the top token always stays.
        cut = ((p.cumsum(-1) - p) >= top_p) & (top_p < 1)
        cut[:, 0] = False
        x = x.scatter(-1, order, sorted_x.masked_fill(cut, float("-inf")))
    return x.softmax(-1)


def process(logits: Tensor, rows: list[RowSampling], history: list[History]) -> Tensor:
    """The logits processors of every row that has some, in place (on float32 logits)."""
    vocab, dev = logits.shape[-1], logits.device
    pen = [i for i, r in enumerate(rows) if r.penalized]
    if pen:
        _penalize(logits, pen, [rows[i] for i in pen], [history[i] for i in pen])
    bias = [(i, t, b) for i, r in enumerate(rows) for t, b in r.logit_bias]
    if bias:
        ri, ti, bi = zip(*bias)
        # (row, token) pairs are distinct (the engine merges a request's duplicates), so a
        # plain gather-add-scatter: index_put_'s accumulate path is far slower on CPU
        index = (torch.tensor(ri, device=dev), torch.tensor(ti, device=dev))
        logits[index] += torch.tensor(bi, device=dev)
    ban = [(i, t) for i, r in enumerate(rows) if len(history[i].output) < r.min_tokens
           for t in r.banned if t < vocab]
    if ban:
        ri, ti = zip(*ban)
        logits[torch.tensor(ri, device=dev), torch.tensor(ti, device=dev)] = float("-inf")
    return logits


def _penalize(logits: Tensor, at: list[int], rows: list[RowSampling],
              history: list[History]) -> None:
    """Penalties of rows `at`, sparse: only the (row, token) pairs a row has seen are read and
    written, found by one `unique` over row * vocab + token keys (no vocab-wide tensors)."""
    vocab, dev = logits.shape[-1], logits.device
    rows_t = torch.tensor(at, device=dev)
    outs = [h.output for h in history]
    flat = torch.tensor([t for o in outs for t in o], dtype=torch.long, device=dev)
    row_of = torch.repeat_interleave(torch.arange(len(at), device=dev),
                                     torch.tensor([len(o) for o in outs], device=dev))
    out_keys, counts = torch.unique(row_of * vocab + flat, return_counts=True)
    if any(r.repetition_penalty != 1 for r in rows):
        # transformers' RepetitionPenaltyLogitsProcessor: every token seen, prompt included,
        # has its logit divided by the penalty when positive, multiplied when negative.
        prompt_keys = [h.prompt_ids().to(dev) + i * vocab for i, h in enumerate(history)]
        seen = torch.unique(torch.cat([out_keys, *prompt_keys]))
        r, t = seen // vocab, seen % vocab
        rep = torch.tensor([x.repetition_penalty for x in rows], device=dev)[r]
        vals = logits[rows_t[r], t]
        logits[rows_t[r], t] = torch.where(vals > 0, vals / rep, vals * rep)
    if out_keys.numel() and any(x.presence_penalty != 0 or x.frequency_penalty != 0
                                for x in rows):
        # OpenAI's: logit -= frequency * count + presence * (count > 0), completion only.
        r, t = out_keys // vocab, out_keys % vocab
        freq = torch.tensor([x.frequency_penalty for x in rows], device=dev)[r]
        pres = torch.tensor([x.presence_penalty for x in rows], device=dev)[r]
        logits[rows_t[r], t] -= freq * counts + pres


LOGPROB_FLOOR = -9999.0  # what -inf becomes (JSON has no infinity; vLLM's choice too)


def token_logprobs(logits: Tensor, tokens: Tensor, ks: list[int]) -> list[TokenLogprobs]:
    """Per row: the log-probability of `tokens[row]` and the top `ks[row]` under
    log_softmax(logits) (rows of raw float32 logits)."""
    return _entries(logits.log_softmax(-1), tokens, ks)


def _entries(lp: Tensor, tokens: Tensor, ks: list[int]) -> list[TokenLogprobs]:
    chosen = lp.gather(-1, tokens[:, None].to(lp.device))[:, 0].clamp_min(LOGPROB_FLOOR)
    k = max(ks)
    top_lp, top_id = lp.topk(k, dim=-1) if k else (lp[:, :0], tokens[:, None][:, :0])
    chosen, top_lp, top_id = chosen.tolist(), top_lp.clamp_min(LOGPROB_FLOOR).tolist(), \
        top_id.tolist()
    return [TokenLogprobs(int(t), c, tuple(zip(ids[:n], vals[:n])))
            for t, c, ids, vals, n in zip(tokens.tolist(), chosen, top_id, top_lp, ks)]
