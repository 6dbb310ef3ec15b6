"""Who may do what on a secure cluster: Ferry's principals and their ACLs, as data.

One SCRAM principal per component (least privilege: the topics, groups and transactional ids
its code uses, no more) and one per tenant. `ferry kafka up --secure` and `ferry kafka
tenant add` turn these tables into ACL bindings; nothing else grants anything. The broker
denies whatever no ACL allows (`allow.everyone.if.no.acl.found=false`); only the broker's
own `admin` is a super user.

A tenant may write `ferry.ingress` (the router authenticates its API key there) and read,
describe and create topics under its reply prefix, with consumer groups under the same
prefix: it cannot post to a deployment's topic, touch a control table, or read anyone
else's replies (nor the shared `ferry.results` / `ferry.deltas`). Its prefix gets write
grants for the router and the workers, which answer there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from schemas.topics import (
    CANCELS_TOPIC, CHECKPOINTS_TOPIC, COMPARISONS_TOPIC, DELTAS_TOPIC, DLQ_TOPIC, INGRESS_TOPIC,
    KEYS_TOPIC, MIRROR_PREFIX, PRIMARY_RESULTS_TOPIC, REGISTRY_TOPIC, REPLIES_PREFIX,
    REQUESTS_PREFIX, RESULTS_TOPIC, ROUTES_TOPIC, SHADOW_RESULTS_PREFIX, SHADOW_TOPIC,
    TELEMETRY_TOPIC, WORKER_GROUP_PREFIX,
)

ADMIN = "admin"  # the broker's own principal (inter-broker, controller), the one super user
ROUTER, WORKER, GATEWAY, DEPLOYER, COMPARATOR, CONTROL = (
    "ferry-router", "ferry-worker", "ferry-gateway", "ferry-deployer", "ferry-comparator",
    "ferry-control")
SHADOW_GROUP_PREFIX = "ferry.shadow."  # schemas.topics.shadow_group
DEPLOYER_GROUP_PREFIX = "ferry.deployer."  # streams.rollout.deployer: one group per model
CONTROL_TABLES = (KEYS_TOPIC, ROUTES_TOPIC, SHADOW_TOPIC, REGISTRY_TOPIC)
TENANT_NAME = re.compile(r"^[a-zA-Z0-9._-]{1,100}$")  # = streams.routing.keys.TENANT

READ = ("READ", "DESCRIBE")
WRITE = ("WRITE", "DESCRIBE")
# Components create the topics they use when missing (edge.topic_admin.ensure_topics).
READ_C = (*READ, "CREATE")
WRITE_C = (*WRITE, "CREATE")
ALL = ("ALL",)


@dataclass(frozen=True)
class Grant:
    """Operations allowed on one resource pattern (Kafka's ResourceType / PatternType)."""

    resource: str  # TOPIC | GROUP | TRANSACTIONAL_ID | CLUSTER
    name: str
    operations: tuple[str, ...]
    prefixed: bool = False

    def bindings(self, principal: str) -> list[dict[str, str]]:
        """The ACL bindings (FerryKafkaAdmin.java's JSON) that give `principal` this grant."""
        return [{"principal": f"User:{principal}", "host": "*", "resource_type": self.resource,
                 "name": self.name, "pattern": "PREFIXED" if self.prefixed else "LITERAL",
                 "operation": op, "permission": "ALLOW"} for op in self.operations]


def topic(name: str, ops: tuple[str, ...]) -> Grant:
    return Grant("TOPIC", name, ops)


def topics(prefix: str, ops: tuple[str, ...]) -> Grant:
    return Grant("TOPIC", prefix, ops, prefixed=True)


def groups(prefix: str, ops: tuple[str, ...] = READ) -> Grant:
    return Grant("GROUP", prefix, ops, prefixed=True)


def _app(app_id: str) -> list[Grant]:
    """A faust app: its consumer group and its own topics (`<id>.quotas`, `<id>-__assignor-…`)."""
    return [Grant("GROUP", app_id, READ), topics(app_id, ALL)]


def _router_app() -> list[Grant]:
    """streams/routing/transactions.py: the app id is the consumer group, the prefix of the
    transactional ids (`<id>.ferry.ingress.<partition>`) and of the quota topic
    (`<id>.quotas`). Prefixed by `ferry-router`, so any app id starting with it is covered
    (`ferry router --app-id ferry-router-eu`); a tenant name or prefix never starts so."""
    return [groups(ROUTER), Grant("TRANSACTIONAL_ID", ROUTER, WRITE, prefixed=True),
            topics(ROUTER, (*READ_C, "WRITE"))]


def _tables(ops: tuple[str, ...]) -> list[Grant]:
    return [topic(t, ops) for t in CONTROL_TABLES]


# What each component's code reads, writes and creates (see each module named).
COMPONENTS: dict[str, list[Grant]] = {
    # streams/routing/router.py: ingress in (and re-posted keyed by tenant), the control tables and
    # the deployment catalog read, requests + mirrors + refusals + error results out.
    ROUTER: [
        topic(INGRESS_TOPIC, (*READ_C, "WRITE")), *_tables(READ_C),
        topics(REQUESTS_PREFIX, WRITE_C), topics(MIRROR_PREFIX, WRITE_C),
        topic(DLQ_TOPIC, WRITE_C), topic(RESULTS_TOPIC, WRITE_C),
        topics(REPLIES_PREFIX, WRITE_C), *_router_app(),
    ],
    # workers/worker.py, publisher.py, transactions.py: a deployment's requests (or mirror
    # copies for a shadow) in, one transactional producer per partition, answers out.
    WORKER: [
        topics(REQUESTS_PREFIX, READ_C), topics(MIRROR_PREFIX, READ_C),
        topic(CANCELS_TOPIC, READ_C),
        groups(WORKER_GROUP_PREFIX), groups(SHADOW_GROUP_PREFIX),
        Grant("TRANSACTIONAL_ID", WORKER_GROUP_PREFIX, WRITE, prefixed=True),
        Grant("TRANSACTIONAL_ID", SHADOW_GROUP_PREFIX, WRITE, prefixed=True),
        topic(RESULTS_TOPIC, WRITE_C), topics(REPLIES_PREFIX, WRITE_C),
        topic(DELTAS_TOPIC, WRITE_C), topic(DLQ_TOPIC, WRITE_C),
        topic(TELEMETRY_TOPIC, WRITE_C), topic(PRIMARY_RESULTS_TOPIC, WRITE_C),
        topics(SHADOW_RESULTS_PREFIX, WRITE_C),
    ],
    # streams/front/gateway.py: posts to ingress (or, --direct, to deployments), its own reply and
    # delta topics, cancels, async results copied to and polled from ferry.results; the
    # busy check and /v1/models read the worker groups' offsets and members.
    GATEWAY: [
        topic(INGRESS_TOPIC, WRITE), topics(REQUESTS_PREFIX, WRITE), topic(CANCELS_TOPIC, WRITE),
        topics(REPLIES_PREFIX, (*READ_C, "WRITE")), topic(RESULTS_TOPIC, (*READ_C, "WRITE")),
        *_tables(READ_C), groups(WORKER_GROUP_PREFIX, ("DESCRIBE",)),
    ],
    # streams/rollout/deployer.py: checkpoint events in, registry and routes out, probe requests on
    # the new deployment's topic answered on its own reply topic.
    DEPLOYER: [
        topic(CHECKPOINTS_TOPIC, READ_C), groups(DEPLOYER_GROUP_PREFIX),
        topic(REGISTRY_TOPIC, (*READ_C, "WRITE")), topic(ROUTES_TOPIC, (*READ_C, "WRITE")),
        topics(REQUESTS_PREFIX, WRITE_C), topics(REPLIES_PREFIX, READ_C),
        groups(WORKER_GROUP_PREFIX, ("DESCRIBE",)),
    ],
    # streams/shadow/comparator.py: primary and candidates' results (and mirror copies) in,
    # comparisons out.
    COMPARATOR: [
        topic(PRIMARY_RESULTS_TOPIC, READ_C), topics(SHADOW_RESULTS_PREFIX, READ_C),
        topics(MIRROR_PREFIX, READ_C), topic(COMPARISONS_TOPIC, WRITE_C), *_app(COMPARATOR),
    ],
    # The operator's tools (`ferry keys|route|shadow|deploy|undeploy|canary|replay|send|top`,
    # the trainer): the control tables, checkpoint events, telemetry and comparisons to
    # judge by, replays onto mirror topics, direct requests with their results.
    CONTROL: [
        *_tables((*READ_C, "WRITE")), topic(CHECKPOINTS_TOPIC, WRITE_C),
        topic(TELEMETRY_TOPIC, READ_C), topic(COMPARISONS_TOPIC, READ_C),
        topic(PRIMARY_RESULTS_TOPIC, (*READ_C, "WRITE")), topics(MIRROR_PREFIX, WRITE_C),
        topics(REQUESTS_PREFIX, WRITE), topic(RESULTS_TOPIC, READ_C),
        topic(DELTAS_TOPIC, READ_C), topic(CANCELS_TOPIC, WRITE),
        groups(WORKER_GROUP_PREFIX, ("DESCRIBE",)),
    ],
}
RESERVED = {ADMIN, "ANONYMOUS", *COMPONENTS}


def tenant_grants(reply_prefix: str) -> list[Grant]:
    """A tenant: requests into ingress; its own reply topics and consumer groups."""
    return [topic(INGRESS_TOPIC, WRITE), topics(reply_prefix, READ_C), groups(reply_prefix)]


def answering_grants(reply_prefix: str) -> dict[str, list[Grant]]:
    """What the components that answer a tenant need on its reply prefix: the router (error
    results) and the workers (results, deltas) write there and create the topics."""
    return {ROUTER: [topics(reply_prefix, WRITE_C)], WORKER: [topics(reply_prefix, WRITE_C)]}


def default_reply_prefix(tenant: str) -> str:
    return f"{tenant}."


def _norm(name: str) -> str:
    return name.replace("_", ".")  # Kafka takes '.' and '_' for the same in collisions


def check_tenant(name: str) -> None:
    if not TENANT_NAME.fullmatch(name):
        raise ValueError(f"tenant: {name!r} must match {TENANT_NAME.pattern}")
    if name in RESERVED or name.startswith("ferry-"):
        raise ValueError(f"tenant: {name!r} is reserved for Ferry's own principals")


def check_reply_prefix(prefix: str, others: dict[str, str] | None = None) -> None:
    """Refuse a prefix that would reach topics or groups that are not the tenant's own:
    Ferry's namespace (`ferry…`, a prefix of it, `__…`) or another tenant's prefix (`others`:
    tenant -> prefix), in either direction, since a PREFIXED ACL matches every longer name."""
    if not TENANT_NAME.fullmatch(prefix) or len(prefix) < 2:
        raise ValueError(f"reply prefix: {prefix!r} must be 2-100 of a-z A-Z 0-9 . _ -")
    norm = _norm(prefix)
    if norm.startswith("ferry") or "ferry".startswith(norm) or norm.startswith("."):
        raise ValueError(f"reply prefix: {prefix!r} overlaps Ferry's own topics (ferry.*, "
                         "ferry-*, __*); choose e.g. the tenant's name and a dot")
    for tenant, other in (others or {}).items():
        if norm.startswith(_norm(other)) or _norm(other).startswith(norm):
            raise ValueError(f"reply prefix: {prefix!r} overlaps tenant {tenant!r}'s "
                             f"{other!r}: one tenant could read the other's replies")


def component_bindings() -> list[dict[str, str]]:
    return [b for principal, grants in COMPONENTS.items() for g in grants
            for b in g.bindings(principal)]


def tenant_bindings(tenant: str, reply_prefix: str) -> list[dict[str, str]]:
    bindings = [b for g in tenant_grants(reply_prefix) for b in g.bindings(tenant)]
    for principal, grants in answering_grants(reply_prefix).items():
        bindings += [b for g in grants for b in g.bindings(principal)]
    return bindings


def tenant_prefixes(bindings: list[dict[str, str]]) -> dict[str, str]:
    """tenant -> reply prefix, from a cluster's ACL bindings (a tenant's prefixed READ)."""
    found = {}
    for b in bindings:
        name = b["principal"].removeprefix("User:")
        if (name not in RESERVED and b["resource_type"] == "TOPIC" and b["pattern"] == "PREFIXED"
                and b["operation"] == "READ"):
            found[name] = b["name"]
    return found
