"""The compose stack, checked where no Docker engine runs: the Compose Specification's JSON
Schema (vendored in compose/schema), then Ferry's own rules: every service health-gated,
every image built or pinned, every `ferry` command parsed by Ferry's CLI parser, listeners
and volumes that fit together, the CPU override, the image and what Prometheus scrapes, the
router's static member id, each component's Kafka principal from variables of its own."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from edge.kafka_clients import KafkaSecurityError, security_from_env
from streams.rollout.launchers import (
    LocalLauncher, ManifestLauncher, WorkerTemplate, worker_kafka_env,
)
from streams.routing.registry import DeploymentRecord
from tests.manifest_checks import (
    CREDENTIALS, ferry_invocations, image_pinned, parse_ferry, principals,
)

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose"
DOCKERFILE = COMPOSE / "worker.Dockerfile"
SCHEMA = json.loads((COMPOSE / "schema" / "compose-spec.json").read_text())


# ---- loading as Compose does: YAML with !reset/!override, interpolation, merging ----------

class Reset:
    """`!reset`: the key goes back to its default (is removed) when files are merged."""


class Override:
    """`!override VALUE`: replaces the base's value whole instead of merging."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _construct(tag: str):  # type: ignore[no-untyped-def]
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        if tag == "!reset":
            return Reset()
        value = (loader.construct_mapping(node, deep=True)
                 if isinstance(node, yaml.MappingNode) else
                 loader.construct_sequence(node, deep=True)
                 if isinstance(node, yaml.SequenceNode) else loader.construct_scalar(node))
        return Override(value)
    return construct


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _construct(_tag))

_INTERPOLATION = re.compile(r"\$(?:\$|\{(\w+)(?:(:?[-?])([^}]*))?\})")
_REPLACED_LISTS = {"command", "entrypoint", "test"}  # merge.md: these lists are overridden


def interpolate(value: Any, env: dict[str, str], missing: list[str]) -> Any:
    """Compose's ${NAME}, ${NAME:-default}, ${NAME-default}, $$; names used without a
    default (and unset in `env`) are appended to `missing`."""
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, op, default = m.group(1), m.group(2), m.group(3)
            if name in env and (env[name] or op != ":-"):
                return env[name]
            if op not in (":-", "-"):
                missing.append(name)
                return ""
            return default
        return _INTERPOLATION.sub(sub, value)
    if isinstance(value, dict):
        return {k: interpolate(v, env, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, missing) for v in value]
    if isinstance(value, Override):
        return Override(interpolate(value.value, env, missing))
    return value


def merge(base: Any, over: Any, key: str = "") -> Any:
    if isinstance(over, Override):
        return over.value
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            if isinstance(v, Reset):
                out.pop(k, None)
            else:
                out[k] = merge(base[k], v, k) if k in base else plain(v)
        return out
    if isinstance(base, list) and isinstance(over, list) and key not in _REPLACED_LISTS:
        return base + [v for v in over if v not in base]
    return plain(over)


def plain(value: Any) -> Any:
    """A value without !reset/!override markers (as the schema sees a single file)."""
    if isinstance(value, Override):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if not isinstance(v, Reset)}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def load(name: str) -> Any:
    return yaml.load((COMPOSE / name).read_text(), ComposeLoader)


def merged(*names: str) -> dict[str, Any]:
    """The project of `docker compose -f A -f B ...` before interpolation (${...} as written)."""
    docs = [load(n) for n in names]
    project = plain(docs[0])
    for doc in docs[1:]:
        project = merge(project, doc)
    return project


def effective(*names: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The project Compose would run for `docker compose -f A -f B ...`, interpolated."""
    return interpolate(merged(*names), env or {}, [])


GPU = effective("docker-compose.yml")
CPU = effective("docker-compose.yml", "docker-compose.cpu.yml")
STACKS = {"gpu": GPU, "cpu": CPU}


def schema_errors(doc: Any) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


# ---- what a service runs ---------------------------------------------------------------

def dockerfile_instruction(name: str) -> list[str]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.split(None, 1)[1] for line in text.splitlines()
            if line.split(None, 1)[:1] == [name]]


def argv(service: dict[str, Any]) -> list[str]:
    """What the container runs: entrypoint + command, the image's when not given (the
    Ferry image's ENTRYPOINT and CMD, read from its Dockerfile)."""
    def listed(v: Any) -> list[str]:
        return v.split() if isinstance(v, str) else list(v)
    ferry_image = "build" in service
    entrypoint = (listed(service["entrypoint"]) if "entrypoint" in service else
                  json.loads(dockerfile_instruction("ENTRYPOINT")[-1]) if ferry_image else [])
    default_cmd = (json.loads(dockerfile_instruction("CMD")[-1])
                   if ferry_image and "entrypoint" not in service else [])
    return entrypoint + (listed(service["command"]) if "command" in service else default_cmd)


def ferry_commands(service: dict[str, Any]) -> list[list[str]]:
    """Every `ferry` argument list the service runs (scripts in the image included)."""
    run = argv(service)
    if run[:1] == ["ferry"]:
        return [run[1:]]
    if run[:1] == ["ferry-bootstrap"]:
        return ferry_invocations((COMPOSE / "bootstrap.sh").read_text(),
                                 {k: str(v) for k, v in service.get("environment", {}).items()})
    return []


def ferry_services(stack: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in stack["services"].items() if "build" in s}


def one_shot(stack: dict[str, Any], name: str) -> bool:
    """A job: some service waits for it to complete."""
    return any(dep.get("condition") == "service_completed_successfully"
               for s in stack["services"].values()
               for d, dep in s.get("depends_on", {}).items() if d == name)


def listens_on(service: dict[str, Any]) -> dict[int, str]:
    """HTTP ports the service's process opens, with the path that tells it is healthy."""
    ports: dict[int, str] = {}
    for args in ferry_commands(service):
        parsed = parse_ferry(args)
        if parsed is None:
            continue
        if parsed.command == "gateway":
            ports[parsed.port] = "/healthz"
        if getattr(parsed, "metrics_port", None):
            ports[parsed.metrics_port] = "/metrics"
    return ports


def healthcheck_url(service: dict[str, Any]) -> tuple[int, str]:
    test = service["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL"), test
    found = re.search(r"localhost:(\d+)(/[\w./-]*)", " ".join(test[1:]))
    assert found, f"healthcheck {test} fetches no local URL"
    return int(found.group(1)), found.group(2)


# ---- the tests -------------------------------------------------------------------------

@pytest.mark.parametrize("files", [("docker-compose.yml",),
                                   ("docker-compose.cpu.yml",),
                                   ("docker-compose.yml", "docker-compose.cpu.yml")])
def test_files_match_the_compose_specification(files: tuple[str, ...]) -> None:
    if len(files) == 1:  # as written, and as Compose sees it after interpolation
        raw = plain(load(files[0]))
        docs = [raw, interpolate(raw, {}, [])]
    else:
        docs = [effective(*files)]
    for doc in docs:
        assert schema_errors(doc) == []


def test_schema_check_can_fail() -> None:
    broken = json.loads(json.dumps(GPU))
    broken["services"]["worker"]["depends_on"]["kafka"]["condition"] = "service_ready"
    broken["services"]["gateway"]["healthcheck"]["intervall"] = "10s"
    errors = schema_errors(broken)
    assert len(errors) >= 2, errors


def test_every_interpolation_has_a_default() -> None:
    for name in ("docker-compose.yml", "docker-compose.cpu.yml"):
        missing: list[str] = []
        interpolate(plain(load(name)), {}, missing)
        assert missing == [], f"{name}: ${{{missing}}} without a default"
    assert interpolate("${A:-x}/${B-y}/${A}/$$", {"A": "1"}, []) == "1/y/1/$"


@pytest.mark.parametrize("stack", STACKS, ids=str)
def test_images_are_built_or_pinned(stack: str) -> None:
    services = STACKS[stack]["services"]
    for name, service in services.items():
        assert "image" in service, f"{name}: no image"
        assert image_pinned(service["image"]), f"{name}: {service['image']} is not pinned"
    built = {s["image"] for s in ferry_services(STACKS[stack]).values()}
    assert len(built) == 1, f"one Ferry image per stack, got {built}"
    for base in dockerfile_instruction("FROM"):
        assert image_pinned(base.split()[0]), base
    assert not image_pinned("ferry:latest") and not image_pinned("prom/prometheus")


@pytest.mark.parametrize("stack", STACKS, ids=str)
def test_services_are_health_gated(stack: str) -> None:
    project = STACKS[stack]
    services = project["services"]
    for name, service in services.items():
        for dep, spec in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec.get("condition")
            assert condition in ("service_healthy", "service_completed_successfully"), \
                f"{name} -> {dep}: {condition}: not gated on health"
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}'s missing check"
            else:
                assert one_shot(project, dep)
        if one_shot(project, name):
            assert service["restart"] == "on-failure", f"job {name}: {service.get('restart')}"
        else:
            assert service.get("restart") in ("unless-stopped", "always"), name
        if "build" in service:  # every Ferry component waits for the broker to answer
            assert service["depends_on"]["kafka"]["condition"] == "service_healthy", name


@pytest.mark.parametrize("stack", STACKS, ids=str)
def test_healthchecks_fetch_what_the_service_serves(stack: str) -> None:
    for name, service in STACKS[stack]["services"].items():
        ports = listens_on(service)
        if ports:
            assert "healthcheck" in service, f"{name} serves {ports} but has no healthcheck"
            port, path = healthcheck_url(service)
            assert ports.get(port) == path, f"{name}: checks :{port}{path}, serves {ports}"
        else:  # every long-running Ferry component serves metrics
            assert "build" not in service or one_shot(STACKS[stack], name), \
                f"{name}: no endpoint and no healthcheck"
    for name in ("prometheus", "grafana"):
        port = int(STACKS[stack]["services"][name]["ports"][0].split(":")[-1])
        assert healthcheck_url(STACKS[stack]["services"][name])[0] == port


@pytest.mark.parametrize("stack", STACKS, ids=str)
def test_ferry_commands_parse_with_ferrys_cli(stack: str) -> None:
    project = STACKS[stack]
    seen = set()
    for name, service in ferry_services(project).items():
        commands = ferry_commands(service)
        assert commands, f"{name} runs no ferry command: {argv(service)}"
        for args in commands:
            parsed = parse_ferry(args)
            seen.add(args[0])
            if parsed is not None and parsed.command == "gateway":
                assert parsed.host == "0.0.0.0", "a gateway on loopback is unreachable"
        assert service["environment"]["KAFKA_BOOTSTRAP"] == "kafka:9092", name
    assert seen == {"worker", "router", "gateway", "deployer", "model", "keys", "route"}


def test_cli_check_catches_a_wrong_flag() -> None:
    with pytest.raises(AssertionError, match="unrecognized arguments: --metric-port"):
        parse_ferry(["router", "--metric-port", "9101"])
    with pytest.raises(AssertionError, match="invalid choice"):
        parse_ferry(["keys", "create", "acme"])
    script = 'if ferry keys list | grep -q x; then ferry route set a "$D=100" >/dev/null 2>&1; fi'
    assert ferry_invocations(script, {"D": "tiny"}) == [["keys", "list"],
                                                         ["route", "set", "a", "tiny=100"]]


def test_bootstrap_routes_to_what_the_worker_serves() -> None:
    services = GPU["services"]
    worker = parse_ferry(ferry_commands(services["worker"])[0])
    jobs = ferry_commands(services["bootstrap"])
    assert ["keys", "add", "default"] in jobs
    [route] = [c for c in jobs if c[:2] == ["route", "set"]]
    assert route[3] == f"{worker.deployment}=100"
    [push] = [c for c in jobs if c[:2] == ["model", "push"]]
    assert push[3] == f"{worker.store}/{worker.model}"  # the tiny seed is what it serves


def test_kafka_listeners_and_data_volume() -> None:
    kafka = GPU["services"]["kafka"]
    env = {k: str(v) for k, v in kafka["environment"].items()}

    def listeners(key: str) -> dict[str, tuple[str, int]]:
        out = {}
        for item in env[key].split(","):
            name, _, address = item.partition("://")
            host, _, port = address.rpartition(":")
            out[name] = (host, int(port))
        return out

    bound, advertised = listeners("KAFKA_LISTENERS"), listeners("KAFKA_ADVERTISED_LISTENERS")
    protocols = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(bound) <= set(protocols) and set(advertised) <= set(bound)
    published = {int(p.split(":")[1]): int(p.split(":")[0]) for p in kafka["ports"]}
    # Containers reach kafka:PORT of its listener; the host reaches localhost:PUBLISHED.
    internal = advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    assert internal == ("kafka", bound[env["KAFKA_INTER_BROKER_LISTENER_NAME"]][1])
    [host_side] = [n for n, (h, _) in advertised.items() if h == "localhost"]
    assert published[bound[host_side][1]] == advertised[host_side][1]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == \
        f"{env['KAFKA_NODE_ID']}@kafka:{bound[env['KAFKA_CONTROLLER_LISTENER_NAMES']][1]}"
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16
    assert f"{internal[0]}:{internal[1]}" in kafka["healthcheck"]["test"]
    # The broker writes its logs into the mounted named volume.
    mounts = {v.split(":")[1]: v.split(":")[0] for v in kafka["volumes"]}
    [log_dir] = env["KAFKA_LOG_DIRS"].split(",")
    target = next(t for t in mounts if log_dir == t or log_dir.startswith(t + "/"))
    assert mounts[target] in GPU["volumes"]


def _volumes(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read-only) of a service's short-syntax volumes."""
    out = {}
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        out[target] = (source, mode == ["ro"])
    return out


@pytest.mark.parametrize("stack", STACKS, ids=str)
def test_model_store_and_mounts(stack: str) -> None:
    project = STACKS[stack]
    services = project["services"]
    for name, service in services.items():
        for source, _ in _volumes(service).values():
            if source.startswith((".", "/")):
                if name != "deployer":  # the checkpoints directory is the operator's
                    assert (COMPOSE / source).exists(), f"{name}: {source} missing"
            else:
                assert source in project["volumes"], f"{name}: volume {source} undeclared"
    worker = parse_ferry(ferry_commands(services["worker"])[0])
    deployer = parse_ferry(ferry_commands(services["deployer"])[0])
    assert _volumes(services["worker"])[str(worker.store)] == ("models", True)
    assert _volumes(services["deployer"])[str(deployer.store)] == ("models", False)
    assert _volumes(services["deployer"])[str(deployer.watch)][1]  # read-only


def test_gpu_reservations_and_the_cpu_override(monkeypatch: pytest.MonkeyPatch) -> None:
    def devices(service: dict[str, Any]) -> list[dict[str, Any]]:
        return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get(
            "devices", [])

    def device_flag(stack: dict[str, Any], name: str) -> str:
        service = stack["services"][name]
        if name == "deployer":  # its local launcher passes the environment's flags on
            for key, value in service["environment"].items():
                monkeypatch.setenv(key, str(value))
            flags = LocalLauncher("kafka:9092", Path(".")).extra_args
            assert flags[0] == "--device"
            return flags[1]
        return parse_ferry(ferry_commands(service)[0]).device

    for name in ("worker", "deployer"):
        assert any("gpu" in d["capabilities"] for d in devices(GPU["services"][name])), name
        assert device_flag(GPU, name) == "cuda"
        assert devices(CPU["services"][name]) == [], name
        assert device_flag(CPU, name) == "cpu"
    assert CPU["services"]["worker"]["deploy"]["replicas"] == \
        GPU["services"]["worker"]["deploy"]["replicas"]
    # The override changes the device only: same model, store, deployment, ports.
    gpu_cmd, cpu_cmd = (s["services"]["worker"]["command"] for s in (GPU, CPU))
    assert [a for a in gpu_cmd if a != "cuda"] == [a for a in cpu_cmd if a != "cpu"]
    for stack, index in ((GPU, "/whl/cu"), (CPU, "/whl/cpu")):
        for name, service in ferry_services(stack).items():
            assert index in service["build"]["args"]["TORCH_INDEX_URL"], name
    assert {s["image"] for s in ferry_services(CPU).values()} == {"ferry:0.1.0-cpu"}


def _ignored(pattern_lines: list[str], path: str) -> bool:
    """Docker's .dockerignore matching, enough for these patterns (** spans directories;
    a matched directory excludes what is under it; `!` re-includes)."""
    def matches(pattern: str) -> bool:
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        return any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1))
    ignored = False
    for line in pattern_lines:
        if line.startswith("!"):
            ignored = ignored and not matches(line[1:])
        else:
            ignored = ignored or matches(line)
    return ignored


def test_image_entrypoint_user_torch_and_dockerignore() -> None:
    assert json.loads(dockerfile_instruction("ENTRYPOINT")[-1]) == ["ferry"]
    assert parse_ferry(json.loads(dockerfile_instruction("CMD")[-1])) is None  # --help
    user = dockerfile_instruction("USER")[-1]
    assert user.isdigit() and int(user) != 0, "numeric, so runAsNonRoot can verify it"
    runs = dockerfile_instruction("RUN")
    torch = next(i for i, r in enumerate(runs) if "torch" in r)
    assert '--index-url "$TORCH_INDEX_URL"' in runs[torch]
    assert torch < next(i for i, r in enumerate(runs) if "pip install ." in r)
    assert any(a.startswith("TORCH_INDEX_URL=") for a in dockerfile_instruction("ARG"))
    copies = [c.split()[:-1] for c in dockerfile_instruction("COPY")]
    assert ["compose/bootstrap.sh"] in copies
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    for path in (".venv/bin/python", ".git/HEAD", "workers/__pycache__/model.cpython-311.pyc",
                 "compose/models/tiny/v1/model.safetensors", "runs/a/checkpoint-1/x.safetensors",
                 "tests/test_compose.py", ".ferry/broker/broker.log"):
        assert _ignored(lines, path), f"{path} would go into the build context"
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists() and not _ignored(lines, source), source


def test_prometheus_scrapes_every_component() -> None:
    config = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    services = GPU["services"]
    scraped: set[tuple[str, int]] = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                scraped.add(("prometheus" if host == "localhost" else host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            assert dns["type"] == "A"
            scraped.update((name, dns["port"]) for name in dns["names"])
    exposed = {(name, port) for name, s in services.items()
               for port, path in listens_on(s).items() if path == "/metrics"}
    assert exposed and exposed <= scraped, f"not scraped: {exposed - scraped}"
    for host, port in scraped - exposed:
        assert (host, port) == ("prometheus", 9090), f"{host}:{port} serves no metrics"
    prometheus = services["prometheus"]
    assert _volumes(prometheus)["/etc/prometheus"] == ("./prometheus", True)
    if shutil.which("promtool"):
        done = subprocess.run(["promtool", "check", "config", "--syntax-only",
                               str(COMPOSE / "prometheus" / "prometheus.yml")],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_provisioning_points_at_prometheus() -> None:
    grafana = GPU["services"]["grafana"]
    mounts = _volumes(grafana)
    provisioning = COMPOSE / mounts["/etc/grafana/provisioning"][0]
    [source] = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["isDefault"]
    [provider] = yaml.safe_load(
        (provisioning / "dashboards" / "ferry.yml").read_text())["providers"]
    path = provider["options"]["path"]
    assert mounts[path] == ("./grafana/dashboards", True)
    for dashboard in (COMPOSE / "grafana" / "dashboards").glob("*.json"):
        assert json.loads(dashboard.read_text())["title"], dashboard


async def test_rendered_compose_service_joins_the_stack(tmp_path: Path) -> None:
    """What `ferry deployer --launcher manifests` writes for a checkpoint: a service the
    stack's files accept, of the stack's image, on its network and model store volume."""
    deployer_env = {**GPU["services"]["deployer"]["environment"], "FERRY_WORKER_GPUS": "1"}
    launcher = ManifestLauncher("127.0.0.1:9092", tmp_path, WorkerTemplate.from_env(deployer_env))
    record = DeploymentRecord("Llama_3", "checkpoint-1200", "/models/Llama_3/checkpoint-1200",
                              replicas=2)
    await launcher.start(record)
    rendered = yaml.safe_load((tmp_path / f"{record.deployment}.compose.yml").read_text())
    assert schema_errors(rendered) == []
    stack = merge(GPU, rendered)
    assert schema_errors(stack) == []
    [(name, service)] = rendered["services"].items()
    assert re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name), name
    assert service["image"] == GPU["services"]["worker"]["image"]  # what compose builds
    parsed = parse_ferry(service["command"])
    assert (parsed.model, parsed.deployment) == (Path("Llama_3/checkpoint-1200"),
                                                 record.deployment)
    assert (parsed.device, parsed.bootstrap) == ("cuda", None)
    assert service["environment"]["KAFKA_BOOTSTRAP"] == "kafka:9092"  # never the loopback
    assert healthcheck_url(service) == (parsed.metrics_port, "/metrics")
    assert _volumes(service)[str(parsed.store)] == ("models", True)
    assert service["deploy"]["replicas"] == 2
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    assert WorkerTemplate().image == GPU["services"]["worker"]["image"]


# ---- static membership and Kafka principals -------------------------------------------

def service_env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in service.get("environment", {}).items()}


def parsed_commands(service: dict[str, Any]) -> list[Any]:
    env = service_env(service)
    return [parse_ferry(args, env) for args in ferry_commands(service)]


@pytest.mark.parametrize("stack", STACKS, ids=str)
def test_router_has_a_static_member_id(stack: str) -> None:
    services = ferry_services(STACKS[stack])
    [router] = parsed_commands(services["router"])
    # Read from FERRY_ROUTER_INSTANCE_ID, as `ferry router` reads it in the container.
    assert router.instance_id == services["router"]["environment"]["FERRY_ROUTER_INSTANCE_ID"]
    assert router.instance_id and "replicas" not in services["router"].get("deploy", {})
    ids = [p.instance_id for s in services.values() for p in parsed_commands(s)
           if p is not None and p.command == "router"]
    assert ids == [router.instance_id]  # unique: a second member with it would be fenced
    # The worker's replicas share one environment: no static id they would all carry.
    [worker] = parsed_commands(services["worker"])
    assert worker.group_instance_id is None


def credential_problems(project: dict[str, Any]) -> list[str]:
    """Each Ferry service connects as its own principal: username and password from
    variables named for it (FERRY_ROUTER_KAFKA_USERNAME...: never a literal password, never
    another's), the username defaulting to the principal, the password to none; protocol and
    mechanism from the stack's one pair of variables. `project` as written (`merged`)."""
    problems, owners = [], {}
    for name, service in ferry_services(project).items():
        env = service_env(service)
        needed = principals(parse_ferry(a, env) for a in ferry_commands(service))
        if len(needed) != 1:
            problems.append(f"{name}: runs as principals {sorted(needed)}, not one")
            continue
        [principal] = needed
        prefix = f"FERRY_{principal.removeprefix('ferry-').upper()}_KAFKA"
        wanted = {"FERRY_KAFKA_USERNAME": f"${{{prefix}_USERNAME:-{principal}}}",
                  "FERRY_KAFKA_PASSWORD": f"${{{prefix}_PASSWORD:-}}",
                  "FERRY_KAFKA_SECURITY_PROTOCOL": "${FERRY_KAFKA_SECURITY_PROTOCOL:-PLAINTEXT}",
                  "FERRY_KAFKA_SASL_MECHANISM": "${FERRY_KAFKA_SASL_MECHANISM:-SCRAM-SHA-512}"}
        for var, value in wanted.items():
            if env.get(var) != value:  # never echo what is there: it may be a password
                problems.append(f"{name}: {var} must be {value}")
        for var in CREDENTIALS:
            owners.setdefault(env.get(var), set()).add(principal)
    problems += [f"{value} is shared by principals {sorted(users)}"
                 for value, users in owners.items() if len(users) > 1 and value]
    return problems


@pytest.mark.parametrize("files", [("docker-compose.yml",),
                                   ("docker-compose.yml", "docker-compose.cpu.yml")])
def test_each_component_connects_as_its_own_principal(files: tuple[str, ...]) -> None:
    assert credential_problems(merged(*files)) == []
    components = ("ROUTER", "GATEWAY", "WORKER", "DEPLOYER", "CONTROL")
    sasl = {"FERRY_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            **{f"FERRY_{c}_KAFKA_PASSWORD": f"pw-{c.lower()}" for c in components}}
    # As shipped: plaintext, no password needed.
    for name, service in ferry_services(effective(*files)).items():
        assert security_from_env(service_env(service)).protocol == "PLAINTEXT", name
    # On SASL each service connects as its own principal with its own password.
    logins = {name: security_from_env(service_env(service))
              for name, service in ferry_services(effective(*files, env=sasl)).items()}
    assert {n: (s.protocol, s.username) for n, s in logins.items()} == {
        "bootstrap": ("SASL_PLAINTEXT", "ferry-control"),
        "router": ("SASL_PLAINTEXT", "ferry-router"),
        "gateway": ("SASL_PLAINTEXT", "ferry-gateway"),
        "worker": ("SASL_PLAINTEXT", "ferry-worker"),
        "deployer": ("SASL_PLAINTEXT", "ferry-deployer")}
    assert len({s.password for s in logins.values()}) == len(logins)
    # The deployer's local workers connect as the worker service does, not as the deployer.
    services = effective(*files, env=sasl)["services"]
    assert security_from_env(worker_kafka_env(service_env(services["deployer"]))) == \
        logins["worker"]
    # SASL without a component's password: that component refuses to start, naming it.
    unset = effective(*files, env={**sasl, "FERRY_GATEWAY_KAFKA_PASSWORD": ""})
    with pytest.raises(KafkaSecurityError, match="FERRY_KAFKA_PASSWORD"):
        security_from_env(service_env(unset["services"]["gateway"]))


@pytest.mark.parametrize("change, problem", [
    (lambda s: s["gateway"]["environment"].update(
        FERRY_KAFKA_USERNAME="${FERRY_ROUTER_KAFKA_USERNAME:-ferry-router}"),
     "FERRY_ROUTER_KAFKA_USERNAME:-ferry-router} is shared"),
    (lambda s: s["router"]["environment"].update(FERRY_KAFKA_PASSWORD="hunter2"),
     "router: FERRY_KAFKA_PASSWORD must be ${FERRY_ROUTER_KAFKA_PASSWORD:-}"),
    (lambda s: s["worker"]["environment"].pop("FERRY_KAFKA_SECURITY_PROTOCOL"),
     "worker: FERRY_KAFKA_SECURITY_PROTOCOL must be"),
    (lambda s: s["bootstrap"]["environment"].pop("FERRY_KAFKA_USERNAME"),
     "bootstrap: FERRY_KAFKA_USERNAME must be ${FERRY_CONTROL_KAFKA_USERNAME:-ferry-control}"),
])
def test_credential_rule_catches_mistakes(change: Any, problem: str) -> None:
    project = merged("docker-compose.yml")
    change(project["services"])
    found = credential_problems(project)
    assert any(problem in p for p in found), found
    assert not any("hunter2" in p for p in found)
