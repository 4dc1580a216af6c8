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

from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc

from extproc.config.model import AccessControl, GatewayConfig, Route
from extproc.config.sections import ConfigError
from extproc.policy import responses
from extproc.policy.access import GatewayKeys, KeysFileError, read_keys
from extproc.policy.decision import Outcome, RouteRule
from extproc.policy.secrets import Secret, SecretError, read_secret

AnswerKey = tuple[Outcome, str]  # (outcome, gateway key client name or "")


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    name: str
    rule: RouteRule
    answers: Mapping[AnswerKey, bytes] = field(repr=False)  # serialised; they hold the secret
    header_value: Secret | None  # the formatted credential, e.g. "Bearer <key>"

    def inject_removing(self, remove: tuple[str, ...], client: str) -> bytes:
        """The rare injection that also drops blank client headers; built per request."""
        assert self.header_value is not None
        value = self.header_value.reveal()
        answer = responses.inject(self.name, self.rule.header, value, remove, client)
        serialised: bytes = answer.SerializeToString()
        return serialised


@dataclass(frozen=True, slots=True)
class Policy:
    routes: Mapping[str, CompiledRoute]  # by Envoy route name
    version: str  # short hash of the config, secrets and keys files, for metrics/logs
    missing_optional: tuple[str, ...] = ()  # routes whose optional secret is absent


def compile_policy(config: GatewayConfig, environ: Mapping[str, str] = os.environ) -> Policy:
    """Read every route's secret and keys file and prebuild its answers.

    Raises ConfigError listing every secret or keys file that cannot be used.
    """
    problems: list[str] = []
    compiled: dict[str, CompiledRoute] = {}
    missing: list[str] = []
    for route in config.routes:
        if route.credential is None:
            continue
        try:
            secret = read_secret(route.credential.secret, environ)
            keys = _read_keys(route.access)
        except SecretError as exc:
            problems.append(f"{route.credential.secret.origin}: {exc}")
            continue
        except KeysFileError as exc:
            problems.append(f"{route.access.origin if route.access else ''}: {exc}")
            continue
        if secret is None:
            missing.append(route.name)
        compiled[route.envoy_name] = _compile_route(route, secret, keys)
    if problems:
        raise ConfigError(problems)
    return Policy(MappingProxyType(compiled), _version(config, compiled), tuple(missing))


def _read_keys(access: AccessControl | None) -> GatewayKeys | None:
    if access is None:
        return None
    entries = read_keys(access.keys_file)
    return GatewayKeys(access.header, entries, access.for_client_credentials)


def _compile_route(route: Route, secret: Secret | None, keys: GatewayKeys | None) -> CompiledRoute:
    credential = route.credential
    assert credential is not None
    rule = RouteRule(
        credential.header, frozenset(credential.client_credentials), secret is not None, keys
    )
    value = None
    if secret is not None:
        before, after = credential.format.split("{secret}")
        value = Secret(before.encode() + secret.reveal() + after.encode())
    answers: dict[AnswerKey, ext_proc.ProcessingResponse] = {}
    for client in ("", *(keys.names if keys else ())):
        for outcome in (Outcome.CLIENT_AUTHORIZATION, Outcome.CLIENT_API_KEY):
            answers[(outcome, client)] = responses.pass_through(route.name, outcome, client)
        if value is None:
            answers[(Outcome.REJECTED, client)] = _rejection(route, Outcome.REJECTED, client)
        else:
            answers[(Outcome.INJECTED, client)] = responses.inject(
                route.name, credential.header, value.reveal(), client=client
            )
    if keys is not None:
        answers[(Outcome.DENIED, "")] = _rejection(route, Outcome.DENIED, "")
    serialised = {key: answer.SerializeToString() for key, answer in answers.items()}
    return CompiledRoute(route.name, rule, MappingProxyType(serialised), value)


def _rejection(route: Route, outcome: Outcome, client: str) -> ext_proc.ProcessingResponse:
    """The 401 for ``outcome``, telling the client what to send."""
    assert route.credential is not None
    if outcome is Outcome.DENIED:
        assert route.access is not None
        message = f"Missing or invalid gateway key: send yours in the {route.access.header} header."
    else:
        hint = " or ".join(route.credential.client_credentials)
        message = (
            f"No credential: this gateway has no server key for route '{route.name}'. "
            f"Send your own ({hint})."
        )
    return responses.reject(route.name, outcome, route.error_style, message, client)


def _version(config: GatewayConfig, routes: Mapping[str, CompiledRoute]) -> str:
    """Changes when the config, a secret or a keys file changes; reveals nothing about them."""
    digest = hashlib.sha256(config.source_digest.encode())
    for name in sorted(routes):
        route = routes[name]
        digest.update(name.encode() + b"\0")
        value = route.header_value
        digest.update(hashlib.sha256(value.reveal()).digest() if value else b"-")
        for entry, client in route.rule.keys.entries if route.rule.keys else ():
            digest.update(entry + client.encode())
    return digest.hexdigest()[:12]
