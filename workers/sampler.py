"""Next tokens for a whole step at once, in float32.

Greedy rows (temperature 0, or below `MIN_TEMPERATURE`, where 1/T would overflow) take the
argmax. Sampled rows are scaled by 1/T, cut to their top_k and top_p nucleus in batched
tensor ops, then drawn: unseeded rows in one `multinomial` call on the sampler's own
generator, seeded rows each from their own generator, so a seeded row's tokens depend on
its logits and seed only, never on its batch mates. Any valid input gives a token: a row
whose distribution is degenerate (inf/nan after scaling) falls back to its argmax; a row
whose logits hold NaN, or whose draw still raises, fails alone (an entry in `errors`).
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


@dataclass
class Sampled:
    tokens: list[int]            # [rows] (a failed row's entry is meaningless)
    errors: dict[int, str]       # row index -> why that row failed


class Sampler:
    """Draws a step's tokens; `generator` serves every unseeded sampled row."""

    def __init__(self, device: torch.device, seed: int | None = None) -> None:
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: Tensor, rows: list[RowSampling]) -> Sampled:
        """logits (S, vocab) for S rows, any float dtype."""
        logits = logits.float()
        top, tokens = logits.max(-1)  # max propagates NaN: one pass finds both
        nan = top.isnan().tolist()
        errors = {i: "the model produced NaN logits" for i, bad in enumerate(nan) if bad}
        drawn = [i for i, r in enumerate(rows) if not r.greedy and i not in errors]
        if drawn:
            probs = _filtered_probs(logits[drawn], [rows[i] for i in drawn])
            ok = (probs.isfinite().all(-1) & (probs.sum(-1) > 0)).tolist()
            draws = [(i, p) for i, p, good in zip(drawn, probs, ok) if good]
            self._draw(draws, rows, tokens, errors)
        return Sampled(tokens.tolist(), errors)

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
    """softmax(logits / T) cut to each row's top_k and top_p (the top token always stays)."""
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
