"""What the validated model holds for a good YAML: defaults, each bound's ends, normalised values.

The refusals (one past each bound, the exact messages) are in test_config_errors.py;
here every accepted value is read back from the model, so a default or a bound
changed in load.py is a failing test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from extproc.config.load import load_config, warnings
from extproc.config.model import (
    AccessControl,
    CredentialMode,
    Endpoint,
    GatewayConfig,
    ServerKind,
    TlsFiles,
    Upstream,
)

LISTENER = "listener: {address: 127.0.0.1, port: 4000}\n"
ROUTE = """\
routes:
  - name: anthropic
    prefix: /anthropic
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: K}}
"""
GOOD = LISTENER + ROUTE


def loaded(text: str, folder: Path) -> GatewayConfig:
    (folder / "gateway.yaml").write_text(text)
    return load_config(folder / "gateway.yaml")


def test_an_extproc_section_without_the_lean_server_limits_gets_their_defaults(
    tmp_path: Path,
) -> None:
    """Defaults as load.py gives them (an absent section uses the model's own defaults)."""
    extproc = loaded(GOOD + "extproc: {fast_path: false}\n", tmp_path).extproc
    assert (extproc.max_connections, extproc.idle_timeout_s, extproc.memory_budget_mb) == (
        128,
        300,
        64,
    )
    assert (extproc.address, extproc.port, extproc.timeout_ms, extproc.workers) == (
        "127.0.0.1",
        50051,
        200,
        1,
    )
    assert (extproc.server, extproc.fast_path, extproc.socket) == (ServerKind.LEAN, False, None)


def test_listener_and_route_settings_left_out_get_their_defaults(tmp_path: Path) -> None:
    config = loaded(GOOD, tmp_path)
    listener, [route] = config.listener, config.routes
    assert (listener.stream_idle_timeout_s, listener.max_request_headers_kb) == (300, 60)
    assert (listener.require_access, listener.tls) == (False, None)
    assert (route.timeout_s, route.connect_timeout_s, route.retries, route.ca_file) == (
        0,
        10,
        2,
        None,
    )
    assert (config.admin, config.metrics, config.metering, config.limits) == (
        Endpoint("127.0.0.1", 9901),
        None,
        False,
        None,
    )


ROUTE_FIELD = "    upstream: https://api.anthropic.com\n"
BOUNDS = [
    ("max_connections", "extproc", 4), ("max_connections", "extproc", 100000),
    ("idle_timeout_s", "extproc", 10), ("idle_timeout_s", "extproc", 86400),
    ("memory_budget_mb", "extproc", 4), ("memory_budget_mb", "extproc", 16384),
    ("timeout_ms", "extproc", 1), ("timeout_ms", "extproc", 60000),
    ("workers", "extproc", 1), ("workers", "extproc", 64),
    ("stream_idle_timeout_s", "listener", 1), ("stream_idle_timeout_s", "listener", 86400),
    ("max_request_headers_kb", "listener", 1), ("max_request_headers_kb", "listener", 8192),
    ("timeout_s", "route", 0), ("timeout_s", "route", 86400),
    ("connect_timeout_s", "route", 1), ("connect_timeout_s", "route", 300),
    ("retries", "route", 0), ("retries", "route", 10),
]  # fmt: skip


@pytest.mark.parametrize(
    ("field", "where", "value"), BOUNDS, ids=[f"{b[1]}.{b[0]} of {b[2]}" for b in BOUNDS]
)
def test_each_end_of_a_bound_is_accepted_and_held(
    field: str, where: str, value: int, tmp_path: Path
) -> None:
    if where == "extproc":
        text = GOOD + f"extproc: {{{field}: {value}}}\n"
    elif where == "listener":
        text = GOOD.replace("port: 4000}", f"port: 4000, {field}: {value}}}")
    else:
        text = GOOD.replace(ROUTE_FIELD, ROUTE_FIELD + f"    {field}: {value}\n")
    config = loaded(text, tmp_path)
    part: Any = {"extproc": config.extproc, "listener": config.listener}.get(where)
    assert getattr(part or config.routes[0], field) == value


def test_the_grpcio_server_can_be_chosen(tmp_path: Path) -> None:
    assert loaded(GOOD + "extproc: {server: grpcio}\n", tmp_path).extproc.server is (
        ServerKind.GRPCIO
    )


ENDPOINTS = [
    ("admin left out", "", "admin", Endpoint("127.0.0.1", 9901)),
    ("admin with both", "admin: {address: 0.0.0.0, port: 9902}\n", "admin", Endpoint("0.0.0.0", 9902)),
    ("admin with only an address keeps its port", "admin: {address: 127.0.0.2}\n", "admin",
     Endpoint("127.0.0.2", 9901)),
    ("metrics left out is off", "", "metrics", None),
    ("metrics as an empty mapping is on with its defaults", "metrics: {}\n", "metrics",
     Endpoint("127.0.0.1", 9464)),
    ("metrics with both", "metrics: {address: 0.0.0.0, port: 9100}\n", "metrics",
     Endpoint("0.0.0.0", 9100)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "part", "expected"), [e[1:] for e in ENDPOINTS], ids=[e[0] for e in ENDPOINTS]
)
def test_admin_and_metrics_endpoints(
    text: str, part: str, expected: Endpoint | None, tmp_path: Path
) -> None:
    assert getattr(loaded(GOOD + text, tmp_path), part) == expected


PORTS_APART = [
    ("the listener on the metrics default port while metrics is off",
     GOOD.replace("port: 4000", "port: 9464")),
    ("the admin port on the processor's default while it listens on a socket",
     GOOD + "admin: {port: 50051}\nextproc: {socket: x.sock}\n"),
]  # fmt: skip


@pytest.mark.parametrize("text", [p[1] for p in PORTS_APART], ids=[p[0] for p in PORTS_APART])
def test_a_port_of_a_part_that_does_not_listen_is_free(text: str, tmp_path: Path) -> None:
    loaded(text, tmp_path)


@pytest.mark.parametrize(("given", "held"), [("true", True), ("false", False)])
def test_metering_is_held(given: str, held: bool, tmp_path: Path) -> None:
    assert loaded(GOOD + f"metering: {given}\n", tmp_path).metering is held


def pem_files(folder: Path, *names: str) -> None:
    """Files that look like PEM (the loader checks the markers, Envoy reads the rest)."""
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        kind = "PRIVATE KEY" if "k" in path.stem else "CERTIFICATE"
        path.write_text(f"-----BEGIN {kind}-----\nAA==\n-----END {kind}-----\n")


def test_a_tls_listener_holds_its_files_relative_to_the_yaml(tmp_path: Path) -> None:
    pem_files(tmp_path, "c.pem", "k/k.pem")
    text = GOOD.replace("port: 4000", "port: 4000, tls: {cert_file: c.pem, key_file: k/k.pem}")
    assert loaded(text, tmp_path).listener.tls == TlsFiles(tmp_path / "c.pem", tmp_path / "k/k.pem")


def test_a_ca_file_is_held_relative_to_the_yaml(tmp_path: Path) -> None:
    pem_files(tmp_path, "certs/ca.pem")
    text = GOOD.replace(ROUTE_FIELD, ROUTE_FIELD + "    ca_file: certs/ca.pem\n")
    assert loaded(text, tmp_path).routes[0].ca_file == tmp_path / "certs" / "ca.pem"


UPSTREAMS = [
    ("https without a port or path", "https://api.anthropic.com", Upstream(True, "api.anthropic.com", 443, "/")),
    ("http gets port 80", "http://127.0.0.1", Upstream(False, "127.0.0.1", 80, "/")),
    ("a path keeps one trailing slash", "https://api.openai.com/v1/", Upstream(True, "api.openai.com", 443, "/v1/")),
    ("a path gets a trailing slash", "https://api.openai.com/v1", Upstream(True, "api.openai.com", 443, "/v1/")),
    ("an explicit port", "http://h:8080/x", Upstream(False, "h", 8080, "/x/")),
    ("only slashes are trimmed from the path", "http://h/v1/INDEX", Upstream(False, "h", 80, "/v1/INDEX/")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("url", "expected"), [u[1:] for u in UPSTREAMS], ids=[u[0] for u in UPSTREAMS]
)
def test_an_upstream_url_becomes_scheme_host_port_and_path(
    url: str, expected: Upstream, tmp_path: Path
) -> None:
    text = GOOD.replace("upstream: https://api.anthropic.com", f"upstream: {url}")
    assert loaded(text, tmp_path).routes[0].upstream == expected


PREFIXES = [
    ("a bare segment gets its slash", "/anthropic", "/anthropic/"),
    ("a trailing slash is kept once", "/anthropic/", "/anthropic/"),
    ("several segments of every allowed character", "/a.b_c~d-e/V1", "/a.b_c~d-e/V1/"),
    ("the root", "/", "/"),
]  # fmt: skip


@pytest.mark.parametrize(("given", "held"), [p[1:] for p in PREFIXES], ids=[p[0] for p in PREFIXES])
def test_a_prefix_is_whole_path_segments_ending_in_a_slash(
    given: str, held: str, tmp_path: Path
) -> None:
    text = GOOD.replace("prefix: /anthropic", f"prefix: {given}")
    assert loaded(text, tmp_path).routes[0].prefix == held


PLACEHOLDERS = [
    ("none anywhere", "", "", ()),
    ("the top-level default applies to the route", "placeholders: [dummy, EMPTY]\n", "", ("dummy", "EMPTY")),
    ("the route's own replace the default", "placeholders: [dummy]\n", "[sk-no-key-required]",
     ("sk-no-key-required",)),
    ("an empty route list turns the default off", "placeholders: [dummy]\n", "[]", ()),
    ("repeats are kept once, in order", "", "[b, a, b, '!~']", ("b", "a", "!~")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("top", "route", "held"), [p[1:] for p in PLACEHOLDERS], ids=[p[0] for p in PLACEHOLDERS]
)
def test_placeholders_by_route_or_from_the_default(
    top: str, route: str, held: tuple[str, ...], tmp_path: Path
) -> None:
    text = GOOD + top
    if route:
        text = text.replace("secret: {env: K}}", f"secret: {{env: K}}, placeholders: {route}}}")
    credential = loaded(text, tmp_path).routes[0].credential
    assert credential is not None and credential.placeholders == held


def test_a_client_only_route_needs_no_secret(tmp_path: Path) -> None:
    text = GOOD.replace("secret: {env: K}", "mode: client_only")
    [route] = loaded(text, tmp_path).routes
    assert route.credential is not None
    assert (route.credential.mode, route.credential.secret) == (CredentialMode.CLIENT_ONLY, None)
    assert not route.spends_server_key


@pytest.mark.parametrize("mode", ["prefer_client", "replace_client", "reject_client"])
def test_a_mode_that_spends_the_server_key_holds_its_secret(mode: str, tmp_path: Path) -> None:
    text = GOOD.replace("secret: {env: K}", f"secret: {{env: K}}, mode: {mode}")
    credential = loaded(text, tmp_path).routes[0].credential
    assert credential is not None and credential.secret is not None
    assert (credential.mode.value, credential.secret.env, credential.secret.optional) == (
        mode,
        "K",
        False,
    )


def test_client_credential_headers_are_lower_cased_and_kept_once(tmp_path: Path) -> None:
    text = GOOD.replace(
        "secret: {env: K}", "secret: {env: K}, client_credentials: [X-Api-Key, x-api-key, X-Mine]"
    )
    credential = loaded(text, tmp_path).routes[0].credential
    assert credential is not None
    assert credential.client_credentials == ("x-api-key", "x-mine")
    assert credential.slots == ("x-api-key", "x-mine", "authorization")


ACCESS = [
    ("the default applies to a route without its own", "access: {keys_file: keys.txt}\n", "",
     AccessControl(Path("keys.txt"), "x-gateway-key", False)),
    ("a route's own replaces the default", "access: {keys_file: keys.txt}\n",
     "    access: {keys_file: other.txt, header: x-team-key, for_client_credentials: true}\n",
     AccessControl(Path("other.txt"), "x-team-key", True)),
    ("access: false turns the default off", "access: {keys_file: keys.txt}\n", "    access: false\n", None),
    ("no default and none of its own", "", "", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("top", "route", "expected"), [a[1:] for a in ACCESS], ids=[a[0] for a in ACCESS]
)
def test_a_routes_access_is_its_own_or_the_default(
    top: str, route: str, expected: AccessControl | None, tmp_path: Path
) -> None:
    text = GOOD.replace(ROUTE_FIELD, ROUTE_FIELD + route) + top
    access = loaded(text, tmp_path).routes[0].access
    if expected is not None:
        expected = AccessControl(tmp_path / expected.keys_file, expected.header,
                                 expected.for_client_credentials)  # fmt: skip
    assert access == expected


OPEN_RELAY_ALLOWED = [
    ("a loopback listener", "127.0.0.1", ""),
    ("a route with gateway keys", "0.0.0.0", "    access: {keys_file: keys.txt}\n"),
    ("a route that adds no key", "0.0.0.0", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("address", "access"),
    [o[1:] for o in OPEN_RELAY_ALLOWED],
    ids=[o[0] for o in OPEN_RELAY_ALLOWED],
)
def test_require_access_allows_routes_that_spend_no_key_for_strangers(
    address: str, access: str | None, tmp_path: Path
) -> None:
    text = GOOD.replace("127.0.0.1, port: 4000", f"{address}, port: 4000, require_access: true")
    if access is None:  # no credential at all: the route forwards what the client sent
        text = text.replace("    credential: {header: x-api-key, secret: {env: K}}\n", "")
    else:
        text = text.replace(ROUTE_FIELD, ROUTE_FIELD + access)
    [route] = loaded(text, tmp_path).routes
    assert route.name == "anthropic"


def test_an_open_relay_is_a_warning_naming_the_route_and_the_listener(tmp_path: Path) -> None:
    config = loaded(GOOD.replace("127.0.0.1, port: 4000", "0.0.0.0, port: 4000"), tmp_path)
    assert warnings(config) == [
        "WARNING: route anthropic spends the server key for anyone who reaches the listener: "
        "configure access (gateway keys) or bind the listener to a loopback address "
        "(listener 0.0.0.0:4000; set listener.require_access: true to make this an error)"
    ]
    assert warnings(loaded(GOOD, tmp_path)) == []
