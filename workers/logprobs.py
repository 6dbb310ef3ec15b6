"""A Completion's logprobs (each token's text added) and samples as the Result's fields, and
a step's logprobs as a Delta's (`workers/streaming.py`)."""

from __future__ import annotations

from typing import Any

from schemas.messages import Choice, TokenLogprob, TopLogprob
from workers.engine import Completion
from workers.sampler import TokenLogprobs
from workers.tokenizer import Tokenizer


def records(entries: list[TokenLogprobs], tokenizer: Tokenizer | None,
            texts: dict[int, str | None] | None = None) -> list[TokenLogprob]:
    """One TokenLogprob per entry; texts decoded one token at a time, each id once (`texts`:
    the decodings known already, kept across calls by a stream)."""
    if texts is None:
        texts = {}

    def text(token: int) -> str | None:
        if token not in texts:
            texts[token] = (tokenizer.decode([token], skip_special_tokens=False)
                            if tokenizer is not None else None)
        return texts[token]

    return [TokenLogprob(e.token, e.logprob, text(e.token),
                         [TopLogprob(t, lp, text(t)) for t, lp in e.top]) for e in entries]


def result_fields(done: Completion, tokenizer: Tokenizer | None) -> dict[str, Any]:
    """The Result's logprobs and choices fields for a completion (none that it did not ask
    for)."""
    out: dict[str, Any] = {}
    if done.choices is not None:
        out["choices"] = [
            Choice(c.index, c.output_ids, c.text, c.finish_reason,  # type: ignore[arg-type]
                   records(c.logprobs, tokenizer) if c.logprobs is not None else None)
            for c in done.choices]
    if done.logprobs is not None:
        out["logprobs"] = records(done.logprobs, tokenizer)
    if done.prompt_logprobs is not None:
        out["prompt_logprobs"] = [None, *records(done.prompt_logprobs, tokenizer)]
    return out


def completion_tokens(done: Completion) -> int:
    """Tokens generated for the answer: every returned sample's."""
    if done.choices is None:
        return len(done.output_ids)
    return sum(len(c.output_ids) for c in done.choices)
