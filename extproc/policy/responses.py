"""Build the ext_proc answers; the policy serialises them once per config load.

Header values go in ``raw_value`` only: Envoy sends values there and takes
them from there; a ``value``-only mutation arrives upstream empty and setting
both is an error. Every answer carries dynamic metadata (route, credential
source, outcome, client, teams) for the access log, appended per request.
"""

from __future__ import annotations

import json
from types import MappingProxyType

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.type.v3 import http_status_pb2

from extproc.config import errors
from extproc.config.errors import AUTHENTICATION, RATE_LIMIT, UNAVAILABLE, ErrorKind
from extproc.config.model import METADATA_NAMESPACE, ErrorStyle
from extproc.policy.decision import Outcome
from extproc.policy.limits import Refusal

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _entry(key: str, value: str) -> bytes:
    """One ``Struct.fields`` map entry holding a string ``Value``."""
    return _field(1, _field(1, key.encode()) + _field(2, _field(3, value.encode())))


_NAMESPACE_KEY = _field(1, METADATA_NAMESPACE.encode())
_DYNAMIC_METADATA = ext_proc.ProcessingResponse.DESCRIPTOR.fields_by_name["dynamic_metadata"].number


def metadata_fields(route: str, outcome: Outcome) -> bytes:
    """The access log's fields for ``route`` and ``outcome``, encoded once per config."""
    return (
        _entry("route", route)
        + _entry("credential_source", outcome.credential_source)
        + _entry("outcome", outcome.value)
    )


def _list_entry(key: str, values: tuple[str, ...]) -> bytes:
    """One ``Struct.fields`` map entry holding a ``ListValue`` of strings."""
    items = b"".join(_field(1, _field(3, v.encode())) for v in values)
    return _field(1, _field(1, key.encode()) + _field(2, _field(6, items)))


def with_metadata(body: bytes, fields: bytes, client: str, teams: tuple[str, ...] = ()) -> bytes:
    """``body`` (a serialised ProcessingResponse) plus its dynamic metadata.

    Serialised protobuf messages merge when concatenated, so the per-route
    part of an answer is built once and only the client's name and teams, which
    vary per request, are encoded here: a few short byte joins, nothing per
    client kept in memory. The teams reach the usage record (team budgets).
    """
    if client:
        fields += _entry("client", client)
    if teams:
        fields += _list_entry("teams", teams)
    namespace = _field(1, _NAMESPACE_KEY + _field(2, _field(5, fields)))
    return body + _field(_DYNAMIC_METADATA, namespace)


def pass_through() -> bytes:
    """Leave the request exactly as the client sent it."""
    answer = ext_proc.ProcessingResponse(request_headers=ext_proc.HeadersResponse())
    serialised: bytes = answer.SerializeToString()
    return serialised


def mutate(header: str | None, value: bytes, remove: tuple[str, ...] = ()) -> bytes:
    """Set ``header`` (replacing every copy) unless None, and drop the headers in ``remove``."""
    set_headers = [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=header, raw_value=value), append_action=_OVERWRITE
        )
    ] if header else []  # fmt: skip
    mutation = ext_proc.HeaderMutation(set_headers=set_headers, remove_headers=list(remove))
    answer = ext_proc.ProcessingResponse(
        request_headers=ext_proc.HeadersResponse(
            response=ext_proc.CommonResponse(header_mutation=mutation)
        )
    )
    serialised: bytes = answer.SerializeToString()
    return serialised


def reject(outcome: Outcome, style: ErrorStyle, message: str) -> bytes:
    """A 401 from the gateway itself, in the provider's error shape; no upstream call.

    No headers are set here (the mutation rules allow credential headers only);
    Envoy's local-reply config sends every processor answer's body as JSON.
    """
    answer = ext_proc.ProcessingResponse(
        immediate_response=ext_proc.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.Unauthorized),
            body=error_body(style, message),
            details=f"credential_gateway_{outcome.value}",
        )
    )
    serialised: bytes = answer.SerializeToString()
    return serialised


def error_body(style: ErrorStyle, message: str, kind: ErrorKind = AUTHENTICATION) -> bytes:
    """A JSON error body in the shape the provider's SDKs parse."""
    return json.dumps(errors.error_json(style, message, kind)).encode()


def limited(style: ErrorStyle, refusal: Refusal) -> bytes:
    """429 (or 503 when limits cannot be checked) with ``retry-after``; no upstream call."""
    kind = RATE_LIMIT if refusal.status == 429 else UNAVAILABLE
    retry_after = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key="retry-after", raw_value=str(refusal.retry_after).encode()),
        append_action=_OVERWRITE,
    )
    answer = ext_proc.ProcessingResponse(
        immediate_response=ext_proc.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=refusal.status),
            headers=ext_proc.HeaderMutation(set_headers=[retry_after]),
            body=error_body(style, refusal.message, kind),
            details=f"credential_gateway_limited_{refusal.limit}",
        )
    )
    serialised: bytes = answer.SerializeToString()
    return serialised


def unknown_route() -> bytes:
    """A route name the policy does not know: fail closed with a retryable 503, no upstream call.

    The processor only runs on credential routes, so this means Envoy and the
    processor disagree about the config (e.g. mid-rollout): never guess a key.
    The route (so its provider) is unknown here: the body suits both providers' SDKs.
    """
    message = "The gateway is switching to a new config; retry shortly."
    answer = ext_proc.ProcessingResponse(
        immediate_response=ext_proc.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.ServiceUnavailable),
            body=json.dumps(errors.any_style_json(message, UNAVAILABLE)).encode(),
            details="credential_gateway_unknown_route",
        )
    )
    return with_metadata(answer.SerializeToString(), metadata_fields("", Outcome.UNKNOWN_ROUTE), "")


# Replies for phases this processor never asks for, should Envoy send one anyway.
PHASE_REPLIES = MappingProxyType(
    {
        "response_headers": ext_proc.ProcessingResponse(
            response_headers=ext_proc.HeadersResponse()
        ).SerializeToString(),
        "request_body": ext_proc.ProcessingResponse(
            request_body=ext_proc.BodyResponse()
        ).SerializeToString(),
        "response_body": ext_proc.ProcessingResponse(
            response_body=ext_proc.BodyResponse()
        ).SerializeToString(),
        "request_trailers": ext_proc.ProcessingResponse(
            request_trailers=ext_proc.TrailersResponse()
        ).SerializeToString(),
        "response_trailers": ext_proc.ProcessingResponse(
            response_trailers=ext_proc.TrailersResponse()
        ).SerializeToString(),
    }
)
