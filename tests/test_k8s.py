"""The Kubernetes manifests (compose/k8s: a kustomize base, a cpu and a gpu overlay) and the
Deployment the deployer renders for a checkpoint, checked without a cluster: every object
loads into the official client's typed models with nothing dropped or coerced, then Ferry's
own rules (probes on the endpoints the components really serve, pinned images, no
loopback, the bootstrap from the ConfigMap, the store as a read-only claim that exists, GPU
limits, `ferry` arguments that Ferry's CLI parser accepts, static group membership from a
StatefulSet's pod names, each component's Kafka principal from a Secret of its own)."""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient

from streams.rollout.launchers import ManifestLauncher, WorkerTemplate, is_loopback
from streams.routing.registry import DeploymentRecord
from tests.manifest_checks import (
    CREDENTIALS, KAFKA_VARS, ferry_invocations, image_pinned, parse_ferry, principals,
)

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "compose" / "k8s"
OVERLAYS = ("cpu", "gpu")
WORKLOADS = ("Deployment", "StatefulSet", "Job")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}


# ---- kustomize: the real one when kubectl is there, else the subset these files use -------

def json_patch(obj: Any, ops: list[dict[str, Any]]) -> None:
    """RFC 6902 add / replace / remove."""
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~")
                          for p in op["path"].lstrip("/").split("/")]
        node = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if op["op"] == "add":
                node.insert(index, op["value"])
            elif op["op"] == "replace":
                node[index] = op["value"]
            else:
                del node[index]
        elif op["op"] == "remove":
            del node[last]
        else:
            assert op["op"] == "add" or last in node, f"replace of missing {op['path']}"
            node[last] = op["value"]


def mini_kustomize(directory: Path) -> list[dict[str, Any]]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(spec) - {"apiVersion", "kind", "namespace", "resources", "images",
                               "patches"}
    assert not unsupported, f"{directory}: extend mini_kustomize for {unsupported}"
    objects: list[dict[str, Any]] = []
    for resource in spec.get("resources", []):
        path = directory / resource
        objects += (mini_kustomize(path) if path.is_dir() else
                    [o for o in yaml.safe_load_all(path.read_text()) if o])
    for patch in spec.get("patches", []):
        ops = yaml.safe_load(patch["patch"])
        target = patch["target"]
        matched = [o for o in objects if o["kind"] == target["kind"]
                   and target.get("name", o["metadata"]["name"]) == o["metadata"]["name"]]
        assert matched, f"patch target {target} matches nothing"
        for obj in matched:
            json_patch(obj, ops)
    for image in spec.get("images", []):
        for _, container in containers(objects):
            name, _, tag = container["image"].rpartition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    if namespace := spec.get("namespace"):
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    return objects


def build(overlay: str) -> list[dict[str, Any]]:
    return mini_kustomize(K8S / "overlays" / overlay)


def _key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its kustomize) absent")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_builds_what_the_tests_check(overlay: str) -> None:
    """The real kustomize agrees object for object with the builder the rules run on."""
    done = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    real = sorted((o for o in yaml.safe_load_all(done.stdout) if o), key=_key)
    assert real == sorted(build(overlay), key=_key)


# ---- strict typed models -----------------------------------------------------------------

def model_name(obj: dict[str, Any]) -> str:
    return obj["apiVersion"].rpartition("/")[2].capitalize() + obj["kind"]


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in b:
                return f"{path}.{key}: unknown to the model"
            if key not in a:
                return f"{path}.{key}: added by the model"
            if (found := first_difference(a[key], b[key], f"{path}.{key}")) is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if (found := first_difference(x, y, f"{path}[{i}]")) is not None:
                return found
        return None
    same = a == b and type(a) is type(b)
    return None if same else f"{path}: {a!r} became {b!r}"


def typed_problem(obj: dict[str, Any]) -> str | None:
    """None when `obj` loads into its typed model (the client's models refuse unknown
    fields, wrong types and missing required ones) and serializes back unchanged."""
    client = ApiClient()
    try:
        model = client.deserialize(json.dumps(obj), model_name(obj), "application/json")
    except (ValueError, TypeError, AttributeError) as exc:
        return f"{model_name(obj)}: {exc}"
    found = first_difference(obj, client.sanitize_for_serialization(model))
    return None if found is None else f"{model_name(obj)} {obj['metadata']['name']}{found}"


# ---- what the objects say ----------------------------------------------------------------

def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            yield obj, obj["spec"]["template"]


def containers(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for obj, template in pod_specs(objects):
        for container in (template["spec"].get("initContainers", []) +
                          template["spec"]["containers"]):
            yield obj, container


def config_maps(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}


def environment(container: dict[str, Any], maps: dict[str, dict[str, str]],
                problems: list[str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it (fieldRefs as placeholders)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "secretRef" in source:  # credentials: the cluster's, not in the manifests
            continue
        ref = source["configMapRef"]["name"]
        if ref not in maps:
            problems.append(f"{container['name']}: envFrom unknown ConfigMap {ref}")
        env.update(maps.get(ref, {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
        elif ref := var["valueFrom"].get("configMapKeyRef"):
            if ref["key"] not in maps.get(ref["name"], {}):
                problems.append(f"{container['name']}: {var['name']} from missing "
                                f"{ref['name']}/{ref['key']}")
            env[var["name"]] = maps.get(ref["name"], {}).get(ref["key"], "")
        elif ref := var["valueFrom"].get("secretKeyRef"):  # the cluster's, as a placeholder
            env[var["name"]] = f"<secret {ref['name']}/{ref['key']}>"
        else:
            env[var["name"]] = f"<{var['valueFrom']['fieldRef']['fieldPath']}>"
    return env


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) in command, args and env values."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def is_ferry(container: dict[str, Any]) -> bool:
    return container["image"].rpartition("/")[2].rpartition(":")[0] == "ferry"


def ferry_commands(container: dict[str, Any], env: dict[str, str]) -> list[list[str]]:
    args = [expand(a, env) for a in container.get("args", [])]
    if container.get("command") == ["ferry"]:
        return [args]
    assert container.get("command") == ["ferry-bootstrap"], container.get("command")
    return ferry_invocations((ROOT / "compose" / "bootstrap.sh").read_text(), env)


def endpoint(parsed: Any) -> tuple[int, str] | None:
    """The HTTP port a component opens and the path that says it is healthy."""
    if parsed.command == "gateway":
        return parsed.port, "/healthz"
    if getattr(parsed, "metrics_port", None):
        return parsed.metrics_port, "/metrics"
    return None


def port_number(container: dict[str, Any], port: int | str) -> int | None:
    for declared in container.get("ports", []):
        if port in (declared.get("name"), declared["containerPort"]):
            return declared["containerPort"]
    return None


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?")
_LOOPBACK = re.compile(r"\blocalhost\b|\b127\.\d+\.\d+\.\d+\b|\[::1\]")
# A shell loop with nothing to probe: it exits on failure and the kubelet restarts it. (Ferry
# containers are checked against the endpoint their command opens instead.)
_UNPROBED = {"ferry-deployer/apply"}


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def rule_problems(objects: list[dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    maps = config_maps(objects)
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    services = [o for o in objects if o["kind"] == "Service"]
    for obj in objects:
        name = obj["metadata"]["name"]
        if not _DNS_LABEL.fullmatch(name):
            problems.append(f"{obj['kind']} {name}: not a DNS-1123 label")
        for key, value in obj["metadata"].get("labels", {}).items():
            if not _LABEL_VALUE.fullmatch(value):
                problems.append(f"{name}: label {key}={value!r} is not a label value")
        for text in strings(obj):
            if _LOOPBACK.search(text):
                problems.append(f"{obj['kind']} {name}: loopback address in {text!r}")
    for obj, template in pod_specs(objects):
        name, spec = obj["metadata"]["name"], template["spec"]
        selector = obj["spec"].get("selector", {}).get("matchLabels", {})
        if obj["kind"] != "Job" and not selector.items() <= template["metadata"]["labels"].items():
            problems.append(f"{name}: selector {selector} does not select its pods")
        if obj["kind"] == "StatefulSet":  # its pods' DNS names come from a headless Service
            governing = next((s for s in services
                              if s["metadata"]["name"] == obj["spec"].get("serviceName")), None)
            if governing is None or governing["spec"].get("clusterIP") != "None" or not \
                    governing["spec"]["selector"].items() <= template["metadata"]["labels"].items():
                problems.append(f"{name}: serviceName is not a headless Service of its pods")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        templates = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        for volume in volumes.values():
            claim = volume.get("persistentVolumeClaim")
            if claim and claim["claimName"] not in claims:
                problems.append(f"{name}: claim {claim['claimName']} is not in the manifests")
        for container in spec["containers"]:
            where = f"{name}/{container['name']}"
            image = container["image"]
            if not image_pinned(image):
                problems.append(f"{where}: image {image} is not pinned to a version")
            resources = container.get("resources", {})
            if not {"cpu", "memory"} <= set(resources.get("requests", {})) or \
                    "memory" not in resources.get("limits", {}):
                problems.append(f"{where}: cpu/memory requests and a memory limit needed")
            gpus = resources.get("limits", {}).get("nvidia.com/gpu")
            if gpus and not any(t.get("key") == "nvidia.com/gpu"
                                for t in spec.get("tolerations", [])):
                problems.append(f"{where}: GPUs but no toleration of the GPU taint")
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes and mount["name"] not in templates:
                    problems.append(f"{where}: mounts unknown volume {mount['name']}")
            env = environment(container, maps, problems)
            long_running = obj["kind"] != "Job"
            for kind in ("readinessProbe", "livenessProbe"):
                if long_running and not is_ferry(container) and kind not in container \
                        and where not in _UNPROBED:
                    problems.append(f"{where}: no {kind}")
                probe = container.get(kind, {})
                for action in ("httpGet", "tcpSocket"):
                    if action in probe and port_number(container, probe[action]["port"]) is None:
                        problems.append(f"{where}: {kind} on an undeclared port")
            if is_ferry(container):
                problems += _ferry_problems(where, obj, template, container, env, volumes, maps)
    for secret, users in principal_secrets(objects).items():
        if len(users) > 1:
            problems.append(f"Secret {secret} is shared by principals {sorted(users)}")
    for service in services:
        pods = [t for _, t in pod_specs(objects)
                if service["spec"]["selector"].items() <= t["metadata"]["labels"].items()]
        if not pods:
            problems.append(f"Service {service['metadata']['name']} selects no pods")
        for port in service["spec"]["ports"]:
            if not any(port_number(c, port["targetPort"]) for t in pods
                       for c in t["spec"]["containers"]):
                problems.append(f"Service {service['metadata']['name']}: no target {port}")
    return problems


def _ferry_problems(where: str, obj: dict[str, Any], template: dict[str, Any],
                    container: dict[str, Any], env: dict[str, str],
                    volumes: dict[str, Any], maps: dict[str, dict[str, str]]) -> list[str]:
    problems = []
    commands: list[argparse.Namespace] = []
    bootstrap = next((v for v in container.get("env", []) if v["name"] == "KAFKA_BOOTSTRAP"),
                     None)
    if not env.get("KAFKA_BOOTSTRAP") or (bootstrap is not None and "value" in bootstrap):
        problems.append(f"{where}: KAFKA_BOOTSTRAP must come from the ConfigMap")
    elif is_loopback(env["KAFKA_BOOTSTRAP"]):
        problems.append(f"{where}: KAFKA_BOOTSTRAP {env['KAFKA_BOOTSTRAP']} is a loopback")
    for args in ferry_commands(container, env):
        if unresolved := [a for a in args if "$(" in a]:
            problems.append(f"{where}: unresolved {unresolved}")
        try:
            parsed = parse_ferry(args, env)
        except AssertionError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if parsed is None:
            continue
        commands.append(parsed)
        if getattr(parsed, "bootstrap", None):
            problems.append(f"{where}: --bootstrap in args (it belongs in the ConfigMap)")
        if parsed.command == "gateway" and parsed.host in ("127.0.0.1", "localhost", "::1"):
            problems.append(f"{where}: gateway bound to loopback")
        served = endpoint(parsed)
        if served is None and obj["kind"] != "Job":
            problems.append(f"{where}: `ferry {parsed.command}` opens no port to probe")
            continue
        for kind in ("readinessProbe", "livenessProbe") if obj["kind"] != "Job" else ():
            http = container.get(kind, {}).get("httpGet")
            if http is None:
                problems.append(f"{where}: no {kind} (httpGet)")
            elif served != (port_number(container, http["port"]), http["path"]):
                problems.append(f"{where}: {kind} {http} is not {served} it serves")
        metrics = getattr(parsed, "metrics_port", None)
        if metrics and obj["kind"] != "Job":
            notes = template["metadata"].get("annotations", {})
            if notes.get("prometheus.io/scrape") != "true" or \
                    notes.get("prometheus.io/port") != str(metrics):
                problems.append(f"{where}: metrics port {metrics} not annotated for scraping")
            if port_number(container, metrics) is None:
                problems.append(f"{where}: metrics port {metrics} not declared")
        if parsed.command == "worker":
            mount = next((m for m in container.get("volumeMounts", [])
                          if m["mountPath"] == str(parsed.store)), None)
            source = volumes.get(mount["name"], {}) if mount else {}
            if not (mount and mount.get("readOnly")
                    and source.get("persistentVolumeClaim", {}).get("readOnly")):
                problems.append(f"{where}: model store {parsed.store} not a read-only claim")
    return (problems + _membership_problems(where, obj, commands)
            + _kafka_security_problems(where, container, commands, maps))


# The flag of each command that makes it a static group member (env defaults:
# FERRY_ROUTER_INSTANCE_ID, FERRY_GROUP_INSTANCE_ID).
_MEMBER_ID = {"router": "instance_id", "worker": "group_instance_id"}
POD_NAME = "<metadata.name>"  # what `environment` gives a fieldRef to the pod's name


def _membership_problems(where: str, obj: dict[str, Any],
                         commands: list[argparse.Namespace]) -> list[str]:
    """A StatefulSet's pods keep their names: each one's name is its static member id (a
    restart takes its partitions back at once). A Deployment's pods get new names, so a
    static id there would only keep a dead member's partitions waiting; the router's
    failover depends on one, so it must be a StatefulSet."""
    problems = []
    for parsed in commands:
        attr = _MEMBER_ID.get(parsed.command)
        if attr is None or obj["kind"] == "Job":
            continue
        member = getattr(parsed, attr)
        if obj["kind"] == "StatefulSet" and member != POD_NAME:
            problems.append(f"{where}: `ferry {parsed.command}` in a StatefulSet needs its pod "
                            f"name as static member id, has {member!r}")
        elif obj["kind"] != "StatefulSet" and parsed.command == "router":
            problems.append(f"{where}: the router must be a StatefulSet (static membership "
                            f"by pod name), not a {obj['kind']}")
        elif obj["kind"] != "StatefulSet" and member is not None:
            problems.append(f"{where}: static member id {member!r} in a {obj['kind']}, whose "
                            "pods' names never come back")
    return problems


def kafka_sources(container: dict[str, Any], maps: dict[str, dict[str, str]]
                  ) -> dict[str, tuple[str, str, str, bool]]:
    """Where each FERRY_KAFKA_* security variable comes from, env over envFrom as the
    kubelet resolves it: (kind, name, key, optional), kind one of configMap, secret (a
    secretKeyRef), secretRef (a whole Secret by envFrom: any key may be in it), value (a
    literal), fieldRef."""
    sources: dict[str, tuple[str, str, str, bool]] = {}
    for source in container.get("envFrom", []):
        if ref := source.get("secretRef"):
            sources.update({v: ("secretRef", ref["name"], v, ref.get("optional", False))
                            for v in KAFKA_VARS})
        else:
            name = source["configMapRef"]["name"]
            sources.update({v: ("configMap", name, v, False)
                            for v in KAFKA_VARS if v in maps.get(name, {})})
    for var in container.get("env", []):
        if var["name"] not in KAFKA_VARS:
            continue
        if "value" in var:
            sources[var["name"]] = ("value", "", "", False)  # never echo a password
            continue
        kind, ref = next(iter(var["valueFrom"].items()))
        kind = {"configMapKeyRef": "configMap", "secretKeyRef": "secret"}.get(kind, kind)
        sources[var["name"]] = (kind, ref.get("name", ""), ref.get("key", ""),
                                ref.get("optional", False))
    return sources


def kafka_secret(principal: str) -> str:
    """The Secret the operator creates for a principal's username and password."""
    return f"{principal}-kafka"


def _kafka_security_problems(where: str, container: dict[str, Any],
                             commands: list[argparse.Namespace],
                             maps: dict[str, dict[str, str]]) -> list[str]:
    """Least privilege: each component connects as its own principal, its username and
    password from its own Secret (never a literal; a secretKeyRef not optional, so a pod
    without its credentials never starts); protocol and mechanism from the ConfigMap, one
    setting for the whole stack, also in the Deployments the deployer renders."""
    needed = principals(commands)
    if len(needed) != 1:
        return [f"{where}: runs as principals {sorted(needed)}, not one"] if needed else []
    [principal] = needed
    secret, sources = kafka_secret(principal), kafka_sources(container, maps)
    problems = []
    for var in CREDENTIALS:
        kind, name, key, optional = sources.get(var, ("unset", "", "", False))
        if kind != "secret" or name != secret:
            problems.append(f"{where}: {var} must come from Secret {secret} ({principal}), "
                            f"not {kind} {name}".rstrip())
        elif kind == "secret" and (optional or key != var):
            problems.append(f"{where}: {var} from {name}/{key}: key {var}, optional: false")
    for var in ("FERRY_KAFKA_SECURITY_PROTOCOL", "FERRY_KAFKA_SASL_MECHANISM"):
        kind, name, _, _ = sources.get(var, ("unset", "", "", False))
        if kind != "configMap":
            problems.append(f"{where}: {var} must come from the ConfigMap, not {kind}")
    return problems


def principal_secrets(objects: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Secret -> the principals of the Ferry containers whose credentials it gives."""
    maps, users = config_maps(objects), dict[str, set[str]]()
    for _, container in containers(objects):
        if not is_ferry(container):
            continue
        env = environment(container, maps, [])
        try:
            parsed = [parse_ferry(a, env) for a in ferry_commands(container, env)]
        except AssertionError:  # a command ferry refuses: its own problem
            continue
        sources = kafka_sources(container, maps)
        for var in CREDENTIALS:
            kind, name, _, _ = sources.get(var, ("unset", "", "", False))
            if kind in ("secret", "secretRef"):
                users.setdefault(name, set()).update(principals(parsed))
    return users


# ---- the tests ---------------------------------------------------------------------------

def rendered(overlay: str, tmp_path: Path) -> dict[str, Any]:
    """The Deployment the overlay's deployer renders for a checkpoint (its template read
    from the overlay's ConfigMap, as the pod's envFrom gives it)."""
    objects = build(overlay)
    [deployer] = [c for o, c in containers(objects) if o["metadata"]["name"] == "ferry-deployer"
                  and c["name"] == "deployer"]
    env = environment(deployer, config_maps(objects), [])
    args = parse_ferry(ferry_commands(deployer, env)[0])
    assert args.launcher == "manifests"
    launcher = ManifestLauncher("127.0.0.1:9092", tmp_path, WorkerTemplate.from_env(env))
    record = DeploymentRecord(env["FERRY_CHECKPOINT_MODEL"], "checkpoint-1200",
                              f"{args.store}/{env['FERRY_CHECKPOINT_MODEL']}/checkpoint-1200",
                              replicas=2)
    asyncio.run(launcher.start(record))
    return yaml.safe_load((tmp_path / f"{record.deployment}.k8s.yaml").read_text())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_loads_into_the_typed_models(overlay: str, tmp_path: Path) -> None:
    objects = build(overlay) + [rendered(overlay, tmp_path)]
    assert {o["kind"] for o in objects} >= {"StatefulSet", "Deployment", "Service", "Job",
                                            "PersistentVolumeClaim", "ConfigMap", "Role"}
    assert [p for o in objects if (p := typed_problem(o))] == []


def test_typed_check_refuses_unknown_and_missing_fields() -> None:
    [worker] = [o for o in build("cpu") if o["metadata"]["name"] == "ferry-worker"
                and o["kind"] == "StatefulSet"]
    unknown = copy.deepcopy(worker)
    unknown["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    assert "readinessProbes: unknown to the model" in typed_problem(unknown)
    coerced = copy.deepcopy(worker)
    coerced["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9100"
    assert "containerPort" in typed_problem(coerced)  # a string where an int belongs
    nameless = copy.deepcopy(worker)
    del nameless["spec"]["template"]["spec"]["containers"][0]["name"]
    assert "name" in typed_problem(nameless)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_follow_ferrys_rules(overlay: str, tmp_path: Path) -> None:
    assert rule_problems(build(overlay) + [rendered(overlay, tmp_path)]) == []


@pytest.mark.parametrize("change, problem", [
    (lambda o: _container(o, "ferry-gateway").pop("livenessProbe"), "no livenessProbe"),
    (lambda o: _container(o, "ferry-router").update(image="ferry:latest"), "not pinned"),
    (lambda o: _config(o).update(KAFKA_BOOTSTRAP="127.0.0.1:9092"), "loopback"),
    (lambda o: _container(o, "ferry-router")["args"].append("--metric-port"), "unrecognized"),
    (lambda o: _container(o, "ferry-worker")["volumeMounts"][0].pop("readOnly"), "read-only"),
    (lambda o: _container(o, "ferry-gateway")["readinessProbe"]["httpGet"].update(
        path="/metrics"), "is not (8000, '/healthz')"),
    (lambda o: _container(o, "ferry-worker")["args"].extend(["--bootstrap", "kafka:9092"]),
     "--bootstrap in args"),
    (lambda o: [x for x in o if x["kind"] == "PersistentVolumeClaim"
                and x["metadata"]["name"] == "ferry-models"][0]["metadata"].update(
        name="models"), "claim ferry-models is not in the manifests"),
    # Static membership: the router's id is its StatefulSet pod's name.
    (lambda o: _workload(o, "ferry-router").update(kind="Deployment"),
     "the router must be a StatefulSet"),
    (lambda o: _container(o, "ferry-router")["env"].remove(
        _env(o, "ferry-router", "FERRY_ROUTER_INSTANCE_ID")), "needs its pod name"),
    (lambda o: _env(o, "ferry-worker", "FERRY_GROUP_INSTANCE_ID")["valueFrom"]["fieldRef"]
     .update(fieldPath="metadata.uid"), "needs its pod name"),
    (lambda o: _workload(o, "ferry-router")["spec"].update(serviceName="ferry-gateway"),
     "serviceName is not a headless Service"),
    # Kafka principals: each its own Secret, never a literal, protocol from the ConfigMap.
    (lambda o: _env(o, "ferry-gateway", "FERRY_KAFKA_USERNAME")["valueFrom"]["secretKeyRef"]
     .update(name="ferry-router-kafka"), "Secret ferry-router-kafka is shared"),
    (lambda o: _literal(o, "ferry-deployer", "FERRY_KAFKA_PASSWORD", "hunter2"),
     "FERRY_KAFKA_PASSWORD must come from Secret ferry-deployer-kafka"),
    (lambda o: _container(o, "ferry-bootstrap")["env"].remove(
        _env(o, "ferry-bootstrap", "FERRY_KAFKA_USERNAME")), "FERRY_KAFKA_USERNAME must come"),
    (lambda o: _env(o, "ferry-worker", "FERRY_KAFKA_PASSWORD")["valueFrom"]["secretKeyRef"]
     .update(optional=True), "optional: false"),
    (lambda o: _literal(o, "ferry-router", "FERRY_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
     "FERRY_KAFKA_SECURITY_PROTOCOL must come from the ConfigMap"),
])
def test_rules_catch_mistakes(change: Any, problem: str) -> None:
    objects = build("gpu")
    change(objects)
    assert any(problem in p for p in rule_problems(objects)), rule_problems(objects)


def _container(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(c for o, c in containers(objects) if o["metadata"]["name"] == name)


def _workload(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(o for o, _ in pod_specs(objects) if o["metadata"]["name"] == name)


def _env(objects: list[dict[str, Any]], workload: str, var: str) -> dict[str, Any]:
    return next(v for v in _container(objects, workload)["env"] if v["name"] == var)


def _literal(objects: list[dict[str, Any]], workload: str, var: str, value: str) -> None:
    """`var` written into the manifest instead of taken from where it belongs."""
    entry = _env(objects, workload, var)
    del entry["valueFrom"]
    entry["value"] = value


def _config(objects: list[dict[str, Any]]) -> dict[str, str]:
    return config_maps(objects)["ferry-config"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_per_overlay(overlay: str, tmp_path: Path) -> None:
    objects = build(overlay)
    workers = [_container(objects, "ferry-worker"),
               rendered(overlay, tmp_path)["spec"]["template"]["spec"]["containers"][0]]
    maps = config_maps(objects)
    for container in workers:
        parsed = parse_ferry(ferry_commands(container, environment(container, maps, []))[0])
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert (parsed.device, gpus) == (("cuda", "1") if overlay == "gpu" else ("cpu", None))
    if overlay == "cpu":
        assert not any("nvidia.com/gpu" in json.dumps(o) for o in objects)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_deployment_fits_the_stack(overlay: str, tmp_path: Path) -> None:
    objects = build(overlay)
    deployment = rendered(overlay, tmp_path)
    [pod] = [t for o, t in pod_specs(objects) if o["metadata"]["name"] == "ferry-deployer"]
    deployer = next(c for c in pod["spec"]["containers"] if c["name"] == "deployer")
    apply = next(c for c in pod["spec"]["containers"] if c["name"] == "apply")
    # What it renders runs the image the deployer itself runs (images: of the overlay).
    worker = deployment["spec"]["template"]["spec"]["containers"][0]
    assert worker["image"] == deployer["image"]
    # The sidecar applies and prunes exactly the Deployments carrying the deployer's label.
    selector = re.search(r"-l ([\w./-]+)=([\w.-]+)", apply["args"][0])
    assert selector and deployment["metadata"]["labels"][selector[1]] == selector[2]
    assert "--prune" in apply["args"][0]
    manifests = parse_ferry(ferry_commands(deployer, environment(
        deployer, config_maps(objects), []))[0]).manifests
    assert {"mountPath": str(manifests), "name": "manifests", "readOnly": True} in \
        apply["volumeMounts"]
    # The same claim the deployer writes the store into, mounted where it pushed.
    store = {m["mountPath"]: m["name"] for m in deployer["volumeMounts"]}["/models"]
    claim = {v["name"]: v for v in pod["spec"]["volumes"]}[store]["persistentVolumeClaim"]
    rendered_claim = deployment["spec"]["template"]["spec"]["volumes"][0]
    assert rendered_claim["persistentVolumeClaim"] == {**claim, "readOnly": True}
    roles = [o for o in objects if o["kind"] == "Role"]
    assert any({"create", "patch", "delete", "list"} <= set(rule["verbs"])
               and "deployments" in rule["resources"] for r in roles for rule in r["rules"])
    assert pod["spec"]["serviceAccountName"] in {
        s["name"] for o in objects if o["kind"] == "RoleBinding" for s in o["subjects"]}


def test_kafka_statefulset_and_bootstrap() -> None:
    objects = build("gpu")
    [kafka] = [o for o in objects if o["kind"] == "StatefulSet"
               and o["metadata"]["name"] == "kafka"]
    container = kafka["spec"]["template"]["spec"]["containers"][0]
    env = environment(container, {}, [])
    assert kafka["spec"]["template"]["spec"]["enableServiceLinks"] is False
    # Its logs live on the claim template's volume.
    [mount] = container["volumeMounts"]
    assert mount["name"] in {t["metadata"]["name"] for t in kafka["spec"]["volumeClaimTemplates"]}
    assert env["KAFKA_LOG_DIRS"].startswith(mount["mountPath"] + "/")
    # It advertises the headless service's per-pod name; KAFKA_BOOTSTRAP names a Service port.
    headless = next(o for o in objects if o["metadata"]["name"] == kafka["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert f".{headless['metadata']['name']}." in env["KAFKA_ADVERTISED_LISTENERS"]
    host, port = _config(objects)["KAFKA_BOOTSTRAP"].split(":")
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == host)
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    # The Job routes the alias to what the static worker serves.
    maps = config_maps(objects)
    job = _container(objects, "ferry-bootstrap")
    commands = ferry_commands(job, environment(job, maps, []))
    worker = _container(objects, "ferry-worker")
    served = parse_ferry(ferry_commands(worker, environment(worker, maps, []))[0])
    assert ["route", "set", maps["ferry-config"]["FERRY_ALIAS"],
            f"{served.deployment}=100", "--force"] in commands
    assert ["keys", "add", maps["ferry-config"]["FERRY_TENANT"]] in commands


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_router_and_worker_take_their_pod_names_as_static_member_ids(
        overlay: str, tmp_path: Path) -> None:
    objects = build(overlay)
    maps = config_maps(objects)
    for name, command, attr in (("ferry-router", "router", "instance_id"),
                                ("ferry-worker", "worker", "group_instance_id")):
        [workload] = [o for o, _ in pod_specs(objects) if o["metadata"]["name"] == name]
        assert workload["kind"] == "StatefulSet"
        headless = next(o for o in objects if o["kind"] == "Service"
                        and o["metadata"]["name"] == workload["spec"]["serviceName"])
        assert headless["spec"]["clusterIP"] == "None"
        container = _container(objects, name)
        # The kubelet gives each pod its own name (ferry-router-0, -1, ...): each reaches
        # `ferry router` as its id, through the flag's environment default.
        ids = set()
        for ordinal in range(3):
            pod = f"{name}-{ordinal}"
            env = {k: v.replace(POD_NAME, pod)
                   for k, v in environment(container, maps, []).items()}
            [args] = ferry_commands(container, env)
            parsed = parse_ferry(args, env)
            assert (parsed.command, getattr(parsed, attr)) == (command, pod)
            ids.add(getattr(parsed, attr))
        assert len(ids) == 3
    # What the deployer renders per checkpoint is a Deployment: no static id.
    checkpoint = rendered(overlay, tmp_path)
    assert checkpoint["kind"] == "Deployment"
    [container] = checkpoint["spec"]["template"]["spec"]["containers"]
    env = environment(container, maps, [])
    assert parse_ferry(ferry_commands(container, env)[0], env).group_instance_id is None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_component_connects_as_its_own_principal(overlay: str, tmp_path: Path) -> None:
    objects = build(overlay) + [rendered(overlay, tmp_path)]
    maps = config_maps(objects)
    secrets: dict[str, set[str]] = {}
    for obj, container in containers(objects):
        if not is_ferry(container):
            continue
        env = environment(container, maps, [])
        [principal] = principals(parse_ferry(a, env) for a in ferry_commands(container, env))
        sources = kafka_sources(container, maps)
        secrets.setdefault(principal, set()).update(
            sources[var][1] for var in CREDENTIALS)
        for var in CREDENTIALS:
            assert sources[var] == ("secret", kafka_secret(principal), var, False), var
        for var in ("FERRY_KAFKA_SECURITY_PROTOCOL", "FERRY_KAFKA_SASL_MECHANISM"):
            assert sources[var][:2] == ("configMap", "ferry-config")
            assert env[var] == maps["ferry-config"][var]
    # One Secret per principal, none shared (the static worker and the rendered ones are
    # the same principal: they read the one ferry-worker-kafka).
    assert secrets == {p: {kafka_secret(p)} for p in (
        "ferry-router", "ferry-gateway", "ferry-worker", "ferry-deployer", "ferry-control")}
    assert principal_secrets(objects) == {kafka_secret(p): {p} for p in secrets}
    # No Secret in the manifests: the operator creates them (README), none is committed.
    assert "Secret" not in {o["kind"] for o in objects}
    # A plaintext cluster as shipped; the protocol is one ConfigMap key away from SASL.
    assert maps["ferry-config"]["FERRY_KAFKA_SECURITY_PROTOCOL"] == "PLAINTEXT"
