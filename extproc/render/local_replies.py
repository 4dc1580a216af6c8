"""Envoy's own answers in the route's provider shape, with a message a person can act on.

Envoy answers some requests itself: the processor is down or too slow, the upstream cannot
be reached, a request is malformed. Left alone it would send its internal details
(``ext_proc_error_gRPC_error_14{…}``) as text. Each mapper here matches one such case with
a CEL expression and writes a fixed message in the route's error shape, read from the route's
metadata (``ROUTE_NAMESPACE``; a reply with no route gets Anthropic's shape). The
processor's own answers (401, 429, the store's 503) and the 404/405 routes already carry
their JSON body: it is sent as it is. Mappers run only for local replies, never per
forwarded request.
"""

from __future__ import annotations

from typing import NamedTuple

from extproc.config import errors
from extproc.config.errors import ErrorKind
from extproc.config.model import ErrorStyle
from extproc.render.common import Json, typed

# Route metadata the mappers read: {"error_style": "openai" | "anthropic"} on every route.
ROUTE_NAMESPACE = "credential_gateway.local_reply"
PROCESSOR_DETAILS = "credential_gateway_"  # the prefix of every processor answer's details
_CEL = "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter"
_STYLE = f"xds.route_metadata.filter_metadata['{ROUTE_NAMESPACE}']['error_style'] == 'openai'"


class Case(NamedTuple):
    condition: str  # CEL over the response
    kind: ErrorKind
    message: str


CASES = (
    Case("response.code_details.startsWith('ext_proc_error')", errors.API_ERROR,
         "The gateway's credential check did not answer (its processor is down or too slow), "
         "so the request was not sent upstream. Try again shortly."),
    Case("response.code == 503", errors.UNAVAILABLE,
         "The gateway could not reach the provider for this route (connection refused or "
         "failed). Try again shortly."),
    Case("response.code == 504", errors.API_ERROR,
         "The provider did not answer within this route's timeout."),
    Case("response.code == 502", errors.API_ERROR,
         "The provider's answer could not be read (it closed the connection or broke the "
         "protocol)."),
    Case("response.code >= 500", errors.API_ERROR,
         "The gateway could not complete this request."),
    Case("response.code == 413", errors.TOO_LARGE, "The request body is too large."),
    Case("response.code == 431", errors.TOO_LARGE, "The request headers are too large."),
    Case("response.code == 408", errors.INVALID, "The request headers did not arrive in time."),
    Case("response.code == 404", errors.NOT_FOUND, "No gateway route matches this request."),
    Case("response.code >= 400", errors.INVALID,
         "The request is malformed (for example a header name with an underscore, or a "
         "header value the gateway refuses)."),
)  # fmt: skip


def _cel(expression: str) -> Json:
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": typed(_CEL, expression=expression),
        }
    }


def _body(style: ErrorStyle, case: Case) -> Json:
    return {
        "json_format": errors.error_json(style, case.message, case.kind),
        "content_type": "application/json",
    }


def config() -> Json:
    """The HCM's ``local_reply_config``: the first mapper that matches writes the body."""
    as_is = {
        "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
        "content_type": "application/json",
    }
    own = (
        f"response.code_details.startsWith('{PROCESSOR_DETAILS}')"
        " || response.code_details == 'direct_response'"
    )
    mappers = [{"filter": _cel(own), "body_format_override": as_is}]
    for style in (ErrorStyle.OPENAI, ErrorStyle.ANTHROPIC):  # Anthropic's is the default
        for case in CASES:
            condition = f"{_STYLE} && ({case.condition})"
            if style is ErrorStyle.ANTHROPIC:
                condition = case.condition
            mappers.append({"filter": _cel(condition), "body_format_override": _body(style, case)})
    return {"mappers": mappers}


def route_metadata(style: ErrorStyle) -> Json:
    """The ``filter_metadata`` entry that tells the mappers a route's error shape."""
    return {ROUTE_NAMESPACE: {"error_style": style.value}}
