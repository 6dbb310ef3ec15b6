"""Connection options every Ferry Kafka client gets (security: SASL credentials, protocol).

Every AIOKafkaProducer / AIOKafkaConsumer / AIOKafkaAdminClient in Ferry is built with
`**client_options()`, so one set of environment variables decides how a component
authenticates to the brokers. With none set, clients connect in plaintext as today.
"""

from __future__ import annotations

import os
from typing import Any


def client_options() -> dict[str, Any]:
    """Keyword arguments for aiokafka clients, from FERRY_KAFKA_* environment variables."""
    protocol = os.environ.get("FERRY_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    if protocol == "PLAINTEXT":
        return {}
    return {
        "security_protocol": protocol,
        "sasl_mechanism": os.environ.get("FERRY_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
        "sasl_plain_username": os.environ.get("FERRY_KAFKA_USERNAME"),
        "sasl_plain_password": os.environ.get("FERRY_KAFKA_PASSWORD"),
    }
