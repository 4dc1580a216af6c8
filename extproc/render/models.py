"""Which models a client's teams may use, enforced by Envoy from the request body.

Only with ``sso.models``. After the processor has named the client and its
teams (a gateway key's from the keys file, a person's from the groups claim)
in dynamic metadata, Envoy's ``json_to_metadata`` filter reads the top-level
``model`` of a JSON request body (a real JSON parse: a ``"model"`` inside a
message cannot stand in for it), then an RBAC filter allows the request when
the client is in no team with an allowlist, or one of its teams with an
allowlist names the model. Anything else is a 403 in the route's provider
shape naming the model; GET and HEAD (no body, no model, no spend) always pass.
Python never reads a body. Requests Envoy passes
without asking the processor (a client's own credential on the fast path)
carry no teams, so no allowlist applies to them.

The cost: each JSON request body is buffered in Envoy before it goes upstream
(up to ``BODY_LIMIT_BYTES`` per request, memory held while it arrives), and
parsed once. A body that is not JSON (or not labelled so) has no model: a
client with an allowlist is refused.
"""

from __future__ import annotations

from extproc.config import errors
from extproc.config.errors import ErrorKind
from extproc.config.identity import Sso
from extproc.config.model import METADATA_NAMESPACE, ErrorStyle, GatewayConfig
from extproc.render import jwt
from extproc.render import local_replies as local_reply
from extproc.render.common import Json, typed

_NOT_ALLOWED = ErrorKind("permission_error", "invalid_request_error", "model_not_allowed")
REQUEST_NAMESPACE = "credential_gateway.request"
BODY_LIMIT_BYTES = 16 * 2**20  # Anthropic's own request limit is 32 MB; images are the big ones
_DENIED = "response.code_details.startsWith('rbac_access_denied')"
_MODEL = f"%DYNAMIC_METADATA({REQUEST_NAMESPACE}:model)%"
_MESSAGE = (
    f"The model '{_MODEL}' is not allowed for your teams on this gateway: "
    "ask its operators which models your teams may use."
)


def http_filters(config: GatewayConfig) -> list[Json]:
    """The body reader and the check (placed after the processor), or nothing without
    model allowlists."""
    sso = config.sso
    if sso is None or not sso.models:
        return []
    return [_json_to_metadata(), _rbac(sso)]


def _json_to_metadata() -> Json:
    rule = {
        "selectors": [{"key": "model"}],
        "on_present": {"metadata_namespace": REQUEST_NAMESPACE, "key": "model", "type": "STRING"},
    }
    return {
        "name": "envoy.filters.http.json_to_metadata",
        "typed_config": typed(
            "envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
            request_rules={"rules": [rule]},
        ),
    }


def _in_team(team: str) -> Json:
    """The processor named ``team`` among the client's teams."""
    value = {"list_match": {"one_of": {"string_match": {"exact": team}}}}
    path = [{"key": "teams"}]
    return _dynamic(METADATA_NAMESPACE, path, value)


def _dynamic(namespace: str, path: list[Json], value: Json) -> Json:
    """A match on the request's dynamic metadata (``sourced_metadata``: the plain
    ``metadata`` field is deprecated)."""
    matcher = {"filter": namespace, "path": path, "value": value}
    return {"sourced_metadata": {"metadata_matcher": matcher, "metadata_source": "DYNAMIC"}}


# Requests that carry no body name no model and spend nothing: listing models, Claude Code's
# ``HEAD /api/hello`` at every start. Any other request without a readable model is refused.
_BODYLESS: list[Json] = [
    {"header": {"name": ":method", "string_match": {"exact": method}}} for method in ("GET", "HEAD")
]


def _rbac(sso: Sso) -> Json:
    listed = [_in_team(team) for team, _ in sso.models]
    policies: Json = {
        # Clients in no team with an allowlist (and requests the processor named no one for).
        "unrestricted": {
            "permissions": [{"any": True}],
            "principals": [{"not_id": {"or_ids": {"ids": listed}}}],
        }
    }
    for (team, models), member in zip(sso.models, listed, strict=True):
        allowed = [
            _dynamic(REQUEST_NAMESPACE, [{"key": "model"}], {"string_match": {"exact": model}})
            for model in models
        ]
        allowed += _BODYLESS
        policies[f"team_{team}"] = {
            "permissions": [{"or_rules": {"rules": allowed}}],
            "principals": [member],
        }
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": typed(
            "envoy.extensions.filters.http.rbac.v3.RBAC",
            rules={"action": "ALLOW", "policies": policies},
        ),
    }


def local_replies(replies: Json, config: GatewayConfig) -> Json:
    """``replies`` with the model refusal (403, naming the model) first."""
    sso = config.sso
    if sso is None or not sso.models:
        return replies
    style_key = f"xds.route_metadata.filter_metadata['{local_reply.ROUTE_NAMESPACE}']"
    openai = f"{style_key}['error_style'] == 'openai'"
    mappers = []
    for style, condition in ((ErrorStyle.OPENAI, f"{openai} && {_DENIED}"), (None, _DENIED)):
        body = errors.error_json(style or ErrorStyle.ANTHROPIC, _MESSAGE, _NOT_ALLOWED)
        mappers.append(
            {
                "filter": jwt.cel(condition),
                "body_format_override": {"json_format": body, "content_type": "application/json"},
            }
        )
    return {**replies, "mappers": [*mappers, *replies["mappers"]]}


def buffer_limits(routes: list[Json], config: GatewayConfig) -> None:
    """Let each route buffer a request body up to the limit (the listener's is 32 KiB)."""
    sso = config.sso
    if sso is None or not sso.models:
        return
    for route in routes:
        if "route" in route:
            route["request_body_buffer_limit"] = BODY_LIMIT_BYTES
