"""The batch key: requests with equal keys can share a batch, so they share a partition."""

from __future__ import annotations

from schemas.messages import Request

# Bytes of prompt text per token, to bucket text prompts before they are tokenised.
_BYTES_PER_TOKEN = 4


def _bucket(n: int, smallest: int = 32) -> int:
    """Next power of two >= n: lengths in one bucket waste at most half their padding."""
    size = smallest
    while size < n:
        size *= 2
    return size


def batch_key(request: Request, deployment: str) -> str:
    """`deployment|greedy-or-sample|p<prompt bucket>|n<generation bucket>`."""
    if request.batch_key:
        return request.batch_key
    if request.input_ids is not None:
        prompt_len = len(request.input_ids)
    else:
        prompt_len = len((request.prompt or "").encode()) // _BYTES_PER_TOKEN + 1
    mode = "greedy" if request.temperature == 0 else "sample"
    return f"{deployment}|{mode}|p{_bucket(prompt_len)}|n{_bucket(request.max_new_tokens, 16)}"
