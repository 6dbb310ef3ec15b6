"""A healthy start prints no ERROR line: aiokafka's self-retried conditions are shown at INFO."""

from __future__ import annotations

import logging

from ferry.cli import _RetriedKafkaErrors


def record(name: str, level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_retried_kafka_errors_are_info_and_real_errors_stay() -> None:
    keep = _RetriedKafkaErrors()
    retried = record("aiokafka.consumer.fetcher", logging.ERROR,
                     "Failed fetch offsets from 1: [Error 6] NotLeaderForPartitionError: tp")
    assert keep.filter(retried) and retried.levelname == "INFO"
    real = record("aiokafka.consumer.fetcher", logging.ERROR, "Unexpected error in fetcher")
    ours = record("ferry.worker", logging.ERROR, "NotLeaderForPartitionError while publishing")
    assert keep.filter(real) and real.levelname == "ERROR"
    assert keep.filter(ours) and ours.levelname == "ERROR"
