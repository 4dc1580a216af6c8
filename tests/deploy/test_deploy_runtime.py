"""The containers' commands, run here as real processes (no Docker engine, no cluster).

A ``Sandbox`` stands in for a container's file system: each path the container
mounts (compose volumes, binds and secrets; pod volumes) is mapped to a folder
under the test's tmp_path, filled the way Docker or the kubelet would fill it. The
gateway YAML is the deploy file itself with a few changes only: free ports, the
listener on 127.0.0.1, its key files mapped like every other path, a processor
timeout that survives a loaded test machine and, where a request is sent, the
upstreams pointed at a local recording server. Arguments, file names and every
other setting come from the deploy files unchanged, so what runs here is what the
containers run.

Redis (compose's ``shared-limits`` profile, the Kubernetes component) runs as Debian's
``redis-server`` under the deploy files' own command and health check, on a free
loopback port that the gateway YAML's ``limits.store`` is pointed at.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import yaml
from harness import RecordingUpstream, base_env, free_port
from harness.adversary import write_keys
from harness.redis import INSTALL_HINT
from test_deploy_wiring import (
    COMPOSE_LIMITS_BLOCK,
    GATEWAY,
    INIT,
    REDIS,
    Dockerfile,
    Json,
    add_top_level,
    compose_config,
    compose_gateway_yaml,
    find,
    kustomize_build,
    option,
    readme_yaml,
    redis_manifests_with_shared_limits,
)

from extproc.config.load import load_config
from extproc.config.model import GatewayConfig
from extproc.runtime import processes

pytestmark = pytest.mark.slow

DEADLINE_S = 30.0
TEST_KEY = "sk-test-deploy-key-0123456789"  # every secret file: the keys, Redis's password
CLIENT, CLIENT_KEY = "alice", "gk-test-deploy-alice-0123456789"
KEYS_FILE = "gateway-keys.txt"  # beside the gateway YAML, as a user would put it


class Sandbox:
    """Container paths → folders under ``root``; container commands → local commands."""

    def __init__(self) -> None:
        self.mounts: dict[str, Path] = {}
        self.words = {"python": sys.executable, "envoy": processes.find_envoy()}

    def mount(self, container_path: str, host_path: Path) -> Path:
        known = self.mounts.setdefault(container_path, host_path)
        assert known == host_path, f"{container_path} is mounted from two places"
        return known

    def path(self, container_path: str) -> Path:
        """Where ``container_path`` is here (through the longest mount that holds it)."""
        for mount in sorted(self.mounts, key=len, reverse=True):
            if PurePosixPath(container_path).is_relative_to(mount):
                return self.mounts[mount] / PurePosixPath(container_path).relative_to(mount)
        raise AssertionError(f"{container_path} is on no mount: the container could not see it")

    def command(self, argv: list[str]) -> list[str]:
        if argv[: len(INIT)] == INIT:  # the image's init only forwards signals: run what it runs
            argv = argv[len(INIT) :]
        return [self._arg(arg) for arg in argv]

    def _arg(self, arg: str) -> str:
        if arg in self.words:
            return self.words[arg]
        if arg.startswith("/"):
            return str(self.path(arg))
        return arg


def localize_gateway(
    sandbox: Sandbox,
    container_path: str,
    text: str,
    upstream: str | None,
    redis_port: int | None = None,
) -> GatewayConfig:
    """Write the gateway YAML at ``container_path`` with free ports; returns the new config.

    A ``redis://`` store is pointed at ``redis_port`` on loopback, its database kept.
    """
    original = yaml.safe_load(text)
    raw = yaml.safe_load(text)
    sections = [s for s in ("listener", "admin", "extproc", "metrics") if s in raw]
    ports: set[int] = set()
    while len(ports) < len(sections):
        ports.add(free_port())
    for section, port in zip(sections, sorted(ports), strict=True):
        raw[section]["port"] = port
    raw["listener"]["address"] = "127.0.0.1"
    # Parallel test runs share two cores: a cold first request can take longer than the
    # deploy's 200 ms, and a 504 then says nothing about the wiring under test.
    raw["extproc"]["timeout_ms"] = 10000
    for route in raw["routes"]:
        secret = route.get("credential", {}).get("secret", {})
        if "file" in secret:
            secret["file"] = str(sandbox.path(secret["file"]))
        if upstream is not None:
            route["upstream"] = upstream
    limits = raw.get("limits") or {}
    if "file" in limits.get("password", {}):
        limits["password"]["file"] = str(sandbox.path(limits["password"]["file"]))
    if redis_port is not None:
        store = urlsplit(limits["store"])
        limits["store"] = store._replace(netloc=f"127.0.0.1:{redis_port}").geturl()
    admin = original["admin"]
    sandbox.words[f"{admin['address']}:{admin['port']}"] = f"127.0.0.1:{raw['admin']['port']}"
    target = sandbox.path(container_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(target)


def write_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TEST_KEY)


# -- the two deployments as sandboxes ------------------------------------------------------


def compose_sandbox(
    root: Path, upstream: str | None = None, extra: str = "", redis_port: int | None = None
) -> tuple[Sandbox, Json, GatewayConfig]:
    """Compose's mounts for every service, the YAML (plus ``extra``) localized;
    (sandbox, services, config)."""
    compose = compose_config()
    services: Json = compose["services"]
    sandbox = Sandbox()
    config_path = option(services["extproc"]["command"], "serve")
    original = compose_gateway_yaml(compose, "extproc", config_path).read_text()
    original = add_top_level(original, extra) if extra else original
    for service in services.values():
        for volume in service.get("volumes", []):
            target = volume["target"]
            if volume["type"] == "volume":
                host = root / "volumes" / volume["source"]
                host.mkdir(parents=True, exist_ok=True)
            elif PurePosixPath(config_path).is_relative_to(target):
                host = root / "config"  # the YAML goes here, localized
            else:
                host = Path(volume["source"])
            sandbox.mount(target, host)
        for secret in service.get("secrets", []):
            write_key(sandbox.mount(secret["target"], root / "secrets" / secret["source"]))
    config = localize_gateway(sandbox, config_path, original, upstream, redis_port)
    return sandbox, services, config


def pod_volumes(
    root: Path, manifests: list[Json], deployment: str
) -> tuple[Sandbox, dict[str, Json]]:
    """A pod's volumes, its ConfigMaps' files written; (sandbox, containers by name)."""
    pod = find(manifests, "Deployment", deployment)["spec"]["template"]["spec"]
    by_name = {c["name"]: c for c in [*pod.get("initContainers", []), *pod["containers"]]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    sandbox = Sandbox()
    for container in by_name.values():
        for mount in container.get("volumeMounts", []):
            folder = sandbox.mount(mount["mountPath"], root / mount["name"])
            folder.mkdir(parents=True, exist_ok=True)
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                data = find(manifests, "ConfigMap", volume["configMap"]["name"])["data"]
                for key, text in data.items():
                    (folder / key).write_text(text)
    return sandbox, by_name


def pod_sandbox(
    root: Path,
    upstream: str | None = None,
    manifests: list[Json] | None = None,
    redis_port: int | None = None,
    extra: str = "",
) -> tuple[Sandbox, dict[str, Json], GatewayConfig]:
    """The gateway pod's volumes as the kubelet fills them (the Secrets with a key for each
    file the YAML names), the YAML (plus ``extra``) localized; (sandbox, containers, config)."""
    manifests = kustomize_build() if manifests is None else manifests
    sandbox, by_name = pod_volumes(root, manifests, GATEWAY)
    config_path = option(by_name["extproc"]["args"], "serve")
    gateway_text = sandbox.path(config_path).read_text()
    gateway_text = add_top_level(gateway_text, extra) if extra else gateway_text
    config = localize_gateway(sandbox, config_path, gateway_text, upstream, redis_port)
    for route in config.routes:
        if route.credential and route.credential.secret.file:
            write_key(route.credential.secret.file)
    if config.limits and config.limits.password and config.limits.password.file:
        write_key(config.limits.password.file)
    return sandbox, by_name, config


# -- processes -----------------------------------------------------------------------------


class Process:
    """One started command with its log file; stopped by the fixture that made it."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name, self.argv, self.log = name, argv, log
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=base_env(), cwd=log.parent
            )

    def report(self) -> str:
        return f"$ {' '.join(self.argv)}\n{self.log.read_text(errors='replace')[-6000:]}"


@pytest.fixture
def start(tmp_path: Path, watch: Callable[..., None]) -> Iterator[Callable[..., Process]]:
    """``start(name, argv)`` → a running Process; all are stopped (last first) after the test."""
    started: list[Process] = []

    def run(name: str, argv: list[str]) -> Process:
        process = Process(name, argv, tmp_path / f"{name}.log")
        started.append(process)
        watch(process)
        return process

    yield run
    for process in reversed(started):
        processes.stop(process.popen)


def succeeds(argv: list[str]) -> bool:
    return subprocess.run(argv, env=base_env(), capture_output=True, check=False).returncode == 0


def wait_until_succeeds(argv: list[str], *watched: Process) -> None:
    """Poll a health-check command until it exits 0; raise at the deadline or if a process dies."""
    end = time.monotonic() + DEADLINE_S
    while not succeeds(argv):
        for process in watched:
            assert process.popen.poll() is None, f"{process.name} exited: {process.report()}"
        assert time.monotonic() < end, f"{argv} still failing after {DEADLINE_S:.0f}s"
        time.sleep(0.1)


def run_once(name: str, argv: list[str]) -> None:
    result = subprocess.run(argv, env=base_env(), capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{name}: {argv}\n{result.stdout}{result.stderr}"


def envoy_validates(bootstrap: Path) -> None:
    result = subprocess.run(
        [processes.find_envoy(), "--mode", "validate", "-c", str(bootstrap),
         "--disable-hot-restart", "--log-level", "error"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def assert_no_key_in(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert TEST_KEY not in path.read_text(errors="replace"), f"the key is in {path}"


# -- tests ---------------------------------------------------------------------------------


def test_compose_render_writes_the_config_envoy_validates(tmp_path: Path) -> None:
    sandbox, services, config = compose_sandbox(tmp_path)
    render = sandbox.command(Dockerfile.parse().entrypoint + services["render"]["command"])
    run_once("render", render)
    bootstrap = sandbox.path(option(services["envoy"]["command"], "-c"))
    envoy_validates(bootstrap)
    # Validate mode does not read the watched files, so check their contents as a static
    # bootstrap rendered from the same YAML.
    static = tmp_path / "static.yaml"
    run_once("render", [sys.executable, "-m", "extproc", "render", str(config.source),
                        "-o", str(static)])  # fmt: skip
    envoy_validates(static)
    assert_no_key_in(bootstrap.parent)


def test_pod_render_writes_the_config_envoy_validates(tmp_path: Path) -> None:
    sandbox, containers, _ = pod_sandbox(tmp_path)
    entrypoint = Dockerfile.parse().entrypoint
    run_once("render", sandbox.command(entrypoint + containers["render"]["args"]))
    envoy_validates(sandbox.path(option(containers["envoy"]["command"], "-c")))
    assert_no_key_in(sandbox.path(option(containers["render"]["args"], "--xds-dir")))


def test_image_command_starts_the_processor_and_passes_the_health_check(
    tmp_path: Path, start: Callable[..., Process]
) -> None:
    """ENTRYPOINT + CMD + HEALTHCHECK from the Dockerfile, with compose's mounts."""
    image = Dockerfile.parse()
    sandbox, _, _ = compose_sandbox(tmp_path)
    health = sandbox.command(image.healthcheck)
    assert not succeeds(health), "the health check passes with nothing running"
    processor = start("extproc", sandbox.command(image.entrypoint + image.cmd))
    wait_until_succeeds(health, processor)
    xds_dir = sandbox.path(option(image.cmd, "--xds-dir"))
    assert {"lds.json", "cds.json"} <= {p.name for p in xds_dir.iterdir()}
    assert processes.stop(processor.popen) == 0, "SIGTERM is a clean stop"


def test_processor_starts_when_compose_is_given_no_keys(
    tmp_path: Path, start: Callable[..., Process]
) -> None:
    """`make compose-up` passes an unset key variable as empty. Recent compose versions
    then create no secret file, older ones an empty one: both must mean a missing
    optional key (401s for clients without their own), not a processor that cannot start."""
    image = Dockerfile.parse()
    sandbox, services, _ = compose_sandbox(tmp_path)
    empty, *absent = (sandbox.path(s["target"]) for s in services["extproc"]["secrets"])
    empty.write_text("")
    for path in absent:
        path.unlink()
    processor = start("extproc", sandbox.command(image.entrypoint + image.cmd))
    wait_until_succeeds(sandbox.command(image.healthcheck), processor)


def get(url: str, **headers: str) -> httpx.Response:
    return httpx.get(url, headers=headers, timeout=10)


def test_compose_stack_injects_the_key_and_drains_a_stream_before_stopping(
    tmp_path: Path, start: Callable[..., Process], upstream: RecordingUpstream
) -> None:
    image = Dockerfile.parse()
    sandbox, services, config = compose_sandbox(tmp_path, upstream.url())
    run_once("render", sandbox.command(image.entrypoint + services["render"]["command"]))
    processor = start("extproc", sandbox.command(image.entrypoint + services["extproc"]["command"]))
    wait_until_succeeds(sandbox.command(image.healthcheck), processor)
    envoy = start("envoy", sandbox.command(services["envoy"]["command"]))
    wait_until_succeeds(sandbox.command(services["envoy"]["healthcheck"]["test"][1:]), envoy)

    base = f"http://127.0.0.1:{config.listener.port}"
    route = next(r for r in config.routes if r.credential)
    assert get(f"{base}{route.prefix}v1/models").status_code == 200
    assert upstream.only_request().values(route.credential.header) == [
        route.credential.format.replace("{secret}", TEST_KEY).encode()
    ]

    # A stream in flight when compose stops Envoy (SIGTERM) runs to its end.
    upstream.clear()
    body: list[bytes] = []
    client = threading.Thread(
        target=lambda: body.append(
            get(f"{base}{route.prefix}sse?hold=1&events=3&pause_ms=0").content
        )
    )
    client.start()
    wait_for(lambda: bool(upstream.requests), "the stream to reach the upstream")
    envoy.popen.send_signal(signal.SIGTERM)
    wait_for(
        lambda: "draining" in envoy.log.read_text() or envoy.popen.poll() is not None,
        "the wrapper to start the drain",
    )
    assert envoy.popen.poll() is None, "Envoy stopped with a stream in flight"
    upstream.sse_release.set()
    client.join(DEADLINE_S)
    assert body and body[0].count(b"data:") == 3, body
    assert envoy.popen.wait(DEADLINE_S) == 0
    assert "drained, 0 request(s) still in flight" in envoy.log.read_text()


def test_pod_containers_start_in_order_and_pass_their_probes(
    tmp_path: Path, start: Callable[..., Process], upstream: RecordingUpstream
) -> None:
    entrypoint = Dockerfile.parse().entrypoint
    sandbox, containers, config = pod_sandbox(tmp_path, upstream.url())
    run_once("render", sandbox.command(entrypoint + containers["render"]["args"]))
    sidecar = containers["extproc"]
    processor = start("extproc", sandbox.command(entrypoint + sidecar["args"]))
    wait_until_succeeds(sandbox.command(sidecar["startupProbe"]["exec"]["command"]), processor)
    envoy_spec = containers["envoy"]
    envoy = start("envoy", sandbox.command(envoy_spec["command"]))
    wait_until_succeeds(sandbox.command(envoy_spec["startupProbe"]["exec"]["command"]), envoy)
    for container in (sidecar, envoy_spec):
        for probe in ("readinessProbe", "livenessProbe"):
            assert succeeds(sandbox.command(container[probe]["exec"]["command"])), probe

    route = next(r for r in config.routes if r.credential)
    reply = get(f"http://127.0.0.1:{config.listener.port}{route.prefix}v1/models")
    assert reply.status_code == 200
    assert upstream.only_request().values(route.credential.header) == [
        route.credential.format.replace("{secret}", TEST_KEY).encode()
    ]


def wait_for(condition: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_envoy_probes_fail_while_envoy_is_down(tmp_path: Path) -> None:
    """The probe script's exit codes are real: nothing listening means not ready, not alive."""
    sandbox, containers, _ = pod_sandbox(tmp_path)
    envoy = containers["envoy"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert not succeeds(sandbox.command(envoy[probe]["exec"]["command"])), probe


# -- shared limits: Redis ------------------------------------------------------------------


def start_redis(
    sandbox: Sandbox,
    command: list[str],
    health: list[str],
    start: Callable[..., Process],
    port: int,
) -> redis.Redis:
    """Debian's redis-server under a Redis container's command, on loopback ``port``, healthy
    by the container's own check; returns a client with the password from the secret."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip(INSTALL_HINT)
    sandbox.words[f"127.0.0.1:{option(command, '--port')}"] = f"127.0.0.1:{port}"
    argv = sandbox.command(command)
    argv[argv.index("--port") + 1] = str(port)
    process = start("redis", [*argv, "--bind", "127.0.0.1"])
    wait_until_succeeds(sandbox.command(health), process)
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port).ping()
    wrong = sandbox.path(health[-1]).with_name("wrong-password")
    wrong.write_text("not-the-password-0123456789")
    assert not succeeds([*sandbox.command(health)[:-1], str(wrong)]), "a wrong password passes"
    return redis.Redis(host="127.0.0.1", port=port, password=TEST_KEY)


def access_yaml() -> str:
    """Gateway keys beside the YAML (limits are per gateway client); see ``write_client_key``."""
    return f"access: {{keys_file: {KEYS_FILE}}}\n"


def write_client_key(config: GatewayConfig) -> None:
    write_keys(config.source.parent / KEYS_FILE, {CLIENT: CLIENT_KEY})


def spend_and_find_the_count(config: GatewayConfig, store: redis.Redis) -> None:
    """A gateway client's request on the organisation's key, counted into ``store``."""
    route = next(r for r in config.routes if r.credential)
    url = f"http://127.0.0.1:{config.listener.port}{route.prefix}v1/models"
    reply = httpx.get(url, headers={"x-api-key": CLIENT_KEY}, timeout=10)
    assert reply.status_code == 200, reply.text
    wait_for(
        lambda: any(CLIENT.encode() in key for key in store.scan_iter()),
        f"{CLIENT}'s request count to reach Redis",
    )


def test_compose_shared_limits_count_in_the_profiles_redis(
    tmp_path: Path, start: Callable[..., Process], upstream: RecordingUpstream
) -> None:
    """docs/deployment.md's YAML for shared limits, with the profile's Redis (its command, secret
    and health check): a gateway client's request is counted there by the processor."""
    image = Dockerfile.parse()
    port = free_port()
    extra = readme_yaml(COMPOSE_LIMITS_BLOCK) + access_yaml()
    sandbox, services, config = compose_sandbox(tmp_path, upstream.url(), extra, port)
    redis_service = services["redis"]
    health = redis_service["healthcheck"]["test"]
    assert health[0] == "CMD"
    store = start_redis(sandbox, redis_service["command"], health[1:], start, port)
    write_client_key(config)
    run_once("validate", [sys.executable, "-m", "extproc", "validate", str(config.source)])
    run_once("render", sandbox.command(image.entrypoint + services["render"]["command"]))
    processor = start("extproc", sandbox.command(image.entrypoint + services["extproc"]["command"]))
    wait_until_succeeds(sandbox.command(image.healthcheck), processor)
    envoy = start("envoy", sandbox.command(services["envoy"]["command"]))
    wait_until_succeeds(sandbox.command(services["envoy"]["healthcheck"]["test"][1:]), envoy)
    spend_and_find_the_count(config, store)


def test_compose_redis_refuses_an_empty_password(tmp_path: Path) -> None:
    """`make compose-up` passes an unset REDIS_PASSWORD as empty: Redis must not start open."""
    sandbox, services, _ = compose_sandbox(tmp_path)
    command = services["redis"]["command"]
    sandbox.path(option(command, "run")).write_text("")
    result = subprocess.run(
        sandbox.command(command), env=base_env(), capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "expected 16 to 512 characters" in result.stderr


def test_pod_shared_limits_count_in_the_components_redis(
    tmp_path: Path, start: Callable[..., Process], upstream: RecordingUpstream
) -> None:
    """docs/deployment.md's overlay and YAML: the component's Redis pod (command, Secret, probes) and
    a gateway pod whose processor counts a client's request there."""
    manifests = redis_manifests_with_shared_limits(tmp_path / "overlay")
    port = free_port()
    redis_sandbox, redis_containers = pod_volumes(tmp_path / "redis-pod", manifests, REDIS)
    (container,) = redis_containers.values()
    write_key(redis_sandbox.path(option(container["command"], "run")))  # the Secret
    probe = container["startupProbe"]["exec"]["command"]
    store = start_redis(redis_sandbox, container["command"], probe, start, port)
    for name in ("readinessProbe", "livenessProbe"):
        assert succeeds(redis_sandbox.command(container[name]["exec"]["command"])), name

    entrypoint = Dockerfile.parse().entrypoint
    sandbox, containers, config = pod_sandbox(
        tmp_path / "gateway-pod", upstream.url(), manifests, port, access_yaml()
    )
    write_client_key(config)
    run_once("validate", [sys.executable, "-m", "extproc", "validate", str(config.source)])
    run_once("render", sandbox.command(entrypoint + containers["render"]["args"]))
    sidecar = containers["extproc"]
    processor = start("extproc", sandbox.command(entrypoint + sidecar["args"]))
    wait_until_succeeds(sandbox.command(sidecar["startupProbe"]["exec"]["command"]), processor)
    envoy_spec = containers["envoy"]
    envoy = start("envoy", sandbox.command(envoy_spec["command"]))
    wait_until_succeeds(sandbox.command(envoy_spec["startupProbe"]["exec"]["command"]), envoy)
    spend_and_find_the_count(config, store)
