"""Per-tenant token buckets for requests and tokens per minute, as plain values.

A bucket holds up to a minute's allowance and refills continuously, so a tenant may burst
its whole per-minute quota and then gets its rate. The state is a `schemas.tables.QuotaState`
so the router can keep it in a compacted topic (`<router app id>.quotas`: it survives a
restart).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from schemas.messages import REST_OF_CONTEXT
from schemas.tables import QuotaState
from streams.routing.keys import Tenant


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    state: QuotaState | None  # the new state (unchanged when refused)
    retry_after_s: float = 0.0
    reason: str = ""


def _level(state: QuotaState | None, name: str, per_minute: int, now: float) -> float:
    """A bucket's level now: its stored level plus the refill since, capped at capacity."""
    stored = None if state is None else getattr(state, name)
    if stored is None:
        return float(per_minute)
    assert state is not None
    elapsed = max(0.0, now - state.at)
    return min(float(per_minute), stored + elapsed * per_minute / 60.0)


def admit(state: QuotaState | None, tenant: Tenant, tokens: int, now: float) -> Verdict:
    """Take one request and `tokens` from the tenant's buckets, or say when to retry."""
    new = QuotaState(at=now)
    waits: list[tuple[float, str]] = []
    for name, per_minute, cost in (("r", tenant.rpm, 1), ("t", tenant.tpm, tokens)):
        if per_minute is None:
            continue
        level = _level(state, name, per_minute, now)
        if cost > per_minute:
            unit = "requests" if name == "r" else "tokens"
            return Verdict(False, state, math.inf,
                           f"{cost} {unit} exceed the quota of {per_minute} per minute")
        if level < cost:
            waits.append(((cost - level) * 60.0 / per_minute, "rpm" if name == "r" else "tpm"))
        new = dataclasses.replace(new, **{name: level - cost})
    if waits:
        wait, which = max(waits)
        return Verdict(False, state, wait,
                       f"{which} quota of tenant {tenant.name!r} exceeded")
    return Verdict(True, new)


# Charged for a request that asks for the rest of the context (max_new_tokens 0: a chat call
# without max_tokens). The router does not know a deployment's context length, and charging
# nothing would let such requests pass any tokens-per-minute quota.
REST_OF_CONTEXT_CHARGE = 2048


def estimate_tokens(prompt: str | None, input_ids: list[int] | None, max_new_tokens: int,
                    rest_of_context: int = REST_OF_CONTEXT_CHARGE) -> int:
    """Tokens charged up front: the prompt (ids, or ~4 bytes of text per token) plus the most
    that may be generated (`rest_of_context` when it is not bounded). The router cannot
    tokenize: each deployment has its own tokenizer."""
    prompt_tokens = len(input_ids) if input_ids is not None else math.ceil(
        len((prompt or "").encode()) / 4)
    return prompt_tokens + (max_new_tokens if max_new_tokens != REST_OF_CONTEXT
                            else rest_of_context)
