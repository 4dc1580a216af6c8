"""People's JWTs checked by Envoy's ``jwt_authn`` filter, before the processor.

One provider per slot a token may arrive in (``Authorization: Bearer``,
``x-api-key``, each route's access header), all for the same issuer, so a
slot holding something else (a subscription user's OAuth token, an own API
key, a gateway key) is never read as a JWT. A rule per set of slots whose
values look like a JWT (three base64url parts) requires exactly those slots'
providers: such a request passes only with valid tokens there (401 otherwise,
in the route's provider shape); a request without one passes untouched to the
gateway-key and client-credential logic. ``forward: false`` removes a verified
token's header, so no token reaches the processor or an upstream; the verified
payload goes into dynamic metadata, which the processor reads.
"""

from __future__ import annotations

from itertools import combinations

from extproc.config import errors
from extproc.config.identity import Sso
from extproc.config.model import STANDARD_SLOTS, ErrorStyle, GatewayConfig
from extproc.render import local_replies as local_reply
from extproc.render import tls
from extproc.render.common import Json, is_ip, seconds, socket_address, typed

FILTER = "envoy.filters.http.jwt_authn"
NAMESPACE = FILTER  # where Envoy puts each verified payload, under its slot's name
JWKS_CLUSTER = "sso_jwks"
_PART = "[A-Za-z0-9_-]+"
_JWT = rf"{_PART}\.{_PART}\.{_PART}"
# Every JWT starts so (base64url of '{"'): a substring test, no RE2.
JWT_START = "eyJ"


def slots(config: GatewayConfig) -> tuple[str, ...]:
    """Every header a person's token may arrive in."""
    access = sorted({r.access.header for r in config.routes if r.access})
    return (*STANDARD_SLOTS, *access)


def provider_name(slot: str) -> str:
    return f"sso_{slot}"


def _provider(sso: Sso, slot: str) -> Json:
    location: Json = {"name": slot}
    if slot == "authorization":
        location["value_prefix"] = "Bearer "
    return {
        "issuer": sso.issuer,
        "audiences": list(sso.audiences),
        "remote_jwks": {
            "http_uri": {"uri": sso.jwks_uri, "cluster": JWKS_CLUSTER, "timeout": "5s"},
            "cache_duration": seconds(sso.cache_s),
            # Keys are fetched when the listener starts, not by the first request.
            "async_fetch": {"failed_refetch_duration": "5s"},
            "retry_policy": {"num_retries": 2},
        },
        "forward": False,
        "from_headers": [location],
        "payload_in_metadata": slot,
        "clock_skew_seconds": sso.clock_skew_s,
        "require_expiration": True,  # a token without exp would be valid for ever
        # No JWT cache: a token signed by a key the provider retired is refused at once.
    }


def _looks_like_jwt(slot: str) -> Json:
    pattern = rf"(?i)bearer\s+{_JWT}" if slot == "authorization" else _JWT
    return {"name": slot, "string_match": {"safe_regex": {"regex": pattern}}}


def _rules(names: tuple[str, ...]) -> list[Json]:
    """For each set of slots holding a JWT, largest first: require those slots' tokens."""
    rules = []
    for size in range(len(names), 0, -1):
        for chosen in combinations(names, size):
            needs = [{"provider_name": provider_name(slot)} for slot in chosen]
            requires = needs[0] if size == 1 else {"requires_all": {"requirements": needs}}
            match = {"prefix": "/", "headers": [_looks_like_jwt(slot) for slot in chosen]}
            rules.append({"match": match, "requires": requires})
    return rules


def http_filter(config: GatewayConfig) -> Json | None:
    """The ``jwt_authn`` filter, or None without an ``sso`` section."""
    sso = config.sso
    if sso is None:
        return None
    names = slots(config)
    providers = {provider_name(slot): _provider(sso, slot) for slot in names}
    return {
        "name": FILTER,
        "typed_config": typed(
            "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            providers=providers,
            rules=_rules(names),
        ),
    }


def jwks_cluster(config: GatewayConfig) -> Json | None:
    """Where Envoy fetches the provider's keys."""
    sso = config.sso
    if sso is None:
        return None
    target = sso.jwks
    cluster: Json = {
        "name": JWKS_CLUSTER,
        "type": "STATIC" if is_ip(target.host) else "LOGICAL_DNS",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": JWKS_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": socket_address(target.host, target.port)}}
                    ]
                }
            ],
        },
    }
    if not is_ip(target.host):
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if target.tls:
        cluster["transport_socket"] = tls.upstream(target, sso.ca_file or config.system_ca_file)
    return cluster


def no_token_matchers(config: GatewayConfig) -> list[Json]:
    """Header matchers that hold when no slot carries a JWT: added to the fast-path copies,
    so a person's request always reaches the processor (which names them)."""
    if config.sso is None:
        return []
    return [
        {
            "name": slot,
            "string_match": {"contains": JWT_START},
            "invert_match": True,
            "treat_missing_header_as_empty": True,
        }
        for slot in slots(config)
    ]


_REFUSED = (
    "Your SSO token was refused (expired, not yet valid, for another issuer or audience, or "
    "not signed by the organisation's provider): get a new one and retry."
)
_DENIED = "response.code_details.startsWith('jwt_authn_access_denied')"


def local_replies(replies: Json, config: GatewayConfig) -> Json:
    """``replies`` with the token refusals (401) first, in the route's provider shape."""
    if config.sso is None:
        return replies
    style_key = f"xds.route_metadata.filter_metadata['{local_reply.ROUTE_NAMESPACE}']"
    openai = f"{style_key}['error_style'] == 'openai'"
    mappers = []
    for style, condition in ((ErrorStyle.OPENAI, f"{openai} && {_DENIED}"), (None, _DENIED)):
        body = errors.error_json(style or ErrorStyle.ANTHROPIC, _REFUSED, errors.AUTHENTICATION)
        mappers.append(
            {
                "filter": cel(condition),
                # Envoy answers a wrong audience with 403: every refused token is a 401, so
                # Claude Code asks its apiKeyHelper for a new one.
                "status_code": 401,
                "body_format_override": {"json_format": body, "content_type": "application/json"},
            }
        )
    return {**replies, "mappers": [*mappers, *replies["mappers"]]}


def cel(expression: str) -> Json:
    config = typed("envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                   expression=expression)  # fmt: skip
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": config,
        }
    }
