"""The ``sso`` section: people from the organisation's OpenID provider.

Envoy validates their JWTs (issuer, audience, signature by the provider's
published keys, expiry within a clock skew); the processor names the client
from one claim and its teams from another. Parsed apart from the rest of the
YAML (like ``limits``). Without a ``jwks_uri`` the provider's discovery
document is read once at load, so a wrong issuer fails the load, not a request.
"""

from __future__ import annotations

import json
import re
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from extproc.config import fields, model
from extproc.config.sections import Problems, Section
from extproc.config.tlsfiles import certificate_problem

SSO = fields.SSO.names
_CLAIM = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,63}$")
_TEAM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")  # as in the keys file
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,79}$")
_AUDIENCE = re.compile(r"^[!-~]{1,200}$")
_DISCOVERY = "/.well-known/openid-configuration"
_DISCOVERY_TIMEOUT_S = 5.0
_MAX_DISCOVERY_BYTES = 1 << 20


@dataclass(frozen=True)
class Sso:
    """How JWTs from one OpenID provider are checked and read."""

    issuer: str
    audiences: tuple[str, ...]
    jwks_uri: str
    jwks: model.Upstream  # where Envoy fetches the keys (its own cluster)
    client_claim: str = "email"
    groups_claim: str = "groups"
    clock_skew_s: int = 60
    cache_s: int = 300  # how long Envoy keeps the keys before fetching them again
    ca_file: Path | None = None  # for an https JWKS; None: the system bundle
    models: tuple[tuple[str, tuple[str, ...]], ...] = ()  # team → the models it may use


def sso(s: Section | None, problems: Problems, base: Path) -> Sso | None:
    """``sso`` as a model; None if absent or invalid (problems say why)."""
    if s is None or not s.ok:
        return None
    issuer = s.text("issuer")
    if issuer and _url(issuer) is None:
        s.error("issuer", "expected an http:// or https:// URL with a host")
        issuer = None
    audiences = _audiences(s)
    claims = [s.text("client_claim", "email"), s.text("groups_claim", "groups")]
    for key, value in zip(("client_claim", "groups_claim"), claims, strict=True):
        if value and not _CLAIM.match(value):
            s.error(key, "expected a claim name (letters, digits, '_', '.', ':', '/', '-')")
            claims = [None, None]
    skew = fields.SSO.integer(s, "clock_skew_s")  # not 0: Envoy reads 0 as its default (60)
    cache = fields.SSO.integer(s, "cache_s")
    ca_file = base / s.raw["ca_file"] if isinstance(s.raw.get("ca_file"), str) else None
    if s.has("ca_file") and ca_file is None:
        s.error("ca_file", "expected a file path")
    elif ca_file is not None and (problem := certificate_problem(ca_file)) is not None:
        s.error("ca_file", problem)  # checked here: ssl would raise for it mid-discovery
        return None
    models = _models(s, problems)
    if None in (issuer, audiences, *claims, skew, cache, models):
        return None
    assert issuer and audiences and claims[0] and claims[1] and models is not None
    jwks_uri = s.text("jwks_uri") if s.has("jwks_uri") else _discover(s, issuer, ca_file)
    jwks = _url(jwks_uri) if jwks_uri else None
    if jwks_uri and jwks is None:
        s.error("jwks_uri", "expected an http:// or https:// URL with a host")
    if jwks is None or jwks_uri is None:
        return None
    return Sso(
        issuer, audiences, jwks_uri, jwks, claims[0], claims[1], skew, cache, ca_file, models
    )


def _audiences(s: Section) -> tuple[str, ...] | None:
    found: list[str] = []
    for path, item in s.items("audiences"):
        if not isinstance(item, str) or not _AUDIENCE.match(item):
            s.problems.add(path, "expected an audience (visible ASCII, at most 200)")
            return None
        found.append(item)
    if not found:
        s.error("audiences" if s.has("audiences") else None, "give at least one audience")
        return None
    return tuple(dict.fromkeys(found))


def _models(s: Section, problems: Problems) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
    """``models: {team: [model, …]}``: a person in a listed team may use only its models."""
    raw = s.raw.get("models", {})
    if not isinstance(raw, dict):
        s.error("models", "expected a mapping of team names to lists of models")
        return None
    out: list[tuple[str, tuple[str, ...]]] = []
    for team, names in raw.items():
        path = (*s.path, "models", team)
        if not isinstance(team, str) or not _TEAM.match(team):
            problems.add(path, "expected a team name as in the keys file")
            return None
        if not isinstance(names, list) or not names:
            problems.add(path, "expected a non-empty list of model names")
            return None
        if not all(isinstance(n, str) and _MODEL.match(n) for n in names):
            problems.add(path, "expected model names (letters, digits, '._:@/-')")
            return None
        out.append((team, tuple(dict.fromkeys(names))))
    return tuple(out)


def _url(text: str) -> model.Upstream | None:
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
        return None
    tls = parts.scheme == "https"
    return model.Upstream(tls, parts.hostname, port or (443 if tls else 80), parts.path or "/")


def _discover(s: Section, issuer: str, ca_file: Path | None) -> str | None:
    """The provider's ``jwks_uri`` from its discovery document (one GET at load)."""
    url = issuer.rstrip("/") + _DISCOVERY
    context = None
    try:
        if ca_file is not None and url.startswith("https:"):
            context = ssl.create_default_context(cafile=str(ca_file))  # SSLError is an OSError
        # The issuer was checked to be http(s) above.
        opened = urllib.request.urlopen(url, timeout=_DISCOVERY_TIMEOUT_S, context=context)  # noqa: S310
        with opened as reply:
            document: Any = json.loads(reply.read(_MAX_DISCOVERY_BYTES))
    except (OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else type(exc).__name__
        s.error("issuer", f"cannot read the discovery document {url} ({reason}); or set jwks_uri")
        return None
    found = document.get("jwks_uri") if isinstance(document, dict) else None
    if not isinstance(found, str) or document.get("issuer") != issuer:
        s.error("issuer", f"{url} names another issuer or no jwks_uri")
        return None
    return found
