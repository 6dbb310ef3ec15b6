"""What every transactional producer in Ferry shares (the worker's per input partition, the
router's per ingress partition): its id, the errors that end it, and a faster retry.

Kept apart from `workers/transactions.py` so the router can use it without importing the
worker's engine (and torch).
"""

from __future__ import annotations

import aiokafka.producer.sender as _aiokafka_sender
from aiokafka import TopicPartition
from aiokafka.errors import ProducerFenced, TransactionalIdAuthorizationFailed

# A transaction that follows another on the same producer is first answered
# CONCURRENT_TRANSACTIONS (the broker is still writing the last one's markers, KAFKA-5477),
# and aiokafka retries it after a fixed 20 ms: most of a back-to-back transaction's time on a
# local broker (27 ms measured, 6 ms with 2 ms retries). Only that retry path reads it.
if hasattr(_aiokafka_sender, "BACKOFF_OVERRIDE"):
    _aiokafka_sender.BACKOFF_OVERRIDE = 0.002

# Errors no retry can mend: this producer may never write again.
FATAL = (ProducerFenced, TransactionalIdAuthorizationFailed)


def transactional_id(group: str, tp: TopicPartition) -> str:
    """One id per (group, input partition): aiokafka has no KIP-447, so the partition's next
    owner starting a producer with this id is what fences the previous one."""
    return f"{group}.{tp.topic}.{tp.partition}"
