"""Every field of the ops YAML in one table per section: type, default, bounds, meaning.

The one source of truth for what the loader accepts where numbers are bounded (the
loader reads ``low``/``high``/``default`` from here) and for the generated reference,
docs/configuration.md (``python -m extproc.reference``). A section's ``fields`` is also
the list of keys the loader allows in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from extproc.config.sections import REQUIRED, Section


@dataclass(frozen=True)
class Field:
    """One key of a section; ``default`` is REQUIRED when it must be given."""

    name: str
    kind: str  # what the reference says the value is: "integer", "true/false", "path", …
    default: Any = None  # None: absent means "not set" (no default value)
    doc: str = ""
    low: int | None = None  # integers: the inclusive bounds the loader enforces
    high: int | None = None
    attr: str | None = None  # the model attribute holding it, when named otherwise

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Table:
    """One mapping of the YAML at ``path`` (``routes[]`` for each item of a list)."""

    path: str
    doc: str
    fields: tuple[Field, ...]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def __getitem__(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def integer(self, s: Section, name: str) -> Any:
        """``s``'s integer ``name`` within this table's bounds (a problem if outside)."""
        f = self[name]
        assert f.low is not None and f.high is not None, name
        return s.integer(name, f.default, f.low, f.high)


def _int(name: str, default: Any, low: int, high: int, doc: str) -> Field:
    return Field(name, "integer", default, doc, low, high)


def _port(name: str, default: Any, doc: str) -> Field:
    return _int(name, default, 1, 65535, doc)


_WHERE_FROM = "a secret: {env: NAME} or {file: path} (trailing newline trimmed)"

TOP = Table("", "The top level of the file.", (
    Field("listener", "mapping", REQUIRED, "where clients connect (below)"),
    Field("admin", "mapping", None, "Envoy's admin interface; keep it on loopback"),
    Field("extproc", "mapping", None, "the Python processor (below)"),
    Field("metrics", "mapping", None, "the processor's Prometheus /metrics; absent: not served"),
    Field("access", "mapping", None, "gateway keys for every route (a route may override it)"),
    Field("placeholders", "list of strings", None,
          "values that count as no credential (exact, case-sensitive; never starting gk-)"),
    Field("metering", "true/false", False, "count token usage per client, in Envoy"),
    _int("metering_flush_ms", 250, 10, 60000,
         "how often Envoy sends the processor its batch of usage records"),
    Field("limits", "mapping", None, "per-client limits on the organisation's key (below)"),
    Field("spend", "mapping", None, "prices, budgets in USD, the ledger (below)"),
    Field("sso", "mapping", None, "people's JWTs from the organisation's OpenID provider (below)"),
    Field("ca_bundle", "path", None,
          "CA bundle for https upstreams without ca_file; absent: the host's (first found)",
          attr="system_ca_file"),
    Field("routes", "list of mappings", REQUIRED, "at least one route (below)"),
))  # fmt: skip

LISTENER = Table("listener", "Where clients connect (Envoy's listener).", (
    Field("address", "string", REQUIRED,
          "non-loopback with a credential route without access: a warning"),
    _port("port", REQUIRED, "the listener's port"),
    Field("tls", "mapping", None,
          "HTTPS (HTTP/2 by ALPN); the files are checked at load and served by SDS"),
    Field("require_access", "true/false", False,
          "make the non-loopback warning an error"),
    _int("stream_idle_timeout_s", 300, 1, 86400,
         "a stream with no bytes either way this long is closed"),
    _int("max_request_headers_kb", 60, 1, 8192, "larger request headers get 431"),
))  # fmt: skip

LISTENER_TLS = Table("listener.tls", "The listener's certificate.", (
    Field("cert_file", "path", REQUIRED, "PEM certificate (chain)"),
    Field("key_file", "path", REQUIRED, "unencrypted PEM private key"),
))  # fmt: skip

ADMIN = Table("admin", "Envoy's admin interface.", (
    Field("address", "string", "127.0.0.1", ""),
    _port("port", 9901, ""),
))  # fmt: skip

METRICS = Table("metrics", "The processor's Prometheus endpoint (/metrics).", (
    Field("address", "string", "127.0.0.1", ""),
    _port("port", 9464, ""),
))  # fmt: skip

EXTPROC = Table("extproc", "The Python processor Envoy asks about each request.", (
    Field("address", "string", "127.0.0.1", "must be loopback: its answers carry the secret"),
    _port("port", 50051, ""),
    Field("socket", "path", None,
          "a Unix socket (mode 0660) instead of address/port; one worker only"),
    Field("failure_mode", "closed | open", "closed",
          "no answer: closed gives a 5xx; open forwards unchanged (refused with access)"),
    _int("timeout_ms", 200, 1, 60000, "per answer; a slower processor counts as failed"),
    _int("workers", 1, 1, 64, "processor processes sharing the port (SO_REUSEPORT)"),
    Field("fast_path", "true/false", True,
          "Envoy skips the processor when a client credential is present"),
    Field("server", "lean | grpcio", "lean",
          "lean: the small HTTP/2 gRPC server; grpcio: the reference runtime"),
    _int("max_connections", 128, 4, 100000, "lean: connections held at once"),
    _int("idle_timeout_s", 300, 10, 86400, "lean: a connection without a call this long closes"),
    _int("memory_budget_mb", 64, 4, 16384,
         "lean: unfinished messages held over all connections"),
))  # fmt: skip

ACCESS = Table("access", "Gateway keys (top level, or a route's own; false: none).", (
    Field("keys_file", "path", REQUIRED, "the keys file the `keys` commands write"),
    Field("header", "string", "x-gateway-key",
          "besides x-api-key and Authorization: Bearer, which always work"),
    Field("for_client_credentials", "true/false", False,
          "a client's own credential needs a gateway key too"),
))  # fmt: skip

ROUTE = Table("routes[]", "One upstream behind a path prefix.", (
    Field("name", "string", REQUIRED, "letters, digits, . _ - (at most 63)"),
    Field("prefix", "string", REQUIRED,
          "whole path segments; replaced by the upstream's path"),
    Field("upstream", "URL", REQUIRED,
          "http:// or https://; the host is SNI, Host and the name checked"),
    Field("credential", "mapping", None,
          "the server credential (below); absent: the route only forwards"),
    Field("access", "mapping or false", None, "overrides the top-level access"),
    Field("ca_file", "path", None, "trust this CA bundle instead of the system one (https only)"),
    Field("error_style", "anthropic | openai", "anthropic",
          "the JSON shape of the gateway's own answers"),
    _int("timeout_s", 0, 0, 86400, "0: no overall limit (long SSE responses are never cut)"),
    _int("connect_timeout_s", 10, 1, 300, ""),
    _int("retries", 2, 0, 10, "on connect failure, refused stream, reset before sending"),
))  # fmt: skip

CREDENTIAL = Table("routes[].credential", "Whose credential the route's upstream gets.", (
    Field("header", "string", REQUIRED, "the header the server credential goes into"),
    Field("format", "string", "{secret}", "e.g. \"Bearer {secret}\"; {secret} exactly once"),
    Field("secret", "mapping", None, _WHERE_FROM + "; required unless mode is client_only"),
    Field("client_credentials", "list of strings", ["authorization", "x-api-key"],
          "headers holding a client's own credential; must include header"),
    Field("mode", "prefer_client | replace_client | reject_client | client_only",
          "prefer_client", "see docs/keys-and-access.md"),
    Field("placeholders", "list of strings", None, "this route's own list instead of the top's"),
))  # fmt: skip

SECRET = Table("routes[].credential.secret", "Where a secret is read (never its value).", (
    Field("env", "string", None, "an environment variable's name"),
    Field("file", "path", None, "a file (trailing newline trimmed); exactly one of env, file"),
    Field("optional", "true/false", False,
          "missing: start anyway, 401 for credential-less requests"),
))  # fmt: skip

LIMITS = Table("limits", "Per gateway client limits on the organisation's key.", (
    Field("store", "memory | redis://host[:port][/db]", "memory",
          "rediss:// for TLS; shared by workers and replicas"),
    Field("password", "secret", None, "with a redis store: " + _WHERE_FROM),
    Field("on_store_error", "open | closed", "open",
          "store unreachable: open admits on own counts; closed gives 503"),
    _int("sync_ms", 200, 20, 10000, "how often a shared store is synced (the overshoot window)"),
    Field("default", "mapping", None, "every client's limit (below)"),
    Field("clients", "mapping of names to limits", None,
          "overrides merged over the default field by field"),
))  # fmt: skip

LIMIT = Table("limits.default", "One limit block (also each of limits.clients); null lifts one.", (
    _int("requests_per_minute", None, 0, 10**12, ""),
    _int("tokens", None, 0, 10**12, "every token type counted, per token_window; needs metering"),
    Field("token_window", "duration (60s, 30m, 12h, 1d)", "1d", "", attr="token_window_s"),
    _int("concurrent", None, 0, 10**12, "requests in flight; needs metering"),
))  # fmt: skip

SPEND = Table("spend", "Prices, budgets in USD over calendar periods, the ledger.", (
    Field("timezone", "IANA time zone", "UTC", "calendar periods: local midnight, ISO weeks"),
    Field("store", "sqlite | postgresql://[user@]host[:port]/db", "sqlite",
          "the ledger; postgresql to share it between replicas"),
    Field("password", "secret", None, "with a postgresql store: " + _WHERE_FROM),
    Field("state_dir", "path", "state", "SQLite: state_dir/spend.db"),
    _int("retention_days", 400, 1, 36500, "ledger rows older than this are removed"),
    _int("flush_ms", 1000, 50, 60000, "the ledger is written in one transaction this often"),
    Field("on_store_error", "open | closed", "open",
          "closed: 503 on the organisation's key while the database is down"),
    Field("reservation_usd", "USD amount (0 … 1e9)", "0.50",
          "held per admitted request until its record arrives"),
    _int("reservation_timeout_s", 900, 10, 86400, "a reservation with no record is dropped"),
    _int("soft_percent", 80, 1, 100, "a log line and a metric once per budget and period"),
    Field("prices", "mapping of models to prices", None,
          "USD per million tokens; wins over the bundled table"),
    Field("budgets", "mapping", None, "caps per period (below); need metering"),
))  # fmt: skip

PRICE = Table("spend.prices.MODEL", "USD per million tokens for one model.", (
    Field("input", "USD amount", REQUIRED, ""),
    Field("output", "USD amount", REQUIRED, ""),
    Field("cache_read", "USD amount", None, "absent: such tokens' cost is unknown"),
    Field("cache_write_5m", "USD amount", None, ""),
    Field("cache_write_1h", "USD amount", None, ""),
))  # fmt: skip

BUDGETS = Table("spend.budgets", "Who is capped.", (
    Field("organisation", "budget", None, "all clients together"),
    Field("default", "budget", None, "every client without its own block"),
    Field("clients", "mapping of names to budgets", None, "merged over default; null lifts a cap"),
    Field("teams", "mapping of names to budgets", None, "a team's clients together"),
))  # fmt: skip

BUDGET = Table("spend.budgets.default", "One budget (also organisation, each client, team).", (
    Field("day", "USD amount", None, ""),
    Field("week", "USD amount", None, "weeks start on Monday"),
    Field("month", "USD amount", None, ""),
))  # fmt: skip

SSO = Table("sso", "People's JWTs from the organisation's OpenID provider.", (
    Field("issuer", "URL", REQUIRED, "the provider's issuer (its discovery document is read)"),
    Field("audiences", "list of strings", REQUIRED, "at least one"),
    Field("jwks_uri", "URL", None, "absent: read from the discovery document at load"),
    Field("ca_file", "path", None, "for an https provider; absent: the system bundle"),
    Field("client_claim", "claim name", "email", "names the client"),
    Field("groups_claim", "claim name", "groups", "names the teams"),
    _int("clock_skew_s", 60, 1, 600, ""),
    _int("cache_s", 300, 10, 86400, "how long Envoy keeps the keys before fetching them again"),
    Field("models", "mapping of teams to lists of models", None,
          "a person in a listed team may use only its models"),
))  # fmt: skip

TABLES = (
    TOP, LISTENER, LISTENER_TLS, ADMIN, METRICS, EXTPROC, ACCESS, ROUTE, CREDENTIAL, SECRET,
    LIMITS, LIMIT, SPEND, PRICE, BUDGETS, BUDGET, SSO,
)  # fmt: skip
