"""The runtime policy: config + secrets + keys compiled into ready-to-send answers.

What can be computed once per config load is computed here: the decision rule
per route and the serialised ext_proc answer bodies, so the per-request path
only looks things up and appends the client's name. Nothing is kept per
gateway client: a keys file is read once however many routes name it, looked
up by digest, and a change to it alone reuses every route's answers. A
``Policy`` is immutable; a reload builds a new one and swaps the reference
(see ``PolicyHolder``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from extproc.config.model import (
    DEFAULT_CLIENT_CREDENTIALS,
    CredentialMode,
    ErrorStyle,
    GatewayConfig,
    Route,
    SecretRef,
)
from extproc.config.sections import ConfigError
from extproc.policy import responses
from extproc.policy.access import GatewayKeys, KeysFileError, KeyTable, read_keys
from extproc.policy.decision import Outcome, RouteRule
from extproc.policy.limits import LimitTable, Refusal
from extproc.policy.people import Claims
from extproc.policy.secrets import Secret, SecretError, read_secret

_NO_KEY = (Outcome.DENIED, Outcome.NO_CREDENTIAL)  # a 401 saying how to send a gateway key
_REFUSALS = frozenset({Outcome.REJECTED, Outcome.REFUSED, Outcome.EXPIRED, *_NO_KEY})


class RouteAnswers:
    """One route's answer bodies by (outcome, headers removed), and its metadata fields.

    Bodies that remove headers are built on first use; there are at most a few
    (one per set of credential headers), never one per client.
    """

    def __init__(self, route: Route, value: Secret | None) -> None:
        self._route = route
        self._value = value  # the formatted credential, e.g. "Bearer <key>"; None: no secret
        self._fields = {o: responses.metadata_fields(route.name, o) for o in Outcome}
        self._bodies: dict[tuple[Outcome, tuple[str, ...]], bytes] = {}
        for outcome in (Outcome.CLIENT_AUTHORIZATION, Outcome.CLIENT_API_KEY, *_NO_KEY):
            self.body(outcome, ())
        self.body(Outcome.INJECTED if value else Outcome.REJECTED, ())

    def answer(
        self, outcome: Outcome, remove: tuple[str, ...], client: str, teams: tuple[str, ...] = ()
    ) -> bytes:
        body = self._bodies.get((outcome, remove)) or self.body(outcome, remove)
        return responses.with_metadata(body, self._fields[outcome], client, teams)

    def fields(self, outcome: Outcome) -> bytes:
        return self._fields[outcome]

    def body(self, outcome: Outcome, remove: tuple[str, ...]) -> bytes:
        built = self._build(outcome, remove)
        self._bodies[(outcome, remove)] = built
        return built

    @property
    def count(self) -> int:
        return len(self._bodies)

    def _build(self, outcome: Outcome, remove: tuple[str, ...]) -> bytes:
        credential = self._route.credential
        if outcome in (Outcome.INJECTED, Outcome.REPLACED):
            assert credential is not None and self._value is not None
            return responses.mutate(credential.header, self._value.reveal(), remove)
        if outcome in _REFUSALS:
            message = _rejection_message(self._route, outcome)
            return responses.reject(outcome, self._route.error_style, message)
        return responses.mutate(None, b"", remove) if remove else responses.pass_through()


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    name: str
    rule: RouteRule
    answers: RouteAnswers = field(repr=False)  # they hold the secret
    identity: bytes = field(repr=False, default=b"")  # what the answers were built from
    style: ErrorStyle = ErrorStyle.ANTHROPIC  # the provider's error (and usage) shape

    def answer(
        self, outcome: Outcome, remove: tuple[str, ...], client: str, teams: tuple[str, ...] = ()
    ) -> bytes:
        return self.answers.answer(outcome, remove, client, teams)

    def limited(self, refusal: Refusal, client: str, teams: tuple[str, ...] = ()) -> bytes:
        """Built per request: the retry-after differs each time (and this path is rare)."""
        body = responses.limited(self.style, refusal)
        return responses.with_metadata(body, self.answers.fields(Outcome.LIMITED), client, teams)


@dataclass(frozen=True, slots=True)
class Policy:
    routes: Mapping[str, CompiledRoute]  # by Envoy route name
    version: str  # short hash of the config, secrets and keys files, for metrics/logs
    missing_optional: tuple[str, ...] = ()  # routes whose optional secret is absent
    keys: Mapping[Path, KeyTable] = field(default_factory=dict, repr=False)  # by keys file
    limits: LimitTable | None = None  # per-client limits on the organisation's key
    sso: Claims | None = None  # people's verified JWTs: which claims name them


def compile_policy(
    config: GatewayConfig, environ: Mapping[str, str] = os.environ, previous: Policy | None = None
) -> Policy:
    """Read every route's secret and keys file and prebuild its answers.

    Answers are reused from ``previous`` for every route whose settings and
    secret did not change, and a keys file whose bytes did not change is not
    parsed again. Raises ConfigError listing every secret or keys file that
    cannot be used.
    """
    problems: list[str] = []
    compiled: dict[str, CompiledRoute] = {}
    missing: list[str] = []
    tables: dict[Path, KeyTable] = {}
    old_tables = previous.keys if previous else {}
    for route in config.routes:
        try:
            secret = _read_secret(route, environ)
            keys = _keys(route, tables, old_tables)
        except SecretError as exc:
            assert route.credential and route.credential.secret
            problems.append(f"{route.credential.secret.origin}: {exc}")
            continue
        except KeysFileError as exc:
            problems.append(f"{route.access.origin if route.access else ''}: {exc}")
            continue
        if secret is None and route.spends_server_key:
            missing.append(route.name)
        old = previous.routes.get(route.envoy_name) if previous else None
        rule = _rule(route, secret is not None, keys, people=config.sso is not None)
        compiled[route.envoy_name] = _compile_route(route, secret, rule, old)
    limits = config.limits
    # Read by the limiter and the spend service; checked here so a missing one is a config
    # error too (``validate`` says so, ``serve`` does not start and then exit 2).
    if limits is not None and limits.password is not None:
        problems += _unusable(limits.password, environ, text=False)
    if config.spend is not None and config.spend.shared and config.spend.password is not None:
        problems += _unusable(config.spend.password, environ, text=True)
    if problems:
        raise ConfigError(problems)
    version = _version(config, compiled, tables)
    table = LimitTable.of(limits) if limits else None
    held = MappingProxyType(tables)
    sso = _claims(config)
    return Policy(MappingProxyType(compiled), version, tuple(missing), held, table, sso)


def _unusable(ref: SecretRef, environ: Mapping[str, str], text: bool) -> list[str]:
    """Why the password ``ref`` names cannot be used (``text``: it must be UTF-8), or nothing."""
    try:
        secret = read_secret(ref, environ)
        if text and secret is not None:
            secret.reveal().decode()
    except SecretError as exc:
        return [f"{ref.origin}: {exc}"]
    except UnicodeDecodeError:  # its message would quote a byte of the password
        return [f"{ref.origin}: {ref.describe()} is not UTF-8 text"]
    return []


def _claims(config: GatewayConfig) -> Claims | None:
    """How people's tokens are read; teams with budgets or model lists are kept first."""
    if config.sso is None:
        return None
    budgets = config.spend.teams if config.spend else ()
    named = {team for team, _ in (*config.sso.models, *budgets)}
    return Claims(config.sso.client_claim, config.sso.groups_claim, frozenset(named))


def _read_secret(route: Route, environ: Mapping[str, str]) -> Secret | None:
    if route.credential is None or route.credential.secret is None:
        return None
    return read_secret(route.credential.secret, environ)


def _keys(
    route: Route, tables: dict[Path, KeyTable], old: Mapping[Path, KeyTable]
) -> GatewayKeys | None:
    """The route's gateway keys; each keys file is read once per compile."""
    access = route.access
    if access is None:
        return None
    table = tables.get(access.keys_file)
    if table is None:
        table = tables[access.keys_file] = read_keys(access.keys_file, old.get(access.keys_file))
    return GatewayKeys(access.header, table, access.for_client_credentials)


def _compile_route(
    route: Route, secret: Secret | None, rule: RouteRule, old: CompiledRoute | None
) -> CompiledRoute:
    credential = route.credential
    value = None
    if credential is not None and secret is not None:
        before, after = credential.format.split("{secret}")
        value = Secret(before.encode() + secret.reveal() + after.encode())
    identity = _identity(route, value)
    answers = old.answers if old and old.identity == identity else RouteAnswers(route, value)
    return CompiledRoute(route.name, rule, answers, identity, route.error_style)


def _rule(route: Route, has_secret: bool, keys: GatewayKeys | None, people: bool) -> RouteRule:
    credential = route.credential
    if credential is None:
        clients = frozenset(DEFAULT_CLIENT_CREDENTIALS)  # for the label when the client pays
        return RouteRule("", clients, False, keys, forward_only=True, people=people)
    return RouteRule(
        credential.header,
        frozenset(credential.client_credentials),
        has_secret,
        keys,
        credential.mode,
        frozenset(p.encode() for p in credential.placeholders),
        people=people,
    )


def _identity(route: Route, value: Secret | None) -> bytes:
    """What a route's answers depend on; the secret only as a digest."""
    access = route.access and route.access.header
    settings = repr((route.name, route.credential, route.error_style, access))
    digest = hashlib.sha256(settings.encode() + b"\0")
    digest.update(hashlib.sha256(value.reveal()).digest() if value else b"-")
    return digest.digest()


def _rejection_message(route: Route, outcome: Outcome) -> str:
    """The 401's text for ``outcome``, telling the client what to send."""
    credential = route.credential
    hint = " or ".join(credential.client_credentials if credential else ())
    if outcome in _NO_KEY:
        if route.access is None:
            return f"Gateway keys are not accepted on route '{route.name}'."
        what = (
            "No gateway key"
            if outcome is Outcome.NO_CREDENTIAL
            else "Missing or invalid gateway key"
        )
        return (
            f"{what}: send yours as x-api-key, as "
            f"'Authorization: Bearer <key>' or in the {route.access.header} header."
        )
    if outcome is Outcome.EXPIRED:
        return "Your gateway key has expired: ask whoever gave it to you for a new one."
    if outcome is Outcome.REFUSED:
        return (
            f"Route '{route.name}' uses the organisation's key: send no credential of your own "
            f"({hint}), only your gateway key if you have one."
        )
    if credential is not None and credential.mode is CredentialMode.CLIENT_ONLY:
        return f"Route '{route.name}' takes only your own credential: send it ({hint})."
    return (
        f"No credential: this gateway has no server key for route '{route.name}'. "
        f"Send your own ({hint})."
    )


def _version(
    config: GatewayConfig, routes: Mapping[str, CompiledRoute], tables: Mapping[Path, KeyTable]
) -> str:
    """Changes when the config, a secret or a keys file changes; reveals nothing about them."""
    digest = hashlib.sha256(config.source_digest.encode())
    for name in sorted(routes):
        digest.update(name.encode() + b"\0" + routes[name].identity)
    for path in sorted(tables):
        digest.update(str(path).encode() + b"\0" + tables[path].digest)
    return digest.hexdigest()[:12]
