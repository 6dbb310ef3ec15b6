"""Every topic Ferry writes or reads, as one AsyncAPI 3.0 document.

`CHANNELS` is the table: a topic (or a family of topics, `ferry.requests.{deployment}`),
its key, partitions and cleanup policy, the records on it (by the name of their JSON Schema
file in `schemas/json/`), the headers, and which components send and receive it.
`document()` renders it; `ferry schemas export` writes it to `schemas/json/asyncapi.json`
beside the record schemas it references, and a test keeps it in step with the code and with
every name in `schemas/topics.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from schemas import topics as t
from schemas.messages import SCHEMA_VERSION

KAFKA_BINDING = "0.5.0"


@dataclass(frozen=True)
class Channel:
    name: str  # the channel's id in the document
    address: str  # a topic name, or a family with one {parameter}
    description: str
    key: str  # what the Kafka key holds
    messages: tuple[str, ...]  # record names (schemas/json/NAME.schema.json)
    partitions: int | None  # None: chosen by whoever owns the topic
    compacted: bool = False
    headers: dict[str, str] = field(default_factory=dict)  # header -> meaning
    senders: tuple[str, ...] = ()  # components that produce to it
    receivers: tuple[str, ...] = ()  # and consume it
    parameter: str | None = None  # what {parameter} of the address names


CHANNELS: tuple[Channel, ...] = (
    Channel("ingress", t.INGRESS_TOPIC,
            "Requests for the router: authenticated by the API key header, charged to the "
            "tenant's quota, routed to a deployment.",
            "the tenant (so one router instance owns a tenant's quota)", ("request",),
            t.INGRESS_PARTITIONS,
            headers={t.API_KEY_HEADER: "the caller's API key fk_<id>_<secret>",
                     t.DEPLOYMENT_HEADER: "pin this deployment (version paths, retries)",
                     t.ATTEMPT_HEADER: "1 on the first try; retries are not charged again"},
            senders=("gateway", "producers"), receivers=("router",)),
    Channel("requests", t.REQUESTS_PREFIX + "{deployment}",
            "A deployment's requests, served by its worker group ferry.workers.{deployment}.",
            "the batch key (Request.batch_key, else deployment|prefix hash)", ("request",),
            t.DEFAULT_PARTITIONS,
            headers={t.MIRRORED_HEADER: "the shadow candidates this request was mirrored to "
                                        "(comma-separated): the worker copies its result to "
                                        f"{t.PRIMARY_RESULTS_TOPIC}"},
            senders=("router", "gateway --direct", "client", "deployer (probes)", "replay"),
            receivers=("worker",), parameter="the deployment (NAME, or NAME-VERSION)"),
    Channel("results", t.RESULTS_TOPIC,
            "Results of requests with reply_to ferry.results, and the gateway's copies of "
            "results for polling by id.",
            "the request id", ("result",), t.DEFAULT_PARTITIONS,
            headers={t.TENANT_HEADER: "on the gateway's copies: the tenant that may poll it",
                     t.CHAT_HEADER: "on the gateway's copies: 1 for a chat call"},
            senders=("worker", "router (refusals)", "gateway (copies)"),
            receivers=("gateway", "client")),
    Channel("replies", t.REPLIES_PREFIX + "{client}",
            "The reply topic of one of Ferry's own clients (a gateway instance, the "
            "deployer's probes).",
            "the request id", ("result", "delta"), t.DEFAULT_PARTITIONS,
            senders=("worker", "router (refusals)"), receivers=("gateway", "client"),
            parameter="the client instance"),
    Channel("deltas", t.DELTAS_TOPIC,
            "Token deltas of streaming requests (stream_to), never in a transaction.",
            "the request id", ("delta",), t.DEFAULT_PARTITIONS,
            senders=("worker",), receivers=("gateway", "client")),
    Channel("cancels", t.CANCELS_TOPIC,
            "Cancels, read by every worker (no group): the one running the request drops it.",
            "the request id", ("cancel",), t.CANCELS_PARTITIONS,
            senders=("gateway", "client"), receivers=("worker",)),
    Channel("dlq", t.DLQ_TOPIC,
            "Messages no component could process, with the reason and where they came from.",
            "the rejected message's key", ("dead_letter",), t.DEFAULT_PARTITIONS,
            senders=("worker", "router"), receivers=("operators",)),
    Channel("mirror", t.MIRROR_PREFIX + "{candidate}",
            "Shadow traffic: copies of an alias's sampled requests for a candidate, and the "
            "comparator's teacher-forced scoring requests.",
            "the batch key", ("request",), t.INGRESS_PARTITIONS,
            headers={t.PRIMARY_HEADER: "the deployment that answers the caller"},
            senders=("router", "comparator (scores)", "replay"),
            receivers=("worker --shadow", "replay export"), parameter="the candidate"),
    Channel("shadow_results", t.SHADOW_RESULTS_PREFIX + "{candidate}",
            "A shadow candidate's results (never sent to callers).",
            "the request id", ("result",), t.DEFAULT_PARTITIONS,
            headers={t.PRIMARY_HEADER: "the primary deployment of the mirrored request"},
            senders=("worker --shadow",), receivers=("comparator",),
            parameter="the candidate"),
    Channel("primary_results", t.PRIMARY_RESULTS_TOPIC,
            "The primary's results of mirrored requests, for the comparator.",
            "the request id", ("result",), t.DEFAULT_PARTITIONS,
            headers={t.PRODUCED_BY_HEADER: "the deployment that produced the result"},
            senders=("worker", "replay"), receivers=("comparator",)),
    Channel("comparisons", t.COMPARISONS_TOPIC,
            "One record per (request, candidate) pair the comparator joined.",
            "the request id", ("comparison",), t.DEFAULT_PARTITIONS,
            senders=("comparator",), receivers=("shadow report",)),
    Channel("telemetry", t.TELEMETRY_TOPIC,
            "One record per batch of results a worker delivered.",
            "the deployment", ("telemetry",), t.TELEMETRY_PARTITIONS,
            senders=("worker",), receivers=("canary", "dashboards")),
    Channel("checkpoints", t.CHECKPOINTS_TOPIC,
            "Requests to a model's deployer: deploy a checkpoint or a stored version, undeploy.",
            "the model", ("checkpoint_event",), t.CONTROL_PARTITIONS,
            senders=("ferry deploy", "ferry undeploy", "trainers"), receivers=("deployer",)),
    Channel("routes", t.ROUTES_TOPIC, "Aliases and their weighted deployments.",
            "the alias", ("route",), t.CONTROL_PARTITIONS, compacted=True,
            senders=("ferry route", "canary", "deployer"),
            receivers=("router", "gateway", "deployer", "canary")),
    Channel("shadow", t.SHADOW_TOPIC, "Which candidates get a copy of an alias's traffic.",
            "the alias", ("shadow",), t.CONTROL_PARTITIONS, compacted=True,
            senders=("ferry shadow", "deployer"), receivers=("router",)),
    Channel("keys", t.KEYS_TOPIC, "API keys (hashes only) and tenants' limits.",
            "key:<key id> for an api_key record, tenant:<name> for a tenant record",
            ("api_key", "tenant"), t.CONTROL_PARTITIONS, compacted=True,
            senders=("ferry keys",), receivers=("router", "gateway")),
    Channel("registry", t.REGISTRY_TOPIC, "Deployed checkpoints and their status.",
            "NAME@VERSION", ("deployment",), t.CONTROL_PARTITIONS, compacted=True,
            senders=("deployer",), receivers=("router", "gateway", "ferry deployments")),
    Channel("quotas", "{app_id}" + t.QUOTAS_SUFFIX,
            "A router's quota buckets, read back when it restarts.",
            "the tenant", ("quota_state",), t.CONTROL_PARTITIONS, compacted=True,
            senders=("router",), receivers=("router",), parameter="the router's app id"),
)


def _message(record: str, channel: Channel) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": record, "contentType": "application/json",
        "payload": {"$ref": f"./{record}.schema.json"},
        "bindings": {"kafka": {"key": {"type": "string", "description": channel.key},
                               "bindingVersion": KAFKA_BINDING}}}
    if channel.headers:
        message["headers"] = {"type": "object", "properties": {
            name: {"type": "string", "description": meaning}
            for name, meaning in channel.headers.items()}}
    return message


def _channel(channel: Channel) -> dict[str, Any]:
    kafka: dict[str, Any] = {"bindingVersion": KAFKA_BINDING}
    if channel.parameter is None:
        kafka["topic"] = channel.address
    if channel.partitions is not None:
        kafka["partitions"] = channel.partitions
    kafka["topicConfiguration"] = {
        "cleanup.policy": ["compact"] if channel.compacted else ["delete"]}
    out: dict[str, Any] = {
        "address": channel.address, "description": channel.description,
        "messages": {m: _message(m, channel) for m in channel.messages},
        "bindings": {"kafka": kafka}}
    if channel.parameter is not None:
        name = channel.address[channel.address.index("{") + 1:channel.address.index("}")]
        out["parameters"] = {name: {"description": channel.parameter}}
    return out


def _operation_id(component: str, action: str, channel: str) -> str:
    return f"{re.sub(r'[^a-zA-Z0-9]+', '_', component).strip('_')}_{action}_{channel}"


def document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every channel, as a plain JSON object."""
    operations: dict[str, Any] = {}
    for channel in CHANNELS:
        for action, components in (("send", channel.senders), ("receive", channel.receivers)):
            for component in components:
                operations[_operation_id(component, action, channel.name)] = {
                    "action": action, "channel": {"$ref": f"#/channels/{channel.name}"},
                    "summary": component,
                    "messages": [{"$ref": f"#/channels/{channel.name}/messages/{m}"}
                                 for m in channel.messages]}
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "Ferry", "version": str(SCHEMA_VERSION), "description": (
            "Kafka-native serving for LLMs: every topic Ferry writes or reads. Values are "
            "JSON (orjson), validated by the record schemas beside this file; keys are "
            "UTF-8 strings.")},
        "defaultContentType": "application/json",
        "channels": {c.name: _channel(c) for c in CHANNELS},
        "operations": operations,
    }
