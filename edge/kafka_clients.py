"""Connection options every Ferry Kafka client gets (security: SASL credentials, protocol).

Every AIOKafkaProducer / AIOKafkaConsumer / AIOKafkaAdminClient in Ferry is built with
`**client_options()` (a faust app with `**faust_options()`), so one set of environment
variables decides how a component authenticates to the brokers. With none set, clients
connect in plaintext as before:

    FERRY_KAFKA_SECURITY_PROTOCOL   PLAINTEXT (default) | SASL_PLAINTEXT | SASL_SSL | SSL
    FERRY_KAFKA_SASL_MECHANISM      SCRAM-SHA-512 (default) | SCRAM-SHA-256 | PLAIN
    FERRY_KAFKA_USERNAME            the component's principal (e.g. ferry-worker)
    FERRY_KAFKA_PASSWORD            its password
    FERRY_KAFKA_SSL_CAFILE          CA bundle for SSL / SASL_SSL (default: the system's)

A setting that cannot work (an unknown protocol or mechanism, SASL without a username or a
password) is one KafkaSecurityError naming the variable, when the first client is built.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Any

PROTOCOLS = ("PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL")
MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")  # what aiokafka speaks with a password


class KafkaSecurityError(ValueError):
    """FERRY_KAFKA_* variables that no client could connect with."""


@dataclass(frozen=True)
class KafkaSecurity:
    """The security settings of this process's Kafka clients."""

    protocol: str = "PLAINTEXT"
    mechanism: str | None = None
    username: str | None = None
    password: str | None = None
    cafile: str | None = None

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    def env(self) -> dict[str, str]:
        """The FERRY_KAFKA_* variables that give a process these settings."""
        env = {"FERRY_KAFKA_SECURITY_PROTOCOL": self.protocol}
        for name, value in (("SASL_MECHANISM", self.mechanism), ("USERNAME", self.username),
                            ("PASSWORD", self.password), ("SSL_CAFILE", self.cafile)):
            if value is not None:
                env[f"FERRY_KAFKA_{name}"] = value
        return env


def security_from_env(environ: dict[str, str] | None = None) -> KafkaSecurity:
    env = os.environ if environ is None else environ
    protocol = env.get("FERRY_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").strip().upper() or "PLAINTEXT"
    if protocol not in PROTOCOLS:
        raise KafkaSecurityError(f"FERRY_KAFKA_SECURITY_PROTOCOL: {protocol!r} is not one of "
                                 f"{', '.join(PROTOCOLS)}")
    cafile = env.get("FERRY_KAFKA_SSL_CAFILE") or None
    if not protocol.startswith("SASL_"):
        return KafkaSecurity(protocol, cafile=cafile)
    mechanism = env.get("FERRY_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512").strip().upper()
    if mechanism not in MECHANISMS:
        raise KafkaSecurityError(f"FERRY_KAFKA_SASL_MECHANISM: {mechanism!r} is not one of "
                                 f"{', '.join(MECHANISMS)}")
    missing = [f"FERRY_KAFKA_{name}" for name in ("USERNAME", "PASSWORD")
               if not env.get(f"FERRY_KAFKA_{name}")]
    if missing:
        raise KafkaSecurityError(f"{protocol} needs {' and '.join(missing)} (the component's "
                                 "principal and password; `ferry kafka env` prints them)")
    return KafkaSecurity(protocol, mechanism, env["FERRY_KAFKA_USERNAME"],
                         env["FERRY_KAFKA_PASSWORD"], cafile)


def _ssl_context(security: KafkaSecurity) -> ssl.SSLContext | None:
    if not security.tls:
        return None
    from aiokafka.helpers import create_ssl_context

    return create_ssl_context(cafile=security.cafile)


def client_options(security: KafkaSecurity | None = None) -> dict[str, Any]:
    """Keyword arguments for aiokafka clients (from FERRY_KAFKA_* variables by default)."""
    security = security_from_env() if security is None else security
    if security.protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security_protocol": security.protocol}
    if security.tls:
        options["ssl_context"] = _ssl_context(security)
    if security.sasl:
        options.update(sasl_mechanism=security.mechanism,
                       sasl_plain_username=security.username,
                       sasl_plain_password=security.password)
    return options


def faust_options(security: KafkaSecurity | None = None) -> dict[str, Any]:
    """Keyword arguments for a faust.App: the same settings as `broker_credentials`."""
    security = security_from_env() if security is None else security
    if security.protocol == "PLAINTEXT":
        return {}
    import faust

    if not security.sasl:  # SSL: a client certificate or none, no password
        return {"broker_credentials": faust.SSLCredentials(_ssl_context(security))}
    return {"broker_credentials": faust.SASLCredentials(
        username=security.username, password=security.password,
        mechanism=security.mechanism, ssl_context=_ssl_context(security))}
