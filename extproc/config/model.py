"""The validated gateway configuration: frozen, typed, free of secrets.

This is what the ops YAML means once ``config.load.load_config`` has checked it.
It holds references to secrets (an env var name, a file path), never their
values, so it can be rendered, logged and compared freely. Secret values live
in ``policy.compiled.Policy``, built from this model by
``policy.compiled.compile_policy``.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # spend.py builds on this module's types
    from extproc.config.identity import Sso
    from extproc.config.spend import Spend

DEFAULT_CLIENT_CREDENTIALS = ("authorization", "x-api-key")
# Every gateway key starts with this, so Envoy tells one from a provider credential by itself.
KEY_PREFIX = "gk-"
# Where clients put a credential whatever the route says: a gateway key may arrive in either.
STANDARD_SLOTS = ("authorization", "x-api-key")
# The dynamic-metadata namespace the processor writes and the rendered access log reads.
METADATA_NAMESPACE = "credential_gateway"


class FailureMode(Enum):
    """What Envoy does when the processor cannot answer."""

    CLOSED = "closed"  # reject the request with a 5xx; never forward without a decision
    OPEN = "open"  # forward the request unchanged


class ServerKind(Enum):
    """Which gRPC server runs the processor."""

    LEAN = "lean"  # extproc.server.h2server: a few tens of µs per request
    GRPCIO = "grpcio"  # the official runtime: the reference, several times the CPU


class CredentialMode(Enum):
    """Whose credential a route's upstream gets."""

    PREFER_CLIENT = "prefer_client"  # the client's own if it sent one, else the server's
    REPLACE_CLIENT = "replace_client"  # always the server's; client credentials are removed
    REJECT_CLIENT = "reject_client"  # always the server's; a client credential gets 401
    CLIENT_ONLY = "client_only"  # never the server's; no client credential gets 401

    @property
    def uses_server(self) -> bool:
        return self is not CredentialMode.CLIENT_ONLY

    @property
    def client_passes(self) -> bool:
        """A client's own credential goes upstream unchanged (so Envoy may skip the processor)."""
        return self in (CredentialMode.PREFER_CLIENT, CredentialMode.CLIENT_ONLY)


class ErrorStyle(Enum):
    """Which provider's JSON error shape the gateway's own 401s use."""

    ANTHROPIC = "anthropic"
    OPENAI = "openai"


@dataclass(frozen=True)
class Endpoint:
    address: str
    port: int


@dataclass(frozen=True)
class TlsFiles:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    tls: TlsFiles | None = None
    require_access: bool = False  # refuse to start a non-loopback listener without gateway keys
    stream_idle_timeout_s: int = 300
    max_request_headers_kb: int = 60


@dataclass(frozen=True)
class ExtprocSettings:
    address: str = "127.0.0.1"
    port: int = 50051
    failure_mode: FailureMode = FailureMode.CLOSED
    timeout_ms: int = 200
    workers: int = 1
    fast_path: bool = True  # skip the processor in Envoy when a client credential is present
    server: ServerKind = ServerKind.LEAN
    socket: Path | None = None  # listen on this Unix socket (mode 0660) instead of address:port
    max_connections: int = 128  # lean server: more are refused (GOAWAY ENHANCE_YOUR_CALM)
    idle_timeout_s: int = 300  # lean server: a connection with no call this long is closed
    memory_budget_mb: int = 64  # lean server: unfinished messages held over all connections

    @property
    def target(self) -> str:
        """The gRPC target for clients of the processor (health checks)."""
        return f"unix:{self.socket}" if self.socket else f"{self.address}:{self.port}"

    @property
    def where(self) -> str:
        return str(self.socket) if self.socket else f"{self.address}:{self.port}"


@dataclass(frozen=True)
class SecretRef:
    """Where a secret comes from; exactly one of env and file is set."""

    env: str | None = None
    file: Path | None = None
    optional: bool = False
    origin: str = field(default="", compare=False)  # "gateway.yaml:14 routes[0].credential.secret"

    def describe(self) -> str:
        """Names the source (never the value) for messages."""
        return f"environment variable {self.env}" if self.env else f"file {self.file}"


@dataclass(frozen=True)
class Credential:
    header: str
    format: str
    secret: SecretRef | None  # None only for ``client_only``
    client_credentials: tuple[str, ...] = DEFAULT_CLIENT_CREDENTIALS
    mode: CredentialMode = CredentialMode.PREFER_CLIENT
    placeholders: tuple[str, ...] = ()  # values that count as blank (``dummy``, ``EMPTY``)

    @property
    def slots(self) -> tuple[str, ...]:
        """Every header a client credential or a gateway key may arrive in."""
        return tuple(dict.fromkeys((*self.client_credentials, *STANDARD_SLOTS)))


@dataclass(frozen=True)
class AccessControl:
    """Gateway client keys for a route: who may spend the server's credential."""

    keys_file: Path
    header: str = "x-gateway-key"
    for_client_credentials: bool = False  # True: a client's own credential needs a gateway key too
    origin: str = field(default="", compare=False)  # where in the YAML, for messages


@dataclass(frozen=True)
class Upstream:
    """A parsed upstream URL: the scheme decides TLS, the host is SNI and Host."""

    tls: bool
    host: str
    port: int
    path: str = "/"  # what the route's prefix is replaced with upstream

    @property
    def authority(self) -> str:
        """The Host header value: the port is left out when it is the scheme's default."""
        default = 443 if self.tls else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Route:
    name: str
    prefix: str  # ends in "/"; "/anthropic/" matches /anthropic and /anthropic/…, not /anthropicx
    upstream: Upstream
    credential: Credential | None = None
    access: AccessControl | None = None
    ca_file: Path | None = None
    error_style: ErrorStyle = ErrorStyle.ANTHROPIC
    timeout_s: int = 0  # 0: no overall limit, so long SSE responses are never cut
    connect_timeout_s: int = 10
    retries: int = 2

    @property
    def spends_server_key(self) -> bool:
        return self.credential is not None and self.credential.mode.uses_server

    @property
    def envoy_name(self) -> str:
        """The route's name in Envoy: the YAML name plus a digest of where its key may go.

        The processor picks the key by this name. When a reload points a route at
        another upstream or another secret, the name changes, so a request routed
        by the old Envoy config still gets the old config's key, never the new one.
        """
        key = self.credential
        secret = key and key.secret
        where = key and (key.header, key.format, secret and (secret.env, secret.file))
        identity = repr((self.upstream, self.ca_file, where))
        return f"{self.name}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


class StoreFailure(Enum):
    """What limits do while their shared store cannot be reached."""

    OPEN = "open"  # admit on this process's own counts (a client may overshoot)
    CLOSED = "closed"  # refuse limited clients' requests on the organisation's key (503)


@dataclass(frozen=True)
class Limit:
    """One gateway client's limits on the organisation's key; None: no limit."""

    requests_per_minute: int | None = None
    tokens: int | None = None  # per ``token_window_s``, every token type counted
    token_window_s: int = 86400
    concurrent: int | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.requests_per_minute, self.tokens, self.concurrent))


@dataclass(frozen=True)
class Limits:
    default: Limit = Limit()
    clients: tuple[tuple[str, Limit], ...] = ()  # per-client overrides, merged over the default
    store: str = "memory"  # or a redis:// URL (shared by replicas and workers)
    password: SecretRef | None = None
    on_store_error: StoreFailure = StoreFailure.OPEN
    sync_ms: int = 200  # how often a shared store is synced (the overshoot window)

    @property
    def shared(self) -> bool:
        return self.store != "memory"


@dataclass(frozen=True)
class GatewayConfig:
    source: Path
    source_digest: str
    listener: Listener
    admin: Endpoint
    extproc: ExtprocSettings
    routes: tuple[Route, ...]
    metrics: Endpoint | None = None
    system_ca_file: Path = Path("/etc/ssl/certs/ca-certificates.crt")
    metering: bool = False  # count token usage on credential routes (in Envoy)
    metering_flush_ms: int = 250  # Envoy sends usage records to the processor this often
    limits: Limits | None = None
    spend: Spend | None = None  # prices, budgets in USD, the ledger
    sso: Sso | None = None  # people's JWTs from the organisation's OpenID provider

    def with_socket(self, socket: Path | None) -> GatewayConfig:
        """This config with the processor on ``socket`` (``up`` uses a private one)."""
        if socket is None:
            return self
        return replace(self, extproc=replace(self.extproc, socket=socket))

    def open_relay_routes(self) -> list[Route]:
        """Credential routes anyone who reaches a non-loopback listener could spend."""
        if is_loopback(self.listener.address):
            return []
        return [r for r in self.routes if r.spends_server_key and r.access is None]


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
