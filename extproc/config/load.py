"""Validate the ops YAML into a ``GatewayConfig`` and report every mistake at once.

Relative file paths in the YAML (secrets, CA bundles, TLS files) are taken
relative to the YAML file's folder, so a config directory can be moved or
mounted anywhere.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from extproc.config import fields, model, tlsfiles
from extproc.config.identity import SSO
from extproc.config.identity import sso as parse_sso
from extproc.config.limits import LIMITS
from extproc.config.limits import limits as parse_limits
from extproc.config.model import KEY_PREFIX
from extproc.config.sections import ConfigError, Problems, Section, field_name
from extproc.config.spend import SPEND
from extproc.config.spend import spend as parse_spend
from extproc.config.tlsfiles import certificate_problem, private_key_problem
from extproc.config.yamlsource import Document, SourceError, load

_PLACEHOLDER = re.compile(r"^[!-+\--~]{1,200}$")  # visible ASCII without ','
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# RFC 9110 token, lower case, and no underscores: Envoy rejects those names at the edge.
_HEADER = re.compile(r"^[a-z0-9!#$%&'*+.^`|~-]+$")
_HEADER_HINT = "expected a lower-case header name, no '_', not one Envoy manages"
# Headers Envoy owns or treats specially: a credential there would be dropped or rewritten.
# A prefix is whole path segments of unreserved characters, so it is also a safe regex.
_PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)*/?$")
_FORBIDDEN_HEADERS = {
    "host", "content-length", "transfer-encoding", "connection", "te", "keep-alive", "upgrade",
    "proxy-connection", "x-forwarded-for", "x-forwarded-proto", "x-request-id",
}  # fmt: skip


def load_config(path: Path) -> model.GatewayConfig:
    """Read and validate ``path``; raise ConfigError listing every problem (and nothing else)."""
    try:
        doc = load(path)
    except SourceError as exc:
        raise ConfigError([str(exc)]) from None
    return parse(doc, path.resolve().parent, source=path)


def warnings(config: model.GatewayConfig) -> list[str]:
    """What is allowed but risky: credential routes open to anyone on a non-loopback listener."""
    where = f"{config.listener.address}:{config.listener.port}"
    return [
        f"WARNING: {_OPEN_RELAY.format(route=route.name)} (listener {where}; "
        "set listener.require_access: true to make this an error)"
        for route in config.open_relay_routes()
    ]


def parse(doc: Document, base: Path, source: Path) -> model.GatewayConfig:
    """Validate a parsed document; file paths are resolved against ``base``."""
    problems = Problems(doc)
    top = Section(problems, (), doc.data, _TOP)
    parser = _Parser(problems, base)
    parser.default_access = parser.access(top.section("access", _ACCESS))
    parser.default_placeholders = parser.placeholders(top) or ()
    listener = parser.listener(top.section("listener", _LISTENER, required=True))
    admin = parser.endpoint(top.section("admin", fields.ADMIN.names), fields.ADMIN)
    extproc = parser.extproc(top.section("extproc", _EXTPROC))
    metrics = parser.endpoint(top.section("metrics", fields.METRICS.names), fields.METRICS)
    if top.ok and not top.has("routes"):
        top.error(None, "missing required field 'routes'")
    routes = [parser.route(path, raw) for path, raw in top.items("routes")]
    if top.has("routes") and not routes and top.ok:
        top.error("routes", "give at least one route")
    _check_unique(problems, top, routes)
    # A broken top-level access block is reported as such, not also as routes without access.
    broken_default = top.has("access") and parser.default_access is None
    if (
        listener
        and listener.require_access
        and not model.is_loopback(listener.address)
        and not broken_default
    ):
        for index, route in enumerate(routes):
            if route and route.spends_server_key and route.access is None:
                problems.add(("routes", index), _OPEN_RELAY.format(route=route.name))
    metering = top.flag("metering", False)
    # How often Envoy sends its batch of usage records to the processor (gRPC access log).
    flush_ms = fields.TOP.integer(top, "metering_flush_ms")
    workers = extproc.workers if extproc else None
    limits = parse_limits(
        top.section("limits", LIMITS), problems, parser.secret, workers, bool(metering)
    )
    spend = parse_spend(top.section("spend", SPEND), problems, parser.secret, base, bool(metering))
    sso = parse_sso(top.section("sso", SSO), problems, base)
    tcp_extproc = extproc if extproc and not extproc.socket else None
    _check_ports(top, listener, admin, tcp_extproc, metrics if top.has("metrics") else None)
    _check_failure_mode(problems, extproc, routes)
    system_ca_file = _system_ca_file(top, base, routes)
    if problems.items:
        raise ConfigError(problems.items)
    assert listener and admin and extproc and metrics  # no problems → every part was built
    return model.GatewayConfig(
        source=source,
        source_digest=doc.digest,
        listener=listener,
        admin=admin,
        extproc=extproc,
        routes=tuple(r for r in routes if r is not None),
        metrics=metrics if top.has("metrics") else None,
        system_ca_file=system_ca_file,
        metering=bool(metering),
        metering_flush_ms=flush_ms or 250,
        limits=limits,
        spend=spend,
        sso=sso,
    )


# The keys each section allows, from the field tables (which docs/configuration.md shows).
_TOP = fields.TOP.names
_LISTENER = fields.LISTENER.names
_EXTPROC = fields.EXTPROC.names
_ROUTE = fields.ROUTE.names
_CREDENTIAL = fields.CREDENTIAL.names
_ACCESS = fields.ACCESS.names
_OPEN_RELAY = (
    "route {route} spends the server key for anyone who reaches the listener: "
    "configure access (gateway keys) or bind the listener to a loopback address"
)


class _Parser:
    """Builds model parts from sections; returns None for a part with problems."""

    def __init__(self, problems: Problems, base: Path) -> None:
        self.problems = problems
        self.base = base
        self.default_access: model.AccessControl | None = None
        self.default_placeholders: tuple[str, ...] = ()

    def access(self, s: Section | None) -> model.AccessControl | None:
        if s is None or not s.ok:
            return None
        keys_file = self._path(s, "keys_file")
        if not s.has("keys_file"):
            s.error(None, "missing required field 'keys_file'")
        header = s.text("header", "x-gateway-key")
        if header and not _valid_header(header):
            s.error(
                "header",
                f"{_HEADER_HINT} (e.g. x-gateway-key)",
            )
            header = None
        strict = s.flag("for_client_credentials", False)
        if keys_file is None or header is None or strict is None:
            return None
        return model.AccessControl(keys_file, header, strict, self._origin(s))

    def route_access(self, s: Section) -> model.AccessControl | None:
        """The route's own ``access``, ``false`` for none, or the top-level default."""
        if not s.has("access"):
            return self.default_access
        if s.raw["access"] is False:
            return None
        return self.access(s.section("access", _ACCESS))

    def _path(self, section: Section, key: str) -> Path | None:
        value = section.text(key, None)
        return None if value is None else (self.base / value)

    def endpoint(self, s: Section | None, table: fields.Table) -> model.Endpoint | None:
        address, port = table["address"].default, table["port"].default
        if s is None:
            return model.Endpoint(address, port)
        addr, number = s.text("address", address), table.integer(s, "port")
        return model.Endpoint(addr, number) if addr and number else None

    def listener(self, s: Section | None) -> model.Listener | None:
        if s is None:
            return None
        tls = None
        if (t := s.section("tls", fields.LISTENER_TLS.names)) is not None:
            cert, key = t.text("cert_file"), t.text("key_file")
            tls = model.TlsFiles(self.base / cert, self.base / key) if cert and key else None
            if tls is not None:
                _check_file(t, "cert_file", certificate_problem(tls.cert_file))
                _check_file(t, "key_file", private_key_problem(tls.key_file))
        values = {
            "address": s.text("address"),
            "port": fields.LISTENER.integer(s, "port"),
            "require_access": s.flag("require_access", False),
            "stream_idle_timeout_s": fields.LISTENER.integer(s, "stream_idle_timeout_s"),
            "max_request_headers_kb": fields.LISTENER.integer(s, "max_request_headers_kb"),
        }
        if None in values.values() or (s.has("tls") and tls is None):
            return None
        return model.Listener(tls=tls, **values)

    def extproc(self, s: Section | None) -> model.ExtprocSettings | None:
        if s is None:
            return model.ExtprocSettings()
        address = s.text("address", "127.0.0.1")
        if address and not model.is_loopback(address):
            s.error(
                "address", "must be a loopback address: the processor's answers carry the secret"
            )
            address = None
        values = {
            "address": address,
            "port": fields.EXTPROC.integer(s, "port"),
            "failure_mode": s.choice("failure_mode", model.FailureMode, model.FailureMode.CLOSED),
            "timeout_ms": fields.EXTPROC.integer(s, "timeout_ms"),
            "workers": fields.EXTPROC.integer(s, "workers"),
            "fast_path": s.flag("fast_path", True),
            "server": s.choice("server", model.ServerKind, model.ServerKind.LEAN),
            "max_connections": fields.EXTPROC.integer(s, "max_connections"),
            "idle_timeout_s": fields.EXTPROC.integer(s, "idle_timeout_s"),
            "memory_budget_mb": fields.EXTPROC.integer(s, "memory_budget_mb"),
        }
        socket = self._path(s, "socket")
        if socket is not None and (s.has("address") or s.has("port")):
            s.error("socket", "give either socket or address/port, not both")
            return None
        if socket is not None and values["workers"] not in (None, 1):
            s.error("workers", "several workers need a TCP port (SO_REUSEPORT), not a socket")
            return None
        return None if None in values.values() else model.ExtprocSettings(socket=socket, **values)

    def route(self, path: tuple[str | int, ...], raw: Any) -> model.Route | None:
        s = Section(self.problems, path, raw, _ROUTE)
        if not s.ok:
            return None
        name, prefix = s.text("name"), s.text("prefix")
        if name and not _NAME.match(name):
            s.error("name", "use letters, digits, '.', '_' and '-' (at most 63)")
            name = None
        if prefix and not _PREFIX.match(prefix):
            s.error(
                "prefix", "expected path segments of letters, digits, . _ ~ - (e.g. /anthropic)"
            )
            prefix = None
        prefix = prefix and prefix.rstrip("/") + "/"
        upstream = self.upstream(s)
        ca_file = self._path(s, "ca_file")
        if ca_file and upstream and not upstream.tls:
            s.error("ca_file", "only applies to an https upstream")
        elif ca_file:
            _check_file(s, "ca_file", certificate_problem(ca_file))
        credential = self.credential(s.section("credential", _CREDENTIAL))
        access = self.route_access(s)
        slots = credential.slots if credential else model.STANDARD_SLOTS
        if access and access.header in slots:
            s.error("access", f"header {access.header!r} is also a client credential header")
            access = None
        values = {
            "error_style": s.choice("error_style", model.ErrorStyle, model.ErrorStyle.ANTHROPIC),
            "timeout_s": fields.ROUTE.integer(s, "timeout_s"),
            "connect_timeout_s": fields.ROUTE.integer(s, "connect_timeout_s"),
            "retries": fields.ROUTE.integer(s, "retries"),
        }
        if None in (name, prefix, upstream, *values.values()):
            return None
        if (s.has("credential") and credential is None) or (
            s.has("access") and s.raw["access"] is not False and access is None
        ):
            return None
        assert name and prefix and upstream
        return model.Route(name, prefix, upstream, credential, access, ca_file, **values)

    def upstream(self, s: Section) -> model.Upstream | None:
        url = s.text("upstream")
        if not url:
            return None
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:  # a bad port, or an unclosed [IPv6 literal
            port, parts = None, urlsplit("")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            s.error("upstream", "expected an http:// or https:// URL with a host")
            return None
        if parts.username or parts.query or parts.fragment:
            s.error("upstream", "give scheme, host, optional port and path only")
            return None
        tls = parts.scheme == "https"
        path = parts.path.rstrip("/") + "/"
        return model.Upstream(tls, parts.hostname, port or (443 if tls else 80), path)

    def credential(self, s: Section | None) -> model.Credential | None:
        if s is None or not s.ok:
            return None
        header = s.text("header")
        if header and not _valid_header(header):
            s.error(
                "header",
                f"{_HEADER_HINT} (e.g. x-api-key)",
            )
            header = None
        fmt = s.text("format", "{secret}")
        rest = fmt.replace("{secret}", "") if fmt else ""
        if fmt and (fmt.count("{secret}") != 1 or "{" in rest or "}" in rest):
            s.error("format", "must contain {secret} exactly once and no other braces")
            fmt = None
        mode = s.choice("mode", model.CredentialMode, model.CredentialMode.PREFER_CLIENT)
        secret = self.secret(s.section("secret", fields.SECRET.names))
        if mode is model.CredentialMode.CLIENT_ONLY and s.has("secret"):
            s.error("secret", "a client_only route never uses a server key: remove the secret")
            mode = None
        elif mode and mode.uses_server and not s.has("secret"):
            s.error(None, f"missing required field 'secret' (mode {mode.value} needs a server key)")
            mode = None
        clients = self.client_credentials(s)
        if header and clients is not None and header not in clients:
            s.error(
                "client_credentials",
                f"must include {header!r}, or a client's own would be overwritten",
            )
            clients = None
        placeholders = self.placeholders(s)
        if placeholders is None:
            placeholders = None if s.has("placeholders") else self.default_placeholders
        usable = secret is not None or (mode is not None and not mode.uses_server)
        if header and fmt and clients and mode and placeholders is not None and usable:
            return model.Credential(header, fmt, secret, clients, mode, placeholders)
        return None

    def placeholders(self, s: Section) -> tuple[str, ...] | None:
        """Values that count as no credential; None if absent or invalid."""
        if not s.has("placeholders"):
            return None
        values: list[str] = []
        for path, item in s.items("placeholders"):
            if not isinstance(item, str) or not _PLACEHOLDER.match(item):
                self.problems.add(path, "expected a value of visible ASCII characters, no ','")
                return None
            if item.startswith(KEY_PREFIX):
                self.problems.add(path, f"values starting with {KEY_PREFIX!r} are gateway keys")
                return None
            values.append(item)
        return tuple(dict.fromkeys(values))

    def client_credentials(self, s: Section) -> tuple[str, ...] | None:
        if not s.has("client_credentials"):
            return model.DEFAULT_CLIENT_CREDENTIALS
        names: list[str] = []
        for path, item in s.items("client_credentials"):
            if not isinstance(item, str) or not _valid_header(item.lower()):
                self.problems.add(path, "expected a header name")
                return None
            names.append(item.lower())
        if not names:
            s.error("client_credentials", "give at least one header name")
            return None
        return tuple(dict.fromkeys(names))

    def secret(self, s: Section | None) -> model.SecretRef | None:
        if s is None or not s.ok:
            return None
        env, file = s.text("env", None), self._path(s, "file")
        optional = s.flag("optional", False)
        if (env is None) == (file is None):
            s.error(None, "give exactly one of env, file")
            return None
        if env is not None and not _ENV_NAME.match(env):
            # Never echoed: a key pasted here instead of a variable name must not reach a log.
            s.error("env", "expected an environment variable name (letters, digits, '_')")
            return None
        if optional is None:
            return None
        return model.SecretRef(env, file, optional, self._origin(s))

    def _origin(self, s: Section) -> str:
        """Where a section is, for messages about what it names: ``gateway.yaml:8 routes[0]...``."""
        return (
            f"{self.problems.doc.filename}:{self.problems.doc.line_of(s.path)} {field_name(s.path)}"
        )


def _valid_header(name: str) -> bool:
    return (
        bool(_HEADER.match(name))
        and name not in _FORBIDDEN_HEADERS
        and not name.startswith("x-envoy-")
    )


def _check_unique(problems: Problems, top: Section, routes: list[model.Route | None]) -> None:
    seen: dict[tuple[str, str], int] = {}
    for index, route in enumerate(routes):
        if route is None:
            continue
        for key in ("name", "prefix"):
            value = getattr(route, key)
            if (key, value) in seen:
                first = seen[(key, value)]
                problems.add(
                    ("routes", index, key), f"{value!r} is already used by routes[{first}]"
                )
            else:
                seen[(key, value)] = index


def _check_file(s: Section, key: str, problem: str | None) -> None:
    if problem is not None:
        s.error(key, problem)


def _system_ca_file(top: Section, base: Path, routes: list[model.Route | None]) -> Path:
    """The CA bundle for https upstreams without a ``ca_file``: ``ca_bundle`` or the host's."""
    if top.has("ca_bundle"):
        value = top.text("ca_bundle")
        path = base / value if value else tlsfiles.SYSTEM_BUNDLES[0]
        if value:
            _check_file(top, "ca_bundle", certificate_problem(path))
        return path
    found = tlsfiles.system_bundle()
    unpinned = [i for i, r in enumerate(routes) if r and r.upstream.tls and r.ca_file is None]
    if found is None and unpinned:
        looked = ", ".join(str(p) for p in tlsfiles.SYSTEM_BUNDLES)
        top.problems.add(
            ("routes", unpinned[0], "upstream"),
            f"no system CA bundle found on this host (looked for {looked}): "
            "set ca_bundle: at the top level, or this route's ca_file",
        )
    return found or tlsfiles.SYSTEM_BUNDLES[0]


def _check_failure_mode(
    problems: Problems, extproc: model.ExtprocSettings | None, routes: list[model.Route | None]
) -> None:
    """``open`` forwards unchanged while the processor is down: never with gateway keys."""
    if extproc is None or extproc.failure_mode is not model.FailureMode.OPEN:
        return
    guarded = [route.name for route in routes if route is not None and route.access is not None]
    if guarded:
        problems.add(
            ("extproc", "failure_mode"),
            "open cannot be used with gateway keys: while the processor is down or slow, "
            "requests would be forwarded unchanged and a gateway key (gk-...) would reach "
            f"the provider (routes with access: {', '.join(guarded[:5])}); use closed",
        )


def _check_ports(
    top: Section, *endpoints: model.Endpoint | model.Listener | model.ExtprocSettings | None
) -> None:
    names = ("listener", "admin", "extproc", "metrics")
    used: dict[int, str] = {}
    for name, endpoint in zip(names, endpoints, strict=True):
        if endpoint is None:
            continue
        if endpoint.port in used:
            message = f"port {endpoint.port} is already used by {used[endpoint.port]}"
            top.problems.add((name, "port"), message)
        used[endpoint.port] = name
