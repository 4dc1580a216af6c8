"""The runtime policy: config + secrets compiled into ready-to-send answers.

Everything that can be computed once per config load is computed here: the
decision rule per route and the serialised ext_proc answer for each outcome,
so the per-request path only looks things up. A ``Policy`` is immutable; a
reload builds a new one and swaps the reference (see ``PolicyHolder``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from extproc import responses
from extproc.decision import Outcome, RouteRule
from extproc.model import GatewayConfig, Route
from extproc.secrets import Secret, SecretError, read_secret
from extproc.sections import ConfigError


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    name: str
    rule: RouteRule
    answers: Mapping[Outcome, bytes] = field(repr=False)  # serialised answers; they hold the secret
    header_value: Secret | None  # the formatted credential, e.g. "Bearer <key>"

    def inject_removing(self, remove: tuple[str, ...]) -> bytes:
        """The rare injection that also drops blank client headers; built per request."""
        assert self.header_value is not None
        value = self.header_value.reveal()
        answer: bytes = responses.inject(
            self.name, self.rule.header, value, remove
        ).SerializeToString()
        return answer


@dataclass(frozen=True, slots=True)
class Policy:
    routes: Mapping[str, CompiledRoute]  # by Envoy route name
    version: str  # short hash of the config file and the secrets' presence, for metrics/logs
    missing_optional: tuple[str, ...] = ()  # routes whose optional secret is absent


def compile_policy(config: GatewayConfig, environ: Mapping[str, str] = os.environ) -> Policy:
    """Read every route's secret and prebuild its answers; ConfigError lists all failures."""
    problems: list[str] = []
    compiled: dict[str, CompiledRoute] = {}
    missing: list[str] = []
    for route in config.routes:
        if route.credential is None:
            continue
        try:
            secret = read_secret(route.credential.secret, environ)
        except SecretError as exc:
            problems.append(f"{route.credential.secret.origin}: {exc}")
            continue
        if secret is None:
            missing.append(route.name)
        compiled[route.envoy_name] = _compile_route(route, secret)
    if problems:
        raise ConfigError(problems)
    return Policy(MappingProxyType(compiled), _version(config, compiled), tuple(missing))


def _compile_route(route: Route, secret: Secret | None) -> CompiledRoute:
    credential = route.credential
    assert credential is not None
    rule = RouteRule(
        credential.header, frozenset(credential.client_credentials), secret is not None
    )
    answers = {
        Outcome.CLIENT_AUTHORIZATION: responses.pass_through(
            route.name, Outcome.CLIENT_AUTHORIZATION
        ),
        Outcome.CLIENT_API_KEY: responses.pass_through(route.name, Outcome.CLIENT_API_KEY),
    }
    value = None
    if secret is None:
        hint = " or ".join(credential.client_credentials)
        answers[Outcome.REJECTED] = responses.reject(route.name, route.error_style, hint)
    else:
        before, after = credential.format.split("{secret}")
        value = Secret(before.encode() + secret.reveal() + after.encode())
        answers[Outcome.INJECTED] = responses.inject(route.name, credential.header, value.reveal())
    serialised = {outcome: answer.SerializeToString() for outcome, answer in answers.items()}
    return CompiledRoute(route.name, rule, MappingProxyType(serialised), value)


def _version(config: GatewayConfig, routes: Mapping[str, CompiledRoute]) -> str:
    """Changes when the config file or any secret changes; reveals nothing about the secrets."""
    digest = hashlib.sha256(config.source.read_bytes() if config.source.exists() else b"")
    for name in sorted(routes):
        secret = routes[name].header_value
        digest.update(name.encode() + b"\0")
        digest.update(hashlib.sha256(secret.reveal()).digest() if secret else b"-")
    return digest.hexdigest()[:12]
