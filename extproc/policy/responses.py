"""Build the ext_proc answers; the policy serialises them once per config load.

Header values go in ``raw_value`` only: Envoy sends values there and takes
them from there; a ``value``-only mutation arrives upstream empty and setting
both is an error. Every answer carries dynamic metadata (route, credential
source) for the access log.
"""

from __future__ import annotations

import json
from types import MappingProxyType

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from extproc.config.model import METADATA_NAMESPACE, ErrorStyle
from extproc.policy.decision import Outcome

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _metadata(route: str, outcome: Outcome, client: str) -> struct_pb2.Struct:
    """What the access log shows: the route, who paid, and the gateway key's client name."""
    fields = {
        "route": route,
        "credential_source": outcome.credential_source,
        "outcome": outcome.value,
    }
    if client:
        fields["client"] = client
    meta = struct_pb2.Struct()
    meta.update({METADATA_NAMESPACE: fields})
    return meta


def pass_through(route: str, outcome: Outcome, client: str = "") -> ext_proc.ProcessingResponse:
    """Leave the request exactly as the client sent it."""
    return ext_proc.ProcessingResponse(
        request_headers=ext_proc.HeadersResponse(),
        dynamic_metadata=_metadata(route, outcome, client),
    )


def inject(
    route: str, header: str, value: bytes, remove: tuple[str, ...] = (), client: str = ""
) -> ext_proc.ProcessingResponse:
    """Set ``header`` (replacing every copy) and drop the blank headers in ``remove``."""
    mutation = ext_proc.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=header, raw_value=value), append_action=_OVERWRITE
            )
        ],
        remove_headers=list(remove),
    )
    return ext_proc.ProcessingResponse(
        request_headers=ext_proc.HeadersResponse(
            response=ext_proc.CommonResponse(header_mutation=mutation)
        ),
        dynamic_metadata=_metadata(route, Outcome.INJECTED, client),
    )


def reject(
    route: str, outcome: Outcome, style: ErrorStyle, message: str, client: str = ""
) -> ext_proc.ProcessingResponse:
    """A 401 from the gateway itself, in the provider's error shape; no upstream call.

    No headers are set here (the mutation rules allow credential headers only);
    Envoy's local-reply config marks 401 bodies as JSON.
    """
    return ext_proc.ProcessingResponse(
        immediate_response=ext_proc.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.Unauthorized),
            body=error_body(style, message),
            details=f"credential_gateway_{outcome.value}",
        ),
        dynamic_metadata=_metadata(route, outcome, client),
    )


def error_body(style: ErrorStyle, message: str, kind: str = "authentication_error") -> bytes:
    """A JSON error body in the shape the provider's SDKs parse."""
    if style is ErrorStyle.OPENAI:
        body: dict[str, object] = {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
    else:
        body = {"type": "error", "error": {"type": kind, "message": message}}
    return json.dumps(body).encode()


def unknown_route() -> ext_proc.ProcessingResponse:
    """A route name the policy does not know: fail closed with a retryable 503, no upstream call.

    The processor only runs on credential routes, so this means Envoy and the
    processor disagree about the config (e.g. mid-rollout): never guess a key.
    Envoy's local-reply config gives the body its JSON shape.
    """
    return ext_proc.ProcessingResponse(
        immediate_response=ext_proc.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.ServiceUnavailable),
            details="credential_gateway_unknown_route",
        ),
        dynamic_metadata=_metadata("", Outcome.UNKNOWN_ROUTE, ""),
    )


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
