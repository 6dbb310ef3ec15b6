"""The batch key: the Kafka key of a request on its deployment's topic.

With continuous batching, every request of a deployment may share a running batch whatever
its length or sampling settings; what must not share one is a different forward pass
(another deployment; adapters, when they exist, would join the key). So the key now places
requests: it carries a hash of the prompt's first tokens, so requests built from one
template (a long shared instruction and examples in front of a short question) land on
the same partition, hence the same replica, whose prefix cache already holds that
template's KV blocks.
"""

from __future__ import annotations

import hashlib

from schemas.chat import messages_text
from schemas.messages import Request

# How much of the prompt names its template: about 256 tokens (text: ~4 bytes a token).
PREFIX_TOKENS = 256
_BYTES_PER_TOKEN = 4


def prefix_hash(request: Request) -> str:
    """16 hex digits naming the prompt's first PREFIX_TOKENS tokens (or ~bytes of text, or of
    the messages' roles and texts)."""
    if request.input_ids is not None:
        head = ",".join(map(str, request.input_ids[:PREFIX_TOKENS])).encode()
    elif request.messages is not None:  # rendered by the worker: its roles and texts
        head = messages_text(request.messages).encode()[:PREFIX_TOKENS * _BYTES_PER_TOKEN]
    else:
        head = (request.prompt or "").encode()[:PREFIX_TOKENS * _BYTES_PER_TOKEN]
    return hashlib.blake2b(head, digest_size=8).hexdigest()


def batch_key(request: Request, deployment: str) -> str:
    """`deployment|<prefix hash>`, or the request's own `batch_key` when it sets one."""
    if request.batch_key:
        return request.batch_key
    return f"{deployment}|{prefix_hash(request)}"
