"""The ``token`` command: a person's access token from the OpenID provider, for ``apiKeyHelper``.

It uses the client-credentials grant (RFC 6749 4.4) with the resource indicator
(RFC 8707) as the audience, so it runs unattended wherever Claude Code does.
The token is kept in a file (mode 0600) until shortly before it expires, so
Claude Code may call the helper as often as it likes without a round trip to
the provider; after a 401 Claude Code calls it again, and an expired token is
replaced. The client secret is read from a file or an environment variable and
never printed; errors are one line naming the provider's URL and its answer.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from extproc.config.files import FileProblem, read_bounded, write_atomic
from extproc.config.model import is_loopback

_TIMEOUT_S = 10.0
_MAX_REPLY = 1 << 20
# Renewed once less than this share of its lifetime is left (at least a minute, if it
# lives that long), so a token never expires between the helper and the gateway.
_RENEW_SHARE = 0.2
_RENEW_MIN_S = 60


class TokenError(Exception):
    """The token could not be obtained; the message names no secret."""


def register(commands: Any) -> None:
    text = "print an access token from the OpenID provider (for Claude Code's apiKeyHelper)"
    command = commands.add_parser("token", help=text, description=__doc__)
    command.add_argument("--issuer", required=True, help="the provider's issuer URL")
    command.add_argument("--client-id", required=True)
    secret = command.add_mutually_exclusive_group(required=True)
    secret.add_argument("--secret-file", type=Path, help="a file holding the client secret")
    secret.add_argument("--secret-env", help="an environment variable holding the client secret")
    command.add_argument(
        "--audience", required=True, help="the resource (the gateway's sso audience)"
    )
    command.add_argument("--scope", default="", help="scopes to ask for, space separated")
    command.add_argument("--token-url", help="the token endpoint (default: from discovery)")
    command.add_argument("--cache", type=Path, help="the cache file (default: in ~/.cache)")
    command.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    cache = args.cache or _default_cache(args.issuer, args.client_id, args.audience)
    try:
        token = cached(cache, time.time())
        if token is None:
            secret = _secret(args)
            url = args.token_url or _token_endpoint(args.issuer)
            token, expires_at = fetch(url, args.client_id, secret, args.audience, args.scope)
            store(cache, token, expires_at)
    except TokenError as exc:
        print(f"token: {exc}", file=sys.stderr)
        return 1
    print(token)
    return 0


def cached(path: Path, now: float) -> str | None:
    """The cached token while it has enough life left; None otherwise (or no usable file)."""
    try:
        entry = json.loads(path.read_text())
        token, issued, expires = entry["access_token"], entry["issued_at"], entry["expires_at"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    margin = max(_RENEW_MIN_S if expires - issued > 2 * _RENEW_MIN_S else 0,
                 (expires - issued) * _RENEW_SHARE)  # fmt: skip
    return token if isinstance(token, str) and now < expires - margin else None


def store(path: Path, token: str, expires_at: float) -> None:
    """Write the cache atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    entry = {"access_token": token, "issued_at": time.time(), "expires_at": expires_at}
    write_atomic(path, json.dumps(entry), 0o600)


def fetch(url: str, client_id: str, secret: str, audience: str, scope: str) -> tuple[str, float]:
    """A new token by the client-credentials grant, and when it expires."""
    form = {"grant_type": "client_credentials", "resource": audience}
    if scope:
        form["scope"] = scope
    basic = base64.b64encode(
        f"{urllib.parse.quote(client_id)}:{urllib.parse.quote(secret)}".encode()
    ).decode()
    # Never followed by a redirect to another host: urllib keeps ordinary headers on one.
    reply = _json(url, urllib.parse.urlencode(form).encode(), {"Authorization": f"Basic {basic}"})
    token, lifetime = reply.get("access_token"), reply.get("expires_in")
    if not isinstance(token, str) or not token:
        raise TokenError(f"{url} answered without an access_token")
    seconds = lifetime if isinstance(lifetime, int | float) and lifetime > 0 else 300
    return token, time.time() + seconds


def _token_endpoint(issuer: str) -> str:
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    found = _json(url).get("token_endpoint")
    if not isinstance(found, str) or not found.startswith(("https://", "http://")):
        raise TokenError(f"{url} names no token_endpoint")
    return found


def _json(url: str, data: bytes | None = None, private: dict[str, str] | None = None) -> Any:
    """GET (or with ``data``, POST) ``url`` and read its JSON object.

    ``private`` headers go to ``url`` only, never to where it redirects; plain
    http is refused except to a loopback address (the client secret travels).
    """
    _check_url(url)
    request = urllib.request.Request(url, data=data, headers={"accept": "application/json"})  # noqa: S310
    for name, value in (private or {}).items():
        request.add_unredirected_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as reply:  # noqa: S310
            body: Any = json.loads(reply.read(_MAX_REPLY))
    except urllib.error.HTTPError as exc:
        raise TokenError(f"{url}: HTTP {exc.code} {_oauth_error(exc)}") from None
    except (OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else type(exc).__name__
        raise TokenError(f"{url}: {reason}") from None
    if not isinstance(body, dict):
        raise TokenError(f"{url}: not a JSON object")
    return body


def _check_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
        return
    raise TokenError(f"{url}: expected an https URL (http only to a loopback address)")


def _oauth_error(exc: urllib.error.HTTPError) -> str:
    """The provider's ``error`` code (``invalid_client``…): short, and never a secret."""
    try:
        code = json.loads(exc.read(4096)).get("error")
    except (OSError, ValueError, AttributeError):
        return ""
    return str(code)[:64] if isinstance(code, str) else ""


def _secret(args: argparse.Namespace) -> str:
    if args.secret_env:
        value = os.environ.get(args.secret_env, "")
        where = f"environment variable {args.secret_env}"
    else:
        try:
            value = read_bounded(args.secret_file, 64 * 2**10, "client secret file").decode()
        except FileProblem as exc:
            raise TokenError(str(exc)) from None
        except UnicodeDecodeError:
            raise TokenError(f"{args.secret_file}: client secret file is not UTF-8 text") from None
        where = f"file {args.secret_file}"
    if not value.strip():
        raise TokenError(f"no client secret in {where}")
    return value.strip()


def _default_cache(issuer: str, client_id: str, audience: str) -> Path:
    """One file per (issuer, client, audience), named by a digest."""
    key = hashlib.sha256("\0".join((issuer, client_id, audience)).encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "credential-gateway" / f"token-{key}.json"
